"""``dcris params``: parameter counts of a configuration, as in the paper's Tables 2 and 5.

The full-size architecture is built on the meta device: exact counts, no memory, no weights needed.
"""

from __future__ import annotations

import argparse
import json

import torch

from dcris.config import Config, load_config
from dcris.model import DCRIS, build_model, parameter_group


def count_parameters(model: DCRIS) -> dict[str, float]:
    """Parameter counts by part (see :func:`dcris.model.parameter_group`).

    Returns:
        ``adapter_params`` (DenseCrossAdapters + TextAdapters, also split by tower), ``baseline_params`` (what a
        Table 2 method trains besides the head: its own modules, or the backbone weights under full fine-tuning),
        ``added_params`` (everything that trains except the head: the paper's "Params" column),
        ``head_params`` (``no_target_params`` of them the no-target output), ``trainable_params``,
        ``backbone_params`` (the pretrained weights, trained or not), ``frozen_params`` (what does not train) and
        the adapters' and the added parameters' share of the backbone in percent.
    """
    counts = dict.fromkeys(
        ("adapter_params", "vision_adapter_params", "text_adapter_params", "baseline_params", "head_params",
         "no_target_params", "backbone_params", "frozen_params"), 0,
    )  # fmt: skip
    for name, p in model.named_parameters():
        n, group = p.numel(), parameter_group(name)
        if group == "head":
            counts["head_params"] += n
            counts["no_target_params"] += n if name.startswith("head.no_target.") else 0
        elif group == "adapters":
            counts["adapter_params"] += n
            counts[f"{name.split('.')[0]}_adapter_params"] += n
        elif group == "baseline" or p.requires_grad:  # the backbone's own weights train under full fine-tuning
            counts["baseline_params"] += n
        if group == "backbone":
            counts["backbone_params"] += n
        if not p.requires_grad:
            counts["frozen_params"] += n
    out: dict[str, float] = dict(counts)
    out["added_params"] = counts["adapter_params"] + counts["baseline_params"]
    out["trainable_params"] = out["added_params"] + counts["head_params"]
    out["adapter_percent"] = 100.0 * counts["adapter_params"] / counts["backbone_params"]
    out["added_percent"] = 100.0 * out["added_params"] / counts["backbone_params"]
    return out


def parameter_report(cfg: Config) -> dict[str, float]:
    """Counts of the architecture ``cfg`` describes (random init on the meta device: nothing is loaded)."""
    with torch.device("meta"):
        model = build_model(cfg.model, pretrained=False)
    return count_parameters(model)


def format_table(name: str, cfg: Config, counts: dict[str, float]) -> str:
    m = cfg.model
    a, b = m.adapters, m.baseline
    method = b.method
    if m.train_backbones:
        method = "full fine-tuning" if b.method == "none" else f"{b.method} + backbones"
    rows = [
        ("preset", name),
        ("vision adapter layers", ",".join(map(str, a.vision_layers)) or "-"),
        ("text adapter layers", ",".join(map(str, a.text_layers)) or "-"),
        ("trainable adapter params", f"{counts['adapter_params']:,} ({counts['adapter_percent']:.2f}% of backbone)"),
        ("  DenseCrossAdapters", f"{counts['vision_adapter_params']:,}"),
        (f"  TextAdapters ({a.text_form} form)", f"{counts['text_adapter_params']:,}"),
        (f"Table 2 method ({method})", f"{counts['baseline_params']:,}"),
        ("trained params, head excluded", f"{counts['added_params']:,} ({counts['added_percent']:.2f}% of backbone)"),
        ("trainable head params", f"{counts['head_params']:,}"),
        ("  no-target output", f"{counts['no_target_params']:,}" if m.head.no_target else "-"),
        ("backbone params", f"{counts['backbone_params']:,}"),
        ("frozen params", f"{counts['frozen_params']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcris params", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="dcris-b", help="preset name (dcris-b, dcris-l, detris-b; Table 2's houlsby, lora, ...)"
    )
    parser.add_argument("--config", help="run file (YAML/JSON) on top of the preset")
    parser.add_argument("--adapter-layers", help="vision and text adapter layers, e.g. 4,8,11 ('none': no adapters)")
    parser.add_argument("--vision-layers", help="vision (DA) adapter layers only, e.g. 1,3,5 ('none' for no DA)")
    parser.add_argument("--text-layers", help="text (TA) adapter layers only, e.g. 1,3,5 ('none' for no TA)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.adapters.text_hidden=32)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for flag, keys in (
        (args.adapter_layers, ("vision_layers", "text_layers")),
        (args.vision_layers, ("vision_layers",)),
        (args.text_layers, ("text_layers",)),
    ):
        if flag is not None:
            value = "[]" if flag.strip().lower() in ("", "none") else flag
            overrides += [f"model.adapters.{k}={value}" for k in keys]
    cfg = load_config(args.config, args.preset if not args.config else None, overrides)
    counts = parameter_report(cfg)
    print(json.dumps(counts) if args.json else format_table(cfg.preset, cfg, counts))
    return 0
