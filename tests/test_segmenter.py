"""The Python API (dcris.Segmenter) and the Hub-style export folder: one inference path, lossless round trips."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dcris.config import preset, to_dict
from dcris.data.letterbox import letterbox_image, normalize_image
from dcris.errors import UserError
from dcris.export import ExportedWeights, load_exported, read_export_config, save_export
from dcris.metrics import MASK_THRESHOLD, masks_from_logits
from dcris.params import parameter_report
from dcris.segmenter import Segmenter, confidence
from dcris.tokenizer import tokenize

REPO = Path(__file__).resolve().parents[1]
LONG = "the small red circle on the left next to the big blue square below the green triangle"
METRICS = {"val": {"miou": 0.4321, "oiou": 0.5, "prec@0.5": 0.25, "prec@0.6": 0.2, "prec@0.7": 0.15,
                   "prec@0.8": 0.1, "prec@0.9": 0.05, "count": 40}}  # fmt: skip


@torch.no_grad()
def reference_masks(segmenter: Segmenter, image: np.ndarray, phrase: str) -> np.ndarray:
    """The inference path written out from the shared functions, one phrase at a time."""
    model, size = segmenter.model, segmenter.model.cfg.image_size
    pixels = normalize_image(torch.from_numpy(letterbox_image(Image.fromarray(image), size)).permute(2, 0, 1))
    logits = model(pixels[None], tokenize([phrase], 17))  # (1, 1, 4S/14, 4S/14)
    return masks_from_logits(logits, [image.shape[:2]], size)[0].numpy()


def test_one_batch_matches_the_reference_path_phrase_by_phrase(tiny_segmenter, probe):
    image, phrases = probe
    results = tiny_segmenter(image, phrases)
    assert [r.text for r in results] == phrases
    for result, phrase in zip(results, phrases, strict=True):
        assert result.mask.shape == result.probability.shape == image.shape[:2]  # the image's own size
        assert result.probability.min() >= 0 and result.probability.max() <= 1
        np.testing.assert_array_equal(result.mask, result.probability > MASK_THRESHOLD)
        expected = reference_masks(tiny_segmenter, image, phrase)
        decided = np.abs(result.probability - MASK_THRESHOLD) > 1e-4  # batching may move values by ~1e-7
        np.testing.assert_array_equal(result.mask[decided], expected[decided])
        assert result.area == pytest.approx(result.mask.mean())
        assert result.seconds > 0 and result.seconds == results[0].seconds  # one batch, one time
    single = tiny_segmenter(image, phrases[0])  # a str gives one result, not a list
    np.testing.assert_allclose(single.probability, results[0].probability, atol=1e-5)


def test_confidence_is_the_soft_iou_of_the_map_with_its_mask():
    prob = torch.tensor([[0.9, 0.5], [0.2, 0.0]])
    mask = prob > MASK_THRESHOLD
    assert confidence(prob, mask) == pytest.approx((0.9 + 0.5) / (2 + 0.2))  # hand-computed
    assert confidence(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]])) == 1.0  # certain of every pixel
    assert confidence(torch.tensor([[0.3, 0.1]]), torch.tensor([[False, False]])) == 0.0  # nothing found
    rng = np.random.default_rng(3)
    p = rng.random((20, 30))
    m = p > MASK_THRESHOLD
    expected = p[m].sum() / (m.sum() + p[~m].sum())
    assert confidence(torch.from_numpy(p), torch.from_numpy(m)) == pytest.approx(expected)


def test_image_inputs_and_bad_input(tiny_segmenter, probe, tmp_path):
    image, phrases = probe
    path = tmp_path / "probe.png"
    Image.fromarray(image).save(path)
    from_array = tiny_segmenter(image, phrases[0]).mask
    for given in (path, str(path), Image.fromarray(image), Image.fromarray(image).convert("RGBA")):
        np.testing.assert_array_equal(tiny_segmenter(given, phrases[0]).mask, from_array)
    gray = tiny_segmenter(image[..., 0], phrases[0])  # (h, w) arrays are gray images
    assert gray.mask.shape == image.shape[:2]
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    for bad, needle in (
        (tmp_path / "junk.jpg", "cannot read image"),
        (tmp_path / "missing.jpg", "cannot read image"),
        (image.astype(np.float32), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ):
        with pytest.raises(UserError, match=needle):
            tiny_segmenter(bad, phrases[0])
    with pytest.raises(UserError, match="empty"):
        tiny_segmenter(image, ["the red circle", "  "])
    with pytest.raises(UserError, match="no phrase"):
        tiny_segmenter(image, [])
    with pytest.raises(UserError, match="too long"):
        tiny_segmenter(image, LONG, truncate=False)


def test_long_phrases_are_cut_and_reported(tiny_segmenter, probe):
    image, phrases = probe
    long, short = tiny_segmenter(image, [LONG, phrases[0]])
    assert long.truncated and not short.truncated
    # what is read of a cut phrase is the tokenizer's truncation of it
    cut = tokenize([LONG], 17)[0]
    kept = cut[(cut != 0)][1:-1]  # without start, end and padding
    from open_clip.tokenizer import SimpleTokenizer

    prefix = SimpleTokenizer().decode(kept.tolist()).strip()
    assert LONG.startswith(prefix) and len(prefix) < len(LONG)
    np.testing.assert_allclose(tiny_segmenter(image, prefix).probability, long.probability, atol=1e-5)


def test_import_dcris_loads_nothing():
    code = (
        "import sys, dcris; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'PIL'))); "
        "print(dcris.Segmenter.__module__, dcris.Segmentation.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.splitlines() == ["[]", "dcris.segmenter Segmentation"]


def test_save_pretrained_round_trip_gives_identical_predictions(tiny_segmenter, probe, tmp_path):
    image, phrases = probe
    folder = tiny_segmenter.save_pretrained(tmp_path / "export", metrics=METRICS)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "dcris-export/2" and config["metrics"] == METRICS
    assert config["config"] == to_dict(tiny_segmenter.config)
    # random-init backbones travel with the adapters and the head: every tensor of the model
    assert set(load_file(str(folder / "model.safetensors"))) == set(tiny_segmenter.model.state_dict())

    loaded = Segmenter.from_pretrained(folder, device="cpu")
    for a, b in zip(tiny_segmenter(image, phrases), loaded(image, phrases), strict=True):
        np.testing.assert_array_equal(a.probability, b.probability)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.score == b.score
    assert loaded.metrics == METRICS and loaded.config.preset == "tiny-dcris"

    card = (folder / "README.md").read_text()
    counts = parameter_report(tiny_segmenter.config)
    assert card.startswith("---\n") and "library_name: dcris" in card and "pipeline_tag: image-segmentation" in card
    assert "`tiny-dcris`" in card and "random init, stored here" in card
    assert f"{counts['trainable_params']:,}" in card and f"{counts['frozen_params']:,}" in card
    assert "| val | 43.21 | 50.00 | 25.00 | 20.00 | 15.00 | 10.00 | 5.00 | 40 |" in card
    assert 'Segmenter.from_pretrained("PATH_OR_HUB_ID"' in card
    # saving again replaces the folder (no stale README); saving over something else is refused
    loaded.save_pretrained(folder, metrics={})
    assert "Not recorded" in (folder / "README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a dcris export folder"):
        loaded.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="without .safetensors"):
        save_export(tiny_segmenter.model.state_dict(), tiny_segmenter.config, tmp_path / "old.safetensors")


def test_named_backbones_are_not_stored_and_the_card_names_them(tmp_path):
    cfg = preset("dcris-b")  # named backbones; the meta device builds the shapes without weights
    with torch.device("meta"):
        from dcris.model import build_model

        keys = list(build_model(cfg.model, pretrained=False).state_dict())
    state = {k: torch.zeros(1) for k in keys}
    folder = save_export(state, cfg, tmp_path / "b", metrics=None)
    stored = set(load_file(str(folder / "model.safetensors")))
    assert stored and all(k.startswith(("head.", "vision.adapters.", "text.adapters.")) for k in stored)
    card = (folder / "README.md").read_text()
    assert "`facebook/dinov2-with-registers-base`" in card and "weights `openai`" in card
    assert "base_model: facebook/dinov2-with-registers-base" in card
    assert read_export_config(folder).preset == "dcris-b"


def test_earlier_single_file_exports_still_load(tiny_segmenter, probe, tmp_path):
    """The dcris-export/1 layout: one .safetensors file with the config in its metadata."""
    image, phrases = probe
    state = tiny_segmenter.model.state_dict()
    path = tmp_path / "dcris.safetensors"
    metadata = {"format": "dcris-export/1", "config": json.dumps(to_dict(tiny_segmenter.config))}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    loaded = Segmenter(load_exported(path))
    np.testing.assert_array_equal(loaded(image, phrases[0]).probability, tiny_segmenter(image, phrases[0]).probability)


def _fake_hub_cache(hf_home: Path, repo_id: str, export: Path) -> None:
    """The huggingface_hub cache layout: blobs named by content hash, a snapshot of links, refs/main."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in export.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (repo / "snapshots" / commit / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)


