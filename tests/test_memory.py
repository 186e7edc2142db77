"""The memory planner's decisions (fake budgets) and block streaming's numerical identity."""

import sys
from pathlib import Path

import pytest
import torch

from klein_nodes.models.transformer import Flux2
from klein_nodes.sampling.memory import module_bytes, plan, transformer_activation_bytes
from klein_nodes.sampling.streaming import BlockStreamer
from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict
from helpers import sample_forward

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
BLOCKS = [0.25 * GIB] * 25  # klein 4B bf16: 5 double (0.49 GB) + 20 single (0.25 GB) blocks, simplified


def klein_plan(free, device="cuda", transformer=7.75 * GIB, activations=1.2 * GIB, decode=3.0 * GIB):
    return plan(free * GIB, 5.8 * GIB, transformer, BLOCKS if transformer > 3 * GIB else [0.09 * GIB] * 25,
                0.17 * GIB, activations, decode, tile_decode_bytes=0.9 * GIB, offloads=device == "cuda",
                text_block_bytes=[0.19 * GIB] * 27)


def test_everything_resident_on_a_big_card():
    decision = klein_plan(80)
    assert (decision.text_encoder, decision.transformer, decision.vae, decision.vae_tiled) == (
        "resident", "resident", "resident", False)


def test_one_component_at_a_time_on_a_mid_card():
    decision = klein_plan(12)
    assert (decision.text_encoder, decision.transformer, decision.vae) == ("offload", "offload", "offload")
    assert not decision.vae_tiled and "one component at a time" in decision.describe()


def test_streaming_on_an_8gb_card_with_bf16_weights():
    decision = klein_plan(7.5)
    assert decision.transformer == "stream" and 0 < decision.resident_blocks < len(BLOCKS)
    assert "streams" in decision.describe()
    more = klein_plan(7.9)
    assert more.resident_blocks >= decision.resident_blocks  # more memory, more blocks stay


def test_quantized_transformer_fits_an_8gb_card_without_streaming():
    decision = klein_plan(7.5, transformer=2.3 * GIB)  # Q4_K
    assert decision.transformer == "offload"


def test_tiled_vae_when_decode_does_not_fit():
    assert klein_plan(4, transformer=2.3 * GIB, activations=0.5 * GIB, decode=4.5 * GIB).vae_tiled
    assert not klein_plan(12).vae_tiled


def test_impossible_budget_explains():
    with pytest.raises(MemoryError, match="transformer cannot run in 1.0 GiB .* lower the resolution or use a "
                                          "smaller quantization"):
        klein_plan(1.0)
    with pytest.raises(MemoryError, match="VAE cannot decode in 2.0 GiB even in tiles"):
        plan(2 * GIB, GIB, 0.5 * GIB, [0.02 * GIB] * 25, 0.17 * GIB, 0.1 * GIB, 4.5 * GIB, tile_decode_bytes=2 * GIB)


def test_cpu_never_streams_and_tiles_only_when_ram_is_short():
    assert klein_plan(64, device="cpu").describe().startswith("text encoder resident, transformer resident")
    assert klein_plan(2, device="cpu", decode=3 * GIB).vae_tiled


def test_on_the_cpu_each_models_pages_go_back_after_its_turn():
    decision = plan(64 * GIB, 5.8 * GIB, 7.75 * GIB, BLOCKS, 0.17 * GIB, 1.2 * GIB, 1.0 * GIB, offloads=False,
                    releases=True, text_block_bytes=[0.19 * GIB] * 27)
    assert (decision.text_encoder, decision.transformer, decision.vae) == ("paged", "paged", "resident")
    # one block at a time: the transformer's non-block weights, one block and its activations
    assert decision.peak == pytest.approx(0.17 * GIB + (7.75 - 25 * 0.25 + 0.25) * GIB + 1.2 * GIB)
    assert "each block's pages handed back as it finishes" in decision.describe()


def test_activation_estimate_grows_with_tokens_and_cfg():
    small = transformer_activation_bytes(TINY_TRANSFORMER, 1024)
    assert transformer_activation_bytes(TINY_TRANSFORMER, 4096) > small
    assert transformer_activation_bytes(TINY_TRANSFORMER, 1024, cfg=True) == 2 * small


def model():
    with torch.device("meta"):
        module = Flux2(TINY_TRANSFORMER)
    module.load_state_dict(transformer_state_dict(TINY_TRANSFORMER, seed=2), assign=True)
    return module.eval()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("resident", [0, 1, 3])
