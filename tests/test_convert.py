"""Import of released DETRIS checkpoints (key list: tests/data/detris_b_state_dict.tsv, the released DETRIS-B keys)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from dcris.config import preset
from dcris.convert import convert_detris_state_dict, detect_preset, read_released_checkpoint
from dcris.errors import UserError
from dcris.model import build_model

TSV = Path(__file__).resolve().parent / "data" / "detris_b_state_dict.tsv"


def released_shapes() -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in TSV.read_text().splitlines()[1:]]
    return {k: () if s == "scalar" else tuple(int(x) for x in s.split("x")) for k, s, _ in rows}


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) if s else torch.randn((), generator=g)
            for k, s in released_shapes().items()}


def test_random_released_state_dict_loads_with_no_missing_or_unexpected_keys(released, tmp_path):
    path = tmp_path / "detris_b.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in released.items()}}, path)
    loaded = read_released_checkpoint(str(path))
    assert detect_preset(loaded) == "detris-b"
    cfg = preset("detris-b")
    state = convert_detris_state_dict(loaded, cfg)
    model = build_model(cfg.model, pretrained=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the fused qkv lands split in q, k, v; adapters and head keep their values
    qkv = released["dinov2.blocks.3.attn.qkv.weight"]
    attn = model.vision.backbone.encoder.layer[3].attention
    for part, chunk in zip((attn.q_proj, attn.k_proj, attn.v_proj), qkv.chunk(3), strict=True):
        assert torch.equal(part.weight, chunk)
    assert torch.equal(model.vision.adapters["5"].dense.branch3[1].conv.weight,
                       released["dinov2.blocks.5.adapter.dense_branch3.1.conv.weight"])
    text_down = released["txt_backbone.transformer.resblocks.1.adapter.D_fc1.weight"]
    assert torch.equal(model.text.adapters["1"].down.weight, text_down)
    assert torch.equal(model.head.proj.txt.weight, released["proj.txt.weight"])
    layer0 = model.vision.backbone.encoder.layer[0]
    assert torch.equal(layer0.layer_scale2.lambda1, released["dinov2.blocks.0.ls2.gamma"])


def test_bad_keys_are_named(released):
    cfg = preset("detris-b")
    extra = dict(released, **{"dinov2.blocks.1.adapter.extra.weight": torch.randn(3)})
    with pytest.raises(UserError, match=r"unknown key 'dinov2\.blocks\.1\.adapter\.extra\.weight'"):
        convert_detris_state_dict(extra, cfg)
    missing = {k: v for k, v in released.items() if k != "neck.aggr.0.weight"}
    with pytest.raises(UserError, match=r"lacks 1 keys .*head\.neck\.aggr\.0\.weight"):
        convert_detris_state_dict(missing, cfg)
    shaped = dict(released, **{"proj.txt.bias": torch.randn(7)})
    with pytest.raises(UserError, match=r"'proj\.txt\.bias' has shape \(7,\), detris-b needs \(2305,\)"):
        convert_detris_state_dict(shaped, cfg)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_released_checkpoint(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        read_released_checkpoint(str(tmp_path / "missing.pth"))


def test_convert_command_writes_a_dcris_export(released, tmp_path, capsys):
    from safetensors import safe_open

    from dcris.cli import main
    from dcris.export import read_export_config

    path, out = tmp_path / "detris_b.pth", tmp_path / "detris_b"
    torch.save(released, path)
    assert main(["convert-detris", str(path), str(out)]) == 0
    assert "detris-b" in capsys.readouterr().out
    assert read_export_config(out).preset == "detris-b"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        # named backbones are reloaded from their weights: only adapters and head travel (about 25M numbers)
        assert keys and all(k.startswith(("head.", "vision.adapters.", "text.adapters.")) for k in keys)
        assert torch.equal(f.get_tensor("head.neck.txt_proj.weight"), released["neck.txt_proj.weight"])
    assert len([k for k in released if k.startswith(("neck.", "decoder.", "proj.")) or ".adapter." in k]) == len(keys)


def test_convert_command_reports_bad_input_in_one_line(tmp_path, capsys):
    from dcris.cli import main

    bad = tmp_path / "bad.pth"
    torch.save({"dinov2.blocks.0.unknown": torch.randn(2)}, bad)
    assert main(["convert-detris", str(bad), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the checkpoint fits no released layout")
    assert err[0].endswith("unknown key 'dinov2.blocks.0.unknown' in the released checkpoint (not part of detris-b)")


# ----------------------------------------------------------------------------------------- the released layout

# ours -> released: the inverse of the converter's renaming, written out from the released key list
_TO_RELEASED = [
    (r"^vision\.adapters\.(\d+)\.down\.", r"dinov2.blocks.\1.adapter.D_fc1."),
    (r"^vision\.adapters\.(\d+)\.up\.", r"dinov2.blocks.\1.adapter.D_fc2."),
    (r"^vision\.adapters\.(\d+)\.dense\.branch(\d)\.", r"dinov2.blocks.\1.adapter.dense_branch\2."),
    (r"^vision\.adapters\.(\d+)\.cross\.", r"dinov2.blocks.\1.adapter.cross."),
    (r"^text\.adapters\.(\d+)\.down\.", r"txt_backbone.transformer.resblocks.\1.adapter.D_fc1."),
    (r"^text\.adapters\.(\d+)\.up\.", r"txt_backbone.transformer.resblocks.\1.adapter.D_fc2."),
    (r"^text\.adapters\.(\d+)\.dense\.branch(\d)\.", r"txt_backbone.transformer.resblocks.\1.adapter.dense_branch\2."),
    (r"^vision\.backbone\.encoder\.layer\.(\d+)\.attention\.o_proj\.", r"dinov2.blocks.\1.attn.proj."),
    (r"^vision\.backbone\.encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"dinov2.blocks.\1.ls\2.gamma"),
    (r"^vision\.backbone\.encoder\.layer\.(\d+)\.", r"dinov2.blocks.\1."),
    (r"^vision\.backbone\.embeddings\.cls_token$", "dinov2.cls_token"),
    (r"^vision\.backbone\.embeddings\.position_embeddings$", "dinov2.pos_embed"),
    (r"^vision\.backbone\.embeddings\.register_tokens$", "dinov2.register_tokens"),
    (r"^vision\.backbone\.embeddings\.mask_token$", "dinov2.mask_token"),
    (r"^vision\.backbone\.embeddings\.patch_embeddings\.projection\.", "dinov2.patch_embed.proj."),
    (r"^vision\.backbone\.layernorm\.", "dinov2.norm."),
    (r"^text\.", "txt_backbone."),
    (r"^head\.", ""),
]
_QKV_PART = re.compile(r"^vision\.backbone\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def to_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of ours in the released key layout (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _QKV_PART.match(key):
            continue
        for pattern, repl in _TO_RELEASED:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise AssertionError(f"no released name for {key}")
    for key in state:
        if (m := _QKV_PART.match(key)) and m.group(2) == "q":
            block, kind = m.group(1), m.group(3)
            parts = [state[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[f"dinov2.blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts)
    return out


def test_the_inverse_layout_reproduces_the_released_key_list():
    """The test's inverse renaming gives exactly the released DETRIS-B keys and shapes (tests/data list)."""
    with torch.device("meta"):
        ours = build_model(preset("detris-b").model, pretrained=False).state_dict()
    ours["text.positional_embedding"] = torch.empty(77, 512, device="meta")  # the released code keeps CLIP's 77
    released = {k: tuple(v.shape) for k, v in to_released(ours).items()}
    assert released == released_shapes()


