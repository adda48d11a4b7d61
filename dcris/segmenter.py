"""The one inference path: an image and phrases in, masks at the image's own size out (SPEC 4-5).

    from dcris import Segmenter

    seg = Segmenter.from_pretrained("runs/demo/run/export")        # an export folder or a Hub model id
    result = seg("photo.jpg", "the man on the left")               # a path, a PIL image or an RGB array
    result.mask, result.probability, result.score, result.seconds
    results = seg(image, ["the man on the left", "the dog"])        # one batch, one result per phrase
    seg.save_pretrained("my-export")                               # config.json, model.safetensors, README.md
    seg.push_to_hub("user/dcris-b-refcoco")                        # the same folder as a Hub repository
    seg = Segmenter.from_pretrained("deploy/refcoco", backend="onnxruntime")   # a `dcris export-onnx` folder

Pre-processing is :func:`~dcris.data.letterbox.letterbox_image` and :func:`~dcris.data.letterbox.normalize_image`,
post-processing :func:`~dcris.metrics.probabilities_from_logits` and its threshold (``masks_from_logits``):
``dcris predict``, ``dcris app`` and the contact sheets of ``dcris demo`` / ``launch/eval.py --pictures`` all
come through here, with either backend: the PyTorch model, or its exported graph in ONNX Runtime
(:mod:`dcris.onnx_runtime`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dcris.config import Config
from dcris.data.letterbox import letterbox_image, normalize_image
from dcris.errors import UserError
from dcris.export import ExportedWeights, download_allowed, save_export
from dcris.metrics import MASK_THRESHOLD, probabilities_from_logits
from dcris.model import DCRIS, ModelOutput, split_output
from dcris.onnx_runtime import OnnxRuntimeModel
from dcris.tokenizer import Truncation, tokenize, truncations

ImageInput = Image.Image | np.ndarray | str | Path
BACKENDS = ("pytorch", "onnxruntime")


@dataclass
class Segmentation:
    """What the model found for one phrase.

    Attributes:
        text: The phrase as given.
        mask: bool (h, w) at the image's own size: ``probability > 0.35`` (SPEC 5).
        probability: float32 (h, w) in [0, 1]: the model's probability that each pixel belongs to the object.
        score: Confidence in [0, 1]: the soft IoU of ``probability`` with ``mask``,
            ``sum(p inside) / (|mask| + sum(p outside))`` -- the IoU the mask would have if the truth were drawn
            pixel by pixel from ``probability``. 1 when the model is certain of every pixel; lower when pixels
            inside are doubtful or probability lies outside the mask; 0 for an empty mask.
        seconds: Wall time of the call that produced it, from the raw image to the masks (the phrases of one
            call are one batch and share it).
        truncation: How the phrase was cut when it needed more tokens than the model reads (only its start was
            read), else None; ``truncated`` says whether it was.
        target_probability: The model's probability that the phrase names something in the image (its no-target
            output, gRefCOCO); 1.0 for a model without that output.
        found: False when the model says the phrase names nothing (``1 - target_probability`` above the
            export's ``model.head.no_target_threshold``, 0.5 unless calibrated by ``dcris eval
            --calibrate-no-target --save``; as the GRES metrics count it): ``mask`` is then empty
            (``probability`` stays what the mask head painted).
    """

    text: str
    mask: np.ndarray
    probability: np.ndarray
    score: float
    seconds: float
    truncation: Truncation | None = None
    target_probability: float = 1.0
    found: bool = True
    area: float = field(init=False)  # fraction of the image the mask covers

    def __post_init__(self) -> None:
        self.area = float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def truncated(self) -> bool:
        return self.truncation is not None


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from a file; an unreadable file is a user error naming it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {str(path)!r}: {exc}") from None


def as_rgb_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a path, a PIL image of any mode, or a uint8 (h, w) / (h, w, 3|4) array."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise UserError(f"an image array must be uint8 (h, w) or (h, w, 3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise UserError(f"cannot use a {type(image).__name__} as an image: give a path, a PIL image or an array")
    if image.width < 1 or image.height < 1:
        raise UserError(f"the image is empty ({image.width} x {image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image as it is: no copy


def confidence(probability: torch.Tensor, mask: torch.Tensor) -> float:
    """The score of :class:`Segmentation`: soft IoU of a probability map with its mask (0 for an empty mask)."""
    inside = probability[mask].sum()
    outside = probability[~mask].sum()
    count = mask.sum()
    return float(inside / (count + outside)) if count else 0.0


class Segmenter:
    """Segments the objects phrases name in one image (module docstring).

    Args:
        model: A DCRIS model; it is used in eval mode (and put back in the mode it was in after each call). Or an
            exported graph in ONNX Runtime (``from_pretrained(..., backend="onnxruntime")``).
        config: The full run config (recorded when saving); default: ``model.cfg`` with preset ``custom``.
        device: Where the model runs; default: where its parameters already are.
        metrics: Per-split evaluation results of these weights, kept for :meth:`save_pretrained`.
    """

    def __init__(
        self,
        model: DCRIS | OnnxRuntimeModel,
        config: Config | None = None,
        device: str | torch.device | None = None,
        metrics: dict[str, dict] | None = None,
    ) -> None:
        self.model = model if device is None or isinstance(model, OnnxRuntimeModel) else model.to(device)
        self.config = config if config is not None else Config(preset="custom", model=model.cfg)
        self.metrics = metrics

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        device: str | torch.device | None = None,
        allow_download: bool = False,
        overrides: list[str] | None = None,
        backend: str = "pytorch",
    ) -> Segmenter:
        """Loads an export: a folder written by :meth:`save_pretrained` / training / ``dcris convert-detris``,
        a single ``.safetensors`` export of earlier versions, or a Hugging Face Hub model id; with
        ``backend="onnxruntime"`` a folder written by ``dcris export-onnx`` (or one ``.onnx`` file in it, such
        as ``model.int8.onnx``).

        Args:
            path_or_id: Where the export is.
            backend: ``"pytorch"``, or ``"onnxruntime"``: the exported graph in ONNX Runtime on the CPU (the
                other arguments do not apply to it).
            device: Where to run (default: CUDA when available, else the CPU).
            allow_download: Fetch a Hub id (and named backbone weights) missing from the local caches, the same
                as the override ``model.allow_download=true``. ``HF_HUB_OFFLINE=1`` forbids it regardless.
            overrides: ``section.key=value`` changes to the recorded config, e.g. ``model.adapters.fused_dense=false``.

        Raises:
            UserError: nothing loadable is at ``path_or_id``; the message says what was looked for. An unknown
                backend, or a device or overrides given with ONNX Runtime.
        """
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")
        if backend == "onnxruntime":
            if overrides or (device is not None and torch.device(device).type != "cpu"):
                raise UserError("the onnxruntime backend runs the exported graph as it is, on the CPU: "
                                "no overrides, no other device")  # fmt: skip
            graph, facts = OnnxRuntimeModel.load(path_or_id)
            return cls(graph, graph.config, metrics=facts.get("metrics"))
        overrides = [*(overrides or []), *(["model.allow_download=true"] if allow_download else [])]
        weights = ExportedWeights.load(path_or_id, download_allowed(overrides))
        weights.configure(overrides)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(weights.to_model(device), weights.cfg, metrics=weights.results)

    def save_pretrained(self, directory: str | Path, metrics: dict[str, dict] | None = None) -> Path:
        """Writes the export folder (``config.json``, ``model.safetensors``, ``README.md``; see ``dcris.export``).

        Args:
            directory: Output folder; an earlier export there is replaced.
            metrics: Per-split results for the model card (default: those loaded with the weights).
        """
        self._need_pytorch("save_pretrained")
        metrics = self.metrics if metrics is None else metrics
        return save_export(self.model.state_dict(), self.config, directory, metrics)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Uploads the export folder as the Hub model repository ``repo_id`` (created when missing).

        Needs a Hub token (``hf auth login``); ``kwargs`` go to ``huggingface_hub.ModelHubMixin.push_to_hub``
        (``private``, ``commit_message``, ``branch``, ``create_pr``, ...).

        Returns:
            The URL of the commit.
        """
        self._need_pytorch("push_to_hub")
        weights = ExportedWeights.from_state(self.model.state_dict(), self.config, self.metrics)
        kwargs.setdefault("model_card_kwargs", {"repo_id": repo_id})
        return weights.push_to_hub(repo_id, **kwargs)

    def _need_pytorch(self, what: str) -> None:
        if self.backend != "pytorch":
            raise UserError(f"{what} needs the PyTorch model: an exported graph holds no trainable weights to save")

    @property
    def backend(self) -> str:
        """``"pytorch"`` or ``"onnxruntime"`` (:data:`BACKENDS`)."""
        return "onnxruntime" if isinstance(self.model, OnnxRuntimeModel) else "pytorch"

    @property
    def device(self) -> torch.device:
        return self.model.device if isinstance(self.model, OnnxRuntimeModel) else next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model takes its pixels in."""
        return self.model.dtype if isinstance(self.model, OnnxRuntimeModel) else next(self.model.parameters()).dtype

    def tokens(self, texts: list[str], truncate: bool) -> tuple[torch.Tensor, list[Truncation | None]]:
        """Token ids (N, L) of the phrases and, per phrase, how it was cut to fit (None when it fits).

        Raises:
            UserError: a phrase is empty, or too long while ``truncate`` is False.
        """
        length = self.model.cfg.text.context_length
        if any(not text.strip() for text in texts):
            raise UserError("a phrase is empty: describe the object to segment")
        cuts = truncations(texts, length)
        if cuts and not truncate:
            text, needed = cuts[0].text, cuts[0].tokens_needed
            raise UserError(f"text too long: {text!r} needs {needed} tokens, the model reads at most {length}")
        cut_at = {cut.index: cut for cut in cuts}
        return tokenize(texts, length), [cut_at.get(index) for index in range(len(texts))]

    def prepare(
        self, image: ImageInput, texts: list[str], truncate: bool = True
    ) -> tuple[Image.Image, torch.Tensor, torch.Tensor, list[Truncation | None]]:
        """The model's inputs for one image and its phrases (the first half of :meth:`__call__`).

        Returns:
            The RGB image, its letterboxed pixels (3, S, S) on the model's device and dtype, the token ids (N, L)
            on the CPU, and how each phrase was cut (None when it fits).

        Raises:
            UserError: an unreadable image, no phrase, an empty phrase, or (``truncate=False``) one too long.
        """
        if not texts:
            raise UserError("no phrase given: describe the object to segment")
        rgb = as_rgb_image(image)
        tokens, cut = self.tokens(texts, truncate)
        size = self.model.cfg.image_size
        canvas = torch.from_numpy(letterbox_image(rgb, size)).to(self.device)  # (S, S, 3) uint8
        pixels = normalize_image(canvas.permute(2, 0, 1)).to(self.dtype)  # (3, S, S)
        return rgb, pixels, tokens, cut

    def segmentations(
        self,
        output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        size: tuple[int, int],
        texts: list[str],
        cut: list[Truncation | None],
        start: float,
    ) -> list[Segmentation]:
        """One :class:`Segmentation` per phrase from the model's output (the second half of :meth:`__call__`).

        Args:
            output: What the model returned for N rows, one per phrase: logits (N, 1, 4S/14, 4S/14), and with the
                no-target output also its (N,) "no object" logits (:func:`~dcris.model.split_output`).
            size: The image's own (height, width).
            texts: The phrases.
            cut: How each phrase was cut (:meth:`prepare`).
            start: ``time.perf_counter()`` when the image arrived: ``seconds`` counts from there.
        """
        logits, no_target_logits = split_output(output)
        nothing = torch.zeros(len(texts)) if no_target_logits is None else torch.sigmoid(no_target_logits.float())
        probs = probabilities_from_logits(logits, [size] * len(texts), self.model.cfg.image_size)  # N x (h, w)
        found = []
        for prob, p_nothing in zip(probs, nothing.tolist(), strict=True):
            # bicubic overshoot, in place (a view of a temporary); the threshold lies inside [0, 1] and is unaffected
            prob = prob.clamp_(0, 1)
            there = p_nothing <= self.model.cfg.head.no_target_threshold
            mask = (prob > MASK_THRESHOLD) & there
            found.append((mask.cpu().numpy(), prob.cpu().numpy(), confidence(prob, mask), 1.0 - p_nothing, there))
        seconds = time.perf_counter() - start
        return [
            Segmentation(text, mask, prob, score, seconds, truncation, target, there)
            for text, (mask, prob, score, target, there), truncation in zip(texts, found, cut, strict=True)
        ]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ModelOutput:
        """The model's output for images (B, 3, S, S) and tokens (B, L), with either backend: the mask logits, or
        with the no-target output the pair (those, "no object" logits) (:func:`~dcris.model.split_output`)."""
        if isinstance(self.model, OnnxRuntimeModel):
            return self.model(images, tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(images, tokens)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def __call__(
        self, image: ImageInput, texts: str | list[str], *, truncate: bool = True
    ) -> Segmentation | list[Segmentation]:
        """Segments what each phrase names; the phrases of one call run as one batch.

        Args:
            image: A path, a PIL image, or a uint8 (h, w) / (h, w, 3|4) array.
            texts: One phrase, or a list of phrases for this image.
            truncate: Cut phrases longer than the model reads (``Segmentation.truncated`` says which); when
                False such a phrase is a user error.

        Returns:
            One :class:`Segmentation` for a phrase, a list of them (in order) for a list.

        Raises:
            UserError: an unreadable image, no phrase, an empty phrase, or (``truncate=False``) one too long.
        """
        start = time.perf_counter()
        single = isinstance(texts, str)
        phrases = [texts] if single else list(texts)
        rgb, pixels, tokens, cut = self.prepare(image, phrases, truncate)
        output = self.forward(pixels.expand(len(phrases), -1, -1, -1), tokens.to(self.device))
        results = self.segmentations(output, (rgb.height, rgb.width), phrases, cut, start)
        return results[0] if single else results
