"""The packer on synthetic releases renamed as the real data sets: sentence length per data set (and its check in
every consumer), the shuffle of every split, the published-count check, blank sentences, RLE masks, skip reasons."""

from __future__ import annotations

import errno
import io
import json
import pickle
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from save_faults import check_disk_full_message

from dcris.cli import main as cli_main
from dcris.cli import run as run_command
from dcris.config import preset
from dcris.data import build_loader, dali_available, pack
from dcris.data.release_counts import PUBLISHED
from dcris.errors import UserError
from dcris.export import load_exported, save_export
from dcris.model import build_model

REPO = Path(__file__).resolve().parents[1]
UMD = {"testA": "test", "testB": "test"}  # G-Ref umd has train, val and test
LONG = "the small red circle on the left next to the big blue square below the green triangle"  # 19 tokens


def _pack(root: Path, release: Path, out: Path, *argv: str) -> int:
    images = ["--images", str(release / "images")]
    return pack.main(["--refer", str(root), *images, "--out", str(out), "--workers", "1", "--shard-size", "10", *argv])


def _samples(shards: Path, split: str) -> list[dict]:
    """Every sample of a packed split in shard order, read with tarfile (not with the loaders under test)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    out: list[dict] = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / shard["tar"]) as tar:
            members: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        out += [dict(sample, info=json.loads(sample["json"])) for sample in members.values()]
    return out


def _add_long_sentence(refs: list[dict], instances: dict) -> None:
    for r in refs:
        if r["split"] == "val":
            r["sentences"].append(dict(sent=LONG, sent_id=10_000 + r["ref_id"]))


# ------------------------------------------------------------------------------------------- context length


@pytest.fixture(scope="module")
def gref_umd(release: Path, release_as: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """G-Ref umd (renamed synthetic release, a 19-token sentence added to every val object), default length."""
    root = release_as(tmp_path_factory.mktemp("refer"), "refcocog", "umd", splits=UMD, edit=_add_long_sentence)
    out = tmp_path_factory.mktemp("shards")
    assert _pack(root, release, out, "--dataset", "refcocog", "--split-by", "umd") == 0
    return out / "refcocog"


def test_context_length_follows_the_released_configs(
    release: Path, release_as: Callable[..., Path], gref_umd: Path, tmp_path: Path
) -> None:
    root = release_as(tmp_path / "refer", "refcoco", "unc", edit=_add_long_sentence)
    release_as(root, "refcocog", "umd", splits=UMD, edit=_add_long_sentence)
    assert _pack(root, release, tmp_path / "a", "--dataset", "refcoco", "--split-by", "unc", "--splits", "val") == 0
    argv = ["--dataset", "refcocog", "--split-by", "umd", "--splits", "val", "--context-length", "17"]
    assert _pack(root, release, tmp_path / "b", *argv) == 0
    reference = open_clip.get_tokenizer("ViT-B-16")  # open_clip truncates the same way (end token kept last)
    for shards, length in ((gref_umd, 22), (tmp_path / "a" / "refcoco", 17), (tmp_path / "b" / "refcocog", 17)):
        manifest = json.loads((shards / "manifest.json").read_text())
        assert manifest["context_length"] == length
        samples = _samples(shards, "val")
        assert samples
        # every sentence whose tokens (start and end included) outnumber the context is counted as cut
        everything = [s for sample in samples for s in sample["info"]["sentences"]]
        cut = sum(int((reference([s], context_length=77)[0] != 0).sum()) > length for s in everything)
        assert manifest["splits"]["val"]["truncated_sentences"] == cut == (len(samples) if length == 17 else 0)
        for sample in samples:
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            sentences = sample["info"]["sentences"]
            assert LONG in sentences and tokens.shape == (len(sentences), length)
            assert np.array_equal(tokens, reference(sentences, context_length=length).numpy())
            # the 19-token sentence fits 22 whole; at 17 it loses two words
            assert (tokens[sentences.index(LONG)] != 0).sum() == min(length, 19)


def test_a_model_of_another_length_stops_with_one_line(
    gref_umd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(build_loader(gref_umd, "val", train=False, batch_size=4, loader="torch", context_length=22)) > 0
    with pytest.raises(UserError) as error:
        build_loader(gref_umd, "val", train=False, batch_size=4, loader="torch", context_length=17)
    message = str(error.value)
    assert "\n" not in message and "17-token" in message and "22-token" in message and str(gref_umd) in message
    cfg = preset("tiny-dcris")  # a 17-token model, evaluated on the 22-token shards
    weights = save_export(build_model(cfg.model, pretrained=False).state_dict(), cfg, tmp_path / "m")
    capsys.readouterr()
    assert cli_main(["eval", "--weights", str(weights), "--shards", str(gref_umd), "--loader", "torch"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"], err
    assert "Traceback" not in err


def test_training_takes_the_length_from_the_shards(
    gref_umd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dcris.trainer import main as train_main

    out = tmp_path / "run"
    argv = ["--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--preset", "tiny-dcris",
            f"data.shards={gref_umd}", f"train.output_dir={out}", "data.loader=torch", "data.workers=0",
            "train.micro_batch=4", "train.global_batch=4", "train.max_steps=1", "data.eval_splits=[]",
            "train.precision=fp32", "model.text.positions=22"]  # fmt: skip
    assert train_main(argv) == 0
    assert "model.text.context_length=22" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["text"]["context_length"] == 22
    assert load_exported(out / "export").cfg.text.context_length == 22


# ------------------------------------------------------------------------------------------------- shuffle


def test_every_rank_of_the_mix_sees_every_data_set(
    release: Path, release_as: Callable[..., Path], tmp_path: Path
) -> None:
    root = tmp_path / "refer"
    sources = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))
    for k, (name, split_by) in enumerate(sources):  # ref_ids 0.., 10000.., 20000..: the source is ref_id // 10000
        release_as(root, name, split_by, ref_offset=10_000 * k, splits=UMD if name == "refcocog" else None)
    assert _pack(root, release, tmp_path / "out", "--mix", "refcoco,refcoco+,refcocog") == 0
    shards = tmp_path / "out" / "mix"
    samples = _samples(shards, "train")
    assert {s["info"]["dataset"] for s in samples} == {"refcoco", "refcoco+", "refcocog"}
    assert all(s["info"]["ref_id"] // 10_000 == [n for n, _ in sources].index(s["info"]["dataset"]) for s in samples)
    for world in (2, 3, 4):
        for rank in range(world):
            loader = build_loader(
                shards, "train", train=True, batch_size=4, image_size=16, rank=rank, world_size=world, seed=1,
                loader="torch", workers=0,
            )  # fmt: skip
            first = [int(r) // 10_000 for _, batch in zip(range(4), loader, strict=False) for r in batch["ref_id"]]
            assert len(first) == 16 and set(first) == {0, 1, 2}, (world, rank, first)


def test_every_split_is_shuffled_with_the_seed(release: Path, release_as: Callable[..., Path], tmp_path: Path) -> None:
    root = release_as(tmp_path / "refer", "refcoco", "unc")
    orders = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert _pack(root, release, tmp_path / name, "--dataset", "refcoco", "--split-by", "unc", "--seed", seed) == 0
        orders[name] = {split: [s["info"]["ref_id"] for s in _samples(tmp_path / name / "refcoco", split)]
                        for split in ("train", "val", "testA", "testB")}  # fmt: skip
    assert orders["a"] == orders["b"]  # a fixed seed: the same shards again
    for split, order in orders["a"].items():
        assert order != sorted(order) or len(order) < 3, split  # not in ref order
        assert sorted(order) == sorted(orders["c"][split])
    assert orders["a"]["train"] != orders["c"]["train"]
    manifest = json.loads((tmp_path / "c" / "refcoco" / "manifest.json").read_text())
    assert manifest["shuffle_seed"] == 1
    # sample_index numbers the samples in their packed order
    assert [s["info"]["sample_index"] for s in _samples(tmp_path / "c" / "refcoco", "train")] == list(
        range(len(orders["c"]["train"]))
    )


# ------------------------------------------------------------------------------------------ published counts

# SPEC 4 (RefCOCO, unc): objects and expressions per split.
REFCOCO_PUBLISHED = {"train": (42404, 120624), "val": (3811, 10834), "testA": (1975, 5657), "testB": (1810, 5095)}


def _counts(refs: list[dict]) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for r in refs:
        objects, sentences = counts.get(r["split"], (0, 0))
        counts[r["split"]] = (objects + 1, sentences + len(r["sentences"]))
    return counts


def test_a_release_whose_counts_differ_is_flagged(
    release: Path, release_as: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = release_as(tmp_path / "refer", "refcoco", "unc")
    counts = _counts(pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes()))
    capsys.readouterr()
    assert _pack(root, release, tmp_path / "out", "--dataset", "refcoco", "--split-by", "unc", "--splits", "val") == 0
    expected = []
    for split, (objects, sentences) in REFCOCO_PUBLISHED.items():  # the whole release is checked, not only val
        have_objects, have_sentences = counts[split]
        expected.append(f"{split}: {have_objects:,} objects in the release, published {objects:,} "
                        f"({have_objects - objects:+,})")  # fmt: skip
        expected.append(f"{split}: {have_sentences:,} sentences in the release, published {sentences:,} "
                        f"({have_sentences - sentences:+,})")  # fmt: skip
    check = json.loads((tmp_path / "out" / "refcoco" / "manifest.json").read_text())["count_check"]
    assert check["match"] is False and check["differences"] == expected
    assert check["published"]["train"] == dict(objects=42404, sentences=120624)
    captured = capsys.readouterr()
    assert "WARNING: refcoco differs from the published release" in captured.err
    assert all(line in captured.err for line in expected)


def test_a_matching_release_passes_and_packing_losses_show(
    release: Path,
    release_as: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def blank_sentence(refs: list[dict], instances: dict) -> None:
        next(r for r in refs if r["split"] == "val")["sentences"].append(dict(sent="  ", sent_id=99_999))

    argv = ["--dataset", "refcoco", "--split-by", "unc", "--splits", "val"]
    root = release_as(tmp_path / "refer", "refcoco", "unc")
    # pretend the published release is this one: then nothing differs
    release_counts = _counts(pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes()))
    monkeypatch.setitem(PUBLISHED, ("refcoco", "unc"), release_counts)
    capsys.readouterr()
    assert _pack(root, release, tmp_path / "out", *argv) == 0
    captured = capsys.readouterr()
    check = json.loads((tmp_path / "out" / "refcoco" / "manifest.json").read_text())["count_check"]
    assert check["match"] is True and check["differences"] == [] and "WARNING" not in captured.err
    assert "refcoco: the counts match the published release" in captured.out
    # a release that matches, but one of whose val sentences is blank: the packed split lacks it
    root = release_as(tmp_path / "refer2", "refcoco", "unc", edit=blank_sentence)
    counts = _counts(pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes()))
    monkeypatch.setitem(PUBLISHED, ("refcoco", "unc"), counts)
    assert _pack(root, release, tmp_path / "out2", *argv) == 0
    check = json.loads((tmp_path / "out2" / "refcoco" / "manifest.json").read_text())["count_check"]
    sentences = counts["val"][1]
    assert check["differences"] == [f"val: {sentences - 1:,} sentences packed, published {sentences:,} (-1)"]
    assert "WARNING: refcoco differs" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- sentences and masks


def test_blank_sentences_are_dropped_with_their_ids(
    release: Path, release_as: Callable[..., Path], tmp_path: Path
) -> None:
    chosen: dict[str, int] = {}

    def edit(refs: list[dict], instances: dict) -> None:
        mixed, empty = [r for r in refs if r["split"] == "val"][:2]
        mixed["sentences"] = [
            dict(sent="  the red thing ", sent_id=901),
            dict(sent="", sent_id=902),
            dict(sent=" \t\n", sent_id=903),
            dict(sent="the last one\n", sent_id=904),
        ]
        empty["sentences"] = [dict(sent="   ", sent_id=905)]
        chosen.update(mixed=mixed["ref_id"], empty=empty["ref_id"])

    root = release_as(tmp_path / "refer", "refcoco", "unc", edit=edit)
    assert _pack(root, release, tmp_path / "out", "--dataset", "refcoco", "--split-by", "unc", "--splits", "val") == 0
    shards = tmp_path / "out" / "refcoco"
    sample = next(s for s in _samples(shards, "val") if s["info"]["ref_id"] == chosen["mixed"])
    assert sample["info"]["sentences"] == ["the red thing", "the last one"]
    assert sample["info"]["sent_ids"] == [901, 904]
    tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
    reference = open_clip.get_tokenizer("ViT-B-16")(["the red thing", "the last one"], context_length=17)
    assert np.array_equal(tokens, reference.numpy())
    manifest = json.loads((shards / "manifest.json").read_text())["splits"]["val"]
    blanks = [(b["ref_id"], b["sent_id"]) for b in manifest["blank_sentences"]]
    assert sorted(blanks) == sorted([(chosen["mixed"], 902), (chosen["mixed"], 903), (chosen["empty"], 905)])
    assert manifest["skipped"] == [dict(ref_id=chosen["empty"], reason="no sentences")]
    # the loader evaluates the two kept sentences, in order
    items = [
        (int(r), int(k), t)
        for b in build_loader(shards, "val", train=False, batch_size=4, image_size=16, loader="torch", workers=0)
        for r, k, t in zip(b["ref_id"], b["sent_idx"], b["tokens"], strict=True)
        if int(r) == chosen["mixed"]
    ]
    assert [k for _, k, _ in items] == [0, 1] and all(np.array_equal(t.numpy(), reference[k]) for _, k, t in items)


def _rectangle_counts(height: int, width: int, top: int, bottom: int, left: int, right: int) -> list[int]:
    """Uncompressed COCO RLE (column-major runs, zeros first) of rows [top, bottom) x columns [left, right)."""
    runs = [left * height + top]  # zeros up to the first 1
    for _ in range(left, right):
        runs += [bottom - top, height - (bottom - top)]  # a column's ones, then zeros to the next column's top
    runs[-1] = height - bottom + (width - right) * height  # after the last column: zeros to the end
    return runs


def test_a_list_of_rles_is_read_as_refer_reads_it(
    release: Path, release_as: Callable[..., Path], tmp_path: Path
) -> None:
    cases: dict[str, int] = {}

    def edit(refs: list[dict], instances: dict) -> None:
        val = [r for r in refs if r["split"] == "val"]
        images = {i["id"]: i for i in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        rle_ref, garbage_ref, wrong_size_ref = val[:3]
        image = images[rle_ref["image_id"]]
        h, w = image["height"], image["width"]
        parts = []
        for box in ((10, 30, 20, 50), (40, 45, 5, 15)):  # two rectangles, as refclef stores a split object
            rle = mask_utils.frPyObjects(dict(size=[h, w], counts=_rectangle_counts(h, w, *box)), h, w)
            parts.append(dict(size=rle["size"], counts=rle["counts"].decode()))  # compressed, as JSON holds it
        anns[rle_ref["ann_id"]]["segmentation"] = parts
        anns[garbage_ref["ann_id"]]["segmentation"] = [["x" * 500]]
        other = images[wrong_size_ref["image_id"]]
        oh, ow = other["height"] + 1, other["width"]
        wrong = dict(size=[oh, ow], counts=_rectangle_counts(oh, ow, 1, 5, 1, 5))  # one row more than the image
        anns[wrong_size_ref["ann_id"]]["segmentation"] = wrong
        cases.update(rle=rle_ref["ref_id"], garbage=garbage_ref["ref_id"], wrong_size=wrong_size_ref["ref_id"])
        cases.update(height=h, width=w, other_h=oh - 1, other_w=ow)

    root = release_as(tmp_path / "refer", "refcoco", "unc", edit=edit)
    assert _pack(root, release, tmp_path / "out", "--dataset", "refcoco", "--split-by", "unc", "--splits", "val") == 0
    shards = tmp_path / "out" / "refcoco"
    sample = next(s for s in _samples(shards, "val") if s["info"]["ref_id"] == cases["rle"])
    expected = np.zeros((cases["height"], cases["width"]), dtype=np.uint8)
    expected[10:30, 20:50] = 255
    expected[40:45, 5:15] = 255
    with Image.open(io.BytesIO(sample["mask.png"])) as mask:
        assert np.array_equal(np.asarray(mask), expected)
    manifest = json.loads((shards / "manifest.json").read_text())
    skipped = {s["ref_id"]: s["reason"] for s in manifest["splits"]["val"]["skipped"]}
    assert skipped.keys() == {cases["garbage"], cases["wrong_size"]}
    assert skipped[cases["garbage"]].startswith("no mask (unreadable segmentation: ")
    w, h = cases["other_w"], cases["other_h"]
    assert skipped[cases["wrong_size"]] == f"mask is {w}x{h + 1}, image is {w}x{h}"
    assert all(len(reason) <= 60 and "xxx" not in reason for reason in skipped.values())


def test_rectangle_counts_are_an_rle_of_the_rectangle() -> None:
    """The hand-made RLE above, checked cell by cell against its definition (column-major runs, zeros first)."""
    h, w = 7, 5
    runs = _rectangle_counts(h, w, 2, 5, 1, 3)
    flat = np.concatenate([np.full(n, k % 2, dtype=np.uint8) for k, n in enumerate(runs)])
    assert flat.size == h * w
    expected = np.zeros((h, w), dtype=np.uint8)
    expected[2:5, 1:3] = 1
    assert np.array_equal(flat.reshape(w, h).T, expected)


# ----------------------------------------------------------------------------------------------- gRefCOCO


@pytest.fixture(scope="module")
def gres_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic gRefCOCO-format release (shards/synth.py --gres), 30 images."""
    from dcris.data.synth import make_synthetic_release

    return make_synthetic_release(tmp_path_factory.mktemp("gres"), images=30, seed=5, gres=True)