@pytest.mark.parametrize("name", ["detris-b", "detris-l", "detris-l-mixed"])
def test_each_released_layout_is_recognised(name: str):
    with torch.device("meta"):
        released = to_released(build_model(preset(name).model, pretrained=False).state_dict())
    assert detect_preset(released) == name


def test_a_checkpoint_of_no_released_layout_names_the_first_key_that_does_not_fit():
    with torch.device("meta"):
        released = to_released(build_model(preset("detris-l").model, pretrained=False).state_dict())
    released["dinov2.blocks.2.adapter.D_fc1.weight"] = torch.empty(64, 1024, device="meta")
    with pytest.raises(UserError, match=r"fits no released layout .*'dinov2\.blocks\.2\.adapter\.D_fc1\.weight' "
                                        r"has shape \(64, 1024\), detris-l needs \(128, 1024\)"):  # fmt: skip
        detect_preset(released)


def _randomised_tiny_detris() -> torch.nn.Module:
    """tiny-detris with every BatchNorm statistic and LayerScale random, so no branch is silently trivial."""
    torch.manual_seed(7)
    model = build_model(preset("tiny-detris").model, pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for layer in model.vision.backbone.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.5, 1.5)
            layer.layer_scale2.lambda1.uniform_(0.5, 1.5)
    return model


