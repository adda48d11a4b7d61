"""Deployable weights in the Hugging Face Hub layout: one folder (or Hub model repository) holding

    config.json        {"format": "dcris-export/2", "config": the resolved Config, "metrics": per-split results}
    model.safetensors  what trains (the adapters and the head, a Table 2 method's own parameters, and the backbones
                       too under full fine-tuning, ``model.train_backbones``) in float32, plus every backbone that
                       has no weights name
    README.md          the model card: preset, backbones, training data, metrics, parameter counts, how to load

Rule for the frozen backbones: a backbone whose weights are named in the config (``model.vision.weights``,
``model.text.weights``) is reloaded from that name and is not in the file; a backbone without a name was
randomly initialised (tiny presets, tests, the demo), so its frozen weights are stored in the file too and the
export reloads to identical predictions either way. A backbone path inside the export folder (``dcris
convert-detris --backbones`` into it) is recorded relative to the folder and read back against it, so the folder
can be moved or copied whole; any other path is recorded as it is (absolute, as convert-detris writes them).

:class:`ExportedWeights` is huggingface_hub's ``ModelHubMixin`` over (config, tensors, metrics): its
``save_pretrained`` writes the folder and the card, ``from_pretrained`` reads a local folder or a Hub id (from
the local Hugging Face cache; fetching only when downloads are allowed, and never under ``HF_HUB_OFFLINE=1``),
``push_to_hub`` uploads. A single ``.safetensors`` file written by earlier versions (``dcris-export/1``, the
config in its metadata) still loads.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dcris.config import Config, apply_overrides, from_dict, to_dict
from dcris.errors import UserError, disk_full_is_user_error, pause_at
from dcris.metrics import GRES_PREC_THRESHOLDS, PREC_THRESHOLDS
from dcris.model import DCRIS, build_model, is_trainable_key

FORMAT = "dcris-export/2"
FILE_FORMAT = "dcris-export/1"  # a single .safetensors file with the config in its metadata (earlier versions)
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

Parameter-efficient referring image segmentation (DCRIS, WANT@ICML 2024): small adapters and a decoder head
on a frozen DINOv2 vision transformer and a frozen CLIP text encoder. Give an image and a phrase ("the man on
the left"), get the mask of the one object the phrase names.

| | |
|---|---|
| preset | `{{ preset }}` |
| vision backbone | {{ vision }} |
| text backbone | {{ text }} |
| adapters | {{ adapters }} |
| input | {{ image_size }} x {{ image_size }} letterbox, phrases of at most {{ context_length }} CLIP tokens |
| trainable parameters | {{ trainable }} (adapters {{ adapter_params }}, head {{ head_params }}) |
| frozen backbone parameters | {{ frozen }} (adapters = {{ adapter_percent }}% of it) |
| training data | {{ training_data }} |

`model.safetensors` holds the adapters and the head{% if stored_backbones %}, and the randomly initialised
{{ stored_backbones }} backbone weights{% endif %}; `config.json` the resolved configuration and the metrics.
Backbones named above are loaded from their own weights.

## Metrics
{% if metrics %}
Evaluated at the original image resolution (sigmoid, bicubic upsampling, inverse letterbox, threshold 0.35), in
percent:

{% for row in metrics %}| {{ row | join(" | ") }} |
{% endfor %}{% else %}
Not recorded with these weights.
{% endif %}
## Use

With the `dcris` package installed (`pip install -e ".[app]"` in its repository):

```bash
dcris predict --weights {{ repo_id }} --image photo.jpg --text "the man on the left" --out mask.png
dcris app --weights {{ repo_id }}                 # a web page: upload an image, type phrases, see the masks
```

```python
from dcris import Segmenter

seg = Segmenter.from_pretrained("{{ repo_id }}", allow_download=True)  # fetched once, then from the cache
result = seg("photo.jpg", "the man on the left")
result.mask, result.probability, result.score, result.seconds
```
"""


