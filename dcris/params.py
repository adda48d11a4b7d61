"""``dcris params``: parameter counts of a configuration, as in the paper's Table 5.

The full-size architecture is built on the meta device: exact counts, no memory, no weights needed.
"""

from __future__ import annotations

import argparse
import json

import torch

from dcris.config import Config, load_config
from dcris.model import DCRIS, build_model


def count_parameters(model: DCRIS) -> dict[str, float]:
    """Trainable adapter and head parameters, frozen backbone parameters, and the adapters' share of the frozen."""
    counts = {"adapter_params": 0, "vision_adapter_params": 0, "text_adapter_params": 0, "head_params": 0,
              "frozen_params": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("head."):
            counts["head_params"] += n
        elif name.startswith(("vision.adapters.", "text.adapters.")):
            counts["adapter_params"] += n
            counts[f"{name.split('.')[0]}_adapter_params"] += n
        else:
            counts["frozen_params"] += n
    out: dict[str, float] = dict(counts)
    out["adapter_percent"] = 100.0 * counts["adapter_params"] / counts["frozen_params"]
    out["trainable_params"] = counts["adapter_params"] + counts["head_params"]
    return out


def parameter_report(cfg: Config) -> dict[str, float]:
    """Counts of the architecture ``cfg`` describes (random init on the meta device: nothing is loaded)."""
    with torch.device("meta"):
        model = build_model(cfg.model, pretrained=False)
    return count_parameters(model)


def format_table(name: str, cfg: Config, counts: dict[str, float]) -> str:
    a = cfg.model.adapters
    rows = [
        ("preset", name),
        ("vision adapter layers", ",".join(map(str, a.vision_layers)) or "-"),
        ("text adapter layers", ",".join(map(str, a.text_layers)) or "-"),
        ("trainable adapter params", f"{counts['adapter_params']:,} ({counts['adapter_percent']:.2f}% of frozen)"),
        ("  DenseCrossAdapters", f"{counts['vision_adapter_params']:,}"),
        (f"  TextAdapters ({a.text_form} form)", f"{counts['text_adapter_params']:,}"),
        ("trainable head params", f"{counts['head_params']:,}"),
        ("frozen backbone params", f"{counts['frozen_params']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcris params", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dcris-b", help="preset name (dcris-b, dcris-l, detris-b, ...)")
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
