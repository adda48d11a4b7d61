"""``dcris sweep``: one of the paper's Tables 2-5, every row trained, scored and tabulated by one command.

python launch/sweep.py --table 2 --shards data/shards/refcoco                     (one process per row)
python launch/sweep.py --table 2 --shards DIR --launcher deepspeed --gpus 2       (the paper's 2 x 16 images)
python launch/sweep.py --table 5 --shards DIR --rows layers-8,layers-4-8-11 --dry-run

Each row is its own run folder OUT/ROW, trained through launch/train.py under the chosen launcher (ZeRO-2;
ZeRO-3 for full-tune) and then scored on the export by launch/eval.py, which writes OUT/ROW/final_metrics.json.
Rows run one after another (``--rows`` picks some). A row with final metrics is finished and skipped; a row with
an export is only scored; any other row is started, or resumed from OUT/ROW/checkpoints/latest by the trainer.
After every row, OUT/TABLE<N>.md and OUT/table<N>.json list all rows of the table with their status: trained
parameters (head excluded) beside the paper's count, and the measured mIoU per split beside the paper's
(unknown: the tables' mIoU figures are not available from a citable source). ``key=value`` overrides apply to
every row, after the row's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcris.config import Config, load_config, to_dict
from dcris.errors import UserError
from dcris.evaluate import split_size
from dcris.export import WEIGHTS_FILE
from dcris.params import parameter_report
from dcris.trainer import EXPORT_NAME

REPO = Path(__file__).resolve().parents[1]
FINAL_METRICS = "final_metrics.json"
LAUNCHERS = ("python", "torchrun", "deepspeed")
# model settings that change how weights are fetched or how fast they run, not what the model is
NOT_ARCHITECTURE = ("model.allow_download", "model.adapters.fused_dense")
# a row is a job of its own: the process-group variables of the calling process (if any) are not passed on
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Row:
    """One row of a table: a preset plus overrides, trained in its own run folder ``name``."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    zero_stage: int = 2  # ds_configs/zero<stage>.json
    paper_params: float | None = None  # millions, as the paper prints them; None where the paper gives none


@dataclass(frozen=True)
class Table:
    """A table of the paper: its title and rows."""

    number: int
    title: str
    rows: tuple[Row, ...]


def _layers(layers: str) -> tuple[str, ...]:
    return (f"model.adapters.vision_layers={layers}", f"model.adapters.text_layers={layers}")


def _widths(vision: int, text: int) -> Row:
    overrides = (f"model.adapters.vision_hidden={vision}", f"model.adapters.text_hidden={text}")
    return Row(f"da{vision}-ta{text}", "dcris-b", overrides, paper_params=2.69 if (vision, text) == (128, 64) else None)


TABLES: dict[int, Table] = {
    2: Table(2, "DCRIS against other ways of tuning the frozen DINOv2-B and CLIP backbones", (
        Row("full-tune", "full-tune", zero_stage=3, paper_params=149.97),
        Row("fix-backbone", "fix-backbone", paper_params=0.0),
        Row("houlsby", "houlsby", paper_params=1.98),
        Row("compacter", "compacter", paper_params=1.62),
        Row("lora", "lora", paper_params=1.57),
        Row("etris", "etris", paper_params=1.38),
        Row("dcris-b-3da", "dcris-b-3da", paper_params=1.34),
        Row("dcris-b", "dcris-b", paper_params=2.69),
    )),
    3: Table(3, "DenseCrossAdapters (DA) and TextAdapters (TA) on or off", (
        Row("none", "dcris-b", _layers("[]")),
        Row("da", "dcris-b", ("model.adapters.text_layers=[]",)),
        Row("ta", "dcris-b", ("model.adapters.vision_layers=[]",)),
        Row("da-ta", "dcris-b", paper_params=2.69),
    )),
    4: Table(4, "Adapter widths: DA hidden and TA hidden", (
        _widths(64, 64), _widths(128, 64), _widths(256, 64), _widths(128, 32), _widths(128, 128),
    )),
    5: Table(5, "Adapter layers (DA and TA in the same blocks)", (
        Row("layers-8", "dcris-b", _layers("8"), paper_params=0.45),
        Row("layers-4-8-11", "dcris-b", _layers("4,8,11"), paper_params=1.35),
        Row("layers-1-3-5-7-9-11", "dcris-b", paper_params=2.69),
        Row("layers-0-11", "dcris-b", _layers(",".join(map(str, range(12)))), paper_params=5.39),
    )),
}  # fmt: skip


@dataclass
class PlannedRow:
    """A row resolved for one sweep: its config, run folder and what is left to do."""

    row: Row
    cfg: Config
    run: Path
    status: str  # "finished", "trained" (an export, not yet scored on every split), "interrupted", "not run"
    params: int  # trained parameters, head excluded (dcris params' added_params)


