"""Operations dispatched per training step and per inference batch at full width on the meta device, and the
compiled graphs entered per step (the code is dcris.op_count).

python launch/count_ops.py --preset dcris-b --compile --out count_ops.json      (about a minute on a CPU)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.op_count", sys.argv[1:]))
