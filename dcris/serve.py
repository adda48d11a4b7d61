"""``dcris serve``: an HTTP JSON API over one or more adapter sets on shared backbones, with dynamic batching.

    dcris serve --weights runs/refcoco/export runs/refcocog/export --port 8000     # docs: http://127.0.0.1:8000/docs
    curl -F image=@photo.jpg -F phrases="the man on the left" -F model=refcoco http://127.0.0.1:8000/v1/segment

Built on FastAPI (routes, validation, OpenAPI docs at ``/docs``) and uvicorn. ``POST /v1/segment`` takes an image
(a multipart upload, or base64 in a JSON body), one or more phrases and an optional model name (default: the first
export given), and returns per phrase the mask (COCO RLE, or PNG with ``mask_format=png``), the score, the area,
how the phrase was cut, the seconds and, for an adapter set with the no-target output (gRefCOCO), whether the
phrase names anything. ``GET /v1/models`` lists the adapter sets; ``POST /v1/models`` loads one more and
``DELETE /v1/models/{name}`` unloads one while serving. ``GET /healthz`` is liveness (the batcher thread runs),
``GET /readyz`` readiness (every adapter set loaded and warmed up), ``GET /metrics`` Prometheus metrics.

Requests waiting at the same time are batched together (:class:`Batcher`), across adapter sets of one backbone
too (:meth:`dcris.multi.MultiSegmenter.forward`): a batch holds at most ``max_batch`` phrases, and its first
request waits at most ``max_wait_ms`` for others. A batch that fails is run again request by request, so only
the request that fails gets the error. Bad requests get a 4xx status and ``{"error": "one message"}``; past
``max_queue`` waiting requests a new one is answered 503 at once (retry later) instead of waiting ever longer, and
a request not answered within ``request_timeout_s`` gets 504. A request's cost is bounded before any heavy work:
only JPEG, PNG, WebP and BMP are decoded (415 otherwise), at most ``workers`` decode or post-process at once, and
the masks are computed one phrase at a time. FastAPI, uvicorn and prometheus_client are an optional extra:
``pip install -e ".[serve]"``.
``--backend onnxruntime`` serves one ``dcris export-onnx`` folder with ONNX Runtime instead (its requests are
batched too; batching across adapter sets and loading sets while serving stay PyTorch features).
"""

import argparse
import asyncio
import base64
import binascii
import io
import logging
import os
import queue
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, InvalidStateError
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dcris.errors import UserError
from dcris.multi import NAME_PATTERN, MultiSegmenter
from dcris.segmenter import BACKENDS, Segmentation, Segmenter
from dcris.tokenizer import Truncation

INSTALL_HINT = 'the HTTP API needs FastAPI, uvicorn and prometheus_client: pip install -e ".[serve]"'
API_KEY_ENV = "DCRIS_API_KEY"  # the API key, when --api-key is not given
IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP"}  # Pillow's name: the one users know
log = logging.getLogger(__name__)


