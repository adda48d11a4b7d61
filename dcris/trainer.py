"""The training loop of SPEC 6, driven by DeepSpeed (ZeRO, mixed precision, accumulation, clipping).

Only the adapters and the head reach the optimizer (Adam, no weight decay); the LR falls by ``lr_gamma`` at each
milestone epoch and is set per optimizer step from the epoch it belongs to. A run writes to ``train.output_dir``:

    config.json           the resolved config
    checkpoints/          resumable DeepSpeed checkpoints (dcris.checkpoint); a rerun resumes from ``latest``
    tensorboard/          loss, LR, images/s and evaluation metrics
    train_log.jsonl       the logged steps, one JSON object a line
    metrics.jsonl         every evaluation: step, epoch and per-split results
    dcris.safetensors     the export at the end (dcris.export)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dcris.checkpoint import export_engine, load_checkpoint, save_checkpoint, set_rng_state
from dcris.config import Config, load_config, to_dict
from dcris.data import build_loader, shards_context_length
from dcris.errors import UserError
from dcris.evaluate import evaluate, split_size
from dcris.metrics import format_table
from dcris.model import build_model
from dcris.train_setup import (
    DEFAULT_DEEPSPEED,
    batch_layout,
    deepspeed_config,
    init_distributed,
    lr_factor,
    precision_dtype,
    read_deepspeed_json,
)

EXPORT_NAME = "dcris.safetensors"


class _Logger:
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


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@contextlib.contextmanager
def _zero_dim_params_as_1d(model: torch.nn.Module) -> Iterator[None]:
    """Shows 0-d parameters (CLIP's frozen ``logit_scale``) as shape (1,) while DeepSpeed initialises.

    DeepSpeed broadcasts every parameter as ``p.data.view(torch.uint8)``, which fails for a 0-d tensor.
    """
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            if p.numel() == 1:  # ZeRO-3 may have replaced it by an empty partition: leave that alone
                p.data = p.data.reshape(())


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(cfg: Config, deepspeed_base: dict[str, Any], deepspeed_source: str = "DeepSpeed config") -> dict[str, Any]:
    """Trains (or resumes) one run; every rank calls it.

    Args:
        cfg: The resolved config.
        deepspeed_base: The DeepSpeed JSON (ds_configs/*.json) before the Config-derived fields are filled.
        deepspeed_source: Where ``deepspeed_base`` came from, for error messages.

    Returns:
        ``step``, ``epoch``, ``lr``, ``loss`` (last logged), ``metrics`` (last evaluation) and ``export``.
    """
    import deepspeed

    t, d = cfg.train, cfg.data
    rank, local_rank, world = init_distributed()
    micro, accum = batch_layout(t, world)
    ds_config = deepspeed_config(cfg, world, deepspeed_base, deepspeed_source)
    split_size(d.shards, d.train_split, train=True)  # fails early, on one line, without shards
    for split in d.eval_splits:
        split_size(d.shards, split, train=False)
    shards_length = shards_context_length(d.shards)  # SPEC 2: 22 for G-Ref umd, else 17
    if cfg.model.text.context_length != shards_length and rank == 0:
        print(f"model.text.context_length={shards_length}: the sentence length of the shards in {d.shards}")
    cfg.model.text.context_length = shards_length  # before the model is built: the config and export record it
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = precision_dtype(t)

    def loader(epoch: int) -> Any:
        return build_loader(
            d.shards, d.train_split, train=True, batch_size=micro, image_size=cfg.model.image_size, rank=rank,
            world_size=world, seed=d.seed, workers=d.workers, loader=d.loader, device=str(device), epoch=epoch,
            shuffle_buffer=d.shuffle_buffer, context_length=cfg.model.text.context_length,
        )  # fmt: skip

    steps_per_epoch = len(loader(0)) // accum  # the loader yields the same count on every rank
    if steps_per_epoch == 0:
        raise UserError(
            f"split {d.train_split!r} of {d.shards} has too few objects for one step of {t.global_batch} images"
        )
    total_steps = t.epochs * steps_per_epoch if t.max_steps <= 0 else min(t.max_steps, t.epochs * steps_per_epoch)

    torch.manual_seed(t.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    model = build_model(cfg.model, pretrained=True)
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)  # counted now: ZeRO-3 empties the partitioned tensors
    # fused Adam is a CUDA kernel; DeepSpeed's own FusedAdam needs a CUDA build of its ops
    optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, t))
    with _zero_dim_params_as_1d(model):
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    torch.manual_seed(t.seed + rank)  # dropout differs across ranks

    out = Path(t.output_dir)
    ckpt_dir = out / "checkpoints"
    log = _Logger(out, rank, engine.monitor)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    step, rng_state = 0, None
    resumed = load_checkpoint(engine, ckpt_dir, rank)
    if resumed is not None:
        state, rng_state = resumed
        if state["steps_per_epoch"] != steps_per_epoch:
            raise UserError(
                f"{ckpt_dir} was trained with {state['steps_per_epoch']} steps per epoch, this config gives "
                f"{steps_per_epoch}: resume with the same data and batch, or use a new train.output_dir"
            )
        step = state["step"]
        log.print(
            f"resumed from {ckpt_dir} at step {step} (epoch {state['epoch']}, lr {scheduler.get_last_lr()[0]:.3g})"
        )
    log.print(
        f"training {num_trainable:,} parameters on {world} rank(s): {micro} x {accum} accumulation x "
        f"{world} = {t.global_batch} images a step, {steps_per_epoch} steps an epoch, {total_steps} steps"
    )

    def checkpoint() -> None:
        client_state = dict(step=step, epoch=step // steps_per_epoch, steps_per_epoch=steps_per_epoch)
        tag = save_checkpoint(engine, ckpt_dir, step, client_state, cfg, rank)
        log.print(f"saved checkpoint {ckpt_dir / tag}")

    def run_eval() -> dict:
        results = evaluate(
            engine.module, d.shards, d.eval_splits, image_size=cfg.model.image_size, batch_size=micro, rank=rank,
            world_size=world, workers=d.workers, loader=d.loader, device=device, dtype=dtype,
        )  # fmt: skip
        scalars = {f"eval/{split}/{k}": v for split, res in results.items() for k, v in res.items() if k != "count"}
        log.record("metrics.jsonl", step, scalars, dict(step=step, epoch=step / steps_per_epoch, results=results))
        log.print(f"evaluation at step {step}:\n{format_table(results)}")
        return results

    engine.train()
    metrics: dict = {}
    evaluated_at = -1
    # the loss stays on the device between log lines: no host sync per step
    loss_sum, loss_count, last_loss = torch.zeros((), device=device), 0, float("nan")
    start_step, start_time = step, time.time()
    while step < total_steps:
        epoch = step // steps_per_epoch  # also the loader's epoch: its order, sentence choice and rank range
        epoch_batches = iter(loader(epoch))
        for _ in range((step - epoch * steps_per_epoch) * accum):
            next(epoch_batches)  # a resumed run skips the micro-batches this epoch already consumed
        if rng_state is not None:
            # restored only now: starting the loader draws from the RNG, which the saving run did at epoch start
            set_rng_state(rng_state)
            rng_state = None
        while step < min(total_steps, (epoch + 1) * steps_per_epoch):
            for batch in itertools.islice(epoch_batches, accum):
                logits = engine(batch["image"].to(device, dtype), batch["tokens"].to(device))
                loss = engine.module.loss(logits, batch["mask"].to(device))
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer and the LR schedule every ``accum`` calls
                loss_sum, loss_count = loss_sum + loss.detach().float(), loss_count + 1
            step += 1
            if step % t.log_every_steps == 0 or step == total_steps:
                last_loss = _mean_over_ranks(loss_sum.item() / max(loss_count, 1))
                loss_sum, loss_count = torch.zeros((), device=device), 0
                elapsed = time.time() - start_time
                rate = (step - start_step) * t.global_batch / elapsed
                lr = scheduler.get_last_lr()[0]
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
                eta = (total_steps - step) * elapsed / (step - start_step)
                log.record(
                    "train_log.jsonl", step,
                    {"train/loss": last_loss, "train/lr": lr, "train/images_per_s": rate, "train/gpu_mem_gib": mem},
                    dict(step=step, epoch=step / steps_per_epoch, loss=last_loss, lr=lr, images_per_s=rate),
                )  # fmt: skip
                log.print(
                    f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {last_loss:.4f} lr {lr:.3g} "
                    f"{rate:.1f} img/s mem {mem:.1f} GiB eta {_fmt_eta(eta)}"
                )
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                epoch_batches.close()  # stop the loader's workers before evaluating (they compete for the CPU)
            if end_of_epoch or (t.eval_every_steps and step % t.eval_every_steps == 0):
                metrics, evaluated_at = run_eval(), step
            if end_of_epoch or step == total_steps or (t.save_every_steps and step % t.save_every_steps == 0):
                checkpoint()
        epoch_batches.close()  # a max_steps stop mid-epoch: stop the workers now, not at garbage collection
    if evaluated_at != step:
        metrics = run_eval()  # a max_steps run that stopped mid-epoch (or a rerun of a finished one)
    export = export_engine(engine, cfg, out / EXPORT_NAME, rank)
    if export is not None:
        log.print(f"exported {export}")
    return dict(
        step=step,
        epoch=step // steps_per_epoch,
        lr=scheduler.get_last_lr()[0],
        loss=last_loss,
        metrics=metrics,
        export=str(out / EXPORT_NAME),
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
