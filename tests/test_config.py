"""Config strictness: presets, run files, overrides; every mistake names its key."""

from __future__ import annotations

import json

import pytest

from dcris.config import ConfigError, from_dict, load_config, preset, to_dict


def test_presets_differ_where_the_paper_says():
    b, l_, d = preset("dcris-b"), preset("dcris-l"), preset("detris-b")
    assert (b.model.vision.width, b.model.vision.depth, b.model.vision.taps) == (768, 12, [4, 8])
    assert (l_.model.vision.width, l_.model.vision.depth, l_.model.vision.taps) == (1024, 24, [8, 16])
    assert l_.model.adapters.vision_layers == [2, 6, 10, 14, 18, 22]
    assert (l_.train.lr, l_.train.global_batch) == (2e-4, 64)
    assert b.model.adapters.text_form == "paper" and d.model.adapters.text_form == "released"
    assert preset("dcris-b") is not preset("dcris-b")  # fresh objects: editing one never leaks


def test_default_micro_batch_keeps_the_global_batch_on_any_number_of_gpus():
    """The default micro-batch is 32 (the benchmark's), a bound: one GPU takes dcris-b's whole step and dcris-l's 64
    in two accumulated micro-batches; several GPUs each take their share of the step."""
    from dcris.train_setup import batch_layout

    assert batch_layout(preset("dcris-b").train, 1) == (32, 1)
    assert batch_layout(preset("dcris-l").train, 1) == (32, 2)
    assert batch_layout(preset("dcris-b").train, 2) == (16, 1)
    assert batch_layout(preset("dcris-b").train, 8) == (4, 1)
    assert batch_layout(preset("dcris-l").train, 16) == (4, 1)
    assert batch_layout(load_config(preset_name="dcris-b", overrides=["train.micro_batch=8"]).train, 2) == (8, 2)
    for world in (3, 64):  # 32 images do not split over 3 ranks, nor into whole images over 64
        with pytest.raises(ConfigError, match=f"at most train.micro_batch 32 over {world} ranks"):
            batch_layout(preset("dcris-b").train, world)


def test_file_then_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny-dcris\ntrain: {epochs: 3, lr: 0.002}\nmodel: {adapters: {vision_layers: [0, 2]}}\n")
    overrides = ["train.epochs=5", "model.adapters.text_layers=3", "model.head.dropout=0"]
    cfg = load_config(str(run), overrides=overrides)
    assert cfg.preset == "tiny-dcris" and cfg.train.epochs == 5 and cfg.train.lr == 0.002
    assert cfg.model.adapters.vision_layers == [0, 2] and cfg.model.adapters.text_layers == [3]
    assert cfg.model.head.dropout == 0.0 and isinstance(cfg.model.head.dropout, float)
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("train.epochs=three", "'train.epochs' expects an integer"),
        ("train.epochs=2.5", "'train.epochs' expects an integer"),
        ("model.adapters.fused_dense=maybe", "'model.adapters.fused_dense' expects true/false"),
        ("model=3", "'model' is a section"),
        ("model.adapters.vision_layers=1,12", r"vision_layers \[1, 12\] must be distinct block indices in \[0, 12\)"),
        ("model.image_size=450", "not a multiple of the patch size"),
        ("train.precision=fp8", "train.precision must be"),
        ("data.sample=sentences", "data.sample must be object or sentence, got 'sentences'"),
        ("epochs", "not of the form key=value"),
    ],
)
def test_mistakes_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(preset_name="dcris-b", overrides=[override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"preset": "tiny-dcris", "data": {"shard": "x"}}))
    with pytest.raises(ConfigError, match="unknown config key 'data.shard'"):
        load_config(str(unknown))
    with pytest.raises(ConfigError, match="unknown preset 'dcris-xl'"):
        load_config(preset_name="dcris-xl")
