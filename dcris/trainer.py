"""The training loop of SPEC 6, driven by DeepSpeed (ZeRO, autocast, accumulation, clipping).

Only the adapters and the head reach the optimizer (Adam, no weight decay); the LR falls by ``lr_gamma`` at each
milestone epoch and is set per optimizer step from the epoch it belongs to. The parts, in the order a run meets
them:

    start_run          process group, data checks, the engine (dcris.train_setup.build_engine), resume
    train_one_epoch    the optimizer steps of one epoch; logs, evaluates and checkpoints when due
    evaluate_run       ``train.eval_splits`` every ``train.eval_every_epochs`` epochs; after the last step, those and
                       ``data.eval_splits``
    save_run           a resumable checkpoint (dcris.checkpoint)

A run writes to ``train.output_dir``:

    config.json           the resolved config
    checkpoints/          resumable DeepSpeed checkpoints (dcris.checkpoint); a rerun resumes from ``latest``
    tensorboard/          loss, LR, images/s, evaluation metrics and contact sheets (``train.eval_pictures``)
    train_log.jsonl       the logged steps, one JSON object a line
    metrics.jsonl         every evaluation: step, epoch and per-split results
    export/               the export at the end (dcris.export): config.json, model.safetensors, README.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from dcris.checkpoint import (
    DIGEST_KEY,
    LATEST,
    UNIVERSAL,
    export_engine,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
    saved_world_size,
    set_rng_state,
    write_universal_checkpoint,
)
from dcris.config import Config, load_config, to_dict
from dcris.data import build_loader, shards_context_length
from dcris.errors import UserError
from dcris.evaluate import autocast, evaluate, split_size
from dcris.metrics import format_table
from dcris.pictures import IoURecorder, contact_sheets
from dcris.train_setup import (
    DEFAULT_DEEPSPEED,
    EngineSetup,
    all_reduce_values,
    batch_layout,
    build_engine,
    check_shared_folder,
    deepspeed_config,
    init_distributed,
    precision_dtype,
    rank_device,
    read_deepspeed_json,
)

EXPORT_NAME = "export"


class RunLog:
    """Console and JSON-lines output of rank 0 (silent elsewhere); TensorBoard through DeepSpeed's monitor."""

    def __init__(self, out: Path, rank: int, monitor: Any) -> None:
        self.out, self.active, self.monitor = out, rank == 0, monitor

    def print(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def record(self, file: str, step: int, scalars: dict[str, float], row: dict[str, Any]) -> None:
        if not self.active:
            return
        self.monitor.write_events([(key, value, step) for key, value in scalars.items()])
        with open(self.out / file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def image(self, tag: str, picture: Any, step: int) -> None:
        writer = getattr(self.monitor.tb_monitor, "summary_writer", None)  # None without TensorBoard
        if self.active and writer is not None:
            writer.add_image(tag, np.asarray(picture), step, dataformats="HWC")


class LossMeter:
    """Mean training loss of the applied steps between log lines; sum and count stay on the device, so a step
    costs no host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.total = torch.zeros((), device=self.device)
        self.count = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        """``loss`` counts when ``applied`` (a 0-d bool tensor on the device) is true."""
        self.total = self.total + torch.where(applied, loss.detach().float(), 0.0)
        self.count = self.count + applied

    def mean_over_ranks(self) -> float:
        """The mean since the last call over all ranks (one host sync; NaN when every step since was skipped),
        then starts again."""
        total, count = torch.stack([self.total.double(), self.count.double()]).tolist()
        (mean,) = all_reduce_values([total / count if count else float("nan")])
        self.reset()
        return mean / dist.get_world_size()


class BatchNormGuard:
    """The running statistics of every BatchNorm layer, put back on the device after a discarded step.

    A training forward changes them besides the weights. Each step saves them in one copy per dtype, and after
    it selects saved or new ones by the step's flag: no host read, and bit for bit what the layers hold.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
        self.groups = [[b for b in buffers if b.dtype == dtype] for dtype in dict.fromkeys(b.dtype for b in buffers)]
        self.saved: list[torch.Tensor] = []

    def save(self) -> None:
        self.saved = [torch.cat([b.reshape(-1) for b in group]) for group in self.groups]

    def restore_if(self, skipped: torch.Tensor) -> None:
        """Puts the saved statistics back where ``skipped`` (a 0-d bool tensor) is true."""
        for group, saved in zip(self.groups, self.saved, strict=True):
            kept = torch.where(skipped, saved, torch.cat([b.reshape(-1) for b in group]))
            parts = kept.split([b.numel() for b in group])
            torch._foreach_copy_(group, [p.view_as(b) for p, b in zip(parts, group, strict=True)])


@dataclass
class Run:
    """What the parts of a run share: the config, the engine, the schedule, the position and the last results."""

    cfg: Config
    setup: EngineSetup
    steps_per_epoch: int
    total_steps: int
    log: RunLog
    step: int = 0  # optimizer steps done
    rng_state: dict | None = None  # a resumed run's RNG states, restored once its epoch's loader has started
    metrics: dict = field(default_factory=dict)  # the last evaluation
    last_loss: float = float("nan")  # the last logged loss
    started_at: tuple[int, float] = (0, 0.0)  # (step, time) this process started training at, for images/s
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradients, over the whole run
    skipped_in_row: int = 0  # of those, the ones since the last step that was applied
    # (step, 0-d bool on the device: skipped?) of the steps not yet read back; read at log lines and saves
    unread_steps: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.cfg)

    def loader(self, epoch: int) -> Any:
        """The training loader of ``epoch`` on this rank, from where ``run.step`` stands in it."""
        start = (self.step - epoch * self.steps_per_epoch) * self.setup.grad_accum  # micro-batches already taken
        return train_loader(self.cfg, self.setup.rank, self.setup.world_size, self.setup.device, epoch, start)


def checkpoint_dir(cfg: Config) -> Path:
    """``RUN/checkpoints``: where a run's checkpoints go and a rerun resumes from."""
    return Path(cfg.train.output_dir) / "checkpoints"


def train_loader(cfg: Config, rank: int, world: int, device: torch.device, epoch: int, start_batch: int = 0) -> Any:
    """The training loader of ``epoch`` on one rank, after its first ``start_batch`` micro-batches (the benchmark
    times the same one)."""
    d = cfg.data
    return build_loader(
        d.shards, d.train_split, train=True, batch_size=cfg.train.micro_batch, image_size=cfg.model.image_size,
        rank=rank, world_size=world, seed=d.seed, workers=d.workers, loader=d.loader, device=str(device), epoch=epoch,
        shuffle_buffer=d.shuffle_buffer, sample=d.sample, context_length=cfg.model.text.context_length,
        hw_decoder_load=d.hw_decoder_load, prefetch_depth=d.prefetch_depth,
        mask_size=4 * cfg.model.image_size // cfg.model.vision.patch_size,  # the logits' side: the loss's resize
        start_batch=start_batch,
    )  # fmt: skip


def final_splits(cfg: Config) -> list[str]:
    """Splits evaluated after the last step: ``data.eval_splits``, then any of ``train.eval_splits`` not in it."""
    return list(dict.fromkeys([*cfg.data.eval_splits, *cfg.train.eval_splits]))


def start_run(cfg: Config, deepspeed_base: dict[str, Any], deepspeed_source: str) -> Run:
    """Everything before the first step; every rank calls it. Bad input fails here, before the model is built."""
    t, d = cfg.train, cfg.data
    rank, local_rank, world = init_distributed()
    micro, accum = batch_layout(t, world)
    zero_stage = deepspeed_config(cfg, world, deepspeed_base, deepspeed_source)["zero_optimization"].get("stage", 0)
    split_size(d.shards, d.train_split, train=True)
    for split in final_splits(cfg):
        split_size(d.shards, split, train=False)
    check_shared_folder(t.output_dir, rank, world)
    shards_length = shards_context_length(d.shards)  # SPEC 2: 22 for G-Ref umd, else 17
    if cfg.model.text.context_length != shards_length and rank == 0:
        print(f"model.text.context_length={shards_length}: the sentence length of the shards in {d.shards}")
    cfg.model.text.context_length = shards_length  # before the model is built: the config and export record it
    # the loader yields the same count on every rank
    steps_per_epoch = len(train_loader(cfg, rank, world, rank_device(local_rank), epoch=0)) // accum
    if steps_per_epoch == 0:
        raise UserError(
            f"split {d.train_split!r} of {d.shards} has too few objects for one step of {t.global_batch} images"
        )
    total_steps = t.epochs * steps_per_epoch if t.max_steps <= 0 else min(t.max_steps, t.epochs * steps_per_epoch)

    ckpt_dir = checkpoint_dir(cfg)
    saved_world = saved_world_size(ckpt_dir)
    if latest_tag(ckpt_dir) is not None and (saved_world is not None) != (zero_stage > 0):
        written = "with ZeRO" if saved_world else "without ZeRO"
        raise UserError(
            f"{ckpt_dir} was written {written} and {deepspeed_source} has ZeRO stage {zero_stage}: resume with the "
            "DeepSpeed config the run started with (--deepspeed), or use a new train.output_dir"
        )
    universal = saved_world not in (None, world)  # written by other ranks: DeepSpeed re-partitions a universal copy
    if universal:
        write_universal_checkpoint(ckpt_dir, rank)
    setup = build_engine(
        cfg, deepspeed_base, deepspeed_source, steps_per_epoch=steps_per_epoch, load_universal=universal
    )
    run = Run(cfg, setup, steps_per_epoch, total_steps, RunLog(Path(t.output_dir), rank, setup.engine.monitor))
    if rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    _resume(run, saved_world if universal else None)
    for note in setup.notes:
        run.log.print(note)
    run.log.print(
        f"training {setup.num_trainable:,} parameters on {world} rank(s): {micro} x {accum} accumulation x "
        f"{world} = {t.global_batch} images a step, {steps_per_epoch} steps an epoch, {total_steps} steps"
    )
    run.started_at = (run.step, time.time())
    return run


def _resume(run: Run, saved_world: int | None) -> None:
    """Continues from ``checkpoints/latest`` when there is one; ``saved_world``: the number of ranks that wrote it,
    when not this run's (its universal copy is loaded, then removed)."""
    s = run.setup
    resumed = load_checkpoint(s.engine, run.ckpt_dir, s.rank, s.frozen_digest, universal=saved_world is not None)
    if resumed is None:
        return
    if saved_world is not None:
        dist.barrier()  # every rank has read the universal copy
        if s.rank == 0:
            shutil.rmtree(run.ckpt_dir / UNIVERSAL)
        run.log.print(
            f"{run.ckpt_dir / str(latest_tag(run.ckpt_dir))} was written by {saved_world} rank(s): resumed on "
            f"{s.world_size} from DeepSpeed's universal checkpoint of it (the same weights, Adam moments and "
            "BatchNorm statistics, at the same step; the rest of the epoch is what this number of ranks reads in "
            "its remaining steps, and the RNG starts from the seed)"
        )
    state, run.rng_state = resumed
    if state["steps_per_epoch"] != run.steps_per_epoch:
        raise UserError(
            f"{run.ckpt_dir} was trained with {state['steps_per_epoch']} steps per epoch, this config gives "
            f"{run.steps_per_epoch}: resume with the same data and batch, or use a new train.output_dir"
        )
    run.step, run.skipped_steps = state["step"], state.get("skipped_steps", 0)
    lr = run.setup.scheduler.get_last_lr()[0]
    run.log.print(f"resumed from {run.ckpt_dir} at step {run.step} (epoch {state['epoch']}, lr {lr:.3g})")


def train_one_epoch(run: Run, epoch: int, meter: LossMeter) -> None:
    """The optimizer steps of ``epoch`` from ``run.step`` on (a resumed run starts mid-epoch), up to the end of
    the epoch or ``train.max_steps``; logs, evaluates and checkpoints when due."""
    s, t = run.setup, run.cfg.train
    engine = s.engine
    # the epoch fixes the order, the sentence choice and the rank's range; a resumed run starts where it stopped
    loader = iter(run.loader(epoch))
    batches: Iterator[dict] = loader
    if run.rng_state is not None:
        if run.step > epoch * run.steps_per_epoch:  # mid-epoch: the saving run started this loader before saving
            batches = itertools.chain([next(loader)], loader)  # starting it draws from the RNG
        set_rng_state(run.rng_state)
        run.rng_state = None
    end = min(run.total_steps, (epoch + 1) * run.steps_per_epoch)
    statistics = BatchNormGuard(engine.module)
    try:
        while run.step < end:
            statistics.save()  # a skipped step puts them back
            losses = []
            for batch in itertools.islice(batches, s.grad_accum):
                # asynchronous copies (from pinned memory; a no-op for DALI's device batches): no host sync
                fields = ("image", "tokens", "mask", "num_targets")
                image, tokens, mask, num_targets = (batch[k].to(s.device, non_blocking=True) for k in fields)
                output = engine(image, tokens)  # autocast inside
                loss = engine.module.loss(output, mask, num_targets)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer and the LR schedule every ``grad_accum`` calls
                losses.append(loss.detach())
            run.step += 1
            # decided on the device (read back at the next log line or save): no host sync between log lines
            skipped = s.step_skipped()
            statistics.restore_if(skipped)
            for loss in losses:
                meter.add(loss, ~skipped)
            run.unread_steps.append((run.step, skipped))
            if run.step % t.log_every_steps == 0 or run.step == run.total_steps:
                log_progress(run, meter)
            if run.step == end:
                loader.close()  # stop the loader's workers before evaluating (they compete for the CPU)
            _evaluate_and_save_when_due(run)
    finally:
        loader.close()  # also when stopped by an error: the workers end now, not at garbage collection


def read_skipped_steps(run: Run) -> None:
    """Reads back which of the steps since the last call were discarded (one host sync), logs and counts those,
    and stops the run once ``train.max_bad_steps`` were in a row.

    A discarded step (a non-finite gradient norm, all-reduced, so on every rank alike) left the weights, Adam's
    state and the BatchNorm statistics as they were, and its LR schedule step was taken.
    """
    if not run.unread_steps:
        return
    steps = [step for step, _ in run.unread_steps]
    flags = torch.stack([skipped for _, skipped in run.unread_steps]).tolist()
    run.unread_steps = []
    for step, skipped in zip(steps, flags, strict=True):
        if not skipped:
            run.skipped_in_row = 0
            continue
        run.skipped_steps += 1
        run.skipped_in_row += 1
        run.log.record(
            "train_log.jsonl", step, {"train/skipped_steps": run.skipped_steps},
            dict(step=step, skipped=True, skipped_steps=run.skipped_steps),
        )  # fmt: skip
        run.log.print(
            f"step {step}: non-finite loss or gradients, step skipped (weights, Adam state and BatchNorm "
            f"statistics unchanged; {run.skipped_in_row} in a row, {run.skipped_steps} in all)"
        )
        limit = run.cfg.train.max_bad_steps
        if 0 < limit <= run.skipped_in_row:
            raise UserError(
                f"{run.skipped_in_row} steps in a row, up to step {step}, had a non-finite loss or gradients "
                f"(train.max_bad_steps={limit}); the run stops and {run.ckpt_dir / LATEST} names the last good "
                "checkpoint: lower train.lr, set train.grad_clip or train.precision=fp32, or check the data, then "
                "rerun"
            )


def log_progress(run: Run, meter: LossMeter) -> None:
    """One log line: loss (mean over ranks since the last line), LR, images/s, peak GPU memory, ETA."""
    t, step = run.cfg.train, run.step
    read_skipped_steps(run)
    run.last_loss = meter.mean_over_ranks()
    start_step, start_time = run.started_at
    elapsed = time.time() - start_time
    rate = (step - start_step) * t.global_batch / elapsed
    lr = run.setup.scheduler.get_last_lr()[0]
    mem = torch.cuda.max_memory_allocated() / 2**30 if run.setup.device.type == "cuda" else 0.0
    eta = int((run.total_steps - step) * elapsed / (step - start_step))
    run.log.record(
        "train_log.jsonl", step,
        {"train/loss": run.last_loss, "train/lr": lr, "train/images_per_s": rate, "train/gpu_mem_gib": mem,
         "train/skipped_steps": run.skipped_steps},
        dict(step=step, epoch=step / run.steps_per_epoch, loss=run.last_loss, lr=lr, images_per_s=rate,
             skipped_steps=run.skipped_steps),
    )  # fmt: skip
    run.log.print(
        f"step {step}/{run.total_steps} epoch {step / run.steps_per_epoch:.2f} loss {run.last_loss:.4f} lr {lr:.3g} "
        f"{rate:.1f} img/s mem {mem:.1f} GiB eta {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    )


def _evaluate_and_save_when_due(run: Run) -> None:
    """After an optimizer step: the periodic evaluation (the last step's is the final one, after the loop) and
    the checkpoint at every epoch end, every ``train.save_every_steps`` steps and at the last step."""
    t, step = run.cfg.train, run.step
    end_of_epoch = step % run.steps_per_epoch == 0
    last = step == run.total_steps
    epochs_done = step // run.steps_per_epoch
    eval_due = (end_of_epoch and t.eval_every_epochs > 0 and epochs_done % t.eval_every_epochs == 0) or (
        t.eval_every_steps > 0 and step % t.eval_every_steps == 0
    )
    save_due = end_of_epoch or last or (t.save_every_steps > 0 and step % t.save_every_steps == 0)
    if (eval_due and not last) or save_due:
        read_skipped_steps(run)  # a run that must stop stops before it saves
    if eval_due and not last:
        evaluate_run(run, t.eval_splits)
    if save_due:
        save_run(run)


def evaluate_run(run: Run, splits: list[str]) -> dict:
    """Evaluates the current weights on ``splits`` (every rank; at the run's precision), logs and keeps the results.

    The RNG states are put back afterwards (the loader's workers draw a seed), so evaluating never changes the
    training that follows.
    """
    if not splits:
        return {}
    s, cfg = run.setup, run.cfg
    recorder = IoURecorder() if cfg.train.eval_pictures > 0 else None
    with torch.random.fork_rng(devices=[]):
        results = evaluate(
            s.engine.module, cfg.data.shards, splits, image_size=cfg.model.image_size,
            batch_size=cfg.train.eval_batch_size, rank=s.rank, world_size=s.world_size, workers=cfg.data.workers,
            loader=cfg.data.loader, device=s.device, dtype=precision_dtype(cfg.train), on_batch=recorder,
        )  # fmt: skip
        if recorder:  # the first split's best to worst pairs, drawn to TensorBoard (frozen weights may be 16-bit)
            with autocast(s.device, precision_dtype(cfg.train)):
                sheets = contact_sheets(
                    s.engine.module, recorder, cfg.data.shards, splits[:1], cfg.train.eval_pictures, s.rank
                )
            for split, sheet in sheets.items():
                run.log.image(f"eval/{split}/pictures", sheet, run.step)
    scalars = {
        f"eval/{split}/{k}": v
        for split, res in results.items()
        for k, v in res.items()
        if k != "count" and isinstance(v, int | float)  # not the protocol's name
    }
    epoch = run.step / run.steps_per_epoch
    run.log.record("metrics.jsonl", run.step, scalars, dict(step=run.step, epoch=epoch, results=results))
    run.log.print(f"evaluation at step {run.step}:\n{format_table(results)}")
    run.metrics = results
    return results


def save_run(run: Run) -> None:
    """A checkpoint of the engine at ``run.step`` (every rank)."""
    client_state = {
        "step": run.step,
        "epoch": run.step // run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "skipped_steps": run.skipped_steps,
        DIGEST_KEY: run.setup.frozen_digest,
    }
    tag = save_checkpoint(run.setup.engine, run.ckpt_dir, run.step, client_state, run.cfg, run.setup.rank)
    run.log.print(f"saved checkpoint {run.ckpt_dir / tag}")


def train_steps(run: Run) -> None:
    """Every optimizer step from ``run.step`` to ``run.total_steps``, epoch by epoch."""
    run.setup.engine.train()
    meter = LossMeter(run.setup.device)
    while run.step < run.total_steps:
        train_one_epoch(run, run.step // run.steps_per_epoch, meter)
    read_skipped_steps(run)


def train(cfg: Config, deepspeed_base: dict[str, Any], deepspeed_source: str = "DeepSpeed config") -> dict[str, Any]:
    """Trains (or resumes) one run; every rank calls it.

    Args:
        cfg: The resolved config.
        deepspeed_base: The DeepSpeed JSON (ds_configs/*.json) before the Config-derived fields are filled.
        deepspeed_source: Where ``deepspeed_base`` came from, for error messages.

    Returns:
        ``step``, ``epoch``, ``lr``, ``loss`` (last logged), ``metrics`` (the final evaluation) and ``export``.
    """
    run = start_run(cfg, deepspeed_base, deepspeed_source)
    train_steps(run)
    evaluate_run(run, final_splits(cfg))
    export = export_engine(run.setup.engine, cfg, run.out / EXPORT_NAME, run.setup.rank, run.metrics)
    if export is not None:
        run.log.print(f"exported {export}")
    return dict(
        step=run.step,
        epoch=run.step // run.steps_per_epoch,
        lr=run.setup.scheduler.get_last_lr()[0],
        loss=run.last_loss,
        metrics=run.metrics,
        export=str(run.out / EXPORT_NAME),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dcris train", description="Train DCRIS with DeepSpeed.")
    parser.add_argument("--config", help="run file (YAML/JSON) listing what differs from its preset")
    parser.add_argument("--preset", help="preset name (default: the run file's 'preset' key, else dcris-b)")
    parser.add_argument(
        "--deepspeed", default=str(DEFAULT_DEEPSPEED), metavar="JSON",
        help="DeepSpeed config; batch, accumulation, clipping and precision fields are filled from the config",
    )  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris train`` and ``launch/train.py``."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.preset, args.overrides)
    train(cfg, read_deepspeed_json(args.deepspeed), args.deepspeed)
    return 0
