"""The project's one exception type for user mistakes (the command line reports it in one line), the translation
of a full disk into it, and the points where a save can be paused for a test to kill it there."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

PAUSE_ENV = "DCRIS_PAUSE_AT"  # POINT:MARKER pauses the process at POINT (see pause_at)


class UserError(Exception):
    """A mistake in what the user gave (a path, a config, an input): reported as ``error: ...``, exit 2."""


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    # Writers in other languages drop the errno: safetensors (Rust) keeps the OS message, and ``torch.save`` to a
    # path (C++, as DeepSpeed calls it) reports a write cut short only as a position check failing in its writer.
    text = str(exc)
    torch_writer = "inline_container.cc" in text and ("unexpected pos" in text or "file write failed" in text)
    return "No space left on device" in text or (isinstance(exc, RuntimeError) and torch_writer)


@contextlib.contextmanager
def disk_full_is_user_error(folder: str | Path) -> Iterator[None]:
    """Turns a full disk while writing under ``folder`` into one :class:`UserError` line naming the folder and the
    space left on its file system; any other error passes through."""
    try:
        yield
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        existing = next(p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists())
        free = shutil.disk_usage(existing).free
        raise UserError(
            f"no space left on the device of {str(folder)!r} ({free / 2**20:.1f} MiB free): free some space there "
            "and run the command again"
        ) from None


def pause_at(point: str) -> None:
    """Writes the marker file and sleeps when ``DCRIS_PAUSE_AT`` is ``POINT:MARKER`` for this ``point``: a test
    kills the process there, at a moment a real kill can hit, and checks what is left on disk."""
    name, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if name == point and marker:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)