# Run with HF_HOME and HF_HUB_OFFLINE set before huggingface_hub is imported: predict by Hub id, then ask for a
# repository that is not cached, with downloads off and on.
OFFLINE_SCRIPT = """
import sys
from dcris.cli import run
image, text, out = sys.argv[1:]
codes = [
    run("dcris.predict", ["--weights", "someone/dcris-tiny", "--image", image, "--text", text, "--out", out,
                          "--device", "cpu"]),
    run("dcris.predict", ["--weights", "someone/missing", "--image", image, "--text", text, "--out", out]),
    run("dcris.evaluate", ["--weights", "someone/missing", "--shards", "."]),
]
print("exit codes", *codes)
"""


def test_hub_id_loads_from_the_cache_offline(tiny_segmenter, probe, tmp_path, monkeypatch):
    image, phrases = probe
    export = tiny_segmenter.save_pretrained(tmp_path / "export")
    _fake_hub_cache(tmp_path / "hf", "someone/dcris-tiny", export)
    Image.fromarray(image).save(tmp_path / "probe.png")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.pop("HF_HUB_CACHE", None)
    out = tmp_path / "pred.png"
    argv = [sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "probe.png"), phrases[0], str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.stdout.splitlines()[-1] == "exit codes 0 2 2", proc.stdout + proc.stderr
    from dcris.predict import mask_path

    served = np.asarray(Image.open(mask_path(out))) > 127
    np.testing.assert_array_equal(served, tiny_segmenter(image, phrases[0]).mask)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert all("'someone/missing' are neither a local folder nor in the local Hugging Face cache" in e for e in errors)
    assert all("model.allow_download=true" in e for e in errors)
    # downloads allowed, but HF_HUB_OFFLINE=1 still holds (checked in this process: the variable is read at call time)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        Segmenter.from_pretrained("someone/missing", allow_download=True)
    loaded = Segmenter.from_pretrained("someone/dcris-tiny", device="cpu")
    np.testing.assert_array_equal(loaded(image, phrases[0]).mask, served)


