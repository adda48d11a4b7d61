"""Two CPU ranks (gloo): ZeRO-3 training, evaluation and export to the end; the shared-output-folder check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port

from dcris.errors import UserError
from dcris.train_setup import check_shared_folder

REPO = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _run_two_ranks(argv: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGV``; a run still going after ``timeout_s`` is killed and fails the test."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # this process's own group is not theirs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.Popen(
        [*cmd, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, err = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in {timeout_s} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_zero3_on_two_ranks_trains_evaluates_and_exports(shards: Path, tmp_path: Path) -> None:
    from dcris.checkpoint import load_weights
    from dcris.data import build_loader
    from dcris.evaluate import evaluate
    from dcris.export import load_exported

    # the ranks get different numbers of testA batches: evaluation must pad the shorter rank, or ZeRO-3 hangs
    options = dict(train=False, batch_size=4, image_size=112, world_size=2, loader="torch")
    batches = [len(build_loader(shards, "testA", rank=rank, **options)) for rank in (0, 1)]
    assert batches[0] != batches[1]
    run = tmp_path / "run"
    proc = _run_two_ranks(
        [str(REPO / "launch" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / "zero3.json"),
         "--preset", "tiny-dcris", f"data.shards={shards}", f"train.output_dir={run}", "data.loader=torch",
         "data.workers=0", "train.micro_batch=2", "train.global_batch=4", "train.max_steps=3", "train.precision=fp32",
         "train.eval_batch_size=4", "data.eval_splits=val,testA"],
        cwd=tmp_path, timeout_s=480,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU ranks keep per-rank BatchNorm statistics" in proc.stdout
    assert (run / "checkpoints" / "latest").read_text() == "step00000003"
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["results"]
    manifest = json.loads((shards / "manifest.json").read_text())["splits"]
    assert {split: r["count"] for split, r in final.items()} == {s: manifest[s]["sentences"] for s in ("val", "testA")}
    # the contact sheet: every rank predicted its pairs (each ZeRO-3 forward is a collective), rank 0 drew it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [image.step for image in events.Images("eval/val/pictures")] == [3]
    # one process scoring the export agrees: the padding batches counted nothing
    model = load_exported(run / "export")
    single = evaluate(model, str(shards), ["val", "testA"], image_size=112, batch_size=4, loader="torch", workers=0)
    for split, result in single.items():
        assert result["count"] == final[split]["count"]
        assert result["miou"] == pytest.approx(final[split]["miou"], abs=1e-3)
    # the checkpoint folder reassembles the ZeRO-3 partitions into the exported weights
    from_folder = load_weights(run / "checkpoints").state_dict()
    assert all(torch.equal(v, from_folder[k]) for k, v in model.state_dict().items())


def _shared_folder_worker(rank: int, port: int, runs: list[list[str]], results: dict) -> None:
    """Runs the check once per entry of ``runs`` (each: this rank's folder per rank); records ok or the message."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for i, folders in enumerate(runs):
        try:
            check_shared_folder(folders[rank], rank, 2, timeout_s=0.5)
            results[i, rank] = "ok"
        except UserError as exc:
            results[i, rank] = str(exc)
    dist.destroy_process_group()


def test_output_folder_must_be_seen_by_every_rank(tmp_path: Path) -> None:
    shared, separate = [str(tmp_path / "run")] * 2, [str(tmp_path / "node0"), str(tmp_path / "node1")]
    results = mp.Manager().dict()
    mp.spawn(_shared_folder_worker, args=(free_port(), [shared, separate], results), nprocs=2)
    assert results[0, 0] == results[0, 1] == "ok"
    assert not list(Path(shared[0]).iterdir())  # the token is gone
    for rank in (0, 1):  # both ranks stop, each naming its folder and the rank that cannot see rank 0's files
        assert "is not shared: rank 1 on" in results[1, rank] and repr(separate[rank]) in results[1, rank]
