"""Everything a run derives from its Config: process group, batch layout, DeepSpeed JSON, LR schedule, the engine.

The batch numbers come from :func:`batch_layout` alone and :func:`deepspeed_config` writes them into the
DeepSpeed JSON, so the JSON and the config cannot disagree: ``micro_batch x grad_accum x world = global_batch``.
:func:`build_engine` is the one place a DeepSpeed engine is made from a Config (the trainer and benchmarks).

Mixed precision (SPEC 6) follows the released code's autocast + GradScaler: trainable weights, gradients,
optimizer state and BatchNorm running statistics stay fp32, and DeepSpeed's ``torch_autocast`` section runs the
forward in bf16 or fp16 (fp16 with a GradScaler). The frozen backbones' matmul weights are stored in that dtype
once (``train.frozen_in_compute_dtype``, :mod:`dcris.precision`): what autocast would cast them to every step.
DeepSpeed's ``bf16``/``fp16`` modes are off: they keep the model itself in 16 bits, which rounds away BatchNorm
statistic updates smaller than about 2% of the stored value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dcris.config import Config, ConfigError, TrainConfig
from dcris.errors import UserError
from dcris.precision import store_frozen_in

if TYPE_CHECKING:
    from dcris.model import DCRIS

AUTO = "auto"  # placeholder in ds_configs/*.json for a value filled from the Config
# the one-process DeepSpeed config of the checkout (the default of a plain ``python`` run)
DEFAULT_DEEPSPEED = Path(__file__).resolve().parents[1] / "ds_configs" / "single.json"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def init_distributed() -> tuple[int, int, int]:
    """Joins (or, for a plain ``python`` run, creates) the process group; calling it again changes nothing.

    The deepspeed launcher and torchrun set RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT; a plain
    single-process run gets a group of one. NCCL with a GPU, gloo without one (DeepSpeed's CPU accelerator).

    Returns:
        ``(rank, local_rank, world_size)``.
    """
    import deepspeed  # deferred: importing deepspeed probes the accelerator

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size()
    if "RANK" not in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        # port 0: the store binds a free port itself, so concurrent single-process runs cannot race for one. Only
        # LOCAL_RANK (which DeepSpeed's engine reads) is set: the processes this one starts run on their own too
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(backend, auto_mpi_discovery=False, init_method="tcp://127.0.0.1:0", rank=0,
                                   world_size=1)  # fmt: skip
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def rank_device(local_rank: int) -> torch.device:
    """The device of a rank: its GPU, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def use_fixed_shape_kernels(device: torch.device) -> None:
    """On CUDA, lets cuDNN time its convolution algorithms on the first call of each shape and keep the fastest.

    Training and evaluation forwards have one shape each (evaluation fills its last batch up), so the search is
    paid once per run; the chosen algorithms may differ between runs in the last bits.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def all_reduce_values(values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over all ranks (float64; on the rank's GPU under NCCL); unchanged without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def batch_layout(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """The one source of the batch numbers.

    ``train.micro_batch`` is the most images a rank takes in one forward: where the global batch split over the
    ranks is smaller, a rank takes its share (32 on one GPU, 16 each on 2, 4 each on 8 for a global batch of 32),
    so the default suits any number of GPUs and a run can resume on another.

    Returns:
        ``(micro_batch, grad_accum)`` with ``micro_batch * grad_accum * world_size == train.global_batch``.

    Raises:
        ConfigError: the global batch does not split into whole micro-batches over the ranks.
    """
    micro = min(train.micro_batch, train.global_batch // world_size)
    if train.micro_batch < 1 or micro < 1 or train.global_batch % (micro * world_size):
        raise ConfigError(
            f"train.global_batch {train.global_batch} does not split into micro-batches of at most "
            f"train.micro_batch {train.micro_batch} over {world_size} ranks; change either so that "
            "global = micro x grad_accum x ranks"
        )
    return micro, train.global_batch // (micro * world_size)


def deepspeed_config(cfg: Config, world_size: int, base: dict[str, Any], source: str = "DeepSpeed config") -> dict:
    """The DeepSpeed config of a run: ``base`` (ds_configs/*.json) with the Config-derived fields filled.

    Derived fields (batch sizes, accumulation, clipping, ``torch_autocast``; ``bf16``/``fp16`` always off) may be
    absent or ``"auto"`` in ``base``; a concrete value that differs from the Config is refused, and so is an
    ``optimizer`` or ``scheduler`` section (the optimizer and the LR schedule come from the Config). Unless
    ``base`` says otherwise, gradients are reduced in fp32 (``lower_precision_safe_modules`` empty), as DDP does.
    ZeRO keeps its gradient norm: its host reads a step are what skip a non-finite step on every rank alike
    (``zero_optimization.compute_grad_norm=false`` in ``base`` drops both); without ZeRO (stage 0), the optimizer
    skips such a step on the device (:class:`SkippingAdam`). DeepSpeed's throughput timer is off unless ``base``
    turns it on (it synchronises the device twice a micro-step).

    Raises:
        ConfigError: ``base`` contradicts the Config; the message names the key.
    """
    t = cfg.train
    micro, accum = batch_layout(t, world_size)
    derived: dict[tuple[str, ...], Any] = {
        ("train_batch_size",): t.global_batch,
        ("train_micro_batch_size_per_gpu",): micro,
        ("gradient_accumulation_steps",): accum,
        ("gradient_clipping",): float(t.grad_clip),
        ("bf16", "enabled"): False,  # 16-bit weights: see the module docstring
        ("fp16", "enabled"): False,
        ("torch_autocast", "enabled"): t.precision != "fp32",
        ("torch_autocast", "dtype"): t.precision,
    }
    if "tensorboard" not in base:  # DeepSpeed's monitor writes RUN/tensorboard (rank 0)
        base = dict(base, tensorboard=dict(enabled=True, output_path=t.output_dir, job_name="tensorboard"))
    for section in ("optimizer", "scheduler"):
        if section in base:
            raise ConfigError(f"{source}: remove the {section!r} section; train.lr / lr_milestones set it")
    out = json.loads(json.dumps(base))  # deep copy
    for path, value in derived.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        given = node.get(path[-1], AUTO)
        if given != AUTO and given != value:
            raise ConfigError(
                f"{source}: {'.'.join(path)} is {given!r} but the config gives {value!r}; "
                f'set it to "auto" or remove it (it follows from the train section)'
            )
        node[path[-1]] = value
    out["torch_autocast"].setdefault("lower_precision_safe_modules", [])
    # DeepSpeed's throughput timer synchronises the device at every forward and step; the trainer times itself
    out.setdefault("timers", {}).setdefault("throughput", {"enabled": False})
    zero = out.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear for the whole process, for good:
        # evaluation after training and every later model would run DeepSpeed's linear instead of torch's
        zero.setdefault("memory_efficient_linear", False)
    if t.precision == "fp16" and zero.get("stage", 0) > 0:
        _fp16_with_zero(zero, t, source)
    return out


def _fp16_with_zero(zero: dict[str, Any], train: TrainConfig, source: str) -> None:
    """Makes DeepSpeed's ZeRO drive the fp16 GradScaler correctly, or refuses what it cannot do.

    ZeRO (DeepSpeed 0.19) computes the gradient norm of the still-scaled gradients: an overflowing step is then
    skipped without the GradScaler backing off (the scale never falls, no step is ever taken), and clipping
    compares the scaled norm. Without the norm (stage 1-2 only) the GradScaler finds the overflow itself.
    """
    if zero["stage"] == 3:
        raise ConfigError(
            f"{source}: train.precision=fp16 needs ZeRO stage 0-2 (stage 3 never backs off the loss "
            "scale after an overflow); use bf16"
        )
    if train.grad_clip > 0:
        raise ConfigError("train.grad_clip > 0 with train.precision=fp16 needs ZeRO stage 0; use bf16 or no clipping")
    if zero.get("compute_grad_norm", False):
        raise ConfigError(f"{source}: zero_optimization.compute_grad_norm must be false with train.precision=fp16")
    zero["compute_grad_norm"] = False


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Reads a DeepSpeed JSON file; a missing or malformed file is a user error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(path)!r} must hold a JSON object")
    return data


def lr_factor(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """LR multiplier at an optimizer step: ``lr_gamma`` per milestone epoch reached (x0.1 at epoch 35)."""
    epoch = step // steps_per_epoch
    return train.lr_gamma ** sum(epoch >= m for m in train.lr_milestones)


def precision_dtype(train: TrainConfig) -> torch.dtype:
    """The autocast dtype of the run's forward passes (float32: no autocast); weights stay float32."""
    return AUTOCAST_DTYPES[train.precision]


def store_frozen_as_configured(model: torch.nn.Module, train: TrainConfig) -> int:
    """Stores the frozen backbone tensors in the run's compute dtype as ``train`` says (:mod:`dcris.precision`);
    the training engine and the benchmark's inference model call it once, after building the model.

    Returns:
        The number of parameters now in 16 bits.
    """
    if not (train.frozen_in_compute_dtype or train.compute_dtype_residual):
        return 0
    return store_frozen_in(model, precision_dtype(train), residual=train.compute_dtype_residual)


def build_training_model(cfg: Config) -> DCRIS:
    """The model a run trains, seeded with ``train.seed``: unnamed (random-init) backbones come out identical
    every time, which is what lets checkpoints leave the frozen weights out."""
    from dcris.model import build_model  # deferred: the backbone libraries take seconds to import

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, pretrained=True)


def frozen_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen parameters (names and bytes): checkpoints record it, loading compares it."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def use_sync_batchnorm(world_size: int, device: torch.device) -> bool:
    """Whether BatchNorm synchronises over ranks (the released code's ``sync_bn``).

    torch's SyncBatchNorm has GPU kernels only (it raises on CPU tensors in training): CPU ranks keep per-rank
    statistics.
    """
    return world_size > 1 and device.type == "cuda"


def convert_sync_batchnorm(model: torch.nn.Module) -> int:
    """Replaces every BatchNorm of ``model`` by a SyncBatchNorm in place (same parameters and buffers).

    The frozen backbones have no BatchNorm, so this touches the adapters and the head only.

    Returns:
        The number of SyncBatchNorm modules.
    """
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
    return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


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
            if hasattr(p, "ds_shape"):  # ZeRO-3 partitioned it: gathering views the flat data as ds_shape
                p.ds_shape = torch.Size([])
            else:
                p.data = p.data.reshape(())


class SkippingAdam(torch.optim.Adam):
    """Fused Adam that skips a step with a non-finite gradient on the device, without a host read.

    The fused kernel's ``found_inf`` (what torch's GradScaler sets) is raised when the gradients' norm is not
    finite, or when a GradScaler found an overflow: weights, moments and step counts stay as they were. The
    optimizer of a run without ZeRO; ZeRO's own optimizer reads the norm on the host instead.

    Attributes:
        skipped: After a step, a 0-d bool tensor on the device: whether it was skipped.
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.skipped: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        skipped = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        scaler_found_inf = getattr(self, "found_inf", None)  # a GradScaler's (fp16), which also unscales
        if scaler_found_inf is not None:
            skipped |= scaler_found_inf > 0
        self.found_inf = skipped.float()
        try:
            out = super().step(closure)
        finally:
            if scaler_found_inf is None:
                del self.found_inf
            else:
                self.found_inf = scaler_found_inf  # the GradScaler removes its own after the step
        self.skipped = skipped
        return out


@dataclass
class EngineSetup:
    """A DeepSpeed engine built from a Config, with what the training loop needs to know about it."""

    engine: Any  # deepspeed.DeepSpeedEngine: ``engine.module`` is the model, ``engine.optimizer`` wraps Adam
    scheduler: torch.optim.lr_scheduler.LambdaLR  # per optimizer step, from lr_factor
    device: torch.device
    rank: int
    world_size: int
    grad_accum: int
    num_trainable: int  # trainable parameters (counted before ZeRO-3 partitions them)
    frozen_digest: str  # frozen_digest() of the model as built
    notes: list[str]  # one-line facts about the set-up for the log (e.g. the BatchNorm decision)

    def step_skipped(self) -> torch.Tensor:
        """After an optimizer step: whether it was discarded for a non-finite loss or gradients, as a 0-d bool
        tensor on the device. Without ZeRO it never left the device (:class:`SkippingAdam`); ZeRO decided on the
        host, and its discarded step still counts in the LR schedule here (DeepSpeed does not step it then)."""
        if isinstance(self.engine.optimizer, SkippingAdam):
            return self.engine.optimizer.skipped
        applied = self.engine.was_step_applied()
        if not applied:
            self.scheduler.step()
        return torch.full((), not applied, device=self.device)


def build_engine(
    cfg: Config,
    deepspeed_base: dict[str, Any] | None = None,
    source: str = "DeepSpeed config",
    *,
    steps_per_epoch: int = 1,
    load_universal: bool = False,
) -> EngineSetup:
    """The DeepSpeed engine of a Config: model, trainable parameters, Adam, LR schedule, SyncBatchNorm, ZeRO.

    Every rank calls it (it joins the process group itself). Inputs go to ``setup.device`` in float32; the
    engine's forward autocasts as ``train.precision`` says.

    Args:
        cfg: The resolved config.
        deepspeed_base: The DeepSpeed JSON before the Config-derived fields are filled (default:
            ds_configs/single.json).
        source: Where ``deepspeed_base`` came from, for error messages.
        steps_per_epoch: Optimizer steps per epoch, for the LR milestones.
        load_universal: The engine will load a universal checkpoint (one written by another number of ranks).
    """
    import deepspeed

    t = cfg.train
    rank, local_rank, world = init_distributed()
    _, accum = batch_layout(t, world)
    if deepspeed_base is None:
        deepspeed_base, source = read_deepspeed_json(DEFAULT_DEEPSPEED), str(DEFAULT_DEEPSPEED)
    ds_config = deepspeed_config(cfg, world, deepspeed_base, source)
    if load_universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    device = rank_device(local_rank)
    use_fixed_shape_kernels(device)

    model = build_training_model(cfg)  # identical on every rank (DeepSpeed also broadcasts rank 0's weights)
    digest = frozen_digest(model)  # of the fp32 weights as built, before they are stored in the compute dtype
    store_frozen_as_configured(model, t)
    notes = []
    if use_sync_batchnorm(world, device):
        notes.append(f"SyncBatchNorm over {world} ranks ({convert_sync_batchnorm(model)} layers)")
    elif world > 1:
        notes.append(f"SyncBatchNorm runs on GPUs only: the {world} CPU ranks keep per-rank BatchNorm statistics")
    params = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in params)  # counted now: ZeRO-3 empties the partitioned tensors
    if ds_config["zero_optimization"].get("stage", 0) == 0:
        optimizer: torch.optim.Adam = SkippingAdam(params, lr=t.lr, weight_decay=t.weight_decay)
    else:  # ZeRO checks the gradients itself; fused Adam is a CUDA kernel (DeepSpeed's FusedAdam needs its ops)
        optimizer = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps_per_epoch, t))
    with _zero_dim_params_as_1d(model):
        engine, _, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    torch.manual_seed(t.seed + rank)  # dropout differs across ranks
    return EngineSetup(
        engine=engine, scheduler=scheduler, device=device, rank=rank, world_size=world, grad_accum=accum,
        num_trainable=num_trainable, frozen_digest=digest, notes=notes,
    )  # fmt: skip


def check_shared_folder(folder: str | Path, rank: int, world_size: int, timeout_s: float = 5.0) -> None:
    """Checks that every rank sees the files rank 0 writes in ``folder`` (checkpoints and ``latest`` need it).

    Rank 0 writes a token file with a fresh name; after a broadcast (the barrier) every rank looks for it,
    allowing ``timeout_s`` for a network file system to show it. A collective: every rank calls it.

    Raises:
        UserError: on every rank, when some rank cannot see the file.
    """
    if world_size == 1:
        return
    folder = Path(folder)
    token = [uuid.uuid4().hex]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".shared-{token[0]}").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    path = folder / f".shared-{token[0]}"
    deadline = time.monotonic() + timeout_s
    while not (seen := path.is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    views: list[Any] = [None] * world_size
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if rank == 0:
        path.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(
            f"train.output_dir {str(folder)!r} is not shared: {', '.join(blind)} cannot see the files rank 0 writes "
            "there; point it at a folder every node mounts"
        )