def _as_grefcoco(gres_release: Path, root: Path, edit: Callable[[list[dict], dict], None] | None = None) -> Path:
    """The synthetic gRefCOCO release under gRefCOCO's own name, ``edit(refs, instances)`` applied."""
    refs = json.loads((gres_release / "synthetic_gres" / "grefs(unc).json").read_text())
    instances = json.loads((gres_release / "synthetic_gres" / "instances.json").read_text())
    if edit is not None:
        edit(refs, instances)
    (root / "grefcoco").mkdir(parents=True)
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    return root


def _spoil(refs: list[dict], instances: dict) -> None:
    """Marks one part of a multi-target ref crowd, makes a one-object ref all-crowd, drops an annotation, sets a
    contradicting no_target flag, gives an object a 4-coordinate polygon beside its own and another only one of 4
    and one of 5 coordinates, and spaces one raw sentence oddly (val refs, so the test knows where to look)."""
    val = [r for r in refs if r["split"] == "val"]
    anns = {a["id"]: a for a in instances["annotations"]}
    multi = [r for r in val if len(r["ann_id"]) > 1]
    single = [r for r in val if len(r["ann_id"]) == 1 and r["ann_id"] != [-1]]
    anns[multi[0]["ann_id"][0]]["iscrowd"] = 1  # left out of every union it is in
    crowd_only = next(r for r in single if r["ann_id"][0] != multi[0]["ann_id"][0] and
                      all(r["ann_id"][0] not in m["ann_id"] for m in multi))  # fmt: skip
    anns[crowd_only["ann_id"][0]]["iscrowd"] = 1
    missing = next(r for r in single if r is not crowd_only and all(r["ann_id"][0] not in m["ann_id"] for m in multi))
    missing["ann_id"] = [123_456]
    contradiction = next(r for r in single if r not in (crowd_only, missing))
    contradiction["no_target"] = True
    spoilt = {a for r in (multi[0], crowd_only, missing, contradiction) for a in r["ann_id"]}
    short = [r for r in single if r not in (crowd_only, missing, contradiction) and r["ann_id"][0] not in spoilt]
    anns[short[0]["ann_id"][0]]["segmentation"].append([1.0, 1.0, 3.0, 3.0])  # dropped, the object stays
    anns[short[1]["ann_id"][0]]["segmentation"] = [[0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 9.0, 0.0, 9.0]]  # none left
    short[2]["sentences"][0]["raw"] = "  The\tthing   there \n"