def row_status(run: Path, splits: list[str]) -> str:
    """How far a row's run folder got (see :class:`PlannedRow`): finished means scored on every split."""
    metrics = _read_json(run / FINAL_METRICS)
    if isinstance(metrics, dict) and all(s in metrics for s in splits):
        return "finished"
    if (run / EXPORT_NAME / WEIGHTS_FILE).is_file():
        return "trained"
    return "interrupted" if run.exists() else "not run"


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a half-written file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_same_model(planned: PlannedRow) -> None:
    """Refuses to resume or reuse a run folder whose recorded model differs from the row's.

    Raises:
        UserError: the run's config.json describes another model (names the first differing key).
    """
    recorded = _read_json(planned.run / "config.json")
    if recorded is None:
        return
    old, new = _flat({"model": recorded.get("model", {})}), _flat({"model": to_dict(planned.cfg)["model"]})
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in NOT_ARCHITECTURE)
    if differing:
        key = differing[0]
        raise UserError(
            f"{planned.run} holds a run of another model ({key}: {old.get(key)!r} there, {new.get(key)!r} for row "
            f"{planned.row.name!r}); choose another --out or remove that folder"
        )


def plan(table: Table, shards: Path, out: Path, overrides: list[str], splits: list[str]) -> list[PlannedRow]:
    """Resolves every row's config (all errors before anything runs), its parameter count and its status."""
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if key in ("data.shards", "train.output_dir"):
            raise UserError(f"{key} is set by the sweep: use --shards / --out instead of the override {ov!r}")
    planned = []
    for row in table.rows:
        run = out / row.name
        sweep_overrides = [f"data.shards={shards}", f"train.output_dir={run}"]
        cfg = load_config(preset_name=row.preset, overrides=[*row.overrides, *sweep_overrides, *overrides])
        params = int(parameter_report(cfg)["added_params"])  # builds the row's model on the meta device
        planned.append(PlannedRow(row, cfg, run, row_status(run, splits), params))
    return planned


def select(table: Table, planned: list[PlannedRow], names: list[str] | None) -> list[PlannedRow]:
    """The rows named in ``--rows`` (all when None), in table order."""
    known = [r.name for r in table.rows]
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UserError(f"table {table.number} has no row {unknown[0]!r}; its rows: {', '.join(known)}")
    return [p for p in planned if names is None or p.row.name in names]


def _launcher(launcher: str, gpus: int) -> list[str]:
    if launcher == "python":
        return [sys.executable]
    name, flag = ("torchrun", "--nproc_per_node") if launcher == "torchrun" else ("deepspeed", "--num_gpus")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which(name, path=path)
    if exe is None:
        raise UserError(f"the {name} launcher is not installed next to {sys.executable} nor on PATH")
    return [exe, flag, str(gpus)]


def row_commands(planned: PlannedRow, launcher: list[str], splits: list[str], overrides: list[str]) -> list[list[str]]:
    """The commands still to run for a row: training (unless its export exists), then the final evaluation."""
    row, cfg, run = planned.row, planned.cfg, planned.run
    commands = []
    if planned.status in ("not run", "interrupted"):
        deepspeed = REPO / "ds_configs" / f"zero{row.zero_stage}.json"
        sweep_overrides = [f"data.shards={cfg.data.shards}", f"train.output_dir={run}"]
        commands.append([
            *launcher, str(REPO / "launch" / "train.py"), "--deepspeed", str(deepspeed), "--preset", row.preset,
            *row.overrides, *sweep_overrides, *overrides,
        ])  # fmt: skip
    if planned.status != "finished":
        commands.append([
            *launcher, str(REPO / "launch" / "eval.py"), "--weights", str(run / EXPORT_NAME), "--shards",
            cfg.data.shards, "--splits", ",".join(splits), "--out", str(run / FINAL_METRICS), "--batch-size",
            str(cfg.train.micro_batch), "--workers", str(cfg.data.workers), "--loader", cfg.data.loader,
        ])  # fmt: skip
    return commands


def table_rows(planned: list[PlannedRow], splits: list[str]) -> list[dict[str, Any]]:
    """Per row: trained parameters beside the paper's, and the measured mIoU per split (None where not run)."""
    rows = []
    for p in planned:
        params, paper = p.params, p.row.paper_params
        metrics = _read_json(p.run / FINAL_METRICS) or {}
        rows.append({
            "row": p.row.name,
            "preset": p.row.preset,
            "overrides": list(p.row.overrides),
            "run": str(p.run),
            "status": row_status(p.run, splits),
            "params": params,
            "paper_params_m": paper,
            "params_off_percent": None if not paper else 100.0 * (params - paper * 1e6) / (paper * 1e6),
            "miou": {s: metrics[s]["miou"] if s in metrics else None for s in splits},
            "paper_miou": None,
        })  # fmt: skip
    return rows


