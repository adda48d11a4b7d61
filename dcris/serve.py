"""``dcris serve``: an HTTP JSON API over one or more adapter sets on shared backbones, with dynamic batching.

    dcris serve --weights runs/refcoco/export runs/refcocog/export --port 8000     # docs: http://127.0.0.1:8000/docs
    curl -F image=@photo.jpg -F phrases="the man on the left" -F model=refcoco http://127.0.0.1:8000/v1/segment

Built on FastAPI (routes, validation, OpenAPI docs at ``/docs``) and uvicorn. ``POST /v1/segment`` takes an image
(a multipart upload, or base64 in a JSON body), one or more phrases and an optional model name (default: the first
export given), and returns per phrase the mask (COCO RLE, or PNG with ``mask_format=png``), the score, the area,
how the phrase was cut, the seconds and, for an adapter set with the no-target output (gRefCOCO), whether the
phrase names anything. ``GET /v1/models`` lists the adapter sets, ``GET /healthz`` reports
liveness and the batching counters.

Requests waiting at the same time are batched together (:class:`Batcher`), across adapter sets of one backbone
too (:meth:`dcris.multi.MultiSegmenter.forward`): a batch holds at most ``max_batch`` phrases, and its first
request waits at most ``max_wait_ms`` for others. A batch that fails is run again request by request, so only
the request that fails gets the error. Bad requests get a 4xx status and ``{"error": "one message"}``; past
``max_queue`` waiting requests a new one is answered 503 at once (retry later) instead of waiting ever longer.
FastAPI and uvicorn are an optional extra: ``pip install -e ".[serve]"``. ``--backend onnxruntime`` serves one
``dcris export-onnx`` folder with ONNX Runtime instead (its requests are batched too; batching across adapter sets
stays a PyTorch feature).
"""

import argparse
import asyncio
import base64
import binascii
import io
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dcris.errors import UserError
from dcris.multi import MultiSegmenter
from dcris.segmenter import BACKENDS, Segmentation
from dcris.tokenizer import Truncation