def test_missing_weights_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        ExportedWeights.load(tmp_path / "no" / "such" / "export")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a dcris export"):
        ExportedWeights.load(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read exported weights"):
        ExportedWeights.load(tmp_path / "bad.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_bf16_give_the_cpu_masks(tiny_segmenter, probe, tmp_path):
    image, phrases = probe
    gpu = Segmenter.from_pretrained(tiny_segmenter.save_pretrained(tmp_path / "export"), device="cuda")
    assert gpu.device.type == "cuda"
    half = Segmenter(copy.deepcopy(gpu.model).to(torch.bfloat16))  # as the trainer's bf16 module
    for cpu, cuda, bf16 in zip(tiny_segmenter(image, phrases), gpu(image, phrases), half(image, phrases), strict=True):
        np.testing.assert_allclose(cuda.probability, cpu.probability, atol=2e-3)
        assert (cuda.mask != cpu.mask).mean() < 2e-3
        assert bf16.mask.shape == cpu.mask.shape and (bf16.mask != cpu.mask).mean() < 0.05
        assert abs(bf16.score - cpu.score) < 0.05


@pytest.fixture(scope="module")
def gres_segmenter(tiny_segmenter, probe) -> Segmenter:
    """The tiny segmenter's weights plus a no-target output whose bias splits the probe's phrases into found and
    not found."""
    from dcris.model import build_model, split_output

    cfg = copy.deepcopy(tiny_segmenter.config)
    cfg.model.head.no_target = True
    torch.manual_seed(3)
    model = build_model(cfg.model, pretrained=False).eval()
    missing, unexpected = model.load_state_dict(tiny_segmenter.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.no_target.") for k in missing)
    image, phrases = probe
    pixels = normalize_image(torch.from_numpy(letterbox_image(Image.fromarray(image), 112)).permute(2, 0, 1))
    with torch.no_grad():
        logits = split_output(model(pixels.expand(len(phrases), -1, -1, -1), tokenize(phrases, 17)))[1]
        model.head.no_target.fc2.bias -= logits.median() + 1e-3  # the middle phrase's logit just above 0
    return Segmenter(model, cfg)


def test_a_phrase_the_model_finds_nothing_for_gets_an_empty_mask(gres_segmenter, tiny_segmenter, probe, tmp_path):
    from dcris.model import split_output
    from dcris.predict import main as predict_main

    image, phrases = probe
    pixels = normalize_image(torch.from_numpy(letterbox_image(Image.fromarray(image), 112)).permute(2, 0, 1))
    with torch.no_grad():  # the reference: the model's own "no object" logits, one phrase at a time
        outputs = [gres_segmenter.model(pixels[None], tokenize([p], 17)) for p in phrases]
        nothing = [torch.sigmoid(split_output(output)[1])[0] for output in outputs]
    results, plain = gres_segmenter(image, phrases), tiny_segmenter(image, phrases)
    assert {r.found for r in results} == {True, False}
    for result, base, p_nothing in zip(results, plain, nothing, strict=True):
        assert result.target_probability == pytest.approx(1 - float(p_nothing), abs=1e-5)
        assert result.found == (float(p_nothing) <= 0.5)
        np.testing.assert_allclose(result.probability, base.probability, atol=1e-5)  # the same mask head
        if result.found:
            np.testing.assert_array_equal(result.mask, base.mask)
        else:
            assert not result.mask.any() and result.area == 0 and result.score == 0
    assert all(r.found and r.target_probability == 1.0 for r in plain)  # no no-target output: always a target
    # dcris predict says so, and writes the empty mask
    weights = gres_segmenter.save_pretrained(tmp_path / "export")
    Image.fromarray(image).save(tmp_path / "probe.png")
    argv = ["--weights", str(weights), "--device", "cpu"]
    for k, phrase in enumerate(phrases):
        argv += ["--image", str(tmp_path / "probe.png"), "--text", phrase, "--out", str(tmp_path / f"o{k}.png")]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert predict_main(argv) == 0
    lines = stdout.getvalue().splitlines()
    for k, result in enumerate(results):
        assert ("no object found" in lines[k]) == (not result.found)
        written = np.asarray(Image.open(tmp_path / f"o{k}_mask.png")) > 0
        np.testing.assert_array_equal(written, result.mask)
