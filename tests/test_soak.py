"""launch/soak.py's argument checks: a mistake stops at once, with a usage line, before any data or training."""

import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "launch" / "soak.py"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--minutes", "0"], "--minutes and --interval must be positive"),
        (["--every", "0"], "--every and --keep must be at least 1"),
        (["--minutes", "5", "--warmup", "5"], "--warmup must be at least 0 and below --minutes (5)"),
    ],
)
def test_bad_arguments_stop_before_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    with pytest.raises(SystemExit) as stopped:
        soak.main([*argv, "--workdir", str(tmp_path / "soak")])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "soak").exists()
