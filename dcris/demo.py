"""``dcris demo``: the whole pipeline on a CPU in minutes.

Synthetic REFER release (shards/synth.py) -> webdataset shards (shards/pack.py) -> training of the tiny preset
with random-init backbones through the real trainer (DeepSpeed, one process; recipe configs/synthetic.yaml)
-> evaluation of the export on val/testA/testB -> a contact sheet of val pairs from the best to the worst.
Text-blind baselines are scored on the same samples, so the numbers show whether the model reads the phrase:

- ``whole_image``: every pixel is the object.
- ``centre_disc``: a disc at the centre, radius a quarter of the shorter side.
- ``all_objects``: the union of every object in the image -- it finds the shapes but not which one is meant.

Reproducible on a CPU: the seeds, the data order and the number of threads are fixed, so two runs on one machine
give identical weights and metrics (torch's CPU kernels used here are deterministic already: its
``use_deterministic_algorithms`` gives the same weights, 7 times slower). The thread count is fixed because it
changes how floating-point sums are split and so their rounding: the losses of a 1- and a 2-thread run differ
from the first step on (in the sixth digit), and such differences grow over thousands of steps. A CPU with
other vector instructions can round differently too, so another machine may land on other numbers. One thread
also keeps a busy machine fast: two OpenMP threads that share their cores with other work wait on each other.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "synthetic.yaml"
DEEPSPEED = REPO / "ds_configs" / "single.json"
SPLITS = ["val", "testA", "testB"]
NUM_IMAGES = 1000  # synthetic images (about 70% train)
NUM_PICTURES = 12  # val pairs drawn, from the best IoU to the worst
THREADS = 1  # torch's intra-op threads in the demo (module docstring); the loader workers decode in parallel


def _baseline_masks(release: Path) -> dict[int, dict[str, np.ndarray]]:
    """Per ref_id, the whole-image, centre-disc and all-objects masks at the original resolution."""
    from pycocotools.coco import COCO

    from dcris.data.refs import load_refs

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(str(release / "synthetic" / "instances.json"))
    refs = load_refs(release / "synthetic" / "refs(unc).p")
    by_image: dict[int, dict[str, np.ndarray]] = {}
    out = {}
    for ref in refs:
        image_id = ref["image_id"]
        if image_id not in by_image:
            info = coco.imgs[image_id]
            h, w = info["height"], info["width"]
            yy, xx = np.mgrid[:h, :w]
            disc = (yy + 0.5 - h / 2) ** 2 + (xx + 0.5 - w / 2) ** 2 <= (min(h, w) / 4) ** 2
            union = np.zeros((h, w), dtype=bool)
            for ann in coco.imgToAnns[image_id]:
                union |= coco.annToMask(ann).astype(bool)
            by_image[image_id] = dict(whole_image=np.ones((h, w), dtype=bool), centre_disc=disc, all_objects=union)
        out[ref["ref_id"]] = by_image[image_id]
    return out


def score_baselines(shards: Path, release: Path, splits: list[str]) -> dict[str, dict[str, dict]]:
    """The text-blind baselines' metrics per split, on the very samples the model is scored on."""
    from dcris.data import build_loader
    from dcris.metrics import IoUAccumulator

    masks = _baseline_masks(release)
    results: dict[str, dict[str, dict]] = {}
    for split in splits:
        accs = {name: IoUAccumulator() for name in ("whole_image", "centre_disc", "all_objects")}
        for batch in build_loader(shards, split, train=False, batch_size=64, image_size=8, loader="torch"):
            for ref_id, truth in zip(batch["ref_id"].tolist(), batch["orig_mask"], strict=True):
                for name, acc in accs.items():
                    acc.add(masks[ref_id][name], truth)
        results[split] = {name: acc.result() for name, acc in accs.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris demo``."""
    parser = argparse.ArgumentParser(prog="dcris demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="dcris-demo", help="folder for data, run, metrics and pictures")
    parser.add_argument("--images", type=int, default=NUM_IMAGES, help="synthetic images to generate")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/synthetic.yaml")
    args = parser.parse_args(argv)

    import torch

    from dcris.config import load_config
    from dcris.data import pack, synth
    from dcris.evaluate import evaluate
    from dcris.export import load_exported
    from dcris.metrics import format_table
    from dcris.pictures import IoURecorder, contact_sheets
    from dcris.train_setup import read_deepspeed_json
    from dcris.trainer import train

    out = Path(args.out).resolve()
    release, shards, run = out / "release", out / "shards" / "synthetic", out / "run"
    times: dict[str, float] = {}
    start = time.time()
    synth.make_synthetic_release(release, images=args.images, seed=0)
    pack.main(["--refer", str(release), "--dataset", "synthetic", "--split-by", "unc", "--images",
               str(release / "images"), "--out", str(out / "shards"), "--workers", "2"])  # fmt: skip
    times["data_s"] = time.time() - start

    cfg = load_config(str(RECIPE), overrides=[f"data.shards={shards}", f"train.output_dir={run}", *args.overrides])
    torch.set_num_threads(THREADS)
    t0 = time.time()
    summary = train(cfg, read_deepspeed_json(DEEPSPEED), str(DEEPSPEED))
    times["train_s"] = time.time() - t0

    t0 = time.time()
    model = load_exported(summary["export"])
    recorder = IoURecorder()
    results = evaluate(
        model, str(shards), SPLITS, image_size=cfg.model.image_size, batch_size=32, loader="torch", on_batch=recorder
    )
    baselines = score_baselines(shards, release, SPLITS)
    sheet = out / "contact_sheet_val.png"
    contact_sheets(model, recorder, shards, ["val"], NUM_PICTURES)["val"].save(sheet)
    times["eval_s"] = time.time() - t0
    times["total_s"] = time.time() - start

    metrics = {**results, "baselines": baselines, "seconds": times, "steps": summary["step"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nmodel (tiny, random-init backbones, {summary['step']} steps):\n{format_table(results)}")
    for name in ("whole_image", "centre_disc", "all_objects"):
        print(f"\ntext-blind baseline {name}:\n{format_table({s: baselines[s][name] for s in SPLITS})}")
    print(
        f"\ndata {out / 'shards'}\nrun {run} (checkpoints, tensorboard, logs)\nexport {summary['export']}\n"
        f"pictures {sheet} ({NUM_PICTURES} val pairs, best to worst)\nmetrics {out / 'metrics.json'}\n"
        f"took {times['total_s']:.0f} s (data {times['data_s']:.0f}, training {times['train_s']:.0f}, "
        f"evaluation and pictures {times['eval_s']:.0f})"
    )
    return 0
