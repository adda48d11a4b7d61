"""Host synchronisations per training step (between log lines) and per evaluation batch, counted on the CPU.

python launch/sync_bench.py --out sync_bench.json                       (tiny-dcris, about a minute on 2 cores)
python launch/sync_bench.py --deepspeed ds_configs/single.json ds_configs/zero2.json --steps 6

The trainer's own loop (``dcris.trainer``: DeepSpeed's engine on its CPU accelerator) runs ``--steps`` optimizer
steps of ``--micro-batch`` x 2 accumulation on a generated synthetic release, under
:class:`dcris.hostsync.HostSyncCounter`; then ``dcris.evaluate.evaluate`` scores the ``val`` split with the trained
weights. One row per DeepSpeed config: the syncs of a step and of an evaluation batch, by kind, and where they
happen (the JSON lists every calling line).
"""

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's dcris, also when not installed

import torch  # noqa: E402

from dcris.config import load_config  # noqa: E402
from dcris.hostsync import count_evaluation_syncs, count_training_syncs  # noqa: E402
from dcris.provenance import git_commit  # noqa: E402
from dcris.train_setup import precision_dtype, read_deepspeed_json  # noqa: E402


def measure(deepspeed: str, shards: Path, out: Path, args: argparse.Namespace) -> dict:
    cfg = load_config(preset_name=args.preset, overrides=[
        f"data.shards={shards}", f"train.output_dir={out}", "data.loader=torch", "data.workers=1",
        f"train.micro_batch={args.micro_batch}", f"train.global_batch={2 * args.micro_batch}",
        f"train.max_steps={args.steps}", f"train.precision={args.precision}", "train.log_every_steps=1000",
        "train.eval_every_epochs=0", "train.save_every_steps=0", "train.eval_pictures=0", "data.eval_splits=",
    ])  # fmt: skip
    train, run = count_training_syncs(cfg, read_deepspeed_json(deepspeed), deepspeed)
    evaluation = count_evaluation_syncs(
        run.setup.engine.module, str(shards), "val", image_size=cfg.model.image_size, batch_size=args.micro_batch,
        device=run.setup.device, dtype=precision_dtype(cfg.train), workers=1,
    )  # fmt: skip
    return dict(deepspeed=Path(deepspeed).name, train=train, eval=evaluation)


def _row(label: str, r: dict) -> str:
    return f"| {label} | {r['deepspeed']} | {r['train']['syncs_per_step']:g} | {r['eval']['syncs_per_batch']:g} |"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed", nargs="+", default=[str(REPO / "ds_configs" / "single.json"),
                                                          str(REPO / "ds_configs" / "zero2.json")])  # fmt: skip
    parser.add_argument("--preset", default="tiny-dcris")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps (the first and last are not counted)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--label", default="", help="a name for this code (e.g. before, after)")
    parser.add_argument("--out", default="sync_bench.json")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first and the last step are not counted)")
    from dcris.data import pack, synth

    rows, commit = [], git_commit()  # the measured code's, before anything changes under the run
    with tempfile.TemporaryDirectory(prefix="dcris-syncs-") as tmp:
        release = synth.make_synthetic_release(Path(tmp) / "release", images=24, seed=0)
        pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc", "--images",
                   str(release / "images"), "--out", str(Path(tmp) / "shards"), "--workers", "1"])  # fmt: skip
        shards = Path(tmp) / "shards" / "synthetic"
        for i, deepspeed in enumerate(args.deepspeed):
            rows.append(measure(deepspeed, shards, Path(tmp) / f"run{i}", args))
            print(_row(args.label, rows[-1]), flush=True)  # as it comes
    record = dict(
        label=args.label, commit=commit, preset=args.preset, precision=args.precision,
        micro_batch=args.micro_batch, steps=args.steps, rows=rows,
        env=dict(python=platform.python_version(), torch=torch.__version__, cpu=_cpu()),
    )  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=2))
    print("| code | DeepSpeed config | syncs per training step | syncs per evaluation batch |")
    print("|---|---|---|---|")
    for r in rows:
        print(_row(args.label, r))
        for kind in ("train", "eval"):
            for where, n in r[kind]["where"].items():
                print(f"    {kind}: {n} x {where}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
