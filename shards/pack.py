"""Pack a REFER release into webdataset shards (the code is dcris.data.pack; --help lists the options).

python shards/pack.py --refer data/refer --dataset refcoco --split-by unc --images data/coco/train2014 --out data/shards
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

from dcris.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("dcris.data.pack", sys.argv[1:]))
