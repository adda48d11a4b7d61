"""One shard layout: every run file reads a folder that the README's pack commands write, with the sentence length
those commands give it, and evaluates only val while training (the test splits are scored afterwards)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dcris.config import load_config
from dcris.data import pack

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _pack_commands(lines: list[str]) -> dict[str, int]:
    """Folder -> context length written by each ``python shards/pack.py ...`` command among the lines."""
    written = {}
    for line in lines:
        if line.startswith("python shards/pack.py "):
            args = pack._parse_args(shlex.split(line)[2:])
            split_by = None if args.mix else args.split_by
            length = args.context_length or pack.default_context_length(args.dataset, split_by)
            folder = str(Path(args.out) / pack.output_name(args))
            assert folder not in written, f"two pack commands write {folder}: the second would replace the first"
            written[folder] = length
    return written


def _readme_folders() -> dict[str, int]:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    return _pack_commands([line.strip() for block in blocks for line in block.splitlines()])


def _header(path: Path, tag: str) -> list[str]:
    """The commands after ``# tag:`` in a run file's comment header."""
    prefix = f"# {tag}:"
    return [line[len(prefix) :].strip() for line in path.read_text().splitlines() if line.startswith(prefix)]


def test_the_readme_packs_the_documented_layout() -> None:
    folders = _readme_folders()
    assert folders == {
        "data/shards/refcoco": 17,
        "data/shards/refcoco+": 17,
        "data/shards/refcocog": 22,  # G-Ref umd: the released umd configs' word_len
        "data/shards-google/refcocog": 17,
        "data/shards/mix": 17,  # DETRIS_large_mixed: word_len 17
        "data/shards-17/refcocog": 17,
        "data/shards/synthetic": 17,
        "data/shards/grefcoco": 17,
        "data/shards/synthetic_gres": 17,
        "data/shards-gres/mix": 17,  # RefCOCO + gRefCOCO, beside the three-set mix
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_reads_a_folder_the_readme_writes(path: Path) -> None:
    folders = _readme_folders()
    cfg = load_config(str(path))
    assert cfg.data.shards in folders, f"{path.name}: data.shards={cfg.data.shards} is not packed by the README"
    # the model reads the sentence length the shards hold (training would set it anyway; the run file says it)
    assert cfg.model.text.context_length == folders[cfg.data.shards], path.name
    # the header's own pack commands are the README's, and its test commands read README folders
    assert _pack_commands(_header(path, "pack")).items() <= folders.items(), path.name
    assert cfg.data.shards in _pack_commands(_header(path, "pack")), path.name
    for command in _header(path, "test"):
        argv = shlex.split(command)
        assert argv[:2] == ["python", "launch/eval.py"], command
        shards = argv[argv.index("--shards") + 1]
        assert shards in folders, command
        assert argv[argv.index("--weights") + 1] == f"{cfg.train.output_dir}/export", command
    if path.stem in ("synthetic", "synthetic_gres", "dcris-l_mixed"):  # no test header, or another set's test splits
        return
    # training evaluates val only; the header scores the test splits afterwards
    assert cfg.data.eval_splits == ["val"], path.name
    (test,) = _header(path, "test")
    splits = shlex.split(test)[shlex.split(test).index("--splits") + 1].split(",")
    expected = {"refcocog_google": ["val"], "refcocog_umd": ["val", "test"]}.get(
        path.stem.split("_", 1)[1], ["val", "testA", "testB"]
    )
    assert splits == expected, path.name
