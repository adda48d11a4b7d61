"""Several adapter sets on one backbone: sharing decided from the weights, and mixed batches equal to each set alone."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from adapter_sets import adapter_set, backbone_state

from dcris.config import Config, preset
from dcris.errors import UserError
from dcris.model import build_model, parameter_group, split_output
from dcris.multi import MultiSegmenter, backbone_key, named_exports
from dcris.segmenter import Segmenter
from dcris.tokenizer import tokenize

LONG = "the small red circle on the left next to the big blue square below the green triangle"  # cut at 12 and 17
PHRASES = ["the red circle", "the big blue square on the right", "a green triangle", "the small one", LONG]


@torch.no_grad()
def test_a_mixed_batch_equals_each_set_alone(three_sets):
    multi = MultiSegmenter(three_sets)
    models = {name: s.model for name, s in three_sets.items()}
    assert models["paper"].vision.backbone is models["released"].vision.backbone is models["other"].vision.backbone
    assert models["paper"].text.transformer is models["other"].text.transformer
    for model in models.values():  # every adapter and head tensor is non-zero
        assert all(p.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    size = models["paper"].cfg.image_size
    gen = torch.Generator().manual_seed(5)
    rng = random.Random(5)
    sizes = {"paper": [2, 1], "released": [1], "other": [3, 2]}  # "released" has a single row
    parts = []
    for name, counts in sizes.items():
        for n in counts:
            images = torch.randn(n, 3, size, size, generator=gen)
            phrases = [rng.choice(PHRASES) for _ in range(n)]
            parts.append((name, images, tokenize(phrases, models[name].cfg.text.context_length)))
    rng.shuffle(parts)
    assert len({name for name, *_ in parts[:3]}) > 1  # interleaved, not grouped by set
    mixed = multi.forward(parts)
    for (name, images, tokens), got in zip(parts, mixed, strict=True):
        # the set's own model on its rows only; "other" also answers whether each phrase names nothing
        (got, got_nothing), (alone, alone_nothing) = split_output(got), split_output(models[name](images, tokens))
        assert got.shape == alone.shape == (len(images), 1, 4 * size // 14, 4 * size // 14)
        scale = float(alone.abs().max())
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
        assert (got_nothing is None) == (alone_nothing is None) == (name != "other")
        if alone_nothing is not None:
            assert got_nothing.shape == (len(images),)
            nothing_scale = float(alone_nothing.abs().max())
            torch.testing.assert_close(got_nothing, alone_nothing, rtol=1e-5, atol=1e-5 * nothing_scale)
    # the sets really differ: the same rows under another set's adapters give other logits
    name, images, tokens = next(p for p in parts if p[0] == "paper")
    other = split_output(models["other"](images, tokens))[0]
    assert (other - mixed[parts.index((name, images, tokens))]).abs().max() > 1e-2


def test_sharing_is_decided_from_the_weights(three_sets, tmp_path, probe, caplog):
    image, phrases = probe
    paper = three_sets["paper"]
    a = paper.save_pretrained(tmp_path / "refcoco" / "export")
    renamed = Segmenter(paper.model, Config(preset="tiny-detris", model=paper.model.cfg))  # another preset name
    b = renamed.save_pretrained(tmp_path / "b")
    changed = adapter_set(preset("tiny-dcris"), backbone_state(paper.model), 4)
    with torch.no_grad():
        changed.model.vision.backbone.encoder.layer[2].mlp.fc1.weight[0, 0] += 1e-3  # one frozen number differs
    c = changed.save_pretrained(tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="dcris.multi"):
        multi = MultiSegmenter.from_pretrained([str(a), f"bee={b}", str(c)], device="cpu")
    assert multi.names == ["refcoco", "bee", "c"]
    loaded = {name: multi.segmenter(name).model for name in multi.names}
    assert loaded["bee"].vision.backbone is loaded["refcoco"].vision.backbone
    assert loaded["bee"].text.token_embedding is loaded["refcoco"].text.token_embedding
    assert loaded["bee"].text.positional_embedding is loaded["refcoco"].text.positional_embedding
    assert loaded["c"].vision.backbone is not loaded["refcoco"].vision.backbone
    assert multi.batch_key("bee") == multi.batch_key("refcoco") != multi.batch_key("c")
    log = caplog.text
    assert "'bee' shares the frozen backbones of 'refcoco'" in log and "'c' loads its own" in log
    rows = {row["name"]: row for row in multi.describe()}
    assert rows["refcoco"]["shares_backbone_with"] == ["bee"] and rows["c"]["shares_backbone_with"] == []
    assert rows["bee"]["preset"] == "tiny-detris" and rows["c"]["context_length"] == 17
    # the held backbones: two, not three (parameters counted once per object)
    unique = {id(p): p.numel() for m in loaded.values() for p in m.parameters()}
    backbone = sum(p.numel() for k, p in paper.model.named_parameters() if parameter_group(k) == "backbone")
    trainable = sum(p.numel() for p in paper.model.parameters() if p.requires_grad)
    assert sum(unique.values()) == 2 * backbone + 3 * trainable
    # each set answers as its own Segmenter
    for name, original in (("refcoco", paper), ("bee", paper), ("c", changed)):
        for got, want in zip(multi(image, phrases, model=name), original(image, phrases), strict=True):
            np.testing.assert_allclose(got.probability, want.probability, atol=1e-5)
    assert backbone_key(paper.model) == backbone_key(loaded["bee"]) != backbone_key(changed.model)
    with pytest.raises(ValueError, match="cannot share a batch"):
        multi.forward([("refcoco", torch.zeros(1, 3, 112, 112), tokenize(["a"], 17)),
                       ("c", torch.zeros(1, 3, 112, 112), tokenize(["a"], 17))])  # fmt: skip


def test_names_and_unknown_models(three_sets, probe):
    assert named_exports(["runs/refcoco/export", "g=runs/refcocog/export", "user/dcris-b-x"]) == {
        "refcoco": "runs/refcoco/export", "g": "runs/refcocog/export", "dcris-b-x": "user/dcris-b-x"}  # fmt: skip
    with pytest.raises(UserError, match="two exports are named 'export'"):
        named_exports(["a/export/export", "b/export/export"])
    with pytest.raises(UserError, match="must be letters"):
        named_exports({"a b": "x"})
    multi = MultiSegmenter(three_sets)
    with pytest.raises(UserError, match="unknown model 'nope': the adapter sets are 'paper', 'released', 'other'"):
        multi(probe[0], "the red circle", model="nope")
    with pytest.raises(UserError, match="no model named"):
        multi(probe[0], "the red circle")


def own_backbone_set(seed: int) -> Segmenter:
    """A tiny set that trains its backbones (Table 2's full-tune row): it keeps its own and runs alone."""
    cfg = preset("tiny-dcris")
    cfg.model.train_backbones = True
    torch.manual_seed(seed)
    return adapter_set(cfg, backbone_state(build_model(cfg.model, pretrained=False)), seed)


def test_a_set_with_its_own_backbones_gets_its_inputs_on_its_device():
    """Device bookkeeping on the CPU: a set recorded on the meta device is handed images and tokens there, whatever
    device they were prepared on (the tokens are always prepared on the CPU)."""
    own = own_backbone_set(6)
    multi = MultiSegmenter({"own": own})
    assert multi.backbones["own"] is None
    meta = torch.device("meta")
    multi.devices["own"] = meta  # where the set computes, as the bookkeeping says; nothing runs there
    seen = []
    own.model.forward = lambda images, tokens: seen.append((images.device, tokens.device)) or images[:, :1]
    size = own.model.cfg.image_size
    multi.forward([("own", torch.zeros(2, 3, size, size), tokenize(["a", "b"], 17))])
    assert seen == [(meta, meta)]


@pytest.mark.gpu
@torch.no_grad()
def test_a_set_with_its_own_backbones_runs_on_the_gpu(three_sets, probe):
    image, phrases = probe
    own = own_backbone_set(6)
    expected = own(image, phrases)
    multi = MultiSegmenter({"own": Segmenter(own.model, own.config, device="cuda")})
    _, pixels, tokens, _ = multi.segmenter("own").prepare(image, phrases)
    assert pixels.is_cuda and not tokens.is_cuda
    (logits,) = multi.forward([("own", pixels.expand(len(phrases), -1, -1, -1), tokens)])
    got = multi.segmenter("own").segmentations(logits, image.shape[:2], phrases, [None] * len(phrases), 0.0)
    for g, w in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.probability, w.probability, atol=1e-4)