INSTALL_HINT = 'the HTTP API needs FastAPI and uvicorn: pip install -e ".[serve]"'
log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Batching and request limits of the server (each a ``dcris serve`` option)."""

    max_batch: int = 16  # phrases per forward (a request is never split, so at least max_phrases)
    max_wait_ms: float = 10.0  # how long a batch's first request waits for others to join it
    max_queue: int = 256  # requests waiting for the model; one more is answered 503 at once, not queued
    max_upload_bytes: int = 20 * 2**20  # request body size (a base64 image is 4/3 of its file)
    max_pixels: int = 40_000_000  # width x height of the decoded image
    max_phrases: int = 16  # phrases per request
    max_phrase_chars: int = 1000  # characters per phrase (longer than the model reads is cut, not refused)

    def check(self) -> None:
        """Raises UserError on options that cannot work together."""
        limits = (self.max_batch, self.max_queue, self.max_upload_bytes, self.max_pixels, self.max_phrases)
        if min(*limits, self.max_phrase_chars) < 1:
            raise UserError("the batch size and every limit must be at least 1")
        if self.max_wait_ms < 0:
            raise UserError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")
        if self.max_phrases > self.max_batch:
            too_many = f"--max-phrases {self.max_phrases} exceeds --max-batch {self.max_batch}"
            raise UserError(f"{too_many}: a request is one batch")


class RequestError(UserError):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------- requests


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image of an upload, checked against the pixel limit before it is decoded.

    Raises:
        RequestError: 400 for what is not an image or is damaged or truncated, 413 over ``max_pixels``.
    """
    if not data:
        raise RequestError(400, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"the image is too large: {exc}") from None
    except (UnidentifiedImageError, OSError):
        raise RequestError(400, "the upload is not an image (JPEG, PNG, WebP, ... expected)") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise RequestError(413, f"the image has {image.width} x {image.height} = {pixels} pixels; at most {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: "image file is truncated", broken streams
        raise RequestError(400, f"the image is damaged or truncated: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise RequestError(400, f"the image is empty ({image.width} x {image.height})")
    return image.convert("RGB")


def check_phrases(phrases: list[str], options: ServeOptions) -> None:
    """Raises RequestError for no phrase (422) or over the phrase limits (413)."""
    if not phrases:
        raise RequestError(422, "phrases: give at least one phrase that names an object")
    if len(phrases) > options.max_phrases:
        raise RequestError(413, f"{len(phrases)} phrases: at most {options.max_phrases} per request")
    for phrase in phrases:
        if len(phrase) > options.max_phrase_chars:
            raise RequestError(413, f"a phrase of {len(phrase)} characters: at most {options.max_phrase_chars}")


def encode_mask(mask: np.ndarray, mask_format: str) -> dict[str, Any]:
    """A bool (h, w) mask as COCO RLE ``{"size": [h, w], "counts": str}`` or ``{"png": base64 of a 0/255 PNG}``."""
    if mask_format == "png":
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
        return {"png": base64.b64encode(buffer.getvalue()).decode("ascii")}
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


def truncation_json(cut: Truncation | None) -> dict[str, Any] | None:
    return None if cut is None else {"tokens_needed": cut.tokens_needed, "kept": cut.kept}


def segmentation_json(result: Segmentation, mask_format: str) -> dict[str, Any]:
    """The answer for one phrase: one key per field of :class:`~dcris.segmenter.Segmentation` that is sent."""
    return {
        "phrase": result.text,
        "mask": encode_mask(result.mask, mask_format),
        "score": result.score,
        "area": result.area,
        "truncated": result.truncated,
        "truncation": truncation_json(result.truncation),
        "seconds": result.seconds,
        "target_probability": result.target_probability,
        "found": result.found,
    }


# ----------------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One request's rows, ready for the model: its adapter set, pixels (3, S, S) and tokens (n, L)."""

    model: str
    pixels: torch.Tensor
    tokens: torch.Tensor
    future: Future = field(default_factory=Future)  # the logits (n, 1, 4S/14, 4S/14)

    @property
    def rows(self) -> int:
        return len(self.tokens)


class Batcher:
    """Gathers the jobs waiting at once into mixed batches and runs them, one batch at a time, on one thread.

    Args:
        multi: The adapter sets.
        max_batch: Rows per forward at most.
        max_wait_ms: How long a batch's first job waits for others.
        max_queue: Jobs waiting at most: past it :meth:`submit` refuses (a full server answers at once, rather
            than letting every client's wait grow without bound).
    """

    def __init__(self, multi: MultiSegmenter, max_batch: int, max_wait_ms: float, max_queue: int) -> None:
        self.multi, self.max_batch, self.max_wait, self.max_queue = multi, max_batch, max_wait_ms / 1000, max_queue
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = self.rows = 0  # forwards run and the rows they held (the mean batch size is their ratio)
        self.thread = threading.Thread(target=self._loop, name="dcris-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def submit(self, job: Job) -> Future:
        """Queues ``job``; its future gets its output. Raises RequestError (503) when ``max_queue`` jobs wait."""
        if self.queue.qsize() >= self.max_queue:
            raise RequestError(503, f"the server is busy ({self.max_queue} requests wait for the model): retry later")
        self.queue.put(job)
        return job.future

    def _gather(self, first: Job) -> tuple[list[Job], Job | None, bool]:
        """The jobs of one batch (``first`` and those arriving in time), the job that did not fit, and whether
        the stop signal came."""
        jobs, rows = [first], first.rows
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the deadline, what already waits still joins
                job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, None, True
            if rows + job.rows > self.max_batch:
                return jobs, job, False
            jobs.append(job)
            rows += job.rows
        return jobs, None, False

    def _loop(self) -> None:
        carry: Job | None = None
        while True:
            first = carry if carry is not None else self.queue.get()
            if first is None:
                return
            jobs, carry, stopping = self._gather(first)
            ordered = sorted(jobs, key=lambda job: self.multi.batch_key(job.model))
            for _, group in groupby(ordered, key=lambda job: self.multi.batch_key(job.model)):
                self._run(list(group))
            if stopping:
                return

    def _run(self, jobs: list[Job]) -> None:
        parts = [(job.model, job.pixels.expand(job.rows, -1, -1, -1), job.tokens) for job in jobs]
        try:
            outputs = self.multi.forward(parts)
        except Exception as exc:  # one bad request must not fail the others: run each alone
            if len(jobs) > 1:
                for job in jobs:
                    self._run([job])
            else:
                log.exception("a batch of one request (model %r) failed", jobs[0].model)
                jobs[0].future.set_exception(exc)
            return
        self.batches += 1
        self.rows += sum(job.rows for job in jobs)
        for job, out in zip(jobs, outputs, strict=True):
            job.future.set_result(out)


# ----------------------------------------------------------------------------------------------- the app


def _first_error(exc: Any) -> str:
    """One line from a pydantic ValidationError: where and what."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    return f"{where}: {error['msg']}" if where else error["msg"]


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request has more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(multi: MultiSegmenter, options: ServeOptions | None = None) -> Any:
    """The FastAPI application serving ``multi`` (module docstring); the batcher runs while the app does.

    Returns:
        The app; ``app.state.batcher`` is its :class:`Batcher` (its counters feed ``/healthz``).
    """
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartParser

    options = options or ServeOptions()
    options.check()
    batcher = Batcher(multi, options.max_batch, options.max_wait_ms, options.max_queue)

    class SegmentFields(BaseModel):
        """The fields of a request besides the image."""

        model_config = ConfigDict(extra="forbid")
        phrases: list[str] = Field(description="what to segment, one phrase per object")
        model: str | None = Field(None, description=f"adapter set (GET /v1/models); default {multi.names[0]!r}")
        mask_format: Literal["rle", "png"] = Field("rle", description="COCO RLE, or a base64 PNG of 0/255")

    class SegmentJSON(SegmentFields):
        """A JSON request: the image file's bytes in base64."""

        image: str = Field(description="the image file (JPEG, PNG, ...) in base64")

    multipart_schema = {
        "type": "object",
        "required": ["image", "phrases"],
        "properties": {
            "image": {"type": "string", "format": "binary"},
            "phrases": {"type": "array", "items": {"type": "string"}},
            "model": {"type": "string"},
            "mask_format": {"type": "string", "enum": ["rle", "png"]},
        },
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(
        title="DCRIS",
        summary="Referring image segmentation: an image and phrases in, one mask per phrase out.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    handlers: dict[Any, Callable[[Any], JSONResponse]] = {
        RequestError: lambda exc: error(exc.status, str(exc)),
        UserError: lambda exc: error(422, str(exc)),  # the Segmenter's checks: an empty phrase
        RequestValidationError: lambda exc: error(422, _first_error(exc)),
        ValidationError: lambda exc: error(422, _first_error(exc)),
        HTTPException: lambda exc: error(exc.status_code, str(exc.detail)),
        Exception: lambda exc: error(500, f"internal error: {type(exc).__name__}: {exc}"),
    }
    for kind, make in handlers.items():
        app.add_exception_handler(kind, lambda _request, exc, make=make: make(exc))

    async def parse(request: Request) -> tuple[bytes, SegmentFields]:
        """The image bytes and the other fields of a multipart or JSON request."""
        body = await read_body(request, options.max_upload_bytes)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):

            async def stream() -> AsyncIterator[bytes]:
                yield body

            fields_at_most = options.max_phrases + 8  # the phrases, model, mask_format and some slack
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=fields_at_most).parse()
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise RequestError(422, "image: upload the image as a file field named 'image'")
            values: dict[str, Any] = {"phrases": form.getlist("phrases")}
            values.update({k: v for k, v in form.items() if k not in ("image", "phrases")})
            return await upload.read(), SegmentFields.model_validate(values)
        if kind.startswith("application/json"):
            fields = SegmentJSON.model_validate_json(body)
            try:
                return base64.b64decode(fields.image, validate=True), fields
            except (binascii.Error, ValueError):
                raise RequestError(400, "image: not valid base64") from None
        raise RequestError(415, f"send multipart/form-data or application/json, not {kind or 'no content type'!r}")

    @app.post(
        "/v1/segment",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": multipart_schema},
                    "application/json": {"schema": SegmentJSON.model_json_schema()},
                },
            }
        },
    )
    async def segment(request: Request) -> dict[str, Any]:
        """Segments what each phrase names in the image.

        Multipart: an ``image`` file, ``phrases`` (repeat the field per phrase), optional ``model`` and
        ``mask_format``. JSON: the same fields with ``image`` in base64. Answers ``{"model", "width", "height",
        "results": [{"phrase", "mask", "score", "area", "truncated", "truncation", "seconds", "target_probability",
        "found"}, ...]}``; ``found`` is false when the model says the phrase names nothing (its mask is then empty).
        """
        start = time.perf_counter()
        data, fields = await parse(request)
        name = fields.model or multi.names[0]
        if name not in multi.segmenters:
            raise RequestError(404, f"unknown model {name!r}: the adapter sets are {', '.join(map(repr, multi.names))}")
        check_phrases(fields.phrases, options)
        segmenter = multi.segmenter(name)
        image = await run_in_threadpool(decode_image, data, options.max_pixels)
        rgb, pixels, tokens, cut = await run_in_threadpool(segmenter.prepare, image, fields.phrases)
        output = await asyncio.wrap_future(batcher.submit(Job(name, pixels, tokens)))

        def answer() -> dict[str, Any]:
            results = segmenter.segmentations(output, (rgb.height, rgb.width), fields.phrases, cut, start)
            return {
                "model": name,
                "width": rgb.width,
                "height": rgb.height,
                "results": [segmentation_json(r, fields.mask_format) for r in results],
            }

        return await run_in_threadpool(answer)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The adapter sets: name, preset, context length, input size, backbone digest and who shares it."""
        return {"models": multi.describe()}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, and the batching counters: forwards run, rows they held, requests waiting."""
        return {
            "status": "ok",
            "models": multi.names,
            "batches": batcher.batches,
            "rows": batcher.rows,
            "queued": batcher.queue.qsize(),
        }

    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dcris serve``."""
    defaults = ServeOptions()
    parser = argparse.ArgumentParser(prog="dcris serve", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--weights", nargs="+", required=True, metavar="[NAME=]EXPORT",
        help="export folders or Hub ids; the name defaults to the folder's (RUN for RUN/export)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default 8000)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: CUDA when available)")
    parser.add_argument(
        "--backend", choices=BACKENDS, default="pytorch",
        help="onnxruntime: serve one `dcris export-onnx` folder on the CPU (batching across adapter sets is PyTorch's)",
    )  # fmt: skip
    for name, value in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides of each export (model.allow_download=true)"
    )
    args = parser.parse_args(argv)
    options = ServeOptions(**{name: getattr(args, name) for name in vars(defaults)})
    options.check()
    try:
        import fastapi  # noqa: F401 - fail before the weights load
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    multi = MultiSegmenter.from_pretrained(
        args.weights, device=args.device, overrides=args.overrides, backend=args.backend
    )
    app = build_app(multi, options)
    print(f"serving {', '.join(multi.names)} on http://{args.host}:{args.port} (docs: /docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
