"""ONNX Runtime against eager PyTorch on the CPU, side by side in one run (BENCHMARKS.md, "ONNX Runtime on a CPU").

python launch/onnx_bench.py --preset dcris-b --batches 1,8 --repeats 3 --iou-pairs 16 --out onnx_bench.json

The model is built with random backbones of the real size and every adapter and head tensor random and non-zero
(init plus noise), then written by ``dcris.onnx_export.write_onnx_export`` (fp32, and the dynamic int8 variant).
At each batch size the same random inputs go through eager PyTorch (inference mode) and ONNX Runtime's CPU session
with graph optimisations off, with all of them, and the int8 graph: median latency of a forward, images/s, the
ratio to PyTorch, and each output's largest difference from PyTorch relative to its largest logit. Then the int8
graph's masks are compared with the fp32 graph's through ``Segmenter`` over pairs of the synthetic val split (mask
IoU; both empty counts 1). Prints a table and writes the JSON record.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from dcris.config import preset  # noqa: E402
from dcris.data.refs import load_refs  # noqa: E402
from dcris.data.synth import make_synthetic_release  # noqa: E402
from dcris.model import build_model, split_output  # noqa: E402
from dcris.onnx_export import random_tokens, write_onnx_export  # noqa: E402
from dcris.onnx_runtime import INT8_MODEL_FILE, MODEL_FILE, OnnxRuntimeModel  # noqa: E402
from dcris.provenance import git_commit  # noqa: E402
from dcris.segmenter import Segmenter  # noqa: E402


def random_model(name: str, noise: float) -> tuple:
    cfg = preset(name)
    cfg.model.vision.weights = cfg.model.text.weights = ""  # random backbones of the real size
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn_like(p))
        for name_, b in model.named_buffers():
            if name_.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name_.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model, cfg


def centre_logits(model, cfg) -> float:
    """Shifts the projector's per-sample bias (the kernel's last entry) so that the median logit of a random input
    is 0: a random head paints (nearly) every pixel or none, and a mask IoU of such masks says nothing."""
    size, length = cfg.model.image_size, cfg.model.text.context_length
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        logits = split_output(model(torch.randn(1, 3, size, size, generator=generator),
                                    random_tokens(1, length, generator)))[0]  # fmt: skip
    shift = float(logits.median())
    with torch.no_grad():
        model.head.proj.txt.bias[-1] -= shift
    return shift


def timed(run, inputs, repeats: int) -> tuple[list[float], object]:
    out = run(*inputs)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*inputs)
        seconds.append(time.perf_counter() - start)
    return seconds, out


def relative_errors(got, want) -> list[float]:
    pairs = zip(split_output(got), split_output(want), strict=True)
    return [float((g - w).abs().max() / w.abs().max()) for g, w in pairs if w is not None]


def val_pairs(root: Path, images: int, count: int) -> list[tuple[Path, str]]:
    release = make_synthetic_release(root, images=images, seed=0)
    refs = [r for r in load_refs(release / "synthetic" / "refs(unc).p") if r["split"] == "val"]
    instances = json.loads((release / "synthetic" / "instances.json").read_text())
    files = {im["id"]: im["file_name"] for im in instances["images"]}
    return [(release / "images" / files[r["image_id"]], r["sentences"][0]["sent"]) for r in refs[:count]]


def mask_agreement(folder: Path, cfg, pairs: list[tuple[Path, str]], threads: int) -> dict:
    fp32 = Segmenter(OnnxRuntimeModel(folder / MODEL_FILE, cfg, threads=threads))
    int8 = Segmenter(OnnxRuntimeModel(folder / INT8_MODEL_FILE, cfg, threads=threads))
    ious, areas, prob_diffs = [], [], []
    for image, phrase in pairs:
        a, b = fp32(image, phrase), int8(image, phrase)
        union = (a.mask | b.mask).sum()
        ious.append(float((a.mask & b.mask).sum() / union) if union else 1.0)
        areas.append(a.area)
        prob_diffs.append(float(np.abs(a.probability - b.probability).max()))
    return {
        "pairs": len(pairs),
        "mean_iou": statistics.mean(ious),
        "min_iou": min(ious),
        "fp32_mean_area": statistics.mean(areas),
        "fp32_empty_or_full": sum(a in (0.0, 1.0) for a in areas),
        "max_probability_difference": max(prob_diffs),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dcris-b")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8; '': none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per variant and batch (+1 warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of PyTorch and ONNX Runtime")
    parser.add_argument("--iou-images", type=int, default=40, help="images of the synthetic release")
    parser.add_argument("--iou-pairs", type=int, default=16, help="val pairs the int8 masks are compared on")
    parser.add_argument("--noise", type=float, default=0.02, help="noise added to every adapter and head tensor")
    parser.add_argument("--centre", action="store_true", help="centre the logits at 0 (centre_logits)")
    parser.add_argument("--out", default="onnx_bench.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = random_model(args.preset, args.noise)
    shift = centre_logits(model, cfg) if args.centre else 0.0
    size, length = cfg.model.image_size, cfg.model.text.context_length
    record = {
        "preset": args.preset,
        "logit_shift": shift,
        "image_size": size,
        "env": {
            "cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        },
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "onnx"
        start = time.perf_counter()
        _, error = write_onnx_export(model, cfg, folder, int8=True)
        record["export_seconds"] = time.perf_counter() - start
        record["export_check_relative_error"] = error  # batch 3, random inputs
        record["graph_mib"] = {f: (folder / f).stat().st_size / 2**20 for f in (MODEL_FILE, INT8_MODEL_FILE)}
        print(f"exported in {record['export_seconds']:.0f} s, check {error:.1e}, MiB {record['graph_mib']}", flush=True)

        generator = torch.Generator().manual_seed(1)
        rows = []
        for batch in (int(b) for b in args.batches.split(",") if b):
            inputs = (torch.randn(batch, 3, size, size, generator=generator), random_tokens(batch, length, generator))
            with torch.inference_mode():
                seconds, want = timed(model, inputs, args.repeats)
            base = statistics.median(seconds)
            rows.append({"batch": batch, "variant": "pytorch eager", "seconds": seconds, "median_s": base,
                         "images_per_s": batch / base, "ratio": 1.0, "relative_error": [0.0]})  # fmt: skip
            variants = [
                ("onnxruntime, no graph optimisation", MODEL_FILE, False),
                ("onnxruntime, all graph optimisations", MODEL_FILE, True),
                ("onnxruntime int8, all graph optimisations", INT8_MODEL_FILE, True),
            ]
            for label, file, optimize in variants:
                graph = OnnxRuntimeModel(folder / file, cfg, threads=args.threads, optimize=optimize)
                seconds, got = timed(graph, inputs, args.repeats)
                median = statistics.median(seconds)
                rows.append({"batch": batch, "variant": label, "seconds": seconds, "median_s": median,
                             "images_per_s": batch / median, "ratio": base / median,
                             "relative_error": relative_errors(got, want)})  # fmt: skip
                del graph
                gc.collect()
            for row in rows[-4:]:
                print(f"batch {batch} {row['variant']:<42} {1000 * row['median_s']:9.0f} ms "
                      f"{row['images_per_s']:7.2f} img/s  x{row['ratio']:.2f}  err {max(row['relative_error']):.1e}",
                      flush=True)  # fmt: skip
        record["rows"] = rows
        pairs = val_pairs(Path(tmp), args.iou_images, args.iou_pairs)
        record["int8_vs_fp32_masks"] = mask_agreement(folder, cfg, pairs, args.threads)
        print(json.dumps(record["int8_vs_fp32_masks"]), flush=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