def exported_keys(cfg: Config, state_keys: list[str]) -> list[str]:
    """The state-dict keys an export of ``cfg`` holds (module docstring): trainable + unnamed backbones."""
    random_text, random_vision = not cfg.model.text.weights, not cfg.model.vision.weights
    return [
        k
        for k in state_keys
        if is_trainable_key(k, cfg.model)
        or (random_text and k.startswith("text."))
        or (random_vision and k.startswith("vision.backbone."))
    ]


def _metric_rows(results: dict[str, dict]) -> list[list[str]]:
    """A Markdown table of per-split results (percentages): header, rule, one row per split; gRefCOCO results
    (with ``giou``) get gIoU, cIoU, N-acc, T-acc and their Pr@ instead."""
    gres = any("giou" in r for r in results.values())
    thresholds = GRES_PREC_THRESHOLDS if gres else PREC_THRESHOLDS
    names = ("gIoU", "cIoU", "N-acc", "T-acc") if gres else ("mIoU", "oIoU")
    keys = [*(("giou", "ciou", "n_acc", "t_acc") if gres else ("miou", "oiou")), *(f"prec@{t}" for t in thresholds)]
    rows = [["split", *names, *(f"Pr@{t}" for t in thresholds), "pairs"], ["---"] * (2 + len(keys))]
    for split, r in results.items():
        rows.append([split, *(f"{100 * r[k]:.2f}" for k in keys), str(r["count"])])
    return rows


