"""Faults injected into a save: a SIGKILL at a pause point, and the check of a full disk's one-line message."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_at(point: str, code: str, tmp_path: Path) -> None:
    """Runs ``python -c code`` until it pauses at ``point`` (``dcris.errors.pause_at``), then kills it with SIGKILL."""
    marker, log = tmp_path / f"paused-at-{point}", tmp_path / f"{point}.log"
    env = dict(os.environ, DCRIS_PAUSE_AT=f"{point}:{marker}", PYTHONPATH=str(REPO))
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"never paused at {point}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def check_disk_full_message(message: str, folder: Path) -> None:
    """One line naming ``folder`` and the free space of its file system (to within 64 MiB of what it is now)."""
    found = re.search(r"\(([0-9.]+) MiB free\)", message)
    assert "\n" not in message and repr(str(folder)) in message and found, message
    assert abs(float(found.group(1)) - shutil.disk_usage(folder).free / 2**20) < 64
