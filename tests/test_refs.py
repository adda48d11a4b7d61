"""REFER refs files are read with a class lookup that refuses everything a crafted pickle could run."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from dcris.data import pack
from dcris.data.refs import load_refs
from dcris.errors import UserError


class _RunsCode:
    """Pickles as a call of ``os.system``: unpickling it with plain ``pickle`` would run the shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_refs_read_as_pickle_reads_them(release: Path, tmp_path: Path, protocol: int) -> None:
    refs = pickle.loads((release / "synthetic" / "refs(unc).p").read_bytes())
    refs[0]["extra"] = {"ids": {3, 5}, "pair": (1, 2.5), "none": None, "flag": True}
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(refs, protocol=protocol))
    assert load_refs(path) == refs


def test_a_pickle_that_would_run_code_is_refused(release: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    refs = pickle.loads((release / "synthetic" / "refs(unc).p").read_bytes())
    refs[1]["sentences"][0]["sent"] = _RunsCode(f"touch {marker}")
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    (bad / "synthetic" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(UserError, match=r"names the class (posix|os)\.system"):
        load_refs(bad / "synthetic" / "refs(unc).p")
    argv = ["--refer", str(bad), "--dataset", "synthetic", "--split-by", "unc", "--images", str(bad / "images")]
    with pytest.raises(SystemExit) as exit_info:  # the packer stops in one line before any work
        pack.main([*argv, "--out", str(tmp_path / "out"), "--workers", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "system" in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()
