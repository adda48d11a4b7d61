"""Training and inference throughput as the trainer and evaluation run (the code is dcris.benchmark).

python launch/bench.py --preset dcris-b --batch 32 [--fused] [--compile] [--model-only] --out bench.json
python launch/bench.py --preset tiny-dcris --batch 4 --steps 3 --images 16      (seconds on a CPU)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.benchmark", sys.argv[1:]))
