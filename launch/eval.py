"""Evaluate exported weights or a checkpoint on packed splits (the code is dcris.evaluate).

python launch/eval.py --weights RUN/export --shards data/shards/refcoco --splits val,testA,testB [--pictures 16]
torchrun --nproc_per_node 8 launch/eval.py ...      (samples sharded over ranks, sums reduced exactly)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.evaluate", sys.argv[1:]))
