"""Import of released DETRIS checkpoints (key list: tests/data/detris_b_state_dict.tsv, the released DETRIS-B keys)."""

from __future__ import annotations

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
    with pytest.raises(UserError, match=r"'head\.proj\.txt\.bias' has shape \(7,\)"):
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
    assert len(err) == 1 and err[0].startswith("error: unknown key 'dinov2.blocks.0.unknown'")