def test_grefcoco_packs_unions_empty_masks_and_target_counts(gres_release: Path, tmp_path: Path) -> None:
    root = _as_grefcoco(gres_release, tmp_path / "refer", _spoil)
    argv = ["--refer", str(root), "--images", str(gres_release / "images"), "--out", str(tmp_path / "out")]
    assert pack.main([*argv, "--dataset", "grefcoco", "--workers", "1", "--shard-size", "10"]) == 0  # unc: default
    shards = tmp_path / "out" / "grefcoco"
    manifest = json.loads((shards / "manifest.json").read_text())
    refs = {r["ref_id"]: r for r in json.loads((root / "grefcoco" / "grefs(unc).json").read_text())}
    instances = json.loads((root / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {im["id"]: im for im in instances["images"]}
    for split, info in manifest["splits"].items():
        samples = _samples(shards, split)
        skipped = {s["ref_id"]: s["reason"] for s in info["skipped"]}
        assert len(samples) + len(skipped) == sum(r["split"] == split for r in refs.values())
        want = dict(crowd_parts=0, short_polygons=0, objects_without_polygons=0, no_target_contradictions=0)
        no_target, multi = [0, 0], [0, 0]
        for sample in samples:
            ref = refs[sample["info"]["ref_id"]]
            image = images[ref["image_id"]]
            union = np.zeros((image["height"], image["width"]), dtype=np.uint8)
            listed = [] if ref["ann_id"] == [-1] else [anns[a] for a in ref["ann_id"]]
            kept, polygons = [], []
            for a in (a for a in listed if not a["iscrowd"]):  # ReLA's loader: polygons of 6 coordinates or more
                valid = [p for p in a["segmentation"] if len(p) >= 6 and len(p) % 2 == 0]
                want["short_polygons"] += len(a["segmentation"]) - len(valid)
                want["objects_without_polygons"] += not valid
                kept, polygons = (kept + [a], polygons + [valid]) if valid else (kept, polygons)
            want["crowd_parts"] += sum(a["iscrowd"] for a in listed)
            for valid in polygons:  # pycocotools' own rendering of every polygon, OR-ed
                rle = mask_utils.frPyObjects(valid, image["height"], image["width"])
                union |= mask_utils.decode(rle).max(axis=2)
            got = (np.asarray(Image.open(io.BytesIO(sample["mask.png"]))) > 127).astype(np.uint8)
            np.testing.assert_array_equal(got, union)
            assert sample["info"]["segmentations"] == polygons  # what --protocol rela rasterises
            assert sample["info"]["sentences"] == [" ".join(s["raw"].split()) for s in ref["sentences"]]
            meta = np.frombuffer(sample["meta"], dtype="<i8")
            assert len(meta) == 8 and meta[7] == len(kept) == sample["info"]["num_targets"]
            assert meta[3] == (kept[0]["id"] if kept else -1) and sample["info"]["ann_ids"] == [a["id"] for a in kept]
            count = [1, len(sample["info"]["sentences"])]
            no_target = [a + b for a, b in zip(no_target, count, strict=True)] if not kept else no_target
            # gRefCOCO's statistics count a ref multi-target by the objects it lists, crowd parts too
            multi = [a + b for a, b in zip(multi, count, strict=True)] if len(listed) > 1 else multi
        expected = {}
        for r in (r for r in refs.values() if r["split"] == split):
            non_crowd = [anns[a] for a in r["ann_id"] if a in anns and not anns[a]["iscrowd"]]
            if r["no_target"] != (r["ann_id"] == [-1]):
                expected[r["ref_id"]] = f"no_target is {r['no_target']} but ann_id lists 1 object(s)"
                want["no_target_contradictions"] += 1
            elif r["ann_id"] == [123_456]:
                expected[r["ref_id"]] = "annotation 123456 missing"
            elif r["ann_id"] != [-1] and not non_crowd:
                expected[r["ref_id"]] = "every listed object is a crowd annotation"
            elif r["ann_id"] != [-1] and all(max(map(len, a["segmentation"])) < 6 for a in non_crowd):
                expected[r["ref_id"]] = "no listed object has a polygon of 6 or more coordinates (or is not a crowd)"
        assert skipped == expected
        assert info["no_target"] == dict(objects=no_target[0], sentences=no_target[1])
        assert info["multi_target"] == dict(objects=multi[0], sentences=multi[1])
        assert {k: info[k] for k in want} == want and info["sentences_without_raw"] == 0
        if split == "val":  # every kind of spoilt ref was seen
            assert no_target[0] > 0 and multi[0] > 0 and len(set(expected.values())) == 4
            assert min(want.values()) >= 1
    total = sum(len(r["sentences"]) for r in refs.values())
    assert manifest["count_check"]["differences"] == [
        f"all splits: {total:,} sentences in the release, published 259,859 ({total - 259859:+,})"
    ]


def test_grefcoco_total_is_checked_after_packing(
    gres_release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcris.data.release_counts import PUBLISHED_TOTALS

    def drop_annotation(refs: list[dict], instances: dict) -> None:
        next(r for r in refs if r["ann_id"] != [-1])["ann_id"] = [123_456]

    for name, edit in (("clean", None), ("spoilt", drop_annotation)):
        root = _as_grefcoco(gres_release, tmp_path / name, edit)
        refs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
        total = sum(len(r["sentences"]) for r in refs)
        monkeypatch.setitem(PUBLISHED_TOTALS, ("grefcoco", "unc"), total)  # the release matches the total
        argv = ["--refer", str(root), "--images", str(gres_release / "images"), "--out", str(tmp_path / f"o{name}")]
        assert pack.main([*argv, "--dataset", "grefcoco", "--workers", "1"]) == 0
        check = json.loads((tmp_path / f"o{name}" / "grefcoco" / "manifest.json").read_text())["count_check"]
        assert check["published"] == {"sentences": total}
        lost = 0 if edit is None else len(next(r for r in refs if r["ann_id"] == [123_456])["sentences"])
        want = [] if not lost else [f"all splits: {total - lost:,} sentences packed, published {total:,} ({-lost:+,})"]
        assert check["differences"] == want and check["match"] is (not lost)


def test_old_seven_field_meta_reads_as_one_target(shards: Path, tmp_path: Path) -> None:
    """Shards of the 7-field meta (packed before the target count) still load: one target per sample."""
    import webdataset as wds
    from wds2idx import IndexCreator

    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(old / shard["tar"]) as tar:
            members: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
        with wds.TarWriter(str(old / shard["tar"])) as writer:
            for sample in members.values():
                sample["meta"] = sample["meta"][: 7 * 8]  # the first 7 int64 fields
                writer.write(sample)
        with IndexCreator(str(old / shard["tar"]), str(old / shard["idx"]), verbose=False) as creator:
            creator.create_index()
        with np.load(old / shard["tables"]) as tables:
            tokens, meta = tables["tokens"], tables["meta"]
        np.savez(old / shard["tables"], tokens=tokens, meta=meta[:, :7])  # the DALI loader's copy of the meta
    for kind in ("torch", "dali") if dali_available() else ("torch",):
        read = dict(loader=kind, train=False, batch_size=4, image_size=56, workers=0 if kind == "torch" else 1)
        batches, new = list(build_loader(old, "val", **read)), list(build_loader(shards, "val", **read))
        assert all(b["num_targets"].eq(1).all() for b in batches) and sum(len(b["ref_id"]) for b in batches) > 0
        for a, b in zip(batches, new, strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["ref_id"], b["ref_id"]), kind
            for key in ("orig_size", "sent_idx", "tokens"):  # what the first 7 meta fields and the tables give
                assert torch.equal(a[key], b[key]), (kind, key)


def test_a_refcoco_and_grefcoco_mix_trains_on_no_held_out_image(gres_release: Path, tmp_path: Path) -> None:
    """Every RefCOCO ref is put in train, so the images of gRefCOCO's val/test splits sit in RefCOCO's train: the
    mix must drop them (and keep gRefCOCO's own layout: target counts, empty masks)."""
    root = _as_grefcoco(gres_release, tmp_path / "refer")
    grefs = json.loads((root / "grefcoco" / "grefs(unc).json").read_text())
    refcoco = [
        dict(r, ann_id=r["ann_id"][0], category_id=r["category_id"][0], split="train", ref_id=10_000 + r["ref_id"])
        for r in grefs
        if len(r["ann_id"]) == 1 and r["ann_id"] != [-1]
    ]
    (root / "refcoco").mkdir()
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refcoco))
    shutil.copy(root / "grefcoco" / "instances.json", root / "refcoco" / "instances.json")
    argv = ["--refer", str(root), "--images", str(gres_release / "images"), "--out", str(tmp_path / "out")]
    assert pack.main([*argv, "--mix", "refcoco,grefcoco", "--workers", "1"]) == 0
    held_out = {r["image_id"] for r in grefs if r["split"] != "train"}
    assert held_out
    shards = tmp_path / "out" / "mix"
    samples = _samples(shards, "train")
    assert samples and not {s["info"]["image_id"] for s in samples} & held_out
    kept = [r for r in refcoco if r["image_id"] not in held_out] + [r for r in grefs if r["split"] == "train"]
    assert len(samples) == len(kept)
    info = json.loads((shards / "manifest.json").read_text())["splits"]["train"]
    assert info["dropped"] == sum(r["image_id"] in held_out for r in refcoco)
    assert {s["info"]["dataset"] for s in samples} == {"refcoco", "grefcoco"}
    nothing = [s for s in samples if np.frombuffer(s["meta"], dtype="<i8")[7] == 0]
    assert len(nothing) == info["no_target"]["objects"] == sum(r["no_target"] for r in grefs if r["split"] == "train")


# ------------------------------------------------------------------------------------------- full disk


def test_a_full_disk_stops_packing_in_one_line_and_leaves_no_manifest(
    release: Path, release_as: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    root = release_as(tmp_path / "refer", "refcoco", "unc")
    argv = ["--refer", str(root), "--images", str(release / "images"), "--out", str(tmp_path / "out"),
            "--workers", "1", "--shard-size", "10", "--dataset", "refcoco", "--split-by", "unc"]  # fmt: skip
    assert run_command("dcris.data.pack", argv) == 0  # what shards/pack.py runs
    shards = tmp_path / "out" / "refcoco"
    real_write, written = wds.TarWriter.write, []

    def write(self: wds.TarWriter, sample: dict) -> int:
        written.append(sample["__key__"])
        if len(written) > 12:  # the disk fills up in the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    capsys.readouterr()
    assert run_command("dcris.data.pack", [*argv, "--seed", "1"]) == 2  # another shuffle: every shard is written again
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    check_disk_full_message(lines[0], shards)
    assert not (shards / "manifest.json").exists()  # the first pack's would describe shards now rewritten
    monkeypatch.undo()
    assert run_command("dcris.data.pack", [*argv, "--seed", "1"]) == 0
    assert len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]) > 1
    assert re.search(r"; 1 of \d+ shards were already complete", capsys.readouterr().out)  # the one written whole