class ExportedWeights(
    ModelHubMixin,
    library_name="dcris",
    pipeline_tag="image-segmentation",
    tags=["referring-image-segmentation", "dcris"],
    model_card_template=MODEL_CARD,
):
    """The deployable part of a model: its config, the exported tensors and, when known, its metrics.

    Args:
        cfg: The resolved config the model is rebuilt from.
        tensors: The exported state-dict entries (:func:`exported_keys`).
        results: Per-split evaluation results (``IoUAccumulator.result()``), or None.
        folder: The folder the export is written to, when ``save_pretrained`` writes it elsewhere first (see
            :func:`save_export`): backbone paths inside it are recorded relative to it. Default: where it is written.
    """

    def __init__(
        self,
        cfg: Config,
        tensors: dict[str, torch.Tensor],
        results: dict[str, dict] | None = None,
        folder: Path | None = None,
    ) -> None:
        self.cfg, self.tensors, self.results, self.folder = cfg, tensors, results, folder

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        cfg: Config,
        results: dict[str, dict] | None = None,
        folder: Path | None = None,
    ) -> ExportedWeights:
        """The exported tensors of a full model state dict, float tensors as float32, on the CPU."""
        tensors = {
            k: (state[k].float() if state[k].is_floating_point() else state[k]).detach().cpu().contiguous()
            for k in exported_keys(cfg, list(state))
        }
        return cls(cfg, tensors, results, folder)

    # ------------------------------------------------------------------------------------- writing

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file(self.tensors, str(save_directory / WEIGHTS_FILE), metadata={"format": FORMAT})
        recorded = backbones_relative_to(self.cfg, self.folder or save_directory)
        payload = {"format": FORMAT, "config": to_dict(recorded), "metrics": self.results}
        (save_directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card (README.md): the mixin's card data and template, filled from the config."""
        from dcris.params import parameter_report  # builds the architecture on the meta device

        weights = Path(self.cfg.model.vision.weights)
        m = backbones_relative_to(self.cfg, self.folder).model if self.folder else self.cfg.model  # as recorded
        counts = parameter_report(self.cfg)
        data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        if m.vision.weights and not (weights.is_absolute() or weights.exists()):  # a Hub id, not a local folder
            data.base_model = m.vision.weights
        vision = f"`{m.vision.weights}`"
        text = f"open_clip `{m.text.model_name}` text tower, weights `{m.text.weights}`"
        if not m.vision.weights:
            vision = f"DINOv2 shape, {m.vision.depth} blocks of width {m.vision.width} (random init, stored here)"
        if not m.text.weights:
            text = f"CLIP text shape, {m.text.layers} blocks of width {m.text.width} (random init, stored here)"
        stored = [name for name, weights in (("vision", m.vision.weights), ("text", m.text.weights)) if not weights]
        fields = dict(
            title=f"DCRIS ({self.cfg.preset})",
            preset=self.cfg.preset,
            vision=vision,
            text=text,
            stored_backbones=" and ".join(stored),
            adapters=f"DenseCrossAdapters in vision blocks {m.adapters.vision_layers}, Text Adapters "
            f"({m.adapters.text_form} form) in text blocks {m.adapters.text_layers}",
            image_size=m.image_size,
            context_length=m.text.context_length,
            trainable=f"{counts['trainable_params']:,}",
            adapter_params=f"{counts['adapter_params']:,}",
            head_params=f"{counts['head_params']:,}",
            frozen=f"{counts['frozen_params']:,}",
            adapter_percent=f"{counts['adapter_percent']:.2f}",
            training_data=self._training_data(),
            metrics=_metric_rows(self.results) if self.results else [],
            repo_id="PATH_OR_HUB_ID",
        )
        fields.update(kwargs)
        return ModelCard.from_template(data, template_str=self._hub_mixin_info.model_card_template, **fields)

    def _training_data(self) -> str:
        d = self.cfg.data
        if not d.shards:
            return "not recorded in the config"
        manifest = Path(d.shards) / "manifest.json"
        if not manifest.is_file():
            return f"split `{d.train_split}` of `{d.shards}`"
        info = json.loads(manifest.read_text())
        split = info.get("splits", {}).get(d.train_split, {})
        return (
            f"{info.get('dataset', Path(d.shards).name)}, split `{d.train_split}` "
            f"({split.get('objects', '?')} objects, {split.get('sentences', '?')} expressions)"
        )

    # ------------------------------------------------------------------------------------- reading

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
    ) -> ExportedWeights:
        if not config or config.get("format") != FORMAT:
            raise UserError(f"{model_id!r} is not a dcris export (its {CONFIG_FILE} lacks format {FORMAT!r})")
        if Path(model_id).is_dir():
            weights = str(Path(model_id) / WEIGHTS_FILE)
        else:
            weights = hf_hub_download(
                model_id, WEIGHTS_FILE, revision=revision, cache_dir=cache_dir, force_download=force_download,
                local_files_only=local_files_only, token=token,
            )  # fmt: skip
        cfg = backbones_resolved_in(from_dict(config["config"]), Path(weights).parent)
        return cls(cfg, _read_tensors(weights), config.get("metrics"))

    @classmethod
    def load(cls, path_or_id: str | Path, allow_download: bool = False) -> ExportedWeights:
        """Reads an export: a local folder, an earlier single ``.safetensors`` file, or a Hub model id.

        Args:
            path_or_id: Where the export is.
            allow_download: Fetch a Hub id that is not in the local cache (``HF_HUB_OFFLINE=1`` still forbids it).

        Raises:
            UserError: nothing readable is there; the message says what was looked for.
        """
        where = str(export_folder(Path(path_or_id)))
        if Path(where).is_file():
            return cls._from_file(where)
        try:
            return cls.from_pretrained(where, local_files_only=not allow_download)
        except HFValidationError:
            raise UserError(f"weights {where!r} do not exist (neither a local path nor a Hub id)") from None
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            how = "pass model.allow_download=true to fetch it" if not allow_download else "HF_HUB_OFFLINE is set"
            raise UserError(
                f"weights {where!r} are neither a local folder nor in the local Hugging Face cache ({how})"
            ) from None
        except OSError as exc:  # the Hub's HTTP errors, unreadable files
            raise UserError(f"cannot read weights {where!r}: {exc}") from None

    @classmethod
    def _from_file(cls, path: str) -> ExportedWeights:
        return cls(read_export_config(path), _read_tensors(path))

    def configure(self, overrides: list[str] | None) -> None:
        """Applies a loader's ``section.key=value`` overrides to the recorded config.

        Downloads are the loader's choice alone: the recorded ``model.allow_download`` is reset, so only an
        override ``model.allow_download=true`` lets named backbones be fetched.
        """
        self.cfg.model.allow_download = False
        apply_overrides(self.cfg, overrides)

    def to_model(self, device: str | torch.device = "cpu") -> DCRIS:
        """Rebuilds the model: config, named backbones from their weights, the rest from the tensors (strictly:
        every expected tensor present, nothing else).

        Returns:
            The model in eval mode on ``device``.
        """
        model = build_model(self.cfg.model, pretrained=True)
        expected = set(exported_keys(self.cfg, list(model.state_dict())))
        missing, unexpected = sorted(expected - set(self.tensors)), sorted(set(self.tensors) - expected)
        if missing or unexpected:
            raise UserError(
                f"exported weights of {self.cfg.preset} do not match their config: "
                f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
            )
        model.load_state_dict(self.tensors, strict=False)  # strict over ``expected``, checked above
        return model.to(device).eval()


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read exported weights {path!r}: {exc}") from None


