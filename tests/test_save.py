"""Watermark & save: naming, metadata, C2PA signing and verification, failure handling, never overwriting."""

import io
import json
import os
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

import klein_nodes as kn
from klein_nodes.provenance import c2pa_sign, metadata, watermark
from klein_nodes.provenance.save import save_image_records

c2pa = pytest.importorskip("c2pa")
PROMPT = {"3": {"class_type": "KleinSampler", "inputs": {"seed": 42}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KleinSampler"}], "links": []}


def pictures(batch=2, size=(320, 384), seed=0):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((batch, 3, 10, 12)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic").clamp(0, 1).permute(0, 2, 3, 1)


@pytest.fixture()
def credentials(tmp_path):
    return tmp_path / "credentials"


@pytest.mark.parametrize("fmt,extension", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_saved_files_are_signed_watermarked_and_carry_the_workflow(tmp_path, credentials, fmt, extension):
    paths = kn.save_images(pictures(), tmp_path / "out", prefix="portraits/klein", format=fmt, quality=95,
                           prompt=PROMPT, workflow=WORKFLOW, credentials=credentials)
    assert [p.name for p in paths] == [f"klein_00001_.{extension}", f"klein_00002_.{extension}"]
    assert all(p.parent == tmp_path / "out" / "portraits" for p in paths)
    root = (credentials / "root.pem").read_bytes()
    for path in paths:
        report = kn.verify_image(path, trust_anchor=root)
        assert report["c2pa"] == "Trusted" and report["c2pa_codes"] == []
        assert report["workflow"] and report["prompt"]
        assert json.loads(metadata.read_workflow(path)[1]) == WORKFLOW
        assert report["watermark_detected"]
        untrusted = c2pa_sign.verify(path)
        assert untrusted["state"] == "Valid" and untrusted["codes"] == ["signingCredential.untrusted"]
        assert untrusted["manifest"]["assertions"][0]["data"]["actions"][0]["digitalSourceType"].endswith(
            "trainedAlgorithmicMedia")
        assert "prompt" not in json.dumps(untrusted["manifest"])  # the manifest keeps the workflow private


def test_metadata_written_before_signing_and_any_later_change_is_detected(tmp_path, credentials):
    (path,) = kn.save_images(pictures(1), tmp_path, credentials=credentials, prompt=PROMPT)
    data = path.read_bytes()
    assert b'"seed": 42' in data
    path.write_bytes(data.replace(b'"seed": 42', b'"seed": 43'))  # edit the embedded prompt after signing
    report = kn.verify_image(path, trust_anchor=(credentials / "root.pem").read_bytes())
    assert report["c2pa"] == "Invalid" and "assertion.dataHash.mismatch" in report["c2pa_codes"]
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    assert kn.verify_image(truncated)["watermark_bits"] is None


def test_counter_continues_across_formats_and_never_overwrites(tmp_path, credentials):
    (tmp_path / "klein_00007_.webp").write_bytes(b"someone else's file")
    (first,) = kn.save_images(pictures(1), tmp_path, format="png", credentials=credentials)
    assert first.name == "klein_00008_.png"
    assert (tmp_path / "klein_00007_.webp").read_bytes() == b"someone else's file"
    (second,) = kn.save_images(pictures(1), tmp_path, format="jpeg", credentials=credentials)
    assert second.name == "klein_00009_.jpg"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_path_traversal_and_bad_options_are_refused(tmp_path):
    for prefix in ("../escape", "/etc/klein", "a/../../b"):
        with pytest.raises(kn.KleinError, match="outside the output folder"):
            kn.save_images(pictures(1), tmp_path / "out", prefix=prefix, c2pa=False)
    with pytest.raises(kn.KleinError, match="quality must be a number from 1 to 100, got 0"):
        kn.save_images(pictures(1), tmp_path, quality=0, c2pa=False)
    with pytest.raises(kn.KleinError, match="format 'gif'"):
        kn.save_images(pictures(1), tmp_path, format="gif", c2pa=False)


def test_without_c2pa_nothing_is_written_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa now fails
    with pytest.raises(kn.KleinError, match="C2PA signing is not available"):
        kn.save_images(pictures(1), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    (path,) = kn.save_images(pictures(1), tmp_path / "out", allow_unsigned=True)
    assert path.exists()


def test_signing_failure_writes_nothing(tmp_path, credentials, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the certificate is invalid")
    monkeypatch.setattr(c2pa_sign, "sign", broken)
    with pytest.raises(kn.KleinError, match="signing failed .the certificate is invalid.; nothing was written"):
        kn.save_images(pictures(1), tmp_path / "out", credentials=credentials)
    assert not list((tmp_path / "out").glob("*.png"))
    (record,) = save_image_records(pictures(1), tmp_path / "out", credentials=credentials, allow_unsigned=True)
    assert not record.signed and "saved unsigned" in record.notes[0]


def test_disable_metadata_and_small_images(tmp_path, credentials):
    (record,) = save_image_records(pictures(1, size=(128, 160)), tmp_path, prompt=PROMPT, workflow=WORKFLOW,
                                   credentials=credentials, metadata_enabled=False)
    assert metadata.read_workflow(record.path) == (None, None)
    assert record.watermark_bits is None and "watermark skipped" in record.notes[0]
    assert kn.verify_image(record.path)["watermark_bits"] is None


def test_lossy_format_reports_a_lost_watermark(tmp_path, credentials):
    (record,) = save_image_records(pictures(1, size=(512, 512)), tmp_path, format="webp", quality=60,
                                   credentials=credentials, watermark_mode="standard")  # BFL's embedding: lost by WebP
    assert record.watermark_bits < watermark.DETECTED_AT and "will not be detected" in record.notes[0]


def test_user_credentials_and_private_key_permissions(tmp_path):
    folder = c2pa_sign.create_credentials(tmp_path / "mine")
    assert (folder / "signer.key").stat().st_mode & 0o077 == 0
    own = {"chain": folder / "chain.pem", "key": folder / "signer.key"}
    (path,) = kn.save_images(pictures(1), tmp_path / "out", credentials=own)
    assert c2pa_sign.verify(path, (folder / "root.pem").read_bytes())["state"] == "Trusted"
    with pytest.raises(kn.KleinError, match="readable 'chain' and 'key'"):
        kn.save_images(pictures(1), tmp_path / "out", credentials={"chain": tmp_path / "missing.pem"})


def test_unsigned_file_verifies_as_none(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(np.zeros((300, 300, 3), dtype=np.uint8)).save(path)
    report = kn.verify_image(path)
    assert report["c2pa"] == "None" and not report["workflow"] and not report["watermark_detected"]


def test_save_and_verify_nodes(comfyui, monkeypatch):
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    save, verify = NODE_CLASS_MAPPINGS["KleinSave"], NODE_CLASS_MAPPINGS["KleinVerify"]
    assert all("tooltip" in options for _, options in save.INPUT_TYPES()["required"].values())
    out = save().save(pictures(1), "batch/klein", "png", 80, True, True, False, prompt=PROMPT,
                      extra_pnginfo={"workflow": WORKFLOW})
    (entry,) = out["ui"]["images"]
    assert entry == {"filename": "klein_00001_.png", "subfolder": "batch", "type": "output"}
    (line,) = out["ui"]["text"]
    assert line.startswith("klein_00001_.png; watermark 4") and line.endswith("/46 bits read back; C2PA signed")
    assert out["result"][0].shape == (1, 320, 384, 3)
    assert (comfyui.parent / "user" / "klein_nodes" / "c2pa" / "signer.key").exists()  # credentials: user folder
    assert not list((comfyui.parent / "output").rglob("*.pem")) and not list((comfyui.parent / "output").rglob("*.key"))
    report = json.loads(verify().verify("batch/klein_00001_.png")["result"][0])
    assert report["c2pa"] == "Trusted" and report["workflow"] and report["prompt"]
    with pytest.raises(kn.KleinError, match="Klein Verify Image: 'batch/klein_00009_.png' is not a file.*relative to"):
        verify().verify("batch/klein_00009_.png")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(disable_metadata=True)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    save().save(pictures(1), "batch/klein", prompt=PROMPT, extra_pnginfo={"workflow": WORKFLOW})
    assert metadata.read_workflow(comfyui.parent / "output" / "batch" / "klein_00002_.png") == (None, None)


def test_verify_command(tmp_path, credentials, capsys):
    from klein_nodes.cli import main

    (path,) = kn.save_images(pictures(1), tmp_path, credentials=credentials, workflow=WORKFLOW)
    assert main(["verify", str(path), "--trust", str(credentials / "root.pem")]) == 0
    out = capsys.readouterr().out
    assert '"c2pa": "Valid"' in out and "trusted by the trust list you gave" in out
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(plain)
    assert main(["verify", str(plain)]) == 1


def natural(size=1024, seed=3):
    """A natural-looking test image: soft shapes, edges and fine texture (not flat, not pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.5 + 0.3 * np.sin(6 * x + 2 * c) * np.cos(4 * y - c) for c in range(3)], -1)
    for _ in range(12):
        cy, cx, r = rng.random(3) * [1, 1, 0.2]
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.random(3)
    image += rng.normal(0, 0.04, image.shape)
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))[None]


def test_png_watermark_reads_back_with_imwatermark(tmp_path, credentials):
    imwatermark = pytest.importorskip("imwatermark")
    decoder = imwatermark.WatermarkDecoder("bits", len(watermark.FLUX_BITS))
    for seed in (3, 4):
        (path,) = kn.save_images(natural(seed=seed), tmp_path, credentials=credentials)
        bgr = np.asarray(Image.open(path).convert("RGB"))[..., ::-1].copy()
        matched = sum(int(a) == b for a, b in zip(decoder.decode(bgr, "dwtDct"), watermark.FLUX_BITS))
        assert matched >= 44, (seed, matched)


def test_odd_inputs(tmp_path, credentials):
    (tiny,) = save_image_records(torch.rand(1, 1, 1, 3), tmp_path, credentials=credentials)
    assert Image.open(tiny.path).size == (1, 1) and "watermark skipped" in tiny.notes[0] and tiny.signed
    rgba = torch.rand(1, 300, 300, 4)
    rgba[..., 3] = 0  # fully transparent: white
    (record,) = save_image_records(rgba, tmp_path, credentials=credentials, watermark=False)
    assert "alpha channel composited on white" in record.notes
    assert np.asarray(Image.open(record.path)).min() == 255
    huge = torch.rand(1, 4320, 7680, 3) * 0.2 + 0.4
    (big,) = save_image_records(huge, tmp_path, format="jpeg", quality=90, credentials=credentials)
    assert Image.open(big.path).size == (7680, 4320) and big.signed and big.watermark_bits is not None


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(kn.KleinError, match="cannot write to"):
        kn.save_images(pictures(1), blocker / "out", c2pa=False)


def expired_credentials(folder):
    """Credentials whose signing certificate expired yesterday."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    c2pa_sign.create_credentials(folder)
    leaf = x509.load_pem_x509_certificate((folder / "chain.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "signer.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.subject)
    builder = builder.public_key(key.public_key())
    builder = builder.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=30))
    builder = builder.not_valid_after(now - datetime.timedelta(days=1))
    for extension in leaf.extensions:
        if not isinstance(extension.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
    (folder / "chain.pem").write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return folder


@pytest.mark.parametrize("damage", ["corrupt key", "corrupt certificate", "expired certificate"])
def test_bad_credentials_fail_cleanly(tmp_path, damage):
    folder = tmp_path / "creds"
    if damage == "expired certificate":
        expired_credentials(folder)
    else:
        c2pa_sign.create_credentials(folder)
        target = folder / ("signer.key" if damage == "corrupt key" else "chain.pem")
        target.write_bytes(target.read_bytes()[:60] + b"garbage" + target.read_bytes()[90:])
    with pytest.raises(kn.KleinError, match="nothing was written"):
        kn.save_images(pictures(1), tmp_path / "out", credentials=folder)
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


@pytest.mark.skipif(__import__("shutil").which("node") is None, reason="needs Node.js")
@pytest.mark.parametrize("size", ["small", "large"])
def test_frontend_reads_the_workflow_from_a_signed_jpeg(tmp_path, credentials, size):
    """js/klein_exif.js (the drop handler's parser) finds the workflow and prompt in our signed JPEG's EXIF."""
    import subprocess
    from pathlib import Path

    workflow = WORKFLOW if size == "small" else {"nodes": [{"id": i, "widgets_values": ["é" * 50]} for i in range(100)]}
    (path,) = kn.save_images(pictures(1), tmp_path, format="jpeg", prompt=PROMPT, workflow=workflow,
                             credentials=credentials)
    module = Path(kn.__file__).parent / "js" / "klein_exif.js"
    script = (f"import {{ readJpegMetadata }} from {json.dumps(module.as_uri())};"
              f"import {{ readFileSync }} from 'node:fs';"
              f"process.stdout.write(JSON.stringify(readJpegMetadata(readFileSync({json.dumps(str(path))}))));")
    found = json.loads(subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True,
                                      check=True).stdout)
    assert json.loads(found["workflow"]) == workflow and json.loads(found["prompt"]) == PROMPT


def test_saved_files_get_the_usual_permissions(tmp_path, credentials):
    import os

    umask = os.umask(0o022)
    try:
        (path,) = kn.save_images(pictures(1), tmp_path, credentials=credentials)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_symlinked_subfolder_cannot_lead_outside_the_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(kn.KleinError, match="outside the output folder"):
        kn.save_images(pictures(1), tmp_path / "out", prefix="link/klein", c2pa=False)
    assert not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("kwargs,images,fragment", [
    ({"prefix": "kle\0in"}, None, "is not a usable file name"),
    ({"prefix": "x" * 300}, None, "has a name over 200 bytes"),
    ({"quality": "high"}, None, "quality must be a number from 1 to 100, got 'high'"),
    ({"format": "webp"}, torch.zeros(1, 16, 16400, 3), "a 16400x16 image cannot be saved as webp (at most 16383"),
    ({}, torch.zeros(1, 0, 0, 3), "cannot save an image of shape (0, 0, 3)"),
    ({}, torch.zeros(1, 8, 8, 5), "cannot save an image of shape (8, 8, 5)"),
])
def test_bad_save_requests_are_refused_before_any_work(tmp_path, kwargs, images, fragment):
    with pytest.raises(kn.KleinError) as info:
        kn.save_images(pictures(1) if images is None else images, tmp_path / "out", c2pa=False, **kwargs)
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_image_too_large_for_memory_is_refused_before_it_is_processed(tmp_path, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1000))
    with pytest.raises(kn.KleinError,
                       match="saving a 64x64 image needs about 0.0 GB of memory and 0.0 GB is available"):
        kn.save_images(torch.zeros(1, 64, 64, 3), tmp_path, c2pa=False)


def test_verify_answers_hostile_and_odd_files_with_a_report(tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (9500, 9500)).save(bomb)  # a few hundred KB that decode to 90 MP
    began = time.monotonic()
    report = kn.verify_image(bomb)
    assert time.monotonic() - began < 5 and report["watermark_bits"] is None
    assert any("over the 64 MP verification limit" in code for code in report["c2pa_codes"])
    Image.new("RGB", (300, 300)).save(tmp_path / "anim.gif")
    (tmp_path / "noext").write_bytes((tmp_path / "anim.gif").read_bytes())
    for name in ("anim.gif", "noext"):
        report = kn.verify_image(tmp_path / name)
        assert report["c2pa"] == "None" and report["watermark_bits"] is not None
    exif = Image.Exif()
    exif[0x0110] = b"\xff\xfe garbage"
    Image.new("RGB", (300, 300)).save(tmp_path / "odd.jpg", exif=exif)
    assert kn.verify_image(tmp_path / "odd.jpg")["workflow"] is False
    with pytest.raises(kn.KleinError, match="missing.png: no such file"):
        kn.verify_image(tmp_path / "missing.png")


def test_a_large_workflow_never_costs_the_jpeg(tmp_path):
    """JPEG EXIF holds 64 KB: with a 100 KB workflow the image is still written, the workflow is dropped with a
    note and the prompt kept; PNG keeps everything."""
    workflow = {"nodes": [{"id": i, "type": "KleinSampler", "widgets_values": ["x" * 90]} for i in range(1000)]}
    prompt = {"1": {"class_type": "KleinSampler", "inputs": {"seed": 1}}}
    assert len(json.dumps(workflow)) > 100_000
    (jpeg,) = save_image_records(pictures(1), tmp_path, format="jpeg", c2pa=False, prompt=prompt, workflow=workflow)
    assert jpeg.path.exists()
    assert any("the workflow (" in note and "was not embedded" in note for note in jpeg.notes)
    assert metadata.read_workflow(jpeg.path) == (json.dumps(prompt), None)
    (png,) = save_image_records(pictures(1), tmp_path, format="png", c2pa=False, prompt=prompt, workflow=workflow)
    assert metadata.read_workflow(png.path) == (json.dumps(prompt), json.dumps(workflow)) and not png.notes


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_transparency_is_saved_as_alpha_with_the_watermark_in_the_colour(tmp_path, credentials, fmt):
    images = pictures(1, size=(320, 320))
    opacity = torch.ones(1, 320, 320)
    opacity[:, :, :100] = 0.0  # a transparent band
    opacity[:, :, 100:140] = 0.5
    (record,) = save_image_records(images, tmp_path, format=fmt, quality=90, credentials=credentials, alpha=opacity)
    written = Image.open(record.path)
    assert written.mode == "RGBA"
    alpha = np.asarray(written)[..., 3]
    expected = (255.0 * opacity[0].numpy()).astype(np.uint8)
    assert np.abs(alpha.astype(int) - expected).max() <= (0 if fmt == "png" else 2)
    assert record.signed and record.watermark_bits is not None
    if fmt == "png":  # lossy WebP erases BFL's mark with or without alpha (a separate problem)
        assert record.watermark_bits >= watermark.DETECTED_AT
    assert c2pa_sign.verify(record.path, (credentials / "root.pem").read_bytes())["state"] == "Trusted"


def test_jpeg_composites_transparency_on_white_and_says_so(tmp_path):
    opacity = torch.zeros(1, 320, 384)
    (record,) = save_image_records(pictures(1), tmp_path, format="jpeg", c2pa=False, alpha=opacity, watermark=False)
    assert np.asarray(Image.open(record.path)).min() >= 250  # fully transparent: white
    assert any("JPEG has no transparency" in note for note in record.notes)


def test_opacity_must_fit_the_images(tmp_path):
    with pytest.raises(kn.KleinError, match="must be an .H, W. = .320, 384. array"):
        kn.save_images(pictures(1), tmp_path, c2pa=False, alpha=torch.ones(1, 10, 10))
    with pytest.raises(kn.KleinError, match="3 opacity masks for 2 images"):
        kn.save_images(pictures(2), tmp_path, c2pa=False, alpha=torch.ones(3, 320, 384))


def test_save_node_takes_comfyuis_mask_as_transparency(comfyui):
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    mask = torch.zeros(1, 320, 384)
    mask[:, :50] = 1.0  # Load Image's convention: 1 = transparent
    NODE_CLASS_MAPPINGS["KleinSave"]().save(pictures(1), "alpha", "png", 80, True, False, True, mask=mask)
    alpha = np.asarray(Image.open(comfyui.parent / "output" / "alpha_00001_.png"))[..., 3]
    assert (alpha[:50] == 0).all() and (alpha[50:] == 255).all()


def test_an_edits_manifest_lists_the_images_that_shaped_it(tmp_path, credentials):
    import hashlib

    source, reference = pictures(1, seed=1), Image.fromarray(np.full((64, 80, 3), 200, dtype=np.uint8))
    sources = [("reference", "reference_1.png", reference), ("edited", "photo.png", source)]
    (path,) = kn.save_images(pictures(1), tmp_path, credentials=credentials, sources=sources)
    report = kn.verify_image(path, (credentials / "root.pem").read_bytes())
    assert report["c2pa"] == "Trusted" and report["c2pa_actions"] == ["c2pa.opened", "c2pa.edited"]
    by_title = {i["title"]: i for i in report["c2pa_ingredients"]}
    assert by_title["photo.png"]["relationship"] == "parentOf"
    assert by_title["reference_1.png"]["relationship"] == "inputTo"
    png = io.BytesIO()
    reference.save(png, "PNG")
    assert by_title["reference_1.png"]["instance_id"] == "sha256:" + hashlib.sha256(png.getvalue()).hexdigest()
    (created,) = kn.save_images(pictures(1), tmp_path, credentials=credentials, sources=sources[:1])
    report = kn.verify_image(created, (credentials / "root.pem").read_bytes())
    assert report["c2pa"] == "Trusted" and report["c2pa_actions"] == ["c2pa.created"]
    assert [i["relationship"] for i in report["c2pa_ingredients"]] == ["inputTo"]
    (plain,) = kn.save_images(pictures(1), tmp_path, credentials=credentials)
    assert kn.verify_image(plain, (credentials / "root.pem").read_bytes())["c2pa_ingredients"] == []


def test_save_node_records_the_loaded_images_that_shaped_the_result(comfyui, monkeypatch):
    """The API prompt tells which Load Image files reached the save node as references or as the edited image."""
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS, save

    inputs = comfyui.parent / "input"
    inputs.mkdir()
    for name in ("photo.png", "ref.png", "unused.png"):
        Image.fromarray(np.full((64, 64, 3), len(name), dtype=np.uint8)).save(inputs / name)
    monkeypatch.setattr(save, "input_file", lambda name: str(inputs / name))
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "unused.png"}},
              "4": {"class_type": "KleinVAEEncode", "inputs": {"image": ["1", 0], "vae": ["9", 0]}},
              "5": {"class_type": "KleinReferences", "inputs": {"image_1": ["2", 0], "conditioning": ["8", 0]}},
              "6": {"class_type": "KleinSampler", "inputs": {"latent": ["4", 0], "positive": ["5", 0]}},
              "7": {"class_type": "KleinSave", "inputs": {"images": ["6", 0]}}}
    assert save.graph_sources(prompt, "7") == [("reference", "ref.png"), ("edited", "photo.png")]
    NODE_CLASS_MAPPINGS["KleinSave"]().save(pictures(1), "edit", prompt=prompt, unique_id="7")
    report = kn.verify_image(comfyui.parent / "output" / "edit_00001_.png",
                             (comfyui.parent / "user" / "klein_nodes" / "c2pa" / "root.pem").read_bytes())
    assert report["c2pa"] == "Trusted" and report["c2pa_actions"] == ["c2pa.opened", "c2pa.edited"]
    assert sorted(i["title"] for i in report["c2pa_ingredients"]) == ["photo.png", "ref.png"]


def test_sources_are_checked(tmp_path, credentials):
    with pytest.raises(kn.KleinError, match="source role 'input': use 'edited' or 'reference'"):
        kn.save_images(pictures(1), tmp_path, credentials=credentials, sources=[("input", "a.png", pictures(1))])
    with pytest.raises(kn.KleinError, match="source 'b.png' is a batch of 2 images"):
        kn.save_images(pictures(1), tmp_path, credentials=credentials, sources=[("reference", "b.png", pictures(2))])


CIRCULAR = {}
CIRCULAR["self"] = CIRCULAR
DEEP = []
for _ in range(10_000):
    DEEP = [DEEP]
IMAGE = pictures(1, size=(64, 64))
MISSING, FOLDER, FIFO, A_FILE = "in/missing.png", "in/folder", "in/fifo", "in/a-file"  # made under tmp_path
BAD_ARGUMENTS = [  # (function, argument, value, what the message names)
    ("save_images", "images", 5, "images"), ("save_images", "images", None, "images"),
    ("save_images", "images", [IMAGE[0]], "images"), ("save_images", "images", [0.5, 0.5], "images"),
    ("save_images", "images", [], "images"), ("save_images", "images", "klein.png", "images"),
    ("save_images", "images", np.empty((1, 8, 8, 3), dtype=object), "images"),
    ("save_images", "images", np.zeros((1, 8, 8, 3), dtype=complex), "images"),
    ("save_images", "images", np.zeros((1, 8, 8, 3), dtype=bool), "images"),
    ("save_images", "images", torch.zeros(1, 8, 8, 3, dtype=torch.complex64), "images"),
    ("save_images", "images", torch.full((1, 8, 8, 3), float("nan")), "images holds NaN"),
    ("save_images", "images", torch.zeros(1, 8, 8, 3, device="meta"), "images is a meta-device tensor"),
    ("save_images", "images", torch.tensor(0.5), "images"),
    ("save_image_records", "prefix", "klein\ud800", "prefix"), ("save_images", "prefix", 5, "prefix"),
    ("save_images", "prefix", None, "prefix"), ("save_images", "prefix", b"klein", "prefix"),
    ("save_images", "prefix", "kle\nin", "prefix"), ("save_images", "prefix", "kle\0in", "prefix"),
    ("save_images", "prompt", {"x": object()}, "prompt"),
    ("save_images", "extra_pnginfo", {"workflow": {1, 2}}, "extra_pnginfo['workflow']"),
    ("save_images", "extra_pnginfo", {"workflow": torch.zeros(2)}, "extra_pnginfo['workflow']"),
    ("save_images", "extra_pnginfo", {"workflow": float("nan")}, "extra_pnginfo['workflow']"),
    ("save_images", "extra_pnginfo", {"workflow": CIRCULAR}, "extra_pnginfo['workflow']"),
    ("save_images", "extra_pnginfo", {"workflow": DEEP}, "extra_pnginfo['workflow']"),
    ("save_images", "extra_pnginfo", {5: {}}, "extra_pnginfo[5]"),
    ("save_images", "extra_pnginfo", [("workflow", {})], "extra_pnginfo"),
    ("save_images", "workflow", {"zoom": float("inf")}, "workflow"),
    ("save_images", "quality", 80.5, "quality"), ("save_images", "quality", None, "quality"),
    ("save_images", "format", None, "format"), ("save_images", "format", ["png"], "format"),
    ("save_images", "watermark", "yes", "watermark"), ("save_images", "watermark_mode", ["robust"], "watermark_mode"),
    ("save_images", "c2pa", "no", "c2pa"), ("save_images", "allow_unsigned", 1, "allow_unsigned"),
    ("save_images", "metadata_enabled", None, "metadata_enabled"),
    ("save_images", "alpha", 0.5, "alpha"), ("save_images", "alpha", [1.0], "alpha"),
    ("save_images", "alpha", torch.full((1, 64, 64), float("nan")), "alpha"),
    ("save_images", "alpha", torch.ones(1, 32, 32), "alpha"),
    ("save_images", "sources", "photo.png", "sources"), ("save_images", "sources", [("reference", "a")], "sources"),
    ("save_images", "sources", [("input", "a.png", IMAGE)], "source role"),
    ("save_images", "sources", [("reference", 5, IMAGE)], "source title"),
    ("save_images", "sources", [("reference", "a.png", 5)], "source 'a.png'"),
    ("save_images", "sources", [("reference", "a.png", MISSING)], "source 'a.png'"),
    ("save_images", "sources", [("reference", "a.png", FIFO)], "source 'a.png'"),
    ("save_images", "safety", "checked", "safety"), ("save_images", "safety", [object()], "safety"),
    ("save_images", "credentials", 5, "credentials"), ("save_images", "credentials", {"chain": 5}, "credentials"),
    ("save_images", "directory", None, "directory"), ("save_images", "directory", 5, "directory"),
    ("save_images", "directory", b"out", "directory"), ("save_images", "directory", "o\0ut", "directory"),
    ("save_images", "directory", A_FILE, "directory"),
    ("save_file", "image", IMAGE, "image"), ("save_file", "image", torch.full((8, 8, 3), float("nan")), "image"),
    ("save_file", "path", 5, "path"), ("save_file", "path", "out/a\0.png", "path"),
    ("save_file", "path", A_FILE, "the output must end in"), ("save_file", "quality", "high", "quality"),
    ("save_file", "prompt", {"seed": object()}, "prompt"), ("save_file", "safety", [{1, 2}], "safety"),
    ("verify_image", "path", 5, "path"), ("verify_image", "path", None, "path"),
    ("verify_image", "path", b"a.png", "path"), ("verify_image", "path", FOLDER, "path"),
    ("verify_image", "path", FIFO, "path"), ("verify_image", "path", "a\0.png", "path"),
    ("verify_image", "path", MISSING, "path"), ("verify_image", "trust_anchor", 5, "trust anchor"),
]


@pytest.mark.parametrize("function,argument,value,named", BAD_ARGUMENTS,
                         ids=[f"{f}-{a}-{i}" for i, (f, a, _, _) in enumerate(BAD_ARGUMENTS)])
def test_a_wrong_argument_is_refused_by_name_before_any_file_is_touched(tmp_path, monkeypatch, function, argument,
                                                                         value, named):
    """Every argument of the public save and verify functions, of a wrong type or value: one KleinError naming it,
    raised before any work, and no file made, changed or left behind (no temporary file, no credentials)."""
    from klein_nodes.provenance.save import save_file

    monkeypatch.chdir(tmp_path)
    (tmp_path / FOLDER).mkdir(parents=True)
    os.mkfifo(tmp_path / FIFO)
    (tmp_path / A_FILE).write_bytes(b"not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "klein_00001_.png").write_bytes(b"someone else's file")
    Image.new("RGB", (300, 300)).save(tmp_path / "in" / "image.png")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    before = sorted((str(p), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*"))
    calls = {"save_images": lambda **given: kn.save_images(**{"images": IMAGE, "directory": "out", "c2pa": False,
                                                              **given}),
             "save_image_records": lambda **given: save_image_records(**{"images": IMAGE, "directory": "out",
                                                                         "c2pa": False, **given}),
             "save_file": lambda **given: save_file(**{"image": IMAGE[0], "path": "out/one.png", "c2pa": False,
                                                       **given}),
             "verify_image": lambda **given: kn.verify_image(**{"path": "in/image.png", **given})}
    with pytest.raises(kn.KleinError) as info:
        calls[function](**{argument: value})
    assert named in str(info.value)
    assert type(info.value) is kn.KleinError and info.value.__cause__ is None and len(str(info.value)) < 400
    assert sorted((str(p), p.is_file() and p.read_bytes()) for p in tmp_path.rglob("*")) == before


def test_infinite_values_are_clipped_as_comfyuis_save_image_does(tmp_path):
    """NaN is refused (above); +inf and -inf are values outside 0..1, saved as 255 and 0, with and without alpha."""
    image = torch.zeros(1, 4, 4, 4)
    image[..., 0], image[..., 1], image[..., 2:] = float("inf"), float("-inf"), 1.0
    (path,) = kn.save_images(image, tmp_path, c2pa=False, watermark=False)
    assert np.asarray(Image.open(path)).reshape(-1, 3).tolist() == [[255, 0, 255]] * 16
    (path,) = kn.save_images(image[..., :3], tmp_path, c2pa=False, watermark=False)
    assert np.asarray(Image.open(path)).reshape(-1, 3).tolist() == [[255, 0, 255]] * 16
