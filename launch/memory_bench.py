"""Resident memory of N adapter sets of a preset on shared random real-size backbones (CPU), one process per N.

python launch/memory_bench.py --preset dcris-b --sets 1,4,16 --out memory_bench.json

Each set is a model built with random backbones from one seed (so every set's frozen tensors are equal and
``MultiSegmenter`` shares them by their digest) and its own random adapters and head. Reports RSS after loading,
the cost of each added set against the bytes of its own adapter and head tensors, and 16 separate Segmenters as
computed from the first row (the process before loading, plus N times the first set's cost).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

import psutil  # noqa: E402
import torch  # noqa: E402

from dcris.config import preset  # noqa: E402
from dcris.model import build_model  # noqa: E402
from dcris.multi import MultiSegmenter, return_freed_memory  # noqa: E402
from dcris.segmenter import Segmenter  # noqa: E402


def child(name: str, count: int) -> dict:
    cfg = preset(name)
    cfg.model.vision.weights = cfg.model.text.weights = ""  # random backbones of the real size
    before = psutil.Process().memory_info().rss
    multi = MultiSegmenter({})
    own_bytes = 0
    for k in range(count):
        torch.manual_seed(0)
        model = build_model(cfg.model, pretrained=False).eval()
        torch.manual_seed(k + 1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        own_bytes = sum(v.numel() * v.element_size() for key, v in model.state_dict().items()
                        if key.startswith(("head.", "text.adapters.", "vision.adapters.")))  # fmt: skip
        multi.add(f"set{k}", Segmenter(model, cfg))
        del model
        return_freed_memory()
    return {"sets": count, "rss_before": before, "rss": psutil.Process().memory_info().rss, "own_bytes": own_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dcris-b")
    parser.add_argument("--sets", default="1,4,16")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="memory_bench.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.preset, args.child)))
        return 0
    rows = []
    for count in map(int, args.sets.split(",")):
        command = [sys.executable, __file__, "--preset", args.preset, "--child", str(count)]
        rows.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
    first = rows[0]
    first_cost = first["rss"] - first["rss_before"]
    mib = 2**20
    print("| sets | RSS MiB | per added set MiB | its adapter+head MiB | ratio | separate Segmenters MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        added = row["sets"] - first["sets"]
        per_set = (row["rss"] - first["rss"]) / added if added else None
        row["per_added_set_bytes"] = per_set
        row["ratio_to_own_bytes"] = per_set / row["own_bytes"] if per_set else None
        row["separate_segmenters_rss"] = first["rss_before"] + row["sets"] * first_cost
        print(f"| {row['sets']} | {row['rss'] / mib:.0f} | {per_set / mib if per_set else 0:.1f} | "
              f"{row['own_bytes'] / mib:.1f} | {row['ratio_to_own_bytes'] or 0:.3f} | "
              f"{row['separate_segmenters_rss'] / mib:.0f} |")  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