def format_markdown(table: Table, rows: list[dict[str, Any]], splits: list[str]) -> str:
    """TABLE<N>.md: the rows as a Markdown table."""

    def paper_count(r: dict[str, Any]) -> str:
        return "unknown" if r["paper_params_m"] is None else f"{r['paper_params_m']:.2f}M"

    def off(r: dict[str, Any]) -> str:
        if r["params_off_percent"] is None:
            return "0%" if r["paper_params_m"] == 0 and r["params"] == 0 else "-"
        return f"{r['params_off_percent']:+.2f}%"

    def miou(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    head = ["row", "trained params", "paper params", "off", *(f"{s} mIoU" for s in splits), "paper mIoU", "status"]
    lines = [
        f"# Table {table.number}: {table.title}",
        "",
        "Trained parameters exclude the head (`dcris params`). mIoU in percent, from each run's "
        f"`{FINAL_METRICS}` (launch/eval.py on the run's export). The paper's mIoU figures for this table are "
        "unknown: no citable source.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["row"], f"{r['params']:,}", paper_count(r), off(r), *(miou(r["miou"][s]) for s in splits)]
        lines.append("| " + " | ".join([*cells, "unknown", r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: Table, planned: list[PlannedRow], splits: list[str], out: Path) -> tuple[Path, Path]:
    """Writes OUT/TABLE<N>.md and OUT/table<N>.json (each atomically)."""
    rows = table_rows(planned, splits)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"table": table.number, "title": table.title, "splits": splits, "rows": rows}
    written = []
    for path, text in (
        (out / f"TABLE{table.number}.md", format_markdown(table, rows, splits)),
        (out / f"table{table.number}.json", json.dumps(doc, indent=2) + "\n"),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        written.append(path)
    return written[0], written[1]


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: one ``error:`` line, no usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see dcris sweep --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="dcris sweep", description="Train, score and tabulate every row of one of the paper's Tables 2-5."
    )
    parser.add_argument("--table", type=int, required=True, choices=sorted(TABLES), help="which table")
    parser.add_argument("--shards", required=True, help="packed data set (folder with manifest.json)")
    parser.add_argument("--out", help="folder of the row runs and the table (default: runs/table<N>)")
    parser.add_argument("--launcher", default="python", choices=LAUNCHERS, help="how each row is launched")
    parser.add_argument("--gpus", type=int, default=1, help="processes per row for torchrun / deepspeed (default 1)")
    parser.add_argument("--rows", help="comma-separated subset of the table's rows (default: all)")
    parser.add_argument("--splits", default="val,testA,testB", help="splits scored at the end (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris sweep`` and ``launch/sweep.py``."""
    args = parse_args(argv)
    table = TABLES[args.table]
    if args.gpus < 1 or (args.launcher == "python" and args.gpus != 1):
        raise UserError(f"--gpus {args.gpus}: 1 with --launcher python, a positive count with torchrun or deepspeed")
    splits = [s for s in args.splits.split(",") if s]
    shards = Path(args.shards).resolve()
    out = Path(args.out or f"runs/table{table.number}").resolve()
    names = [n for n in args.rows.split(",") if n] if args.rows else None
    planned = plan(table, shards, out, args.overrides, splits)
    selected = select(table, planned, names)
    launcher = _launcher(args.launcher, args.gpus)
    if not args.dry_run:
        split_size(str(shards), planned[0].cfg.data.train_split, train=True)  # one line, before any run
        for split in splits:
            split_size(str(shards), split, train=False)
    for p in planned:
        check_same_model(p)
    for i, p in enumerate(selected, 1):
        commands = row_commands(p, launcher, splits, args.overrides)
        print(f"== table {table.number}, row {i}/{len(selected)} {p.row.name!r}: {p.status} ({p.run})", flush=True)
        for cmd in commands:
            if args.dry_run:
                print(shlex.join(cmd))
                continue
            done = subprocess.run(cmd, env={k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV})
            if done.returncode != 0:
                raise UserError(
                    f"row {p.row.name!r} stopped: {Path(cmd[len(launcher)]).name} exited with status "
                    f"{done.returncode}; rerun the same command to resume it"
                )
        if not args.dry_run:
            write_table(table, planned, splits, out)
    if not args.dry_run:
        md, js = write_table(table, planned, splits, out)
        print(f"wrote {md} and {js}")
    return 0
