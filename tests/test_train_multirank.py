"""Two CPU ranks (gloo): ZeRO-3 training, evaluation and export to the end; resuming on another number of ranks;
the shared-output-folder check."""

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


def _run_two_ranks(argv: list[str], cwd: Path, timeout_s: float, ranks: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node RANKS ARGV``; a run still going after ``timeout_s`` is killed and fails the test."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}  # this process's own group is not theirs
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    cmd += ["--master_port", str(free_port())]
    proc = subprocess.Popen(
        [*cmd, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, err = proc.communicate()
        pytest.fail(f"the {ranks}-rank run did not finish in {timeout_s} s:\n{err[-3000:]}")
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


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_run_resumes_on_another_number_of_ranks(shards: Path, tmp_path: Path, zero: str) -> None:
    """2 ranks save at step 2, 1 rank resumes and saves at step 4, 2 ranks resume: each resume starts from exactly
    the state the saving run had (fp32 weights, Adam moments, BatchNorm statistics, step, LR)."""
    run = tmp_path / "run"
    common = [
        "--deepspeed", str(REPO / "ds_configs" / f"{zero}.json"), "--preset", "tiny-dcris", f"data.shards={shards}",
        f"train.output_dir={run}", "data.loader=torch", "data.workers=0", "train.micro_batch=2",
        "train.global_batch=4", "train.precision=fp32", "train.save_every_steps=2", "train.eval_every_epochs=0",
    ]  # fmt: skip
    states = {}
    for name, ranks, steps in (("first", 2, 2), ("narrower", 1, 4), ("wider", 2, 4)):
        argv = [str(REPO / "tests" / "engine_state.py"), str(tmp_path / name), *common, f"train.max_steps={steps}"]
        proc = _run_two_ranks(argv, tmp_path, timeout_s=300, ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[name] = {
            when: torch.load(dump) for when in ("start", "end") if (dump := tmp_path / f"{name}.{when}.pt").exists()
        }
        if name != "first":
            assert f"was written by {3 - ranks} rank(s): resumed on {ranks}" in proc.stdout
            assert not (run / "checkpoints" / "universal").exists()  # the converted copy is gone once loaded
    for saved, resumed in (("first", "narrower"), ("narrower", "wider")):
        before, after = states[saved]["end"], states[resumed]["start"]
        assert before.keys() == after.keys()
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert int(states["first"]["end"]["step"]) == 2 and int(states["narrower"]["end"]["step"]) == 4
    exp_avg = [k for k in states["first"]["end"] if k.endswith("/exp_avg")]
    assert exp_avg and all(states["first"]["end"][k].abs().sum() > 0 for k in exp_avg)  # moments were restored


def test_a_number_of_ranks_that_cannot_keep_the_global_batch_stops_first(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcris.trainer
    from dcris.config import load_config

    monkeypatch.setattr(dcris.trainer, "init_distributed", lambda: (0, 0, 3))  # as a launcher of 3 ranks would
    cfg = load_config(None, "tiny-dcris", [f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}",
                                           "train.micro_batch=2", "train.global_batch=4"])  # fmt: skip
    split = r"^train.global_batch 4 does not split into micro-batches of at most train.micro_batch 2 over 3 ranks"
    with pytest.raises(UserError, match=split):
        dcris.trainer.start_run(cfg, {}, "DeepSpeed config")
    assert not (tmp_path / "run").exists()


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