def test_converted_checkpoint_with_its_own_backbones_segments_offline(tmp_path):
    """A tiny checkpoint in the released layout -> convert-detris --backbones -> dcris predict, with no hub at all;
    the mask equals the original model's."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from dcris.segmenter import Segmenter

    model = _randomised_tiny_detris()
    torch.save({"state_dict": to_released(model.state_dict())}, tmp_path / "tiny.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))

    def dcris(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dcris", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    export = tmp_path / "tiny"
    dcris("convert-detris", str(tmp_path / "tiny.pth"), str(export), "--preset", "tiny-detris",
          "--backbones", str(tmp_path / "backbones"))  # fmt: skip
    from dcris.export import read_export_config

    recorded = read_export_config(export).model
    assert recorded.vision.weights == str(tmp_path / "backbones" / "dinov2")
    assert recorded.text.weights == str(tmp_path / "backbones" / "clip_text.safetensors")
    dcris("predict", "--weights", str(export), "--image", str(tmp_path / "img.png"), "--text", "the red circle",
          "--out", str(tmp_path / "pred.png"), "--device", "cpu")  # fmt: skip
    got = np.asarray(Image.open(tmp_path / "pred_mask.png")) > 127
    want = Segmenter(model)(Image.open(tmp_path / "img.png").convert("RGB"), "the red circle").mask
    assert got.shape == (45, 70) and np.array_equal(got, want)


def test_backbones_inside_the_export_folder_are_recorded_relative_to_it(tmp_path):
    """convert-detris --backbones EXPORT/backbones: the config names them relative to the folder, the folder
    segments as the original model from wherever it is moved to, and a rerun replaces it, backbones included;
    --context-length is recorded."""
    import json
    import shutil

    import numpy as np
    from PIL import Image

    from dcris.cli import main
    from dcris.export import load_exported, read_export_config
    from dcris.segmenter import Segmenter

    model = _randomised_tiny_detris()
    torch.save({"state_dict": to_released(model.state_dict())}, tmp_path / "tiny.pth")
    export = tmp_path / "tiny"
    argv = ["convert-detris", str(tmp_path / "tiny.pth"), str(export), "--preset", "tiny-detris",
            "--backbones", str(export / "backbones")]  # fmt: skip
    assert main(argv) == 0
    (export / "backbones" / "clip_text.safetensors").write_bytes(b"spoilt")  # the rerun writes it anew
    assert main(argv) == 0
    recorded = json.loads((export / "config.json").read_text())["config"]["model"]
    assert recorded["vision"]["weights"] == "backbones/dinov2"
    assert recorded["text"]["weights"] == "backbones/clip_text.safetensors"
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(export, tmp_path / "elsewhere" / "tiny"))
    assert read_export_config(moved).model.vision.weights == str((moved / "backbones" / "dinov2").resolve())
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    got = Segmenter.from_pretrained(moved, device="cpu")(image, "the red circle").mask
    assert got.shape == (45, 70) and np.array_equal(got, Segmenter(model)(image, "the red circle").mask)

    short = tmp_path / "short"
    assert main(["convert-detris", str(tmp_path / "tiny.pth"), str(short), "--preset", "tiny-detris",
                 "--context-length", "12"]) == 0  # fmt: skip
    assert read_export_config(short).model.text.context_length == 12
    assert load_exported(short).cfg.text.context_length == 12


def _fake_hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Puts ``files`` into a Hugging Face hub cache at ``root`` as a download of ``repo_id`` would."""
    import shutil

    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


def test_backbones_in_the_local_hub_cache_load_without_the_download_flag(tmp_path, monkeypatch):
    """Named weights found in the hub cache (vision by model id, text by open_clip tag) load with
    ``allow_download`` off, which never reaches for the network."""
    import huggingface_hub

    from dcris.convert import write_backbones

    model = _randomised_tiny_detris()
    vision_dir, text_file = write_backbones(model.state_dict(), preset("tiny-detris"), tmp_path / "backbones")
    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "someone/tiny-dinov2", {p.name: p for p in vision_dir.iterdir()})
    _fake_hub_cache(hub, "timm/vit_base_patch16_clip_224.openai", {"open_clip_model.safetensors": text_file})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    cfg = preset("tiny-detris").model
    cfg.vision.weights, cfg.text.weights = "someone/tiny-dinov2", "openai"
    assert not cfg.allow_download
    loaded = build_model(cfg).state_dict()
    frozen = [k for k in loaded if k.startswith(("vision.backbone.", "text.")) and not k.startswith("text.adapters.")]
    assert frozen and all(torch.equal(loaded[k], model.state_dict()[k]) for k in frozen)
    cfg.text.weights = "laion2b_s34b_b88k"  # a real tag that is not cached: refused, nothing is fetched
    with pytest.raises(UserError, match="not in the local cache: pass model.allow_download=true"):
        build_model(cfg)