def _map_backbones(cfg: Config, change: Callable[[Path], str]) -> Config:
    """A copy of ``cfg`` with each backbone weights name (not the empty one) passed through ``change``."""
    out = copy.deepcopy(cfg)
    for backbone in (out.model.vision, out.model.text):
        if backbone.weights:
            backbone.weights = change(Path(backbone.weights))
    return out


def backbones_relative_to(cfg: Config, folder: Path) -> Config:
    """``cfg`` as an export in ``folder`` records it: absolute backbone paths inside the folder made relative to it;
    other paths, Hub ids and open_clip tags unchanged."""
    root = Path(folder).resolve()

    def relative(weights: Path) -> str:
        inside = weights.is_absolute() and weights.resolve().is_relative_to(root)
        return weights.resolve().relative_to(root).as_posix() if inside else str(weights)

    return _map_backbones(cfg, relative)


def backbones_resolved_in(cfg: Config, folder: Path) -> Config:
    """``cfg`` as read from an export in ``folder``: relative backbone paths found inside the folder made absolute;
    anything else (absolute paths, Hub ids, open_clip tags) unchanged."""

    def resolved(weights: Path) -> str:
        inside = not weights.is_absolute() and (folder / weights).exists()
        return str((folder / weights).resolve()) if inside else str(weights)

    return _map_backbones(cfg, resolved)


def _previous(path: Path) -> Path:
    """Where :func:`_replace_folder` keeps the earlier export while the new one moves in."""
    return path.with_name(path.name + ".old")


def export_folder(path: Path) -> Path:
    """The folder an export at ``path`` is read from: ``path``, or its earlier export (whole) when a save was killed
    between the two renames of :func:`_replace_folder`. A finished ``path.tmp`` is not used: nothing says that
    it was complete when the save stopped."""
    previous = _previous(path)
    return previous if not path.exists() and previous.is_dir() else path


