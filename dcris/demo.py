"""``dcris demo``: the whole pipeline on a CPU in minutes.

Synthetic REFER release (shards/synth.py) -> webdataset shards (shards/pack.py) -> training of the tiny preset
with random-init backbones through the real trainer (DeepSpeed, one process; recipe configs/synthetic.yaml)
-> evaluation of the export on val/testA/testB -> a contact sheet of val pairs from the best to the worst.
Text-blind baselines are scored on the same samples, so the numbers show whether the model reads the phrase:

- ``whole_image``: every pixel is the object.
- ``centre_disc``: a disc at the centre, radius a quarter of the shorter side.
- ``all_objects``: the union of every object in the image -- it finds the shapes but not which one is meant.

``--gres`` runs the same on the synthetic gRefCOCO release (``shards/synth.py --gres``: phrases that name one
object, several or none) with the no-target output (recipe configs/synthetic_gres.yaml), scored with gIoU, cIoU,
N-acc, T-acc and Pr@; its text-blind baselines answer the same for every phrase of an image:

- ``nothing``: "no object" for every phrase (N-acc 1, T-acc 0).
- ``all_objects``: the union of every object, a target for every phrase (N-acc 0, T-acc 1).
- ``best_per_image``: per image, the one answer (no object, or the union of any subset of its objects) that
  scores the image's phrases best, chosen knowing the truth -- an upper bound of every text-blind predictor that
  paints whole objects.

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
GRES_RECIPE = REPO / "configs" / "synthetic_gres.yaml"
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


def _object_masks(release: Path, name: str) -> tuple[dict[int, list[np.ndarray]], dict[int, int]]:
    """Per image_id its objects' masks (original resolution, annotation order) and per ref_id its image_id."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(str(release / name / "instances.json"))
    objects = {i: [coco.annToMask(a).astype(bool) for a in coco.imgToAnns[i]] for i in coco.imgs}
    refs = json.loads((release / name / "grefs(unc).json").read_text())
    return objects, {r["ref_id"]: r["image_id"] for r in refs}


def score_gres_baselines(shards: Path, release: Path, splits: list[str]) -> dict[str, dict[str, dict]]:
    """The GRES text-blind baselines' metrics per split (module docstring), on the samples the model is scored on."""
    from dcris.data import build_loader
    from dcris.metrics import GresAccumulator

    objects, image_of = _object_masks(release, "synthetic_gres")
    results: dict[str, dict[str, dict]] = {}
    for split in splits:
        by_image: dict[int, list[np.ndarray]] = {}  # the truth of every sample, per image
        for batch in build_loader(shards, split, train=False, batch_size=64, image_size=8, loader="torch"):
            for ref_id, truth in zip(batch["ref_id"].tolist(), batch["orig_mask"], strict=True):
                by_image.setdefault(image_of[ref_id], []).append(truth.astype(bool))
        accs = {name: GresAccumulator() for name in ("nothing", "all_objects", "best_per_image")}
        for image_id, truths in by_image.items():
            masks = objects[image_id]
            answers = []  # (painted, said nothing) for every subset of the objects; the empty one says nothing
            for subset in range(2 ** len(masks)):
                painted = np.zeros_like(truths[0])
                for k in (k for k in range(len(masks)) if subset >> k & 1):
                    painted |= masks[k]
                answers.append((painted, subset == 0))
            empty = [not t.any() for t in truths]

            def add(acc: GresAccumulator, answer: tuple[np.ndarray, bool], truths=truths, empty=empty) -> float:
                counts = [[int((answer[0] & t).sum()), int((answer[0] | t).sum())] for t in truths]
                return float(acc.add(counts, empty, [answer[1]] * len(truths)).sum())  # the sum of IoUs

            add(accs["nothing"], answers[0])
            add(accs["all_objects"], answers[-1])
            best = max(answers, key=lambda a: add(GresAccumulator(), a))
            add(accs["best_per_image"], best)
        results[split] = {name: acc.result() for name, acc in accs.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris demo``."""
    parser = argparse.ArgumentParser(prog="dcris demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="dcris-demo", help="folder for data, run, metrics and pictures")
    parser.add_argument("--images", type=int, default=NUM_IMAGES, help="synthetic images to generate")
    parser.add_argument(
        "--gres", action="store_true",
        help="the synthetic gRefCOCO release (no-target and multi-target phrases), recipe configs/synthetic_gres.yaml",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the recipe")
    args = parser.parse_args(argv)

    import torch

    from dcris.config import load_config
    from dcris.data import synth
    from dcris.evaluate import evaluate
    from dcris.export import load_exported
    from dcris.metrics import format_table
    from dcris.pictures import IoURecorder, contact_sheets
    from dcris.train_setup import read_deepspeed_json
    from dcris.trainer import train

    out = Path(args.out).resolve()
    release, run = out / "release", out / "run"
    times: dict[str, float] = {}
    start = time.time()
    synth.make_synthetic_release(release, images=args.images, seed=0, gres=args.gres)
    shards = synth.pack_synthetic_release(release, out / "shards", "--workers", "2", gres=args.gres)
    times["data_s"] = time.time() - start

    recipe = GRES_RECIPE if args.gres else RECIPE
    cfg = load_config(str(recipe), overrides=[f"data.shards={shards}", f"train.output_dir={run}", *args.overrides])
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
    baselines = (score_gres_baselines if args.gres else score_baselines)(shards, release, SPLITS)
    sheet = out / "contact_sheet_val.png"
    contact_sheets(model, recorder, shards, ["val"], NUM_PICTURES)["val"].save(sheet)
    times["eval_s"] = time.time() - t0
    times["total_s"] = time.time() - start

    metrics = {**results, "baselines": baselines, "seconds": times, "steps": summary["step"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"\nmodel (tiny, random-init backbones, {summary['step']} steps):\n{format_table(results)}")
    for baseline in baselines[SPLITS[0]]:
        print(f"\ntext-blind baseline {baseline}:\n{format_table({s: baselines[s][baseline] for s in SPLITS})}")
    print(
        f"\ndata {out / 'shards'}\nrun {run} (checkpoints, tensorboard, logs)\nexport {summary['export']}\n"
        f"pictures {sheet} ({NUM_PICTURES} val pairs, best to worst)\nmetrics {out / 'metrics.json'}\n"
        f"took {times['total_s']:.0f} s (data {times['data_s']:.0f}, training {times['train_s']:.0f}, "
        f"evaluation and pictures {times['eval_s']:.0f})"
    )
    return 0
