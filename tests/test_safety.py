"""Safety checks: the prompt check's chat and next-token logits against transformers' Qwen3ForCausalLM, the image
check against transformers' ViTForImageClassification with its own image processor, loading and bad files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.models.text_encoder import Qwen3Params
from klein_nodes.testing import TINY_QWEN3, qwen3_config, write_text_encoder, write_tokenizer, write_tiny_vit

transformers = pytest.importorskip("transformers")
CHAT_QWEN3 = Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28})
PROMPTS = ["a cat asleep on a sofa", "the dog in the park, oil painting"]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    path, state = write_text_encoder(folder / "qwen_3_4b.safetensors", CHAT_QWEN3, dtype=torch.float32)
    return path, state, write_tokenizer(folder / "tokenizer")


def reference_lm(state):
    config = transformers.Qwen3Config(**{k: v for k, v in qwen3_config(CHAT_QWEN3).items() if k != "architectures"})
    model = transformers.Qwen3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied to the embeddings, as in Qwen3-4B
    return model


def test_prompt_check_reads_qwen3s_own_chat_and_next_token_logits(chat_files):
    path, state, tokenizer = chat_files
    checker = kn.load_prompt_safety(path, tokenizer=tokenizer, dtype=torch.float32)
    assert len(checker.model.layers) == 28 and checker.model.params.lm_head == "tied"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer))
    reference = reference_lm(state)
    for prompt in PROMPTS:
        question = checker.question.format(categories="\n".join(
            f"- {k.replace('_', ' ')}: {v}" for k, v in checker.policy.items()), prompt=prompt)
        expected_ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                                        add_generation_prompt=True, enable_thinking=False)
        expected_ids = getattr(expected_ids, "input_ids", expected_ids)
        ids, mask = checker.token_ids([prompt])
        assert ids[0].tolist() == list(expected_ids)  # the exact chat Qwen3's own template builds
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        ours = checker.model.next_token_logits(ids, mask)
        assert (ours - expected).abs().max() <= 1e-4
        rows = checker.yes + checker.no
        assert (checker.model.next_token_logits(ids, mask, rows) - expected[:, rows]).abs().max() <= 1e-4
        (score,) = checker([prompt])
        assert score == pytest.approx(float(torch.softmax(expected[0, rows], -1)[: len(checker.yes)].sum()), abs=1e-5)


def test_prompt_check_shares_a_loaded_text_encoder_and_takes_gguf(chat_files, tmp_path):
    from klein_nodes.loaders.convert import quantize_file

    path, _, tokenizer = chat_files
    direct = kn.load_prompt_safety(path, tokenizer=tokenizer, dtype=torch.float32)
    encoder = kn.load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32)  # klein's 27 layers
    shared = kn.load_prompt_safety(encoder)
    assert shared.model.layers[0] is encoder.model.layers[0] and len(shared.model.layers) == 28
    assert shared(PROMPTS) == pytest.approx(direct(PROMPTS), abs=1e-6)
    gguf = quantize_file(path, tmp_path / "qwen-Q8_0.gguf", "Q8_0", tokenizer)[0]
    quantized = kn.load_prompt_safety(gguf, dtype=torch.float32)
    assert quantized(PROMPTS) == pytest.approx(direct(PROMPTS), abs=0.05)
    fp8 = quantize_file(path, tmp_path / "qwen-fp8.safetensors", "fp8")[0]
    scaled = kn.load_prompt_safety(fp8, tokenizer=tokenizer, dtype=torch.float32)
    assert type(scaled.model.layers[27].mlp.down_proj).__name__ != "Linear"  # the last layers stay fp8 too
    assert scaled(PROMPTS) == pytest.approx(direct(PROMPTS), abs=0.05)
    custom = kn.load_prompt_safety(path, tokenizer=tokenizer, policy={"dogs": "any dog"}, dtype=torch.float32)
    assert "- dogs: any dog" in custom.chat("a dog") and "minor" not in custom.chat("a dog")


def test_prompt_check_refuses_files_without_the_chat_model(chat_files, tmp_path):
    path, state, tokenizer = chat_files
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, str(tmp_path / "encoder_only.safetensors"))
    with pytest.raises(kn.CheckpointError, match="holds no final norm"):
        kn.load_prompt_safety(tmp_path / "encoder_only.safetensors", tokenizer=tokenizer)
    from klein_nodes.testing import write_transformer

    transformer, _ = write_transformer(tmp_path / "klein.safetensors")
    with pytest.raises(kn.WrongModelError, match="not a Qwen3 text encoder"):
        kn.load_prompt_safety(transformer, tokenizer=tokenizer)
    with pytest.raises(kn.KleinError, match="non-empty"):
        kn.load_prompt_safety(path, tokenizer=tokenizer, policy={})


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return write_tiny_vit(tmp_path_factory.mktemp("safety") / "nsfw_image_detection")


def test_image_check_matches_transformers_vit_with_its_image_processor(vit_folder):
    checker = kn.load_image_safety(vit_folder)
    processor = transformers.AutoImageProcessor.from_pretrained(str(vit_folder))
    model = transformers.ViTForImageClassification.from_pretrained(str(vit_folder)).eval()
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 48), (40, 90), (32, 32))]
    for picture in pictures:
        with torch.no_grad():
            inputs = processor(images=Image.fromarray(picture), return_tensors="pt")
            expected = torch.softmax(model(**inputs).logits, -1)[0, 1].item()
            assert (checker.pixels(Image.fromarray(picture)) - inputs["pixel_values"]).abs().max() <= 1e-5
        comfy_image = torch.from_numpy(picture[None].astype(np.float32) / 255)  # ComfyUI's IMAGE of the same pixels
        assert checker.classify(comfy_image)[0] == pytest.approx(expected, abs=1e-4)
        assert checker.classify(Image.fromarray(picture))[0] == pytest.approx(expected, abs=1e-4)


def test_image_check_refuses_other_models_and_broken_folders(vit_folder, tmp_path):
    with pytest.raises(kn.CheckpointError, match="a folder with config.json and model.safetensors"):
        kn.load_image_safety(tmp_path)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    (clip / "model.safetensors").write_bytes((vit_folder / "model.safetensors").read_bytes())
    with pytest.raises(kn.WrongModelError, match="holds clip .*not a ViT image classifier"):
        kn.load_image_safety(clip)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((vit_folder / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    (wrong / "model.safetensors").write_bytes((vit_folder / "model.safetensors").read_bytes())
    with pytest.raises(kn.CheckpointError, match="does not match a ViT image classifier"):
        kn.load_image_safety(wrong)
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    (lying / "model.safetensors").write_bytes((vit_folder / "model.safetensors").read_bytes())
    with pytest.raises(kn.CheckpointError, match="num_hidden_layers=1000000000 is not a number from 1 to 128"):
        kn.load_image_safety(lying)
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "config.json").write_text(json.dumps({**config, "id2label": {"0": "cat", "1": "dog"}}))
    (labels / "model.safetensors").write_bytes((vit_folder / "model.safetensors").read_bytes())
    with pytest.raises(kn.KleinError, match="none of the classifier's labels \\(cat, dog\\) reads as unsafe"):
        kn.load_image_safety(labels)
    assert kn.load_image_safety(labels, unsafe_labels=[1]).unsafe == [1]


def test_prompt_check_node_blocks_or_reports(chat_files):
    from klein_nodes.nodes.safety import RESULTS, KleinPromptCheck

    path, _, tokenizer = chat_files
    encoder = kn.load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32)
    (score,) = kn.load_prompt_safety(path, tokenizer=tokenizer, dtype=torch.float32)([PROMPTS[0]])
    node = KleinPromptCheck()
    below, above = max(0.01, score - 0.05), min(0.99, score + 0.05)
    with pytest.raises(kn.KleinError, match="the prompt was flagged .*the run stops here"):
        node.check(encoder, PROMPTS[0], threshold=below, unique_id="7")
    flagged = node.check(encoder, PROMPTS[0], threshold=below, block=False, unique_id="7")
    assert flagged["result"] == (PROMPTS[0], False, pytest.approx(score, abs=1e-5))
    assert flagged["ui"]["text"] == [f"prompt check: P(unsafe) {score:.3f} (flagged at {below})"]
    passed = node.check(encoder, PROMPTS[0], threshold=above, policy="dogs: any dog\nknives: any knife",
                        unique_id="7")
    assert passed["result"][1] is True and RESULTS["7"]["policy"] == ["dogs", "knives"]
    assert PROMPTS[0] not in json.dumps(RESULTS["7"])  # the record never holds the prompt
    with pytest.raises(kn.KleinError, match="is not 'name: what is not allowed'"):
        node.check(encoder, PROMPTS[0], policy="no colon here")


def test_image_check_node_replaces_flagged_images_and_the_save_records_it(comfyui, vit_folder, tmp_path):
    import shutil

    from klein_nodes.nodes import NODE_CLASS_MAPPINGS
    from klein_nodes.provenance.save import verify_image

    shutil.copytree(vit_folder, comfyui / "safety" / "nsfw_image_detection")
    check, save = NODE_CLASS_MAPPINGS["KleinImageCheck"], NODE_CLASS_MAPPINGS["KleinSave"]
    assert check.INPUT_TYPES()["required"]["classifier"][0] == ["nsfw_image_detection"]
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    scores = kn.load_image_safety(vit_folder).classify(images)
    kept = check().check(images, "nsfw_image_detection", threshold=0.99, unique_id="1")
    assert torch.equal(kept["result"][0], images) and kept["result"][1] is True
    cut = min(scores) - 1e-3 if min(scores) > 0.02 else 0.01
    flagged = check().check(images, "nsfw_image_detection", threshold=max(cut, 0.01), unique_id="1")
    out, passed, top = flagged["result"]
    assert passed is False and top == pytest.approx(max(scores)) and bool((out == 0.5).all())
    assert (flagged["ui"]["text"][0].startswith("image 1: P(unsafe) ")
            and "flagged, replaced" in flagged["ui"]["text"][0])
    graph = {"1": {"class_type": "KleinImageCheck", "inputs": {"images": ["5", 0]}},
             "2": {"class_type": "KleinSave", "inputs": {"images": ["1", 0]}},
             "5": {"class_type": "KleinVAEDecode", "inputs": {"prompt_text": "secret words"}}}
    saved = save().save(out, "checked/klein", "png", 80, False, False, True, prompt=graph, unique_id="2")
    path = comfyui.parent / "output" / "checked" / saved["ui"]["images"][0]["filename"]
    record = verify_image(path)["safety"]
    assert record == [{"check": "image", "classifier": "nsfw_image_detection", "threshold": max(cut, 0.01),
                       "scores": [round(s, 4) for s in scores], "passed": False, "replaced": True}]


def test_generate_command_checks_prompt_and_images(tmp_path, vit_folder, capsys, monkeypatch):
    from klein_nodes.cli import main
    from klein_nodes.provenance.save import verify_image
    from klein_nodes.testing import write_tiny_model_set

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    write_tiny_model_set(tmp_path / "ComfyUI")
    base = ["generate", "a cat", "--comfyui", str(tmp_path / "ComfyUI"), "--width", "64", "--height", "64",
            "--steps", "1", "--no-c2pa", "--seed", "3"]
    assert main(base + ["-o", str(tmp_path / "a.png"), "--safety", "image"]) == 2
    assert "--safety image needs --image-classifier" in capsys.readouterr().err
    loaded = []
    monkeypatch.setattr("klein_nodes.loaders.transformer.load_transformer", lambda *a, **k: loaded.append(a))
    assert main(base + ["-o", str(tmp_path / "b.png"), "--safety", "prompt", "--prompt-threshold", "0.01"]) == 3
    err = capsys.readouterr().err
    assert "blocked: the prompt was flagged by the prompt check" in err and loaded == []  # stopped before loading
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    both = base + ["--safety", "prompt,image", "--image-classifier", str(vit_folder), "--prompt-threshold", "0.99"]
    assert main(both + ["-o", str(tmp_path / "c.png"), "--image-threshold", "0.99"]) == 0
    record = verify_image(tmp_path / "c.png")["safety"]
    assert [r["check"] for r in record] == ["prompt", "image"] and all(r["passed"] for r in record)
    assert "a cat" not in json.dumps(record)
    assert main(both + ["-o", str(tmp_path / "d.png"), "--image-threshold", "0.01"]) == 3
    assert "d.png not saved: flagged by the image check" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_generate_node_gates_prompt_and_images(comfyui, chat_files, vit_folder, tmp_path):
    import shutil

    from klein_nodes.nodes.safety import RESULTS
    from klein_nodes.nodes.sampling import KleinGenerate
    from klein_nodes.testing import write_transformer, write_vae

    shutil.copytree(vit_folder, comfyui / "safety" / "nsfw")
    path, _, tokenizer = chat_files
    encoder = kn.load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32)
    model = kn.load_transformer(write_transformer(tmp_path / "t.safetensors", dtype=torch.float32)[0])
    vae = kn.load_vae(write_vae(tmp_path / "vae.safetensors"))
    args = dict(prompt="a cat", width=64, height=64, steps=1, seed=1)
    assert "safety" in KleinGenerate.INPUT_TYPES()["optional"]
    assert KleinGenerate.INPUT_TYPES()["optional"]["image_classifier"][0] == ["none", "nsfw"]
    with pytest.raises(kn.KleinError, match="the prompt was flagged by the prompt check"):
        KleinGenerate().generate(model, encoder, vae, safety="prompt", prompt_threshold=0.01, unique_id="4", **args)
    assert RESULTS["4"][0]["check"] == "prompt" and RESULTS["4"][0]["passed"] is False
    with pytest.raises(kn.KleinError, match="needs an image classifier"):
        KleinGenerate().generate(model, encoder, vae, safety="image", unique_id="4", **args)
    out = KleinGenerate().generate(model, encoder, vae, safety="prompt+image", image_classifier="nsfw",
                                   prompt_threshold=0.99, image_threshold=0.01, unique_id="4", **args)
    (images,) = out["result"]
    assert bool((images == 0.5).all()) and out["ui"]["text"][0].startswith("image check: image 1: P(unsafe)")
    assert [r["check"] for r in RESULTS["4"]] == ["prompt", "image"] and RESULTS["4"][1]["replaced"] is True