def test_streaming_is_numerically_identical(device, resident):
    reference = model().to(device)
    expected = [sample_forward(reference, seed=s).cpu() for s in range(2)]  # two "steps"
    streamed = model()
    weights_before = {n: p.data_ptr() for n, p in streamed.named_parameters()}
    with BlockStreamer(streamed, device, resident_blocks=resident):
        got = [sample_forward(streamed, seed=s).cpu() for s in range(2)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    if device == "cpu":
        assert {n: p.data_ptr() for n, p in streamed.named_parameters()} == weights_before  # restored in place
    assert module_bytes(streamed) == module_bytes(reference)


def test_prefetch_order_follows_the_blocks_and_wraps_between_steps(monkeypatch):
    order = []
    original = BlockStreamer.prefetch
    monkeypatch.setattr(BlockStreamer, "prefetch", lambda self, index: order.append(index % len(self.streamed))
                        or original(self, index))
    streamed = model()  # 2 double + 2 single blocks; 1 resident -> 3 streamed
    with BlockStreamer(streamed, "cpu", resident_blocks=1) as running:
        for step in range(2):
            sample_forward(running, seed=step)
    # enter: 0; each block: arrive (already in flight: the same index again) then leave -> the next one
    assert [i for n, i in enumerate(order) if n == 0 or order[n - 1] != i] == [0, 1, 2, 0, 1, 2, 0]


def test_text_encoder_streams_where_it_does_not_fit_alone():
    decision = klein_plan(5.4)  # a 6 GB card: the bf16 Qwen3-4B (5.8 GiB) cannot load whole
    assert decision.text_encoder == "stream" and 0 < decision.text_resident_blocks < 27
    assert "text encoder streams" in decision.describe() and "layers resident" in decision.describe()


@pytest.mark.parametrize("free", [80, 24, 12, 7.5, 5.4, 4])
def test_the_predicted_peak_stays_within_the_budget(free):
    decision = klein_plan(free)
    assert decision.peak <= 0.9 * free * GIB
    assert f"peak {decision.peak / GIB:.1f} GiB" in decision.describe()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import klein_nodes as kn
    from klein_nodes.testing import write_tiny_model_set

    transformer, text_encoder, vae = write_tiny_model_set(tmp_path_factory.mktemp("stand-in"), seed=3)
    tokenizer = transformer.parents[2] / "comfy" / "text_encoders" / "qwen25_tokenizer"
    return (kn.load_transformer(transformer), kn.load_text_encoder(text_encoder, tokenizer=tokenizer),
            kn.load_vae(vae))


@pytest.mark.parametrize("streams", ["transformer", "text_encoder"])
def test_streaming_on_the_cpu_standing_in_for_a_small_card_gives_the_resident_image(tiny_models, streams):
    """The planner's streaming path, run for real with the CPU as the device and a budget in place of its free
    memory: the blocks move in and out as on a GPU (copied for each forward), and the image is the resident run's,
    bit for bit."""
    import klein_nodes as kn
    from klein_nodes.sampling.memory import plan_models

    transformer, text_encoder, vae = tiny_models
    args = dict(prompt="a lighthouse at dusk", width=64, height=64, steps=2, seed=7)
    if streams == "transformer":  # the tiny encoder's 151k-token embedding and the VAE's decode outweigh the
        args.update(prompt_embeds=text_encoder.encode(args.pop("prompt")), output_type="latent")  # transformer
        text_encoder = vae = None
    resident = kn.KleinPipeline(transformer, text_encoder, vae, device="cpu")(**args)
    text_model = text_encoder.model if text_encoder else None
    plans = ((b, try_plan(plan_models, b, transformer, text_model, vae)) for b in range(2**16, 2**28, 2**14))
    budget = next((b for b, p in plans if p is not None and getattr(p, streams) == "stream"), None)
    assert budget, f"no budget makes the {streams} stream"
    streamed = kn.KleinPipeline(transformer, text_encoder, vae, device="cpu", memory_budget=budget)
    if text_encoder:
        text_encoder._cache.clear()  # encode the prompt again, streaming
    moved = []
    original = BlockStreamer.prefetch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BlockStreamer, "prefetch", lambda self, index: moved.append(type(self.model).__name__)
                      or original(self, index))
        image = streamed(**args)
    assert getattr(streamed.plan, streams) == "stream", streamed.plan.describe()
    assert {"transformer": "Flux2", "text_encoder": "Qwen3"}[streams] in moved  # streamed for real
    assert streamed.plan.peak <= 0.9 * budget
    assert torch.equal(image, resident)


def try_plan(plan_models, budget, transformer, text_encoder, vae):
    try:
        return plan_models(budget, transformer, text_encoder, vae, 4, 4)
    except MemoryError:
        return None


def test_per_card_table_in_the_docs_is_the_planners_and_every_peak_fits():
    """docs/engine.md's table comes from tools/memory_table.py: real-width models of each format on the meta
    device, planned for 6-24 GB cards at 1024² and 2048²."""
    sys.path.insert(0, str(ROOT / "tools"))
    import memory_table

    rows = memory_table.plans()
    assert memory_table.within_budget(rows) == []
    assert memory_table.main(["--check", str(ROOT / "docs" / "engine.md")]) == 0
    by_key = {(card, name): by_size for card, name, _, by_size in rows}
    assert by_key[6, "bf16"][1024].text_encoder == "stream"  # a bf16 Qwen3-4B cannot load whole on 6 GB
    assert by_key[8, "bf16"][1024].transformer == "stream"
    assert by_key[8, "GGUF Q4_K"][1024].transformer == "resident"
    assert all(not isinstance(d, str) for by_size in by_key.values() for d in by_size.values())  # all fit