def default_workers() -> int:
    """Decoding and post-processing threads: the cores, at most 4 (each holds one image's buffers)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class ServeOptions:
    """Batching, request and connection limits of the server (each a ``dcris serve`` option, its help the field's)."""

    max_batch: int = field(
        default=16, metadata={"help": "phrases per forward (a request is never split, so at least max_phrases)"}
    )
    max_wait_ms: float = field(
        default=10.0, metadata={"help": "how long a batch's first request waits for others to join it"}
    )
    max_queue: int = field(
        default=256, metadata={"help": "requests waiting for the model; one more is answered 503 at once, not queued"}
    )
    max_upload_bytes: int = field(
        default=20 * 2**20, metadata={"help": "request body size (a base64 image is 4/3 of its file)"}
    )
    max_pixels: int = field(default=40_000_000, metadata={"help": "width x height of the decoded image"})
    max_phrases: int = field(default=16, metadata={"help": "phrases per request"})
    max_phrase_chars: int = field(
        default=1000, metadata={"help": "characters per phrase (longer than the model reads is cut, not refused)"}
    )
    workers: int = field(
        default_factory=default_workers, metadata={"help": "requests decoding or post-processing at once"}
    )
    request_timeout_s: float = field(
        default=30.0, metadata={"help": "from arrival to answer; past it 504 (rows not yet run are dropped)"}
    )
    body_timeout_s: float = field(default=30.0, metadata={"help": "reading the request body; past it 408"})
    max_connections: int = field(
        default=128, metadata={"help": "open connections and requests at once (uvicorn's limit); past it 503"}
    )
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "on shutdown, how long requests in flight may finish"}
    )
    max_resident: int = field(
        default=0,
        metadata={"help": "adapter sets kept on the device (0: all); the least recently used wait in host memory"},
    )

    def check(self) -> None:
        """Raises UserError on options that cannot work together."""
        limits = (self.max_batch, self.max_queue, self.max_upload_bytes, self.max_pixels, self.max_phrases)
        if min(*limits, self.max_phrase_chars, self.workers, self.max_connections) < 1:
            raise UserError("the batch size, the workers and every limit must be at least 1")
        if self.max_wait_ms < 0 or self.max_resident < 0:
            raise UserError("--max-wait-ms and --max-resident must not be negative")
        if min(self.request_timeout_s, self.body_timeout_s, self.drain_timeout_s) <= 0:
            raise UserError("--request-timeout-s, --body-timeout-s and --drain-timeout-s must be positive")
        if self.max_phrases > self.max_batch:
            too_many = f"--max-phrases {self.max_phrases} exceeds --max-batch {self.max_batch}"
            raise UserError(f"{too_many}: a request is one batch")


@dataclass
class AccessOptions:
    """Who may call what, and where new adapter sets may come from (``dcris serve`` options)."""

    api_key: str | None = None  # needed by the management routes (and every /v1 route with require_key)
    require_key: bool = False  # the segmentation and listing routes need the key too
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    models_root: Path | None = None  # POST /v1/models loads export folders under it (None: no folders)
    allow_download: bool = False  # POST /v1/models may fetch Hub ids
    allow_new_backbones: bool = False  # POST /v1/models may load a set whose backbones no loaded set shares


class RequestError(UserError):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DeadlineExceeded(Exception):
    """A request's deadline passed before its rows ran."""


# ----------------------------------------------------------------------------------------------- requests


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The RGB image of an upload, upright (EXIF orientation applied), checked against the allowed formats and the
    pixel limit before it is decoded.

    Raises:
        RequestError: 400 for an empty, damaged or truncated image, 413 over ``max_pixels``, 415 for what is not
            one of :data:`IMAGE_FORMATS`.
    """
    if not data:
        raise RequestError(400, "the image is empty")
    try:  # only these formats' parsers ever see the bytes
        image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"the image is too large: {exc}") from None
    except (UnidentifiedImageError, OSError):
        names = ", ".join(IMAGE_FORMATS.values())
        raise RequestError(415, f"the upload is not an image of a served format ({names})") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise RequestError(413, f"the image has {image.width} x {image.height} = {pixels} pixels; at most {max_pixels}")
    try:
        image.load()
        if image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1) != 1:
            ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: "image file is truncated", broken streams
        raise RequestError(400, f"the image is damaged or truncated: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise RequestError(400, f"the image is empty ({image.width} x {image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


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


def answer_phrases(
    segmenter: Segmenter,
    output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    size: tuple[int, int],
    phrases: list[str],
    cut: list[Truncation | None],
    start: float,
    mask_format: str,
) -> list[dict[str, Any]]:
    """The answers of a request, computed and encoded one phrase at a time: at most one full-resolution
    probability map is alive at once, and none is kept (they are not sent)."""
    answers = []
    for i, (phrase, truncation) in enumerate(zip(phrases, cut, strict=True)):
        row = tuple(t[i : i + 1] for t in output) if isinstance(output, tuple) else output[i : i + 1]
        (result,) = segmenter.segmentations(row, size, [phrase], [truncation], start)
        answers.append(segmentation_json(result, mask_format))
        del result
    seconds = time.perf_counter() - start
    for answer in answers:  # the phrases of a request share one time, as Segmenter's do
        answer["seconds"] = seconds
    return answers


# ----------------------------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One request's rows, ready for the model: its adapter set, pixels (3, S, S) and tokens (n, L)."""

    model: str
    pixels: torch.Tensor
    tokens: torch.Tensor
    deadline: float = float("inf")  # time.monotonic() past which its rows are not run
    future: Future = field(default_factory=Future)  # the logits (n, 1, 4S/14, 4S/14)

    @property
    def rows(self) -> int:
        return len(self.tokens)


