"""Helpers of the HTTP API's tests: a real uvicorn server on 127.0.0.1 in a thread, uploads, and the check that
served masks are the Segmenter's."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from ports import free_port
from pycocotools import mask as coco_mask

from dcris.metrics import MASK_THRESHOLD
from dcris.multi import MultiSegmenter
from dcris.segmenter import Segmenter
from dcris.serve import AccessOptions, ServeOptions, build_app, server_config


@contextmanager
def running(
    multi: MultiSegmenter, options: ServeOptions, access: AccessOptions | None = None, ready: bool = True
) -> Iterator[httpx.Client]:
    """``build_app`` served by uvicorn (configured as ``dcris serve`` does) in a thread on a free local port; a
    client for it, once the server is ready (every adapter set warmed up) when ``ready``."""
    app = build_app(multi, options, access)
    server = uvicorn.Server(server_config(app, options, "127.0.0.1", free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        client = httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=60)
        while ready and client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.02)
        client.app, client.server, client.thread = app, server, thread  # the tests look at the batcher, stop it
        yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def encoded(image: np.ndarray, kind: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind, **params)
    return buffer.getvalue()


def png(image: np.ndarray) -> bytes:
    return encoded(image, "PNG")


# An Encapsulated PostScript file: Pillow identifies it (and would hand it to Ghostscript to decode)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def post(client: httpx.Client, image: bytes, phrases: list[str], **fields: str) -> httpx.Response:
    data = {"phrases": phrases, **fields}
    return client.post("/v1/segment", files={"image": ("x.png", image, "image/png")}, data=data)


def assert_same_masks(answer: dict, segmenter: Segmenter, image: np.ndarray, phrases: list[str]) -> None:
    """The served masks are the Segmenter's for the same image and phrases (pixels within 1e-3 of the threshold,
    where batching may move the probability, aside)."""
    expected = segmenter(Image.open(io.BytesIO(png(image))), phrases)
    assert [r["phrase"] for r in answer["results"]] == phrases
    for got, want in zip(answer["results"], expected, strict=True):
        mask = coco_mask.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()}).astype(bool)
        decided = np.abs(want.probability - MASK_THRESHOLD) > 1e-3
        assert mask.shape == want.mask.shape
        np.testing.assert_array_equal(mask[decided], want.mask[decided])
        assert got["score"] == pytest.approx(want.score, abs=1e-4)
        assert got["truncated"] == want.truncated and got["area"] == pytest.approx(want.area, abs=1e-3)
        assert got["found"] == want.found
        assert got["target_probability"] == pytest.approx(want.target_probability, abs=1e-4)


def hold(multi: MultiSegmenter) -> None:
    """Makes every forward of ``multi`` wait until ``multi.free`` is set (at most 60 s); ``multi.entered`` is set
    once a forward waits."""
    forward, multi.free, multi.entered = multi.forward, threading.Event(), threading.Event()

    def held(parts):
        multi.entered.set()
        multi.free.wait(60)
        return forward(parts)

    multi.forward = held
