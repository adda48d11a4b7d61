"""Reading REFER's ``refs(SPLIT_BY).p`` without running what a crafted file asks for.

A pickle can name any importable callable and have the reader call it; the released refs files hold only
lists, dicts, strings and numbers, which pickle writes as opcodes without naming a class. The reader here
refuses every class a file names (``set``/``frozenset`` aside, which carry no code) and stops in one line
naming it.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from dcris.errors import UserError

# Plain containers that some pickle protocols write by name; nothing else is ever looked up.
_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler whose class lookup allows only :data:`_ALLOWED`."""

    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UserError(
            f"{self.source} names the class {module}.{name}: a refs file holds only lists, dicts, strings and "
            "numbers, so it is not read (it may run code); take the file from the REFER release"
        )


def load_refs(path: str | Path) -> Any:
    """The object pickled in a refs file, read with a class lookup that refuses everything but plain containers.

    Raises:
        UserError: The file names a class (the message names it).
        pickle.UnpicklingError, EOFError, ...: The file is not a whole pickle.
    """
    path = Path(path)
    return _PlainUnpickler(path.read_bytes(), path).load()
