"""The checkout's top-level ``kernels/`` folder (installed as ``dcris.kernels``) next to Hugging Face's
``kernels`` package, which transformers imports at import time."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_imports_from_the_checkout_root() -> None:
    """``python -m ...`` from the root puts the root first on sys.path, where ``kernels/`` would shadow the package
    transformers imports (an ImportError of ``CUDAProperties``); through dcris, transformers gets its own."""
    importlib.metadata.distribution("kernels")  # transformers >= 5.25 requires it: the case exists here
    code = "import dcris.vision, sys, transformers.activations; print(sys.modules['kernels'].__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve().parent != ROOT / "kernels"
    own = subprocess.run(
        [sys.executable, "-c", "import dcris.kernels.dense_branch_ref as m; print(m.__file__)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert own.returncode == 0 and Path(own.stdout.strip()).resolve().parent == ROOT / "kernels", own.stderr[-2000:]
