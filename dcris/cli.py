"""The ``dcris`` command line: one entry point, one module per subcommand.

Each subcommand module has ``main(argv) -> int``; a :class:`~dcris.errors.UserError` anywhere below becomes one
``error: ...`` line and exit status 2, never a stack trace.
"""

from __future__ import annotations

import importlib
import sys

from dcris.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("dcris.params", "parameter counts of a preset (the paper's Tables 2 and 5)"),
    "convert-detris": ("dcris.convert", "convert a released DETRIS checkpoint to this layout"),
    "train": ("dcris.trainer", "train (also: deepspeed launch/train.py ...)"),
    "eval": ("dcris.evaluate", "evaluate mIoU / oIoU / Pr@ on packed splits"),
    "predict": ("dcris.predict", "segment images from text with exported weights"),
    "export-onnx": ("dcris.onnx_export", "one self-contained ONNX graph of an export, checked against PyTorch"),
    "app": ("dcris.app", "a web page to try a model: image + phrases -> masks (needs the app extra)"),
    "serve": ("dcris.serve", "an HTTP JSON API over adapter sets, with dynamic batching (needs the serve extra)"),
    "sweep": ("dcris.sweep", "train, score and tabulate every row of the paper's Table 2, 3, 4 or 5"),
    "demo": ("dcris.demo", "synthetic data -> pack -> train -> evaluate -> pictures, on a CPU in minutes"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: dcris COMMAND [ARGS]\n\ncommands:\n{rows}\n\n'dcris COMMAND --help' describes each."


def run(module: str, argv: list[str]) -> int:
    """Runs ``module.main(argv)``, turning user mistakes into one line on stderr."""
    try:
        return importlib.import_module(module).main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)} ('dcris --help')", file=sys.stderr)
        return 2
    return run(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
