"""Run one of the paper's Tables 2-5, row by row, and write its table (the code is dcris.sweep).

python launch/sweep.py --table 2 --shards data/shards/refcoco
python launch/sweep.py --table 2 --shards data/shards/refcoco --launcher deepspeed --gpus 2
python launch/sweep.py --table 5 --shards data/shards/refcoco --dry-run      (print the commands only)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.sweep", sys.argv[1:]))
