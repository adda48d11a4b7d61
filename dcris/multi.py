"""Several adapter sets on one frozen backbone: shared backbones in memory and mixed batches.

    from dcris import MultiSegmenter

    seg = MultiSegmenter.from_pretrained({"refcoco": "runs/refcoco/export", "refcocog": "runs/refcocog/export"})
    seg("photo.jpg", "the man on the left", model="refcocog")      # a Segmentation, as Segmenter gives it

The deployment case of parameter-efficient training: one frozen DINOv2 + CLIP pair and a few megabytes of
adapters and head per data set or task.

**Sharing.** Exports whose frozen backbones are the same hold them once. "The same" is decided from the weights:
the recorded backbone source and shape (``model.vision`` and ``model.text`` of the config, less the fields that
only say how they are read: the vision taps and the context length) and a SHA-256 digest of every frozen tensor
(name, dtype, shape and bytes), never from the preset name alone. Exports whose backbones differ are loaded side
by side; the log says which share. A model whose backbones carry a Table 2 method (LoRA layers inside them, or
full fine-tuning) keeps its own.

**Mixed batches.** :meth:`MultiSegmenter.forward` runs rows of different adapter sets in one forward: the frozen
part of each block runs once over the whole batch, each set's DenseCrossAdapters, TextAdapters and head on its own
rows. Sets of one backbone with different context lengths mix too: the text runs at the longest, which changes
nothing for the shorter rows (causal attention; each TextAdapter sees only its rows' own positions). Sets mix when
their :meth:`~MultiSegmenter.batch_key` agrees (one backbone, one input size).

**Residency.** With ``max_resident`` set, at most that many sets keep their own tensors (adapters and head; the
whole model for a set with its own backbones) on the compute device; :meth:`MultiSegmenter.make_resident` brings
the sets a batch needs back and moves the least recently used others to host memory (pinned, for a fast return).
Sets are added and removed while serving (:meth:`~MultiSegmenter.add`, :meth:`~MultiSegmenter.remove`).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dcris.errors import UserError
from dcris.model import DCRIS, ModelOutput, parameter_group, split_output
from dcris.segmenter import ImageInput, Segmentation, Segmenter
from dcris.text import TextEncoder, text_block
from dcris.vision import vision_block

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # an adapter set's name in NAME=PATH and in requests


def frozen_text_parts(text: TextEncoder) -> list[str]:
    """The attribute names of the text encoder's frozen CLIP modules and parameters (all but its adapters)."""
    children = [name for name, _ in text.named_children() if name != "adapters"]
    return children + [name for name, _ in text.named_parameters(recurse=False)]


