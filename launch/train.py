"""Train DCRIS with DeepSpeed (the code is dcris.trainer); resumes from RUN/checkpoints/latest.

deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --config configs/dcris-b_refcoco.yaml
torchrun --nproc_per_node 2 launch/train.py --deepspeed ds_configs/zero2.json --config CONFIG [key=value ...]
python launch/train.py --config configs/synthetic.yaml train.epochs=2      (one process; GPU or CPU)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.trainer", sys.argv[1:]))
