"""Host synchronisations: every operation that would make the host wait for a GPU stream, counted without a GPU.

:class:`HostSyncCounter` watches one thread's tensor operations (a ``TorchFunctionMode`` for what Python calls, a
``TorchDispatchMode`` for every aten operator, autograd's included) and the explicit synchronisation entry points,
and records an event for each of:

    read          ``item()``, ``bool()``/``float()``/``int()`` of a tensor (``aten._local_scalar_dense``), ``tolist()``,
                  ``numpy()`` of a device tensor
    to_host       ``.cpu()`` (or ``.to()`` the host, ``copy_`` into a host tensor) of a device tensor
    data_shape    an operator whose output shape depends on device values: ``nonzero``, boolean indexing,
                  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ...
    host_copy     a copy from the host to the device that blocks: one without ``non_blocking``, one from pageable
                  memory, and ``torch.tensor``/``as_tensor`` of Python or NumPy data with ``device=``
    sync          ``torch.cuda.synchronize``, stream and event ``synchronize``, ``torch.accelerator.synchronize``,
                  DeepSpeed's ``get_accelerator().synchronize()``, ``torch.distributed.barrier``

Which tensors are on the device: on a GPU, those on the counted device. On the CPU, where the counted device is
the host itself, the counter keeps the distinction itself. A tensor is on the device once ``.to(device)`` or
``.cuda()`` (a copy, as on a GPU) or a factory with ``device=`` made it, or an operator computed it from a device
tensor. It is on the host when made without ``device=`` (``torch.tensor(list)``, ``torch.zeros(n)``,
``torch.from_numpy``), by ``.cpu()`` (a copy, as on a GPU), when another process sent it (a DataLoader worker) or
it was read from a file, or when computed from host tensors only. Tensors made before the counter started, or by
other threads, count as device tensors unless pinned: a read of one is counted rather than missed. Host work that
names the host as ``device=`` (a loader worker's decoding, when run in this thread) cannot be told from device
work: measure with loader workers, as runs have them. A CPU-only build cannot pin memory; there a
``non_blocking`` copy to the device is taken as the asynchronous copy it asks for (a GPU test checks that it
comes from pinned memory).

Every operator seen is counted too (``ops``, and ``device_ops`` with a device tensor among its inputs), so a zero
count of events always comes with proof that device work was watched.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

KINDS = ("read", "to_host", "data_shape", "host_copy", "sync")
_HOST, _DEVICE = "host", "device"
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS_FILE = __file__
_aten = torch.ops.aten
# operators whose output shape is data-dependent: the host waits for the device to know it
_DATA_SHAPE = {
    _aten.nonzero, _aten.masked_select, _aten._unique, _aten._unique2, _aten.unique_dim, _aten.unique_consecutive,
    _aten.bincount, _aten.equal, _aten.is_nonzero, _aten.nonzero_numpy, _aten.argwhere,
}  # fmt: skip
_INDEX = {_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_}
_FACTORIES = _device_constructors()
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass(frozen=True)
class SyncEvent:
    kind: str  # one of KINDS
    what: str  # the operator or function
    where: str  # the innermost calling line outside torch: "path:line in function"
    section: str | None  # the section it fell in (HostSyncCounter.section), None outside any


def _caller() -> str:
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIR)
                                 or frame.f_code.co_filename == _THIS_FILE
                                 or frame.f_code.co_filename.startswith("<")):  # fmt: skip
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    short = "/".join(path.parts[-2:])
    return f"{short}:{frame.f_lineno} in {frame.f_code.co_name}"


class _Functions(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.counter._function(func, args, kwargs or {})


class _Operators(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.counter._operator(func, args, kwargs or {})


class HostSyncCounter:
    """Counts host synchronisations of this thread while active (``with HostSyncCounter(device) as c:``).

    Args:
        device: The device the code under watch computes on (a run's training device: ``cpu`` in a CPU test).

    Attributes:
        events: Every synchronisation seen, in order.
        section: A label events are recorded under (set by :meth:`in_section`); None outside one.
        ops, device_ops: aten operators seen, and those with a device tensor among their inputs.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.simulated = self.device.type == "cpu"  # the host is the device: device-ness is tracked by the counter
        self.can_pin = torch.cuda.is_available()
        self.events: list[SyncEvent] = []
        self.section: str | None = None
        self.paused = False
        self.ops = self.device_ops = 0
        self.section_ops: collections.Counter[str | None] = collections.Counter()  # device operators per section
        self._marks: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._thread = threading.get_ident()
        self._stack = contextlib.ExitStack()

    # the counts

    def count(self, section: str | None = ..., kind: str | None = None) -> int:  # type: ignore[assignment]
        """Events of ``section`` (any section when omitted) and ``kind`` (any when None)."""
        return sum(1 for e in self.events if (section is ... or e.section == section) and kind in (None, e.kind))

    def by_kind(self, section: str | None = ...) -> dict[str, int]:  # type: ignore[assignment]
        counts = collections.Counter(e.kind for e in self.events if section is ... or e.section == section)
        return {kind: counts[kind] for kind in KINDS}

    def where(self, section: str | None = ...) -> dict[str, int]:  # type: ignore[assignment]
        """Events by ``kind what @ where``, most frequent first: where to look."""
        counts = collections.Counter(
            f"{e.kind} {e.what} @ {e.where}" for e in self.events if section is ... or e.section == section
        )
        return dict(counts.most_common())

    @contextlib.contextmanager
    def in_section(self, name: str | None) -> Iterator[None]:
        previous, self.section = self.section, name
        try:
            yield
        finally:
            self.section = previous

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Tracks tensors but records no event (what a caller does between the parts it measures)."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    # activation

    def __enter__(self) -> HostSyncCounter:
        self._stack.enter_context(_Functions(self))
        self._stack.enter_context(_Operators(self))
        for owner, name in self._sync_entry_points():
            self._patch(owner, name)
        if self.simulated:  # tensors unpickled (a DataLoader worker's, a loaded file's) and from NumPy are on the host
            _patched(self._stack, torch._utils, "_rebuild_tensor", self._on_host)
            _patched(self._stack, torch, "from_numpy", self._on_host)
        return self

    def _on_host(self, make: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def made(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = make(*args, **kwargs)
            self._mark(out, _HOST)
            return out

        return made

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _sync_entry_points(self) -> list[tuple[Any, str]]:
        points: list[tuple[Any, str]] = [
            (torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize"),
            (torch.distributed, "barrier"),
        ]  # fmt: skip
        if hasattr(torch, "accelerator"):
            points.append((torch.accelerator, "synchronize"))
        if "deepspeed" in sys.modules:  # imported by the code under watch: its accelerator object is a singleton
            from deepspeed.accelerator import get_accelerator

            points.append((get_accelerator(), "synchronize"))
        return points

    def _patch(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        what = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

        def watched(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._thread:
                self._record("sync", what)
            return original(*args, **kwargs)

        setattr(owner, name, watched)
        self._stack.callback(setattr, owner, name, original)

    # classification

    def on_device(self, t: torch.Tensor) -> bool:
        if not self.simulated:
            return t.device.type == self.device.type
        mark = self._marks.get(t)
        return (not t.is_pinned()) if mark is None else mark == _DEVICE

    def _mark(self, value: Any, mark: str) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                self._marks[t] = mark

    def _is_target(self, device: Any) -> bool:
        return device is not None and torch.device(device).type == self.device.type

    def _record(self, kind: str, what: str) -> None:
        if not self.paused:
            self.events.append(SyncEvent(kind, what, _caller(), self.section))

    # the two modes' handlers

    def _function(self, func: Any, args: tuple, kwargs: dict) -> Any:
        name = getattr(func, "__name__", str(func))
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and name in ("tolist", "numpy") and self.on_device(tensor):
            self._record("read", name)
        if tensor is not None and name == "new_tensor" and self.on_device(tensor) and len(args) > 1:
            if not isinstance(args[1], torch.Tensor):
                self._record("host_copy", "new_tensor(data)")
        if tensor is not None and name == "cpu" and self.on_device(tensor):
            self._record("to_host", "cpu")
            out = func(*args, **kwargs)
            if self.simulated and out is tensor:  # a GPU copies to the host: so does the simulated device
                out = tensor.clone()
            self._mark(out, _HOST)
            return out
        if tensor is not None and name in ("to", "cuda"):
            target = torch._C._nn._parse_to(*args[1:], **kwargs)[0] if name == "to" else self.device
            non_blocking = kwargs.get("non_blocking", False) or (name == "to" and _positional_non_blocking(args))
            if self._is_target(target):
                self._copy_to_device(tensor, bool(non_blocking), name)
                out = func(*args, **kwargs)
                if self.simulated and out is tensor and not self.on_device(tensor):
                    out = tensor.clone()  # a GPU copies to the device, and the host tensor stays on the host
                self._mark(out, _DEVICE)
                return out
            if target is not None and self.on_device(tensor):  # to another device: the host
                self._record("to_host", name)
        if tensor is not None and name == "copy_" and len(args) > 1:
            dst, src = args[0], args[1]
            non_blocking = bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            if self.on_device(dst) and not self.on_device(src):
                self._copy_to_device(src, non_blocking, "copy_")
            elif not self.on_device(dst) and self.on_device(src) and not non_blocking:
                self._record("to_host", "copy_")
            return func(*args, **kwargs)
        if func in _FACTORIES:
            device = kwargs.get("device")
            if func in _FROM_DATA and self._is_target(device) and args and not isinstance(args[0], torch.Tensor):
                self._record("host_copy", f"torch.{name}(data, device=)")  # built on the host, copied while waiting
            out = func(*args, **kwargs)
            if func in _FROM_DATA and args and isinstance(args[0], torch.Tensor) and device is None:
                return out  # as_tensor(t) keeps t where it is
            self._mark(out, _DEVICE if self._is_target(device) else _HOST)
            return out
        return func(*args, **kwargs)

    def _copy_to_device(self, src: torch.Tensor, non_blocking: bool, what: str) -> None:
        if self.on_device(src):
            return
        if not non_blocking:
            self._record("host_copy", f"{what} (blocking)")
        elif self.can_pin and not src.is_pinned():
            self._record("host_copy", f"{what} (pageable)")

    def _operator(self, func: Any, args: tuple, kwargs: dict) -> Any:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        from_device = any(self.on_device(t) for t in inputs)
        self.ops += 1
        self.device_ops += from_device
        self.section_ops[self.section] += from_device
        packet = func.overloadpacket
        if from_device:
            if packet is _aten._local_scalar_dense:
                self._record("read", "item")
            elif packet in _DATA_SHAPE or (packet is _aten.repeat_interleave and kwargs.get("output_size") is None
                                           and isinstance(args[0], torch.Tensor)):  # fmt: skip
                self._record("data_shape", str(packet))
            elif packet in _INDEX and _boolean_index(args[1]):
                self._record("data_shape", f"{packet} (boolean mask)")
        out = func(*args, **kwargs)
        if self.simulated:
            if packet is _aten.lift_fresh or not inputs:
                device = kwargs.get("device")
                self._mark(out, _HOST if packet is _aten.lift_fresh or not self._is_target(device) else _DEVICE)
            elif not func._schema.is_mutable:  # an in-place operator keeps its tensor where it is
                self._mark(out, _DEVICE if from_device else _HOST)
        return out


def _positional_non_blocking(args: tuple) -> bool:
    """``t.to(device, dtype, non_blocking)`` / ``t.to(dtype, non_blocking)`` / ``t.to(other, non_blocking)``."""
    flags = [a for a in args[2:] if isinstance(a, bool)]
    return bool(flags and flags[0])


def _boolean_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sections_per_item(counter: HostSyncCounter, items: Any, label: Callable[[int], str]) -> Iterator[Any]:
    """``items``, each with its section open from the moment it is asked for until the next one is: the
    producer's work for item ``i`` (a loader's) and the consumer's work on it both fall in section ``label(i)``."""
    it = iter(items)
    for i in itertools.count():
        with counter.in_section(label(i)):
            try:
                item = next(it)
            except StopIteration:
                return
            yield item


class _SectionedLoader:
    """A loader whose batches open a section each (:func:`sections_per_item`); everything else is the loader's."""

    def __init__(self, counter: HostSyncCounter, inner: Any, label: Callable[[int], str]) -> None:
        self._counter, self._inner, self._label = counter, inner, label

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __iter__(self) -> Iterator[Any]:
        inner = iter(self._inner)
        try:
            yield from sections_per_item(self._counter, inner, self._label)
        finally:
            if hasattr(inner, "close"):
                inner.close()


def _patched(stack: contextlib.ExitStack, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    stack.callback(setattr, owner, name, original)


def _paused(counter: HostSyncCounter) -> Callable[[Any], Any]:
    def make(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with counter.pause():
                return original(*args, **kwargs)

        return call

    return make


def _summary(counter: HostSyncCounter, sections: list[str], unit: str, plural: str) -> dict[str, Any]:
    counts = [counter.count(s) for s in sections]
    return {
        plural: len(sections),
        f"syncs_per_{unit}": sum(counts) / max(len(sections), 1),
        f"syncs_by_{unit}": counts,
        "by_kind": {k: n / max(len(sections), 1) for k, n in _merge(counter, sections).items()},
        "where": dict(sum((collections.Counter(counter.where(s)) for s in sections), collections.Counter())),
        f"device_ops_per_{unit}": sum(counter.section_ops[s] for s in sections) / max(len(sections), 1),
    }


def _merge(counter: HostSyncCounter, sections: list[str]) -> dict[str, int]:
    total = collections.Counter()
    for s in sections:
        total.update(counter.by_kind(s))
    return {kind: total[kind] for kind in KINDS}


def count_training_syncs(
    cfg: Any, deepspeed_base: dict[str, Any], source: str = "DeepSpeed config"
) -> tuple[dict[str, Any], Any]:
    """Host syncs per optimizer step of the trainer's own loop (``dcris.trainer.train_steps`` over
    ``train.max_steps`` steps of one epoch), between log lines: each step's section runs from the loader's first
    micro-batch of the step to the next step's, with log lines, evaluations and checkpoints paused. The first and
    the last step (the loader's start and end) are left out.

    Returns:
        ``steps`` measured, ``syncs_per_step``, ``syncs_by_step``, ``by_kind``, ``where``, ``device_ops_per_step``;
        and the run (``dcris.trainer.Run``: its engine's module is the trained model).
    """
    from dcris import trainer

    run = trainer.start_run(cfg, deepspeed_base, source)
    counter = HostSyncCounter(run.setup.device)
    accum = run.setup.grad_accum
    first = run.step

    def label(epoch: int, start: int) -> Callable[[int], str]:
        return lambda i: f"step {epoch * run.steps_per_epoch + (start + i) // accum + 1}"

    with contextlib.ExitStack() as stack:
        _patched(stack, trainer, "train_loader", lambda real: lambda cfg, rank, world, device, epoch, start=0: (
            _SectionedLoader(counter, real(cfg, rank, world, device, epoch, start), label(epoch, start))))
        for name in ("log_progress", "_evaluate_and_save_when_due"):
            _patched(stack, trainer, name, _paused(counter))
        with counter:
            trainer.train_steps(run)
    return _summary(counter, [f"step {s}" for s in range(first + 2, run.step)], "step", "steps"), run


def count_evaluation_syncs(model: Any, shards: str, split: str, *, image_size: int, batch_size: int,
                           device: torch.device, dtype: torch.dtype, workers: int = 1, loader: str = "torch") -> dict:
    """Host syncs per evaluation batch of ``dcris.evaluate.evaluate`` on one split, until the results are read:
    each batch's section runs from the loader's work for it to the next batch's. The first batch (the loader's
    start) is left out.

    Returns:
        ``batches`` measured, ``syncs_per_batch``, ``syncs_by_batch``, ``by_kind``, ``where``,
        ``device_ops_per_batch``, and the split's ``results``.
    """
    from dcris import evaluate as evaluation

    counter = HostSyncCounter(device)
    batches = []

    def sectioned(real: Any) -> Any:
        def build(*args: Any, **kwargs: Any) -> _SectionedLoader:
            inner = real(*args, **kwargs)
            batches.extend(f"batch {i}" for i in range(len(inner)))
            return _SectionedLoader(counter, inner, lambda i: f"batch {i}")

        return build

    with contextlib.ExitStack() as stack:
        _patched(stack, evaluation, "build_loader", sectioned)
        with counter:
            results = evaluation.evaluate(model, shards, [split], image_size=image_size, batch_size=batch_size,
                                          workers=workers, loader=loader, device=device, dtype=dtype)  # fmt: skip
    return dict(_summary(counter, batches[1:], "batch", "batches"), results=results[split])