def backbone_key(model: DCRIS) -> str | None:
    """What decides that two models' frozen backbones are the same (module docstring), as a hex digest.

    Returns:
        None when the backbones carry a Table 2 method's weights or train: such a model keeps its own.
    """
    cfg = model.cfg
    if cfg.baseline.method != "none" or cfg.train_backbones:
        return None
    vision, text = asdict(cfg.vision), asdict(cfg.text)
    vision.pop("taps")
    text.pop("context_length")
    digest = hashlib.sha256(json.dumps([vision, text], sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        if parameter_group(key) == "backbone":
            digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def share_backbones(model: DCRIS, source: DCRIS) -> None:
    """Makes ``model`` use ``source``'s frozen backbone modules (its own are dropped); adapters and head stay."""
    model.vision.backbone = source.vision.backbone
    for name in frozen_text_parts(model.text):
        setattr(model.text, name, getattr(source.text, name))


def return_freed_memory() -> None:
    """Collects dropped tensors and hands the freed heap back to the system (glibc), so resident memory falls."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused by later allocations instead
        pass


def export_name(path: str | Path) -> str:
    """The default name of an export: its folder's name, or the run's for ``RUN/export``, or a Hub id's repo."""
    parts = Path(str(path).rstrip("/")).parts
    name = parts[-2] if len(parts) > 1 and parts[-1] == "export" else parts[-1]
    return Path(name).stem if name.endswith(".safetensors") else name


def named_exports(specs: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, str | Path]:
    """Names for exports: a mapping as given, or ``NAME=PATH`` / ``PATH`` items (the name from :func:`export_name`).

    Raises:
        UserError: two exports get one name, or a name is not letters, digits, ``.``, ``_`` and ``-``.
    """
    if isinstance(specs, Mapping):
        pairs = list(specs.items())
    else:
        pairs = []
        for spec in specs:
            name, sep, path = str(spec).partition("=")
            pairs.append((name, path) if sep and NAME_PATTERN.fullmatch(name) else (export_name(spec), spec))
    named: dict[str, str | Path] = {}
    for name, path in pairs:
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"model name {name!r} (of {str(path)!r}) must be letters, digits, '.', '_' and '-'")
        if name in named:
            raise UserError(f"two exports are named {name!r}: name them as NAME=PATH")
        named[name] = path
    if not named:
        raise UserError("no exports given")
    return named


class _RowAdapters:
    """One block's adapters of several sets as one callable: each set's adapter on its rows, zero elsewhere.

    Args:
        adapters: per set, its adapter at this block (or None), its output scale, its rows (index tensor) and
            ``extra``: for a TextAdapter ``(context length,)``, for a DenseCrossAdapter ``(its rows' words, grid)``.
        text: whether these are TextAdapters.
    """

    def __init__(self, adapters: list[tuple[nn.Module | None, float, torch.Tensor, tuple]], text: bool) -> None:
        self.adapters = [entry for entry in adapters if entry[0] is not None]
        self.text = text

    def __call__(self, x: torch.Tensor, *_ignored: object) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C): the scaled adapter outputs of each set's rows; the block's scale is 1."""
        out = torch.zeros_like(x)
        for adapter, scale, rows, extra in self.adapters:
            if self.text:  # a TextAdapter reads its set's own positions only (the released form convolves them)
                length = extra[0]
                out[rows, :length] = scale * adapter(x[rows, :length])
            else:
                out[rows] = scale * adapter(x[rows], *extra)
        return out


class MultiSegmenter:
    """Several adapter sets, each a :class:`~dcris.segmenter.Segmenter`, over shared frozen backbones.

    Args:
        segmenters: The adapter sets by name. Sets with the same :func:`backbone_key` are made to share the
            first one's backbone modules.
        max_resident: How many sets keep their own tensors on the compute device at most (module docstring);
            None: all of them.
    """

    def __init__(self, segmenters: Mapping[str, Segmenter], max_resident: int | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise UserError(f"max_resident must be at least 1, got {max_resident}")
        self.segmenters: dict[str, Segmenter] = {}
        self.backbones: dict[str, str | None] = {}  # name -> backbone key (None: its own)
        self.devices: dict[str, torch.device] = {}  # name -> where the set computes
        self.resident: OrderedDict[str, None] = OrderedDict()  # the sets on their device, least recently used first
        self.max_resident = max_resident
        for name, segmenter in segmenters.items():
            self.add(name, segmenter)

    @classmethod
    def from_pretrained(
        cls,
        exports: Sequence[str | Path] | Mapping[str, str | Path],
        *,
        device: str | torch.device | None = None,
        allow_download: bool = False,
        overrides: list[str] | None = None,
        max_resident: int | None = None,
        backend: str = "pytorch",
    ) -> MultiSegmenter:
        """Loads exports one after another, each sharing the backbones already loaded where they are the same.

        Args:
            exports: Export folders or Hub ids: a mapping from name to export, or ``NAME=PATH`` / ``PATH`` items
                (see :func:`named_exports`).
            device: Where to run (default: CUDA when available, else the CPU).
            allow_download: As in :meth:`Segmenter.from_pretrained`.
            overrides: ``section.key=value`` changes applied to every export's recorded config.
            max_resident: As in the class.
            backend: As in :meth:`Segmenter.from_pretrained`; ``"onnxruntime"`` runs one exported graph: sharing
                backbones and batching across adapter sets are PyTorch features.

        Raises:
            UserError: an export cannot be loaded, or the names clash, or several exports with ONNX Runtime.
        """
        named = named_exports(exports)
        if backend != "pytorch" and len(named) > 1:
            raise UserError(
                f"the {backend} backend runs one exported graph: batching across adapter sets is a PyTorch feature "
                f"(got {len(named)} exports)"
            )
        multi = cls({}, max_resident)
        for name, path in named.items():
            loaded = Segmenter.from_pretrained(
                path, device=device, allow_download=allow_download, overrides=overrides, backend=backend
            )
            multi.add(name, loaded)
            return_freed_memory()  # a duplicate backbone was just dropped
        return multi

    def add(self, name: str, segmenter: Segmenter) -> None:
        """Adds an adapter set; its backbones are replaced by an equal one already held (logged either way)."""
        if name in self.segmenters:
            raise UserError(f"an adapter set named {name!r} is already loaded")
        key = backbone_key(segmenter.model) if segmenter.backend == "pytorch" else None
        same = [
            other
            for other, other_key in self.backbones.items()
            if key is not None and other_key == key and self.devices[other] == segmenter.device
        ]
        if same:
            share_backbones(segmenter.model, self.segmenters[same[0]].model)
            shared_with = ", ".join(map(repr, same))
            log.info("adapter set %r shares the frozen backbones of %s (%s)", name, shared_with, key[:12])
        elif segmenter.backend != "pytorch":
            log.info("adapter set %r runs its exported graph (%s)", name, segmenter.backend)
        elif key is None:
            log.info("adapter set %r keeps its own backbones: they carry a Table 2 method's weights", name)
        else:
            log.info("adapter set %r loads its own frozen backbones (%s)", name, key[:12])
        self.segmenters[name] = segmenter
        self.backbones[name] = key
        self.devices[name] = segmenter.device
        self.make_resident([name])

    def remove(self, name: str) -> None:
        """Drops an adapter set (sets sharing its backbones keep them) and returns the freed memory."""
        self.segmenter(name)  # raises for an unknown name
        for held in (self.segmenters, self.backbones, self.devices, self.resident):
            held.pop(name, None)
        return_freed_memory()

    def shares_a_backbone(self, segmenter: Segmenter) -> bool:
        """Whether ``segmenter``'s frozen backbones equal those of a set already held (so adding it costs only its
        adapters and head)."""
        key = backbone_key(segmenter.model)
        return key is not None and key in self.backbones.values()

    def _own_tensors(self, name: str) -> list[torch.Tensor]:
        """The parameters and buffers of set ``name`` that no other set holds: all but shared backbones."""
        segmenter = self.segmenters[name]
        if segmenter.backend != "pytorch":  # an exported graph: its runtime holds the weights
            return []
        tensors = [*segmenter.model.named_parameters(), *segmenter.model.named_buffers()]
        own = self.backbones[name] is None
        return [t for key, t in tensors if own or parameter_group(key) != "backbone"]

    def _place(self, name: str, device: torch.device) -> None:
        host = device.type == "cpu" and self.devices[name].type != "cpu"  # moving out: pinned, for a fast return
        for tensor in self._own_tensors(name):
            moved = tensor.data.to(device)
            tensor.data = moved.pin_memory() if host else moved

    def make_resident(self, names: Sequence[str]) -> list[str]:
        """Brings sets ``names`` to their device (as most recently used) and, past ``max_resident``, moves the
        least recently used others to host memory.

        Returns:
            The sets that had to be brought back (cold).
        """
        cold = [name for name in dict.fromkeys(names) if name not in self.resident]
        for name in cold:
            self._place(name, self.devices[name])
        for name in names:
            self.resident[name] = None
            self.resident.move_to_end(name)
        needed = set(names)
        for name in list(self.resident):
            if self.max_resident is None or len(self.resident) <= self.max_resident:
                break
            if name not in needed:
                self._place(name, torch.device("cpu"))
                del self.resident[name]
        return cold

    @property
    def names(self) -> list[str]:
        return list(self.segmenters)

    def segmenter(self, name: str | None) -> Segmenter:
        """The adapter set called ``name``; None names the only one.

        Raises:
            UserError: no set has that name (or none was named and several are loaded).
        """
        if name is None and len(self.segmenters) == 1:
            return next(iter(self.segmenters.values()))
        if name not in self.segmenters:
            known = ", ".join(map(repr, self.segmenters))
            said = "no model named" if name is None else f"unknown model {name!r}:"
            raise UserError(f"{said} the adapter sets are {known}")
        return self.segmenters[name]

    def batch_key(self, name: str) -> tuple:
        """Sets whose keys are equal can share a batch: one backbone (or the set alone), one input size, one device."""
        key = self.backbones[name]
        segmenter = self.segmenters[name]
        return (key if key is not None else f"own:{name}", segmenter.model.cfg.image_size, str(self.devices[name]))

    def describe(self) -> list[dict]:
        """Per set: name, preset, context length, input size, backbone digest and the sets it shares it with."""
        rows = []
        for name, segmenter in self.segmenters.items():
            key = self.backbones[name]
            cfg = segmenter.model.cfg
            rows.append(
                {
                    "name": name,
                    "preset": segmenter.config.preset,
                    "context_length": cfg.text.context_length,
                    "image_size": cfg.image_size,
                    "backbone": key[:12] if key else None,
                    "shares_backbone_with": [o for o, k in self.backbones.items() if key and k == key and o != name],
                    "resident": name in self.resident,
                }
            )
        return rows

    @torch.no_grad()
    def __call__(
        self, image: ImageInput, texts: str | list[str], *, model: str | None = None, truncate: bool = True
    ) -> Segmentation | list[Segmentation]:
        """Segments with the adapter set ``model`` (optional when one is loaded), as :meth:`Segmenter.__call__` does."""
        segmenter = self.segmenter(model)
        self.make_resident([model or self.names[0]])
        return segmenter(image, texts, truncate=truncate)

    @torch.no_grad()
    def forward(self, parts: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> list[ModelOutput]:
        """Outputs of several sets' rows in one mixed batch (module docstring).

        Args:
            parts: ``(name, images (n, 3, S, S), tokens (n, L))`` in any order, any count per set; L is that set's
                context length. Every part's set must have the same :meth:`batch_key`.

        Returns:
            Per part, what that set's model alone gives for those rows: logits (n, 1, 4S/14, 4S/14), and for a
            set with the no-target output the pair (those, (n,) "no object" logits).
        """
        keys = {self.batch_key(name) for name, _, _ in parts}
        if len(keys) != 1:
            raise ValueError(f"adapter sets of different backbones or input sizes cannot share a batch: {sorted(keys)}")
        counts = [len(images) for _, images, _ in parts]
        owner = [name for (name, _, _), n in zip(parts, counts, strict=True) for _ in range(n)]
        sets = list(dict.fromkeys(owner))
        self.make_resident(sets)
        device = self.devices[sets[0]]  # the inputs may have been prepared while the set was in host memory
        if self.backbones[sets[0]] is None:  # a set with its own backbones (or an exported graph): it alone
            segmenter = self.segmenters[sets[0]]
            return [segmenter.forward(images.to(device), tokens.to(device)) for _, images, tokens in parts]
        length = max(tokens.shape[1] for _, _, tokens in parts)
        tokens = torch.cat([F.pad(t, (0, length - t.shape[1])) for _, _, t in parts])  # 0 is CLIP's padding id
        images = torch.cat([images for _, images, _ in parts]).to(device)
        rows = {name: torch.tensor([i for i, o in enumerate(owner) if o == name], device=device) for name in sets}
        models = {name: self.segmenters[name].model for name in sets}
        logits, no_target = self._mixed(models, rows, images, tokens.to(device))
        pieces = zip(parts, logits.split(counts), no_target.split(counts), strict=True)
        return [(lg, nt) if models[name].head.no_target is not None else lg for (name, _, _), lg, nt in pieces]

    def _mixed(
        self, models: dict[str, DCRIS], rows: dict[str, torch.Tensor], images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed forward of :meth:`forward`: images (B, 3, S, S), tokens (B, Lmax) -> logits (B, 1, h, w) and
        "no object" logits (B,) (0 in the rows of sets without that output)."""
        base = next(iter(models.values()))
        lengths = {name: m.cfg.text.context_length for name, m in models.items()}

        def adapters_at(i: int, pick: Callable[[DCRIS], nn.ModuleDict], extra: Callable[[str], tuple], text: bool):
            entries = [
                (pick(m)[str(i)] if str(i) in pick(m) else None, m.cfg.adapters.scale, rows[name], extra(name))
                for name, m in models.items()
            ]
            routed = _RowAdapters(entries, text)
            return routed if routed.adapters else None

        x = base.text.embed(tokens)  # (B, Lmax, Ct)
        for i, block in enumerate(base.text.transformer.resblocks):
            x = text_block(block, adapters_at(i, lambda m: m.text.adapters, lambda n: (lengths[n],), True), x, 1.0)
        words, sentence = base.text.finish(x, tokens)  # (B, Lmax, Ct), (B, E)
        own_words = {name: words[rows[name], : lengths[name]] for name in models}  # (n, L, Ct) per set

        vision = base.vision
        x, grid = vision.embed(images)  # (B, 1 + R + H*W, Cv)
        taps = {t for m in models.values() for t in m.vision.cfg.taps}
        tapped = {}
        for i, layer in enumerate(vision.backbone.encoder.layer):
            routed = adapters_at(i, lambda m: m.vision.adapters, lambda n: (own_words[n], grid), False)
            x = vision_block(layer, routed, x, words, grid, vision.cfg.heads, 1.0)
            if i in taps:
                tapped[i] = x
        out = no_target = None
        for name, m in models.items():
            r = rows[name]
            maps = m.vision.feature_maps([tapped[t][r] for t in m.vision.cfg.taps], x[r], grid)  # 3 x (n, Cv, H, W)
            own, own_no_target = split_output(m.head(maps, own_words[name], sentence[r], tokens[r, : lengths[name]]))
            if out is None:
                out = own.new_empty((len(images), *own.shape[1:]))  # (B, 1, 4H, 4W)
                no_target = own.new_zeros(len(images))
            out[r] = own
            if own_no_target is not None:
                no_target[r] = own_no_target.to(no_target.dtype)
        return out, no_target
