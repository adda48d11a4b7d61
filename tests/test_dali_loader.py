"""The DALI loader's own paths: one pipeline per run and exact resume, token tables, masks at the loss's size,
the shard format check, no host copies; each against the path it replaces."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from released_geometry import natural_image, object_mask

from dcris.cli import main as cli_main
from dcris.data import build_loader, dali_available
from dcris.data.common import SHARD_FORMAT
from dcris.errors import UserError

pytestmark = pytest.mark.skipif(not dali_available(), reason="no DALI")
LOADERS = ["torch", "dali"]
SIZE, MASK = 112, 32  # a small canvas and the logits' side for it (4 x 112 / 14)


@pytest.fixture(scope="module")
def shards(seven_object_shards: Path) -> Path:
    return seven_object_shards


def _train_loader(shards: Path, epoch: int, loader: str = "dali", **options: object):  # noqa: ANN202
    options = dict(dict(batch_size=3, image_size=SIZE, rank=1, world_size=2, seed=7, shuffle_buffer=5), **options)
    return build_loader(shards, "train", train=True, loader=loader, epoch=epoch, workers=1, **options)


def _equal_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_one_pipeline_runs_through_the_epochs_and_a_resumed_epoch_reads_the_same(
    shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcris.data import dali_loader

    built = []
    init = dali_loader._Stream.__init__

    def counting(self, loader) -> None:  # noqa: ANN001
        built.append(loader.epoch)
        init(self, loader)

    monkeypatch.setattr(dali_loader._Stream, "__init__", counting)
    monkeypatch.setattr(dali_loader, "_STREAMS", type(dali_loader._STREAMS)())
    uninterrupted = [list(_train_loader(shards, epoch, mask_size=MASK)) for epoch in range(3)]
    assert built == [0]  # one pipeline for the three epochs
    assert [int(r) for r in uninterrupted[1][0]["ref_id"]] != [int(r) for r in uninterrupted[0][0]["ref_id"]]
    dali_loader._STREAMS.clear()  # a new process, resuming inside epoch 1 as the trainer does: skip, then read
    resumed = iter(_train_loader(shards, 1, mask_size=MASK))
    skipped = [next(resumed) for _ in range(2)]
    _equal_batches(skipped + list(resumed), uninterrupted[1])
    _equal_batches(list(_train_loader(shards, 2, mask_size=MASK)), uninterrupted[2])  # epoch 2 after epoch 1
    assert built == [0, 1]
    dali_loader._STREAMS.clear()
    _equal_batches(list(_train_loader(shards, 2, mask_size=MASK)), uninterrupted[2])  # a run starting at epoch 2
    left = iter(_train_loader(shards, 0, mask_size=MASK))
    next(left)  # an epoch left unfinished: the next loader cannot continue that pipeline
    _equal_batches(list(_train_loader(shards, 0, mask_size=MASK)), uninterrupted[0])
    assert built == [0, 1, 2, 0, 0]


def _tar_samples(tar: Path) -> list[dict[str, bytes]]:
    """The samples of a shard, in order, as {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as f:
        for member in f.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = f.extractfile(member).read()
    return list(samples.values())


def test_token_and_meta_tables_hold_each_samples_fields(shards: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["format"] == SHARD_FORMAT
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            samples = _tar_samples(shards / shard["tar"])
            with np.load(shards / shard["tables"]) as tables:
                tokens, meta = tables["tokens"], tables["meta"]
            assert tokens.dtype == np.int32 and meta.dtype == np.int64 and len(tokens) == len(meta) == len(samples)
            for sample, rows, fields in zip(samples, tokens, meta, strict=True):
                own = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)  # (K, L)
                assert np.array_equal(rows[: len(own)], own) and not rows[len(own) :].any()
                assert np.array_equal(fields, np.frombuffer(sample["meta"], dtype="<i8"))


@pytest.mark.parametrize("loader", LOADERS)
def test_old_shards_stop_with_one_line_saying_to_repack(
    shards: Path, tmp_path: Path, loader: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(dict(manifest, format="dcris-shards/3")))
    with pytest.raises(UserError) as caught:
        build_loader(old, "val", train=False, batch_size=2, loader=loader)
    message = str(caught.value)
    assert "\n" not in message and "'dcris-shards/3'" in message and str(old) in message
    assert "repack them with shards/pack.py" in message
    # through the command line: one error line, no traceback
    run = ["--preset", "tiny-dcris", f"data.shards={old}", f"data.loader={loader}", f"train.output_dir={tmp_path}"]
    assert cli_main(["train", *run]) != 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"], err
    assert "Traceback" not in err


def _dali_masks(size: int, mask_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(canvas mask float32 (S, S), mask at ``mask_size`` (M, M)) of DALI's two paths, for masks of many sizes."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from dcris.data.dali_loader import decode_mask, letterbox_mask

    rng = np.random.default_rng(11)
    sizes = [(480, 640), (640, 427), (333, 501), (150, 97), (97, 1000), (7, 5), (612, 612)]
    jpegs, pngs = [], []
    for h, w in sizes:
        for array, fmt, out in ((natural_image(rng, h, w), "JPEG", jpegs), (object_mask(rng, h, w) * 255, "PNG", pngs)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format=fmt)
            out.append(np.frombuffer(buffer.getvalue(), np.uint8))

    @pipeline_def(batch_size=len(sizes), num_threads=1, device_id=None)
    def pipeline():  # noqa: ANN202
        jpeg = fn.external_source(source=lambda: jpegs, batch=True)
        orig = decode_mask(fn.external_source(source=lambda: pngs, batch=True))
        return tuple(letterbox_mask(orig, jpeg, size, m, gpu=False) for m in (size, mask_size))

    pipe = pipeline()
    pipe.build()
    canvas, small = pipe.run()
    return [(np.asarray(canvas[i])[0], np.asarray(small[i])[0]) for i in range(len(sizes))]


@pytest.mark.parametrize("size", [448, 112])
def test_training_mask_at_the_loss_size_is_the_loss_resize_of_the_canvas_mask(size: int) -> None:
    mask_size = 4 * size // 14  # the logits' side: 128 for 448, 32 for 112
    differences = []
    for canvas, small in _dali_masks(size, mask_size):
        resized = F.interpolate(torch.from_numpy(canvas)[None, None], size=mask_size, mode="nearest")[0, 0]
        assert small.shape == (mask_size, mask_size)
        differences.append((torch.from_numpy(small) - resized).abs().flatten())
    difference = torch.cat(differences)
    # The same points are sampled, but through another matrix (the subgrid's), which DALI inverts in float: a
    # source coordinate may round a few ulps apart and move a bilinear value across a uint8 rounding boundary.
    assert difference.max() <= 1 / 255 + 1e-7 and (difference > 0).float().mean() <= 1e-3, (
        difference.max() * 255,
        (difference > 0).sum(),
    )


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_give_the_loss_resize_of_their_canvas_masks(shards: Path, loader: str) -> None:
    canvas = list(_train_loader(shards, 1, loader))
    small = list(_train_loader(shards, 1, loader, mask_size=MASK))
    for a, b in zip(canvas, small, strict=True):
        assert torch.equal(a["ref_id"], b["ref_id"]) and torch.equal(a["image"], b["image"])
        assert b["mask"].shape == (3, 1, MASK, MASK)
        resized = F.interpolate(a["mask"], size=MASK, mode="nearest")
        assert (b["mask"] - resized).abs().max() <= 1 / 255 + 1e-7


def test_training_batches_copy_nothing_back_to_the_host(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_: object, **__: object) -> None:
        raise AssertionError("a host copy in the training loop")

    monkeypatch.setattr(torch.Tensor, "cpu", refused)
    monkeypatch.setattr(torch.Tensor, "numpy", refused)
    batches = list(_train_loader(shards, 0, mask_size=MASK))
    assert len(batches) == len(_train_loader(shards, 0)) > 0


@pytest.mark.gpu
def test_dali_gpu_object_batches_never_synchronise(shards: Path) -> None:
    loader = _train_loader(shards, 0, device="cuda", mask_size=MASK)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader.object_batches())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(b["image"].is_cuda and b["tokens_all"].is_cuda and not b["meta"].is_cuda for b in batches)


def test_bench_profile_times_every_stage(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    script = Path(__file__).parents[1] / "shards" / "bench_loaders.py"
    spec = importlib.util.spec_from_file_location("bench_loaders", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = ["--shards", str(shards), "--batch-size", "4", "--image-size", "56", "--workers", "1", "--repeats", "1"]
    assert bench.main([*argv, "--profile", "--json", str(out)]) == 0
    profile = json.loads(out.read_text())["profile"]
    assert [row["stage"] for row in profile] == list(bench.STAGES)
    assert all(row["ms_per_batch"] > 0 for row in profile)
    # each stage is charged what it adds to the pipeline that stops before it
    sums = np.cumsum([row["adds_ms"] for row in profile])
    assert np.allclose(sums, [row["ms_per_batch"] for row in profile], atol=0.02)
    printed = capsys.readouterr().out
    assert all(stage in printed for stage in bench.STAGES)
    # a Markdown row per loader, printed before the profile (as measured: a time limit keeps the rows)
    rows = [line for line in printed.splitlines() if line.startswith(("| torch |", "| dali |"))]
    assert [r.rsplit(" | ", 1)[0] for r in rows] == ["| torch | cpu | cpu", "| dali | cpu | cpu"]
    assert all(float(r.rsplit(" | ", 1)[1].strip(" |")) > 0 for r in rows)
    assert printed.index(rows[-1]) < printed.index(bench.STAGES[0])