def _replace_folder(tmp: Path, path: Path) -> None:
    """Moves the finished folder ``tmp`` to ``path``, replacing an earlier export there: a folder that holds
    nothing the new export does not write (and nothing else).

    A directory cannot be renamed over a non-empty one, so the earlier export steps aside to ``path.old`` first;
    a kill before ``tmp`` takes its place leaves the earlier export whole there, which readers and the next save
    take back (:func:`export_folder`).
    """
    if path.exists():
        ours = {p.name for p in tmp.iterdir()}
        if not path.is_dir() or not {p.name for p in path.iterdir()} <= ours:
            raise UserError(f"{str(path)!r} exists and is not a dcris export folder: not overwriting it")
        old = _previous(path)
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        pause_at("export-swap")
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def save_export(
    state: dict[str, torch.Tensor],
    cfg: Config,
    path: str | Path,
    metrics: dict[str, dict] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Writes the export folder (module docstring) of a full model state dict.

    Args:
        state: The model's full state dict (the trainable tensors at full precision).
        cfg: The run's resolved config.
        path: Output folder (created; an earlier export there is replaced).
        metrics: Per-split evaluation results for the config and the model card, when known.
        extra: Writes more files into the new folder (given as its argument) before it replaces ``path``, e.g.
            the backbones of ``dcris convert-detris``; their paths in ``cfg`` are under ``path``.

    Returns:
        The written folder.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise UserError(
            f"exports are folders ({CONFIG_FILE}, {WEIGHTS_FILE}, {CARD_FILE}): name one without .safetensors, "
            f"e.g. {str(path.with_suffix(''))!r}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if export_folder(path) != path:  # the earlier export of a killed save comes back first
        export_folder(path).rename(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_is_user_error(path):
        ExportedWeights.from_state(state, cfg, metrics, folder=path).save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    _replace_folder(tmp, path)  # a reader never sees a half-written export
    return path


def read_export_config(path: str | Path) -> Config:
    """The resolved Config recorded in an export folder or in an earlier single-file export."""
    path = export_folder(Path(path))
    if path.is_dir():
        config = path / CONFIG_FILE
        payload = json.loads(config.read_text()) if config.is_file() else {}
        if payload.get("format") != FORMAT:
            raise UserError(f"{str(path)!r} is not a dcris export folder (no {CONFIG_FILE} of format {FORMAT!r})")
        return backbones_resolved_in(from_dict(payload["config"]), path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise UserError(f"cannot read exported weights {str(path)!r}: {exc}") from None
    if metadata.get("format") != FILE_FORMAT:
        raise UserError(f"{str(path)!r} is not a dcris export (no {FILE_FORMAT!r} metadata)")
    return from_dict(json.loads(metadata["config"]))


def is_export_folder(path: str | Path) -> bool:
    """Whether ``path`` is an export folder (a ``config.json`` of this format beside the weights)."""
    config = Path(path) / CONFIG_FILE
    try:
        return (Path(path) / WEIGHTS_FILE).is_file() and json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def set_no_target_threshold(path: str | Path, threshold: float) -> None:
    """Records a calibrated no-target threshold (``model.head.no_target_threshold``) in an export folder's config,
    replacing the file in one rename; everything else in it stays as it was."""
    config = Path(path) / CONFIG_FILE
    payload = json.loads(config.read_text())
    payload["config"]["model"]["head"]["no_target_threshold"] = float(threshold)
    from_dict(payload["config"])  # still a valid config: the threshold lies in (0, 1)
    tmp = config.with_name(config.name + ".tmp")
    with disk_full_is_user_error(config.parent):
        tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(config)


def download_allowed(overrides: list[str] | None) -> bool:
    """Whether the overrides hold ``model.allow_download=true``, the one switch that permits downloads."""
    return apply_overrides(Config(), overrides).model.allow_download


def load_exported(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> DCRIS:
    """Rebuilds the model of an export (see :meth:`ExportedWeights.load` for what ``path`` may be).

    Args:
        path: Export folder, earlier single-file export, or Hub model id.
        device: Where the model goes.
        overrides: ``section.key=value`` changes to the recorded config before the model is built (backbone
            weight paths, ...); ``model.allow_download=true`` also lets a Hub id missing from the local cache,
            and named backbones missing from theirs, be fetched.

    Returns:
        The model in eval mode on ``device``.
    """
    weights = ExportedWeights.load(path, download_allowed(overrides))
    weights.configure(overrides)
    return weights.to_model(device)
