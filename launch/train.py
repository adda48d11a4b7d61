"""Train DCRIS (SPEC 6) with DeepSpeed; resumes from RUN/checkpoints/latest when it exists.

deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --config configs/dcris-b_refcoco.yaml
torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --config CONFIG [key=value ...]
python launch/train.py --config configs/synthetic.yaml train.epochs=2      (one process; GPU or CPU)
dcris train --config CONFIG [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DEEPSPEED = Path(__file__).resolve().parents[1] / "ds_configs" / "single.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcris train", description="Train DCRIS with DeepSpeed.")
    parser.add_argument("--config", help="run file (YAML/JSON) listing what differs from its preset")
    parser.add_argument("--preset", help="preset name (default: the run file's 'preset' key, else dcris-b)")
    parser.add_argument(
        "--deepspeed", default=str(DEFAULT_DEEPSPEED), metavar="JSON",
        help="DeepSpeed config; batch, accumulation, clipping and precision fields are filled from the config",
    )  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris train`` and of this script."""
    from dcris.config import load_config
    from dcris.train_setup import read_deepspeed_json
    from dcris.trainer import train

    args = parse_args(argv)
    cfg = load_config(args.config, args.preset, args.overrides)
    train(cfg, read_deepspeed_json(args.deepspeed), args.deepspeed)
    return 0


if __name__ == "__main__":
    from dcris.cli import run

    sys.exit(run("launch.train", sys.argv[1:]))
