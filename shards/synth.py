"""Write a synthetic REFER-layout release (the code is dcris.data.synth).

python shards/synth.py --out data/synth [--images N] [--seed S]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.data.synth", sys.argv[1:]))
