"""Where a benchmark figure came from: the commit it was measured at."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The checkout's HEAD commit; outside a git checkout (a copied source tree) ``$DCRIS_COMMIT`` or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DCRIS_COMMIT", "unknown")
    return out.stdout.strip()
