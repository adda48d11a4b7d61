"""``dcris sweep``: rows run through the real entry points on the synthetic release, interrupted rows resume,
finished rows are skipped, the written table holds each run's own numbers; dry runs and bad arguments."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dcris.cli import main as cli_main
from dcris.config import preset, to_dict
from dcris.sweep import TABLES, plan, row_commands
from dcris.sweep import main as sweep_main
from dcris.trainer import main as train_main

REPO = Path(__file__).resolve().parents[1]


def _value(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "[]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def tiny_overrides() -> list[str]:
    """tiny-dcris's backbones and head (random init), 12 blocks deep so that every row of Tables 2-5 fits."""
    model = to_dict(preset("tiny-dcris"))["model"]
    model["vision"]["depth"] = model["text"]["layers"] = 12
    out = [f"model.image_size={model['image_size']}"]
    for section in ("vision", "text", "head"):
        out += [f"model.{section}.{key}={_value(value)}" for key, value in model[section].items()]
    return out


RECIPE = ["train.micro_batch=4", "train.global_batch=4", "train.max_steps=2", "train.precision=fp32",
          "train.log_every_steps=1", "train.lr=0.001", "data.loader=torch", "data.workers=1"]  # fmt: skip


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_rows_resume_skip_and_tabulate(shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    out = tmp_path / "table2"
    overrides = [*tiny_overrides(), *RECIPE]
    # houlsby was interrupted: one step trained and checkpointed, no export yet
    houlsby = {p.row.name: p for p in plan(TABLES[2], shards, out, overrides, ["val"])}["houlsby"]
    train_argv = row_commands(houlsby, [], ["val"], overrides)[0][1:]  # the row's own launch/train.py arguments
    assert train_main([*train_argv, "train.max_steps=1"]) == 0
    shutil.rmtree(out / "houlsby" / "export")
    capfd.readouterr()

    argv = ["--table", "2", "--shards", str(shards), "--out", str(out), "--rows", "fix-backbone,houlsby",
            "--splits", "val,testA", *overrides]  # fmt: skip
    assert sweep_main(argv) == 0
    assert "resumed from" in capfd.readouterr().out
    assert _steps(out / "houlsby") == [1, 2] and _steps(out / "fix-backbone") == [1, 2]

    table = json.loads((out / "table2.json").read_text())
    rows = {r["row"]: r for r in table["rows"]}
    assert [r["row"] for r in table["rows"]] == [r.name for r in TABLES[2].rows]
    assert {name: r["status"] for name, r in rows.items() if r["status"] != "not run"} == {
        "fix-backbone": "finished", "houlsby": "finished"
    }  # fmt: skip
    # trained parameters: none for fix-backbone; houlsby: two adapters (2*64*32 + 32 + 64) in 12 blocks of 2 encoders
    assert rows["fix-backbone"]["params"] == 0
    assert rows["houlsby"]["params"] == 2 * 12 * 2 * (2 * 64 * 32 + 32 + 64)
    assert (rows["houlsby"]["paper_params_m"], rows["full-tune"]["paper_params_m"]) == (1.98, 149.97)
    markdown = (out / "TABLE2.md").read_text()
    for name in ("fix-backbone", "houlsby"):
        metrics = json.loads((out / name / "final_metrics.json").read_text())
        assert set(metrics) == {"val", "testA"}
        for split in ("val", "testA"):
            assert rows[name]["miou"][split] == metrics[split]["miou"]
            assert f"{100 * metrics[split]['miou']:.2f}" in markdown
    assert rows["lora"]["miou"] == {"val": None, "testA": None}
    assert f"| houlsby | {2 * 12 * 2 * 4192:,} | 1.98M |" in markdown

    # a second run skips the finished rows: nothing left to launch
    assert sweep_main([*argv, "--dry-run"]) == 0
    printed = capfd.readouterr().out
    assert "'houlsby': finished" in printed and "'fix-backbone': finished" in printed
    assert "launch/train.py" not in printed and "launch/eval.py" not in printed


def test_dry_run_prints_every_rows_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "t2"
    argv = ["--table", "2", "--shards", str(tmp_path / "shards"), "--out", str(out), "--dry-run",
            "--launcher", "deepspeed", "--gpus", "2", "train.epochs=3"]  # fmt: skip
    assert sweep_main(argv) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("==")]
    train = [cmd for cmd in lines if cmd[3].endswith("launch/train.py")]
    evaluate = [cmd for cmd in lines if cmd[3].endswith("launch/eval.py")]
    assert len(train) == len(evaluate) == len(TABLES[2].rows) == 8
    for cmd in train + evaluate:
        assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--num_gpus", "2"]
    for cmd, row in zip(train, TABLES[2].rows, strict=True):
        zero = "zero3.json" if row.name == "full-tune" else "zero2.json"
        assert cmd[cmd.index("--deepspeed") + 1].endswith(zero) and cmd[cmd.index("--preset") + 1] == row.preset
        assert f"train.output_dir={out / row.name}" in cmd and cmd[-1] == "train.epochs=3"
    assert not out.exists()  # a dry run writes nothing
    assert sweep_main(["--table", "5", "--shards", "s", "--out", str(out), "--dry-run", "--launcher", "torchrun"]) == 0
    first = shlex.split(capsys.readouterr().out.splitlines()[1])
    assert Path(first[0]).name == "torchrun" and first[1:3] == ["--nproc_per_node", "1"]
    assert "model.adapters.vision_layers=8" in first


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--table", "7", "--shards", "x"], "invalid choice: 7"),
        (["--table", "2"], "required: --shards"),
        (["--table", "2", "--shards", "x", "--rows", "houlsby,nope", "--dry-run"], "no row 'nope'"),
        (["--table", "2", "--shards", "x", "train.output_dir=y", "--dry-run"], "use --shards / --out"),
        (["--table", "2", "--shards", "x", "--gpus", "2"], "--gpus 2"),
        (["--table", "3", "--shards", "x", "model.nope=1", "--dry-run"], "unknown config key 'model.nope'"),
        (["--table", "4", "--shards", "x", "model.adapters.vision_hidden=24", "--dry-run"], "multiple of 16"),
    ],
)
def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture[str], args: list[str], needle: str):
    assert cli_main(["sweep", *args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err


def test_missing_shards_stop_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "empty").mkdir()
    assert cli_main(["sweep", "--table", "3", "--shards", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "manifest" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_run_folder_of_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "o" / "da"
    run.mkdir(parents=True)
    recorded = to_dict(preset("dcris-b"))  # both adapters: not the "da" row (DA only)
    (run / "config.json").write_text(json.dumps(recorded))
    argv = ["sweep", "--table", "3", "--shards", "x", "--out", str(tmp_path / "o"), "--dry-run"]
    assert cli_main(argv) == 2
    assert "model.adapters.text_layers" in capsys.readouterr().err


def test_script_form(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), "--table", "2", "--shards", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: no manifest.json")


def test_a_row_is_finished_once_scored_on_every_split(tmp_path: Path):
    from dcris.sweep import row_status

    run = tmp_path / "row"
    assert row_status(run, ["val"]) == "not run"
    run.mkdir()
    assert row_status(run, ["val"]) == "interrupted"
    (run / "export").mkdir()
    (run / "export" / "model.safetensors").write_bytes(b"")
    assert row_status(run, ["val"]) == "trained"
    (run / "final_metrics.json").write_text('{"val": {"miou": 0.5}')  # cut short while written
    assert row_status(run, ["val"]) == "trained"
    (run / "final_metrics.json").write_text('{"val": {"miou": 0.5}}')
    assert row_status(run, ["val"]) == "finished" and row_status(run, ["val", "testA"]) == "trained"


def test_a_trained_row_is_only_scored(tmp_path: Path):
    (tmp_path / "fix-backbone" / "export").mkdir(parents=True)
    (tmp_path / "fix-backbone" / "export" / "model.safetensors").write_bytes(b"")
    planned = {p.row.name: p for p in plan(TABLES[2], tmp_path / "shards", tmp_path, [], ["val"])}
    assert planned["fix-backbone"].status == "trained" and planned["houlsby"].status == "not run"
    (scoring,) = row_commands(planned["fix-backbone"], ["python"], ["val"], [])
    assert scoring[1].endswith("launch/eval.py") and scoring[scoring.index("--splits") + 1] == "val"
    assert [Path(c[1]).name for c in row_commands(planned["houlsby"], ["python"], ["val"], [])] == [
        "train.py", "eval.py"
    ]  # fmt: skip
