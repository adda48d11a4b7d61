"""The checkout's top-level ``kernels/`` folder (installed as ``dcris.kernels``) next to Hugging Face's
``kernels`` package, which transformers imports at import time, and next to another checkout's editable install."""

import importlib.metadata
import os
import shutil
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


def _kernels_file(code: str, cwd: Path, pythonpath: Path) -> Path:
    """The file of ``dcris.kernels.dense_branch_ref`` that a fresh interpreter imports after ``code``."""
    code += "; import dcris.kernels.dense_branch_ref as m; print(m.__file__)"
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1]).resolve()


def test_kernels_come_from_the_checkout_over_another_checkouts_editable_install(tmp_path: Path) -> None:
    """``PYTHONPATH=$PWD`` over an editable install of another checkout: setuptools' editable finder (a
    meta-path finder after the path finder) maps ``dcris.kernels`` to the other checkout's folder; this
    checkout's ``dcris`` must still get this checkout's kernels."""
    other = tmp_path / "other" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    (other / "dense_branch_ref.py").write_text("")
    finder = (
        "import sys, importlib.machinery as m; "
        "F = type('F', (), {'find_spec': classmethod(lambda c, name, path=None, target=None: "
        f"m.PathFinder.find_spec(name, [{str(other.parent)!r}]) if name == 'dcris.kernels' else None)}}); "
        "sys.meta_path.append(F)"
    )
    assert _kernels_file(finder, tmp_path, ROOT).parent == ROOT / "kernels"


def test_kernels_of_an_installed_package_beside_hugging_faces(tmp_path: Path) -> None:
    """Installed as a wheel lays it out (dcris/ with its kernels in dcris/kernels/) in a site folder that also
    holds a top-level ``kernels`` package, as Hugging Face's is: each import finds its own."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "dcris", site / "dcris", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", site / "dcris" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("HUB = True\n")
    got = _kernels_file("import dcris, kernels; assert kernels.HUB", tmp_path, site)
    assert got.parent == (site / "dcris" / "kernels").resolve()