@torch.no_grad()
def test_at_most_max_resident_sets_stay_on_the_device(three_sets, probe):
    """Residency as bookkeeping (on the CPU the move is a no-op): the least recently used set leaves, a set a batch
    needs comes back, and answers do not change."""
    image, phrases = probe
    multi = MultiSegmenter(three_sets, max_resident=2)
    assert list(multi.resident) == ["released", "other"]  # "paper" left when "other" came
    assert multi.make_resident(["paper"]) == ["paper"] and list(multi.resident) == ["other", "paper"]
    assert multi.make_resident(["other"]) == [] and list(multi.resident) == ["paper", "other"]
    assert sorted(multi.make_resident(["released", "paper", "other"])) == ["released"]  # a batch may need more
    assert len(multi.resident) == 3
    multi.make_resident(["paper"])
    assert list(multi.resident) == ["other", "paper"]
    own = {id(t) for t in multi._own_tensors("paper")}
    backbone = {id(p) for k, p in three_sets["paper"].model.named_parameters() if parameter_group(k) == "backbone"}
    assert own and not own & backbone  # a shared backbone never moves with one set
    for name in ["released", "other", "paper"]:
        for got, want in zip(multi(image, phrases, model=name), three_sets[name](image, phrases), strict=True):
            np.testing.assert_array_equal(got.mask, want.mask)
    multi.remove("released")
    assert multi.names == ["paper", "other"] and "released" not in multi.resident
    with pytest.raises(UserError, match="at least 1"):
        MultiSegmenter(three_sets, max_resident=0)