@dataclass
class Control:
    """Work that must not overlap a forward (adding or removing an adapter set), run on the batcher's thread."""

    run: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Batcher:
    """Gathers the jobs waiting at once into mixed batches and runs them, one batch at a time, on one thread.

    The thread first warms every adapter set up with one batch (:attr:`ready` is set after). A job whose request
    gave up (its future cancelled) or whose deadline passed is dropped before it runs; an exception fails only the
    jobs of its batch; if the thread ends anyway, every waiting job is failed and :meth:`submit` refuses.

    Args:
        multi: The adapter sets.
        options: ``max_batch`` (rows per forward), ``max_wait_ms`` (how long a batch's first job waits for others)
            and ``max_queue`` (jobs waiting at most: past it :meth:`submit` refuses, so that a full server answers
            at once rather than letting every client's wait grow without bound).
        on_batch: Called with the rows of each forward run and the sets it brought back from host memory.
    """

    def __init__(
        self, multi: MultiSegmenter, options: ServeOptions, on_batch: Callable[[int, list[str]], None] | None = None
    ) -> None:
        self.multi, self.max_batch, self.max_queue = multi, options.max_batch, options.max_queue
        self.max_wait = options.max_wait_ms / 1000
        self.on_batch = on_batch or (lambda rows, cold: None)
        self.queue: queue.Queue[Job | Control | None] = queue.Queue()
        self.batches = self.rows = self.dropped = 0  # forwards run, the rows they held, jobs dropped unrun
        self.ready = threading.Event()
        self.ended = threading.Event()  # set as the loop ends, before the requests it held are failed
        self.running: list[Job] = []  # the jobs of the batch being run
        self.thread = threading.Thread(target=self._loop, name="dcris-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.ended.is_set()

    def stop(self, timeout: float) -> None:
        """Lets the jobs already queued run (for at most ``timeout`` seconds), then fails those left."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the batcher did not finish its queue within %.0f s", timeout)
        self._fail_waiting(RequestError(503, "the server is shutting down: retry later"))

    def check_room(self) -> None:
        """Raises RequestError (503) when the batcher is stopped or ``max_queue`` jobs wait."""
        if not self.alive:
            raise RequestError(503, "the model is not running: retry later")
        if self.queue.qsize() >= self.max_queue:
            raise RequestError(503, f"the server is busy ({self.max_queue} requests wait for the model): retry later")

    def submit(self, job: Job) -> Future:
        """Queues ``job``; its future gets its output. Raises RequestError (503) as :meth:`check_room` does."""
        self.check_room()
        self.queue.put(job)
        return job.future

    def call(self, run: Callable[[], Any]) -> Future:
        """Runs ``run`` on the batcher's thread between two batches; the future gets what it returns."""
        if not self.alive:
            raise RequestError(503, "the model is not running: retry later")
        control = Control(run)
        self.queue.put(control)
        return control.future

    def warm_up(self, names: list[str]) -> None:
        """One forward of a blank image per adapter set (not counted as a batch): the first request then pays
        nothing for lazy initialisation."""
        for name in names:
            segmenter = self.multi.segmenter(name)
            size = segmenter.model.cfg.image_size
            _, pixels, tokens, _ = segmenter.prepare(Image.new("RGB", (size, size)), ["warm up"])
            self.multi.forward([(name, pixels[None], tokens)])

    @staticmethod
    def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
        """Gives a future its result or error, unless its request gave up on it meanwhile."""
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        except InvalidStateError:  # cancelled or already settled: nobody waits for it
            pass

    def _claim(self, job: Job) -> bool:
        """Whether ``job`` is still wanted: not cancelled (it can no longer be after this) and within its deadline."""
        try:
            wanted = job.future.set_running_or_notify_cancel()  # False: its request timed out or gave up
        except RuntimeError:  # already settled
            wanted = False
        if wanted and time.monotonic() > job.deadline:
            self._settle(job.future, error=DeadlineExceeded())
            wanted = False
        self.dropped += not wanted
        return wanted

    def _fail_waiting(self, error: Exception) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._settle(item.future, error=error)

    def _gather(self, first: Job) -> tuple[list[Job], Job | Control | None, bool]:
        """The live jobs of one batch (``first`` and those arriving in time), the item that did not fit (a job, or
        a control that must run between batches), and whether the stop signal came."""
        jobs, rows = ([first], first.rows) if self._claim(first) else ([], 0)
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the deadline, what already waits still joins
                item = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return jobs, None, True
            if isinstance(item, Control) or rows + item.rows > self.max_batch:
                return jobs, item, False
            if self._claim(item):
                jobs.append(item)
                rows += item.rows
        return jobs, None, False

    def _loop(self) -> None:
        carry: Job | Control | None = None
        try:
            self.warm_up(self.multi.names)
            self.ready.set()
            while True:
                first = carry if carry is not None else self.queue.get()
                carry = None
                if first is None:
                    return
                if isinstance(first, Control):
                    self._control(first)
                    continue
                jobs, carry, stopping = self._gather(first)
                self.running = jobs
                self._run_batch(jobs)
                self.running = []
                if stopping:
                    return
        except BaseException:
            log.exception("the batcher stopped")
            raise
        finally:
            self.ended.set()  # before any request hears of it: /healthz must say so by then
            self.ready.clear()
            stopped = RequestError(503, "the model is not running: retry later")
            for job in self.running:
                self._settle(job.future, error=stopped)
            if carry is not None:
                self._settle(carry.future, error=stopped)
            self._fail_waiting(stopped)

    def _control(self, control: Control) -> None:
        if not control.future.set_running_or_notify_cancel():
            return
        try:
            self._settle(control.future, control.run())
        except Exception as exc:
            self._settle(control.future, error=exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Runs the jobs in groups that can share a forward, each group split so that it needs at most
        ``max_resident`` adapter sets on the device."""
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            try:
                groups[self.multi.batch_key(job.model)].append(job)
            except Exception as exc:  # e.g. its set was removed meanwhile: only this job fails
                log.exception("a request for model %r cannot run", job.model)
                self._settle(job.future, error=exc)
        limit = self.multi.max_resident
        for group in groups.values():
            chunk: list[Job] = []
            for job in group:
                if limit and len({j.model for j in chunk} | {job.model}) > limit:
                    self._run(chunk)
                    chunk = []
                chunk.append(job)
            self._run(chunk)

    def _run(self, jobs: list[Job]) -> None:
        parts = [(job.model, job.pixels.expand(job.rows, -1, -1, -1), job.tokens) for job in jobs]
        try:
            cold = self.multi.make_resident([job.model for job in jobs])
            outputs = self.multi.forward(parts)
        except Exception as exc:  # one bad request must not fail the others: run each alone
            if len(jobs) > 1:
                for job in jobs:
                    self._run([job])
            else:
                log.exception("a batch of one request (model %r) failed", jobs[0].model)
                self._settle(jobs[0].future, error=exc)
            return
        rows = sum(job.rows for job in jobs)
        self.batches += 1
        self.rows += rows
        self.on_batch(rows, cold)
        for job, out in zip(jobs, outputs, strict=True):
            self._settle(job.future, out)


# ----------------------------------------------------------------------------------------------- the app


class Metrics:
    """The server's Prometheus metrics (``GET /metrics``), in a registry of its own."""

    def __init__(self, batcher: Batcher, multi: MultiSegmenter) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "dcris_requests", "Segmentation requests answered, by adapter set and status", ["model", "status"],
            registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "dcris_request_seconds", "Segmentation request latency, arrival to answer", registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.batch_rows = Histogram(
            "dcris_batch_rows", "Rows (phrases) per forward", registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.cold = Counter("dcris_adapter_set_loads_from_host", "Adapter sets brought back to the device", ["model"],
                            registry=registry)  # fmt: skip
        queued = Gauge("dcris_queue_depth", "Requests waiting for the model", registry=registry)
        queued.set_function(batcher.queue.qsize)
        resident = Gauge("dcris_adapter_sets_resident", "Adapter sets on the compute device", registry=registry)
        resident.set_function(lambda: len(multi.resident))
        loaded = Gauge("dcris_adapter_sets_loaded", "Adapter sets loaded", registry=registry)
        loaded.set_function(lambda: len(multi.segmenters))
        dropped = Gauge("dcris_requests_dropped", "Requests whose rows were dropped unrun: past their deadline or "
                        "given up", registry=registry)  # fmt: skip
        dropped.set_function(lambda: batcher.dropped)

    def batch(self, rows: int, cold: list[str]) -> None:
        self.batch_rows.observe(rows)
        for name in cold:
            self.cold.labels(name).inc()


def _first_error(exc: Any) -> str:
    """One line from a pydantic ValidationError: where and what."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    return f"{where}: {error['msg']}" if where else error["msg"]


async def read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes (declared or streamed), and (408) when
    it has not all arrived within ``timeout`` seconds."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"the request has more than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def multipart_error(message: str, max_fields: int) -> RequestError:
    """What a client did wrong in a multipart body (Starlette's parser says), as a 4xx."""
    if message.startswith("Too many files"):
        return RequestError(413, "at most one file per request: the image")
    if message.startswith("Too many fields"):
        return RequestError(413, f"at most {max_fields} form fields per request (phrases, model, mask_format)")
    if "exceeded maximum size" in message:
        return RequestError(413, f"a form field is too large: {message}")
    return RequestError(400, f"malformed multipart body: {message}")


REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # a client's X-Request-Id is echoed when it is this: printable, short


def build_app(multi: MultiSegmenter, options: ServeOptions | None = None, access: AccessOptions | None = None) -> Any:
    """The FastAPI application serving ``multi`` (module docstring); the batcher runs while the app does.

    Returns:
        The app; ``app.state.batcher`` is its :class:`Batcher` (its counters feed ``/healthz``) and
        ``app.state.metrics`` its :class:`Metrics`.
    """
    import anyio
    import anyio.to_thread
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    options = options or ServeOptions()
    access = access or AccessOptions()
    options.check()
    if options.max_resident:
        multi.max_resident = options.max_resident
        multi.make_resident(multi.names[: options.max_resident])
    batcher = Batcher(multi, options)
    metrics = Metrics(batcher, multi)
    batcher.on_batch = metrics.batch
    in_flight: dict[str, int] = defaultdict(int)  # segmentation requests per adapter set, arrival to answer
    unloading: set[str] = set()
    devices = {str(d) for d in multi.devices.values()}
    device = next(iter(multi.devices.values()), None)  # where sets loaded while serving go

    class SegmentFields(BaseModel):
        """The fields of a request besides the image."""

        model_config = ConfigDict(extra="forbid")
        phrases: list[str] = Field(description="what to segment, one phrase per object")
        model: str | None = Field(None, description="adapter set (GET /v1/models); default: the first one")
        mask_format: Literal["rle", "png"] = Field("rle", description="COCO RLE, or a base64 PNG of 0/255")

    class SegmentJSON(SegmentFields):
        """A JSON request: the image file's bytes in base64."""

        image: str = Field(description="the image file (JPEG, PNG, WebP or BMP) in base64")

    class LoadRequest(BaseModel):
        """An adapter set to load: a folder under --models-root, or a Hub id with --allow-download."""

        model_config = ConfigDict(extra="forbid")
        name: str = Field(description="its name in requests: letters, digits, '.', '_' and '-'")
        source: str = Field(description="an export folder relative to --models-root, or a Hub id")

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
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = anyio.CapacityLimiter(options.workers)
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop, options.drain_timeout_s)

    app = FastAPI(
        title="DCRIS",
        summary="Referring image segmentation: an image and phrases in, one mask per phrase out.",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics = batcher, metrics

    def error(request: Request, status: int, message: str) -> JSONResponse:
        body = {"error": message}
        if status >= 500:  # the request id finds the server log's lines
            body["request_id"] = getattr(request.state, "request_id", "")
        return JSONResponse(body, status_code=status)

    handlers: dict[Any, Callable[[Request, Any], JSONResponse]] = {
        RequestError: lambda request, exc: error(request, exc.status, str(exc)),
        UserError: lambda request, exc: error(request, 422, str(exc)),  # the Segmenter's checks: an empty phrase
        RequestValidationError: lambda request, exc: error(request, 422, _first_error(exc)),
        ValidationError: lambda request, exc: error(request, 422, _first_error(exc)),
        HTTPException: lambda request, exc: error(request, exc.status_code, str(exc.detail)),
    }
    for kind, make in handlers.items():
        app.add_exception_handler(kind, make)

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable) -> Any:
        """A request id (the client's X-Request-Id, or a new one) on the answer and in the log; failures the
        handlers do not know become a 500 that names only that id; metrics of segmentation requests."""
        given = request.headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request.state.request_id = request_id
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, request.method, request.url.path)
            response = error(request, 500, "internal error")
        response.headers["X-Request-Id"] = request_id
        seconds = time.perf_counter() - start
        if request.url.path == "/v1/segment":
            metrics.requests.labels(getattr(request.state, "model", "none"), str(response.status_code)).inc()
            metrics.latency.observe(seconds)
        log.info("%s %s %d %.0f ms id=%s", request.method, request.url.path, response.status_code, seconds * 1000,
                 request_id)  # fmt: skip
        return response

    if access.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=access.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"], expose_headers=["X-Request-Id"],
        )  # fmt: skip

    def authorize(request: Request, management: bool) -> None:
        """Raises RequestError (401) when the route needs the API key and the request lacks it."""
        if access.api_key is None or not (management or access.require_key):
            return
        bearer = request.headers.get("authorization", "")
        given = request.headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else "")
        if not secrets.compare_digest(given.encode(), access.api_key.encode()):
            raise RequestError(401, "a valid API key is needed: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")

    async def parse(request: Request) -> tuple[bytes, SegmentFields]:
        """The image bytes and the other fields of a multipart or JSON request."""
        body = await read_body(request, options.max_upload_bytes, options.body_timeout_s)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):

            async def stream() -> AsyncIterator[bytes]:
                yield body

            max_fields = options.max_phrases + 2  # the phrases, model and mask_format
            parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=max_fields)
            try:
                form = await parser.parse()
            except MultiPartException as exc:
                raise multipart_error(exc.message, max_fields) from None
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

    def model_named(name: str) -> Segmenter:
        if name not in multi.segmenters or name in unloading:
            known = ", ".join(repr(n) for n in multi.names if n not in unloading)
            raise RequestError(404, f"unknown model {name!r}: the adapter sets are {known}")
        return multi.segmenter(name)

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
        start, arrival = time.perf_counter(), time.monotonic()
        authorize(request, management=False)
        batcher.check_room()  # a full server refuses before reading and decoding
        data, fields = await parse(request)
        name = fields.model or next((n for n in multi.names if n not in unloading), "")
        segmenter = model_named(name)
        request.state.model = name
        check_phrases(fields.phrases, options)
        limiter = request.app.state.limiter
        in_flight[name] += 1
        try:
            async with asyncio.timeout(options.request_timeout_s - (time.monotonic() - arrival)):

                def prepare() -> tuple[tuple[int, int], torch.Tensor, torch.Tensor, list]:
                    rgb = decode_image(data, options.max_pixels)
                    _, pixels, tokens, cut = segmenter.prepare(rgb, fields.phrases)
                    return (rgb.height, rgb.width), pixels, tokens, cut  # the decoded image is dropped here

                size, pixels, tokens, cut = await anyio.to_thread.run_sync(prepare, limiter=limiter)
                job = Job(name, pixels, tokens, deadline=arrival + options.request_timeout_s)
                output = await asyncio.wrap_future(batcher.submit(job))
                results = await anyio.to_thread.run_sync(
                    answer_phrases, segmenter, output, size, fields.phrases, cut, start, fields.mask_format,
                    limiter=limiter,
                )  # fmt: skip
        except (TimeoutError, DeadlineExceeded):
            raise RequestError(504, f"no answer within the deadline of {options.request_timeout_s:g} s") from None
        finally:
            in_flight[name] -= 1
        return {"model": name, "width": size[1], "height": size[0], "results": results}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        """The adapter sets: name, preset, context length, input size, backbone digest, who shares it, and whether
        it is on the device now."""
        authorize(request, management=False)
        return {"models": [row for row in multi.describe() if row["name"] not in unloading]}

    def export_source(source: str) -> str | Path:
        """The export folder (under the models root) or Hub id that ``source`` names."""
        if access.models_root is not None:
            root = access.models_root.resolve()
            path = (root / source).resolve()
            if path.is_relative_to(root) and path.exists():
                return path
        if access.allow_download and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            return source
        where = [f"a folder under {str(access.models_root)!r}"] if access.models_root else []
        where += ["a Hub id"] if access.allow_download else []
        if not where:
            raise RequestError(403, "loading adapter sets is off: start with --models-root or --allow-download")
        raise RequestError(404, f"no export {source!r}: give {' or '.join(where)}")

    @app.post("/v1/models", status_code=201)
    async def load_model(request: Request, body: LoadRequest) -> dict[str, Any]:
        """Loads an adapter set while serving; it answers requests once it is loaded and warmed up."""
        authorize(request, management=True)
        if not NAME_PATTERN.fullmatch(body.name):
            raise RequestError(422, f"name {body.name!r}: letters, digits, '.', '_' and '-' only")
        if body.name in multi.segmenters:
            raise RequestError(409, f"an adapter set named {body.name!r} is already loaded")
        source = export_source(body.source)
        loaded = await run_in_threadpool(Segmenter.from_pretrained, source, device=device,
                                         allow_download=access.allow_download)  # fmt: skip
        if not (access.allow_new_backbones or multi.shares_a_backbone(loaded)):
            shared = "has backbones no loaded set shares: start with --allow-new-backbones"
            raise RequestError(409, f"{body.source!r} {shared}")

        def add() -> None:
            multi.add(body.name, loaded)
            batcher.warm_up([body.name])

        await asyncio.wrap_future(batcher.call(add))
        log.info("loaded adapter set %r from %s", body.name, source)
        return next(row for row in multi.describe() if row["name"] == body.name)

    @app.delete("/v1/models/{name}")
    async def unload_model(request: Request, name: str) -> dict[str, Any]:
        """Unloads an adapter set: new requests for it get 404, those in flight finish first."""
        authorize(request, management=True)
        model_named(name)
        if len([n for n in multi.names if n not in unloading]) == 1:
            raise RequestError(409, f"{name!r} is the last adapter set: the server keeps at least one")
        unloading.add(name)
        try:
            deadline = time.monotonic() + options.drain_timeout_s
            while in_flight[name] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.wrap_future(batcher.call(lambda: multi.remove(name)))
        finally:
            unloading.discard(name)
        log.info("unloaded adapter set %r", name)
        return {"unloaded": name, "models": multi.names}

    @app.get("/healthz")
    async def healthz(request: Request) -> Any:
        """Liveness: whether the batcher thread runs; and the batching counters (forwards run, rows they held,
        requests waiting)."""
        body = {
            "status": "ok" if batcher.alive else "batcher stopped",
            "models": multi.names,
            "batches": batcher.batches,
            "rows": batcher.rows,
            "queued": batcher.queue.qsize(),
        }
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/readyz")
    async def readyz(request: Request) -> Any:
        """Readiness: every adapter set loaded and warmed up with one batch, and the batcher running."""
        if not batcher.ready.is_set():
            return error(request, 503, "not ready: the adapter sets are warming up, or the batcher stopped")
        return {"status": "ready", "models": multi.names, "devices": sorted(devices)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus metrics (text format): requests by adapter set and status, latency, batch sizes, queue
        depth, adapter sets loaded and on the device."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def server_config(app: Any, options: ServeOptions, host: str, port: int, log_level: str = "info") -> Any:
    """uvicorn's configuration for ``app``: the connection limit and the drain time on shutdown."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, limit_concurrency=options.max_connections,
        timeout_keep_alive=5, timeout_graceful_shutdown=int(options.drain_timeout_s) or 1,
    )  # fmt: skip


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
    for option in fields(ServeOptions):
        value = getattr(defaults, option.name)
        flag = "--" + option.name.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=value, help=f"{option.metadata['help']} (default {value})")
    parser.add_argument("--api-key", help=f"the key management routes need (default: ${API_KEY_ENV}; none: open)")
    parser.add_argument("--require-key", action="store_true", help="segmentation and listing need the key too")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="a browser origin allowed to call the API (repeat; '*' for any)")  # fmt: skip
    parser.add_argument("--models-root", type=Path, help="POST /v1/models loads export folders under this folder")
    parser.add_argument("--allow-download", action="store_true", help="POST /v1/models may fetch Hub ids")
    parser.add_argument("--allow-new-backbones", action="store_true",
                        help="POST /v1/models may load sets whose backbones no loaded set shares")  # fmt: skip
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides of each export (model.allow_download=true)"
    )
    args = parser.parse_args(argv)
    options = ServeOptions(**{name: getattr(args, name) for name in vars(defaults)})
    options.check()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.require_key and api_key is None:
        raise UserError(f"--require-key needs a key: --api-key or ${API_KEY_ENV}")
    access = AccessOptions(api_key, args.require_key, args.cors_origin, args.models_root, args.allow_download,
                           args.allow_new_backbones)  # fmt: skip
    if args.backend != "pytorch" and (args.models_root or args.allow_download):
        raise UserError(f"--models-root and --allow-download load adapter sets while serving, which the {args.backend} "
                        "backend does not: it serves one exported graph")  # fmt: skip
    try:
        import fastapi  # noqa: F401 - fail before the weights load
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError(INSTALL_HINT) from None

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    multi = MultiSegmenter.from_pretrained(args.weights, device=args.device, overrides=args.overrides,
                                           allow_download=args.allow_download, backend=args.backend)  # fmt: skip
    app = build_app(multi, options, access)
    print(f"serving {', '.join(multi.names)} on http://{args.host}:{args.port} (docs: /docs; Ctrl-C stops)", flush=True)
    uvicorn.Server(server_config(app, options, args.host, args.port)).run()
    return 0
