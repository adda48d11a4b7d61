"""Soak: the tiny preset trained on the CPU for a fixed wall time, evaluating and checkpointing every K steps,
while its resident memory, open file descriptors and checkpoint folder are sampled; do they stay bounded?

python launch/soak.py --minutes 20 --every 25 --out soak.json [key=value ...]   (overrides of the recipe)

The run is the demo's recipe (configs/synthetic.yaml: tiny-dcris, fp32, the PyTorch loader) on a small synthetic
release packed first, with ``train.eval_every_steps`` = ``train.save_every_steps`` = ``--every`` and
``train.keep_checkpoints`` = ``--keep``. The trainer stops by steps, not by time, so it runs in a child process
(``python launch/train.py``, its output in WORKDIR/train.log) given more epochs than it can finish, and is
stopped with SIGTERM at the deadline (SIGKILL if it lingers): the measurement ends with the sample just before
the stop, so a checkpoint cut short by the signal is never counted. (Looping whole runs instead would measure
start-ups, not a long run.)

Every ``--interval`` seconds the parent samples, with psutil: the trainer's RSS, the RSS of it and its
DataLoader workers together, its open file descriptors, its live child processes, and the checkpoint folder's
size and tags. Samples in the first ``--warmup`` of the run (by default a fifth of it: every code path -- train,
evaluation, save, pruning -- has run a few times by then) are left out of the bounds, which compare the first
sample after warm-up with the later ones:

    rss        the trainer's RSS grows by at most 10% from the first sample to the last
    fds        the median of the last quarter of the samples is within 4 of the median of the first quarter
               (medians: an evaluation's loader workers add pipes while they run)
    checkpoints  the folder never holds more than (keep + 1) x its largest tag (a new tag is written before the
               oldest is pruned); at the end at most ``--keep`` tags remain (exactly that many once that many
               were saved)

It prints a table of the samples and the verdicts, and writes them as JSON to ``--out``; exit 0 when every
bound held, 1 when one did not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's dcris, also when not installed

RECIPE = REPO / "configs" / "synthetic.yaml"
RSS_GROWTH_BOUND = 0.10  # of the first sample after warm-up
FD_SLACK = 4  # descriptors the late samples' median may differ from the early ones'
STOP_GRACE_S = 30  # after SIGTERM, before SIGKILL
MIB = 1 << 20


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall time of the training run")
    parser.add_argument("--every", type=int, default=25, help="evaluate and checkpoint every this many steps")
    parser.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints: newest checkpoints kept")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="minutes left out of the bounds (default: a fifth of the run)")
    parser.add_argument("--images", type=int, default=200, help="synthetic images to generate and pack")
    parser.add_argument("--workdir", help="folder for the data, the run and its log (default: a temporary one)")
    parser.add_argument("--out", help="write the samples and verdicts here as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        parser.error("--minutes and --interval must be positive")
    if args.every < 1 or args.keep < 1 or args.images < 10:
        parser.error("--every and --keep must be at least 1, --images at least 10")
    args.warmup = args.minutes / 5 if args.warmup is None else args.warmup
    if not 0 <= args.warmup < args.minutes:
        parser.error(f"--warmup must be at least 0 and below --minutes ({args.minutes:g})")
    return args


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist yet); files pruned meanwhile are skipped."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _last_step(log: Path) -> int:
    """The last step the trainer logged (train_log.jsonl), 0 before the first."""
    if not log.is_file():
        return 0
    lines = log.read_text().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def sample(trainer, checkpoints: Path, log: Path, start: float) -> dict:  # noqa: ANN001 (psutil.Process)
    """One sample of the trainer and its checkpoint folder."""
    import psutil

    children = []
    for child in trainer.children(recursive=True):
        try:
            children.append(child.memory_info().rss)
        except psutil.NoSuchProcess:  # a loader worker that has just ended
            pass
    rss = trainer.memory_info().rss
    tags = sorted(p for p in checkpoints.glob("step*") if p.is_dir()) if checkpoints.is_dir() else []
    return dict(
        t_s=round(time.time() - start, 1),
        step=_last_step(log),
        rss_mib=round(rss / MIB, 1),
        rss_with_workers_mib=round((rss + sum(children)) / MIB, 1),
        fds=trainer.num_fds(),
        children=len(children),
        checkpoints_mib=round(_folder_bytes(checkpoints) / MIB, 2),
        largest_tag_mib=round(max((_folder_bytes(t) for t in tags), default=0) / MIB, 2),
        tags=len(tags),
    )


def verdicts(samples: list[dict], warmup_s: float, keep: int) -> dict:
    """The bounds of the module docstring over the samples after warm-up."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        return dict(ok=False, reason="fewer than two samples after warm-up: run longer or sample more often")
    first, last = after[0], after[-1]
    growth = (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    quarter = max(1, len(after) // 4)
    early_fds, late_fds = (statistics.median(s["fds"] for s in part) for part in (after[:quarter], after[-quarter:]))
    tag_mib = max(s["largest_tag_mib"] for s in samples)
    folder_max = max(s["checkpoints_mib"] for s in after)
    result = dict(
        first=first,
        last=last,
        rss_growth=round(growth, 4),
        rss_ok=growth <= RSS_GROWTH_BOUND,
        rss_with_workers_growth=round(
            (last["rss_with_workers_mib"] - first["rss_with_workers_mib"]) / first["rss_with_workers_mib"], 4
        ),
        fds_early_median=early_fds,
        fds_late_median=late_fds,
        fds_peak=max(s["fds"] for s in after),
        fds_ok=abs(late_fds - early_fds) <= FD_SLACK,
        checkpoint_tag_mib=tag_mib,
        checkpoints_max_mib=folder_max,
        checkpoints_bound_mib=round((keep + 1) * tag_mib, 2),
        checkpoints_ok=folder_max <= (keep + 1) * tag_mib + 0.01,  # + 0.01 MiB: ``latest`` and rounding
        tags_at_end=last["tags"],
        keep_checkpoints=keep,
        tags_ok=last["tags"] <= keep and (last["tags"] == keep or max(s["tags"] for s in samples) < keep),
    )
    result["ok"] = all(result[k] for k in ("rss_ok", "fds_ok", "checkpoints_ok", "tags_ok"))
    return result


def _table(samples: list[dict], rows: int = 20) -> str:
    """At most ``rows`` samples, evenly spaced, the first and the last included."""
    step = max(1, -(-len(samples) // rows))
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    widths = {column: max(len(column), 6) for column in samples[0]}
    lines = ["  ".join(f"{column:>{width}}" for column, width in widths.items())]
    lines += ["  ".join(f"{s[column]:>{width}}" for column, width in widths.items()) for s in shown]
    return "\n".join(lines)


def _prepare_data(workdir: Path, images: int) -> Path:
    """The synthetic release packed into shards under ``workdir`` (kept between soaks in the same folder)."""
    from dcris.data import synth

    shards = workdir / "shards" / "synthetic"
    if not (shards / "manifest.json").is_file():
        release = synth.make_synthetic_release(workdir / "release", images=images, seed=0)
        synth.pack_synthetic_release(release, workdir / "shards", "--workers", "1")
    return shards


def _stop(process: subprocess.Popen) -> int:
    """SIGTERM to the trainer, SIGKILL when it is still there after STOP_GRACE_S; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    import psutil

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dcris-soak-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shards = _prepare_data(workdir, args.images)
    run = workdir / "run"
    if run.exists():
        raise SystemExit(f"error: {run} exists: a soak starts from no checkpoint; remove it or use another --workdir")
    overrides = [
        f"data.shards={shards}", f"train.output_dir={run}", "train.epochs=1000000", "train.max_steps=0",
        "train.eval_every_epochs=0", f"train.eval_every_steps={args.every}", f"train.save_every_steps={args.every}",
        f"train.keep_checkpoints={args.keep}", f"train.log_every_steps={args.every}", *args.overrides,
    ]  # fmt: skip
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(RECIPE), *overrides]
    log_path = workdir / "train.log"
    start = time.time()
    deadline = start + args.minutes * 60
    samples: list[dict] = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        trainer = psutil.Process(process.pid)
        try:
            while time.time() < deadline and process.poll() is None:
                time.sleep(min(args.interval, max(0.0, deadline - time.time())))
                if process.poll() is None:
                    samples.append(sample(trainer, run / "checkpoints", run / "train_log.jsonl", start))
                    print(json.dumps(samples[-1]), flush=True)
        finally:
            early = process.poll()
            status = _stop(process)
    if early is not None:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        print(f"the trainer ended before the deadline (exit {status}); the end of {log_path}:\n{tail}", file=sys.stderr)
        return 1
    result = dict(
        minutes=args.minutes, every=args.every, keep=args.keep, interval_s=args.interval, warmup_min=args.warmup,
        command=command, bounds=dict(rss_growth=RSS_GROWTH_BOUND, fd_slack=FD_SLACK, checkpoint_tags=args.keep + 1),
        **verdicts(samples, args.warmup * 60, args.keep), samples=samples,
    )  # fmt: skip
    print("\n" + _table(samples))
    print(
        f"\nafter warm-up ({args.warmup:g} min), first -> last sample: "
        + (
            f"rss {result['first']['rss_mib']} -> {result['last']['rss_mib']} MiB ({result['rss_growth']:+.1%}, "
            f"bound +{RSS_GROWTH_BOUND:.0%}: {'ok' if result['rss_ok'] else 'EXCEEDED'}); "
            f"fds median {result['fds_early_median']} -> {result['fds_late_median']} (peak {result['fds_peak']}, "
            f"bound +-{FD_SLACK}: {'ok' if result['fds_ok'] else 'EXCEEDED'}); "
            f"checkpoints at most {result['checkpoints_max_mib']} MiB (bound {result['checkpoints_bound_mib']}: "
            f"{'ok' if result['checkpoints_ok'] else 'EXCEEDED'}); {result['tags_at_end']} tags at the end, "
            f"keep_checkpoints {args.keep} ({'ok' if result['tags_ok'] else 'WRONG'}); "
            f"{result['last']['step']} steps"
            if "first" in result
            else result["reason"]
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
