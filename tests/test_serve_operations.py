"""Running the HTTP API for other programs, against a real uvicorn server on 127.0.0.1: memory per request, a
batcher that cannot die silently, deadlines, liveness and readiness, slow uploads and the connection limit, the
tokenizer's bounded cache, metrics, the API key, CORS, request ids, adapter sets loaded, unloaded and evicted to
host memory while serving, and shutdown within its drain time."""

from __future__ import annotations

import logging
import os
import random
import socket
import string
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from adapter_sets import adapter_set, backbone_state
from prometheus_client.parser import text_string_to_metric_families
from serving import assert_same_masks, encoded, hold, png, post, running

from dcris.config import preset
from dcris.model import build_model
from dcris.multi import MultiSegmenter, return_freed_memory
from dcris.serve import AccessOptions, Job, ServeOptions
from dcris.tokenizer import BPE_CACHE_WORDS, _bpe

PHRASES = ["the red circle", "the big blue square", "a green triangle on the right", "the small one"]
# Resident memory a request may add at most, per pixel of its decoded image (docs/use.md, "Serving"): the buffers
# it holds at once are about 12 bytes a pixel; the rest is the allocator's slack, which varies from run to run.
PEAK_BYTES_PER_PIXEL = 80


@pytest.fixture(scope="module")
def shared(three_sets) -> Iterator[httpx.Client]:
    """One server for the tests that need no options of their own."""
    with running(MultiSegmenter(three_sets), ServeOptions(max_phrases=16, max_wait_ms=5)) as c:
        yield c


def rss() -> int:
    """This process's resident memory in bytes (the server runs in it)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """A sample's value from GET /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_the_worst_request_the_limits_allow_adds_bounded_memory(three_sets):
    """An RGBA PNG (the most bytes a decoded pixel takes) of exactly max_pixels with max_phrases phrases: the
    resident memory it adds, sampled every 2 ms while it runs, stays within PEAK_BYTES_PER_PIXEL."""
    side, phrases = 2000, 8
    options = ServeOptions(max_pixels=side * side, max_phrases=phrases, max_batch=phrases, workers=1)
    worst = np.zeros((side, side, 4), np.uint8)
    worst[: side // 2] = 200  # a blank image compresses to ~18 KB: the body limits do not stop it
    with running(MultiSegmenter(three_sets), options) as c:
        assert post(c, png(np.zeros((40, 50, 3), np.uint8)), ["a"]).status_code == 200  # one-time costs first
        return_freed_memory()
        base, peak, done = rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            answer = post(c, encoded(worst, "PNG"), [f"the thing number {i}" for i in range(phrases)], model="paper")
        finally:
            done.set()
            sampler.join()
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["results"]) == phrases and answer.json()["height"] == side
    per_pixel = (peak[0] - base) / side**2
    assert per_pixel <= PEAK_BYTES_PER_PIXEL, f"{per_pixel:.1f} bytes a pixel"


def test_cancelled_and_broken_jobs_never_stop_the_batcher(three_sets, probe):
    """A job whose request gave up (future cancelled) and a job of a set that does not exist, batched with good
    requests: the good ones are answered and the server goes on serving."""
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    with running(multi, ServeOptions(max_batch=16, max_wait_ms=50)) as c, ThreadPoolExecutor(2) as pool:
        c.timeout = httpx.Timeout(15)
        batcher = c.app.state.batcher
        hold(multi)
        first = pool.submit(post, c, png(image), [PHRASES[0]], model="paper")
        assert multi.entered.wait(15)  # the model is busy with it: what follows waits in the queue
        _, pixels, tokens, _ = three_sets["paper"].prepare(image, [PHRASES[1]])
        abandoned, ghost = Job("paper", pixels, tokens), Job("ghost", pixels, tokens)
        batcher.submit(abandoned)
        abandoned.future.cancel()
        batcher.submit(ghost)
        second = pool.submit(post, c, png(image), [PHRASES[2]], model="released")
        deadline = time.monotonic() + 15
        while batcher.queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        multi.free.set()
        answers = [first.result(), second.result()]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert_same_masks(answers[1].json(), three_sets["released"], image, [PHRASES[2]])
    assert isinstance(ghost.future.exception(timeout=5), KeyError) and abandoned.future.cancelled()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit, on purpose
def test_a_stopped_batcher_is_reported_and_no_request_waits_forever(three_sets, probe):
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    with running(multi, ServeOptions(max_batch=4, max_phrases=4)) as c:
        c.timeout = httpx.Timeout(15)
        forward = multi.forward

        def dying(parts):
            if any(name == "other" for name, _, _ in parts):
                raise SystemExit("what no handler catches")
            return forward(parts)

        multi.forward = dying
        answer = post(c, png(image), [PHRASES[0]], model="other")
        assert answer.status_code == 503 and "not running" in answer.json()["error"], answer.text
        assert answer.json()["request_id"] == answer.headers["x-request-id"]
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "batcher stopped"
        assert c.get("/readyz").status_code == 503
        start = time.monotonic()
        assert post(c, png(image), [PHRASES[0]], model="paper").status_code == 503  # refused at once
        assert time.monotonic() - start < 5


def test_a_request_past_its_deadline_gets_504_and_its_rows_are_not_run(three_sets, probe):
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    options = ServeOptions(request_timeout_s=1.0, max_batch=4, max_phrases=4, max_wait_ms=0)
    with running(multi, options) as c, ThreadPoolExecutor(2) as pool:
        hold(multi)
        running_one = pool.submit(post, c, png(image), [PHRASES[0]], model="paper")
        assert multi.entered.wait(15)
        start = time.monotonic()
        waiting = pool.submit(post, c, png(image), [PHRASES[1], PHRASES[2]], model="released")
        try:
            late = waiting.result(timeout=10)
        finally:
            seconds = time.monotonic() - start
            multi.free.set()
        assert late.status_code == 504 and "deadline of 1 s" in late.json()["error"], late.text
        assert seconds < 5
        assert running_one.result().status_code == 504  # its forward outlasted the deadline too
        deadline = time.monotonic() + 10
        while c.app.state.batcher.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        health = c.get("/healthz").json()
        assert health["rows"] == 1 and metric(c, "dcris_requests_dropped") == 1  # the late request's 2 rows never ran
        assert metric(c, "dcris_requests_total", model="released", status="504") == 1
        answer = post(c, png(image), [PHRASES[3]], model="other")
        assert answer.status_code == 200
        assert_same_masks(answer.json(), three_sets["other"], image, [PHRASES[3]])


def test_ready_only_once_every_adapter_set_is_warmed_up(three_sets):
    multi = MultiSegmenter(three_sets)
    hold(multi)  # the warm-up's forward waits
    with running(multi, ServeOptions(), ready=False) as c:
        assert multi.entered.wait(15)
        assert c.get("/healthz").status_code == 200  # alive
        waiting = c.get("/readyz")
        assert waiting.status_code == 503 and "warming up" in waiting.json()["error"]
        multi.free.set()
        deadline = time.monotonic() + 15
        while (ready := c.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.status_code == 200 and ready.json()["models"] == ["paper", "released", "other"]
        assert c.get("/healthz").json()["batches"] == 0  # warm-up batches are not counted as traffic


def test_a_slow_upload_gets_408_and_connections_are_limited(three_sets):
    options = ServeOptions(body_timeout_s=1.0, max_connections=3)
    with running(MultiSegmenter(three_sets), options) as c:
        port = c.base_url.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999\r\n"
            slow.sendall(head + b"\r\n" + b'{"image": "')  # and nothing more
            start, reply = time.monotonic(), b""
            while not reply.endswith(b"}") and (chunk := slow.recv(4096)):  # the answer, or the server closes
                reply += chunk
            seconds = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
        assert seconds < 5
        c.close()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        time.sleep(0.3)  # the server has accepted them
        try:
            refused = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        finally:
            for connection in idle:
                connection.close()
        assert refused.status_code == 503
        deadline = time.monotonic() + 10
        while httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code != 200:  # the slots free up
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_tokenizer_cache_stays_bounded_under_traffic(shared, probe):
    """Requests naming ~12,000 distinct random words: the BPE cache holds at most BPE_CACHE_WORDS of them."""
    image, _ = probe
    rng = random.Random(4)
    for _ in range(5):
        phrases = [
            " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 7))) for _ in range(160))[:999]
            for _ in range(16)
        ]
        assert post(shared, png(image), phrases, model="paper").status_code == 200
    cache = _bpe().cache
    assert len(cache) <= BPE_CACHE_WORDS
    assert len(cache) > BPE_CACHE_WORDS * 0.9  # the traffic filled it: the bound, not a lack of words, held it


def test_metrics(shared, probe):
    image, _ = probe
    before = {
        "paper": metric(shared, "dcris_requests_total", model="paper", status="200"),
        "415": metric(shared, "dcris_requests_total", model="paper", status="415"),
        "404": metric(shared, "dcris_requests_total", model="none", status="404"),
        "count": metric(shared, "dcris_request_seconds_count"),
    }
    for name in ["paper", "paper", "other"]:
        assert post(shared, png(image), PHRASES[:2], model=name).status_code == 200
    assert post(shared, b"not an image", ["a"], model="paper").status_code == 415
    assert post(shared, png(image), ["a"], model="nope").status_code == 404
    assert metric(shared, "dcris_requests_total", model="paper", status="200") == before["paper"] + 2
    assert metric(shared, "dcris_requests_total", model="paper", status="415") == before["415"] + 1
    assert metric(shared, "dcris_requests_total", model="none", status="404") == before["404"] + 1
    assert metric(shared, "dcris_request_seconds_count") == before["count"] + 5
    batcher = shared.app.state.batcher
    assert metric(shared, "dcris_batch_rows_count") == batcher.batches > 0
    assert metric(shared, "dcris_batch_rows_sum") == batcher.rows
    assert metric(shared, "dcris_queue_depth") == 0
    assert metric(shared, "dcris_adapter_sets_resident") == metric(shared, "dcris_adapter_sets_loaded") == 3


def test_api_key_cors_and_request_ids(three_sets, probe, caplog):
    image, _ = probe
    access = AccessOptions(api_key="s3cret", require_key=True, cors_origins=["http://ui.example"])
    with running(MultiSegmenter(three_sets), ServeOptions(), access) as c:
        assert post(c, png(image), ["a"]).status_code == 401
        c.headers["X-API-Key"] = "wrong"
        refused = post(c, png(image), ["a"])
        assert refused.status_code == 401 and "API key" in refused.json()["error"]
        del c.headers["X-API-Key"]
        c.headers["Authorization"] = "Bearer s3cret"
        assert post(c, png(image), ["a"]).status_code == 200
        assert c.get("/v1/models").status_code == 200
        del c.headers["Authorization"]
        c.headers["X-API-Key"] = "s3cret"
        assert post(c, png(image), ["a"]).status_code == 200
        del c.headers["X-API-Key"]
        for probe_route in ("/healthz", "/readyz", "/metrics"):  # probes and scrapers need no key
            assert c.get(probe_route).status_code == 200
        assert c.post("/v1/models", json={"name": "x", "source": "y"}).status_code == 401
        assert c.delete("/v1/models/paper").status_code == 401

        with caplog.at_level(logging.INFO, logger="dcris.serve"):
            echoed = c.get("/healthz", headers={"X-Request-Id": "trace-42"})
        assert echoed.headers["x-request-id"] == "trace-42"
        assert any("trace-42" in record.getMessage() for record in caplog.records)
        made = c.get("/healthz").headers["x-request-id"]
        assert len(made) == 32 and int(made, 16) >= 0
        assert c.get("/healthz", headers={"X-Request-Id": "x" * 200}).headers["x-request-id"] != "x" * 200

        preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
        allowed = c.options("/v1/segment", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://ui.example"
        other = c.options("/v1/segment", headers={**preflight, "Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
        simple = c.get("/healthz", headers={"Origin": "http://ui.example"})
        assert simple.headers["access-control-allow-origin"] == "http://ui.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()


def test_adapter_sets_loaded_unloaded_and_evicted_while_serving(three_sets, probe, tmp_path):
    image, _ = probe
    root = tmp_path / "exports"
    three_sets["released"].save_pretrained(root / "released")
    torch.manual_seed(9)
    tiny = preset("tiny-dcris")
    adapter_set(tiny, backbone_state(build_model(tiny.model, pretrained=False)), 4).save_pretrained(root / "apart")
    (tmp_path / "outside").mkdir()
    multi = MultiSegmenter({"paper": three_sets["paper"], "other": three_sets["other"]})
    access = AccessOptions(api_key="k", models_root=root)
    with running(multi, ServeOptions(max_resident=1, max_wait_ms=0), access) as c, ThreadPoolExecutor(2) as pool:
        c.headers["X-API-Key"] = "k"
        loaded = c.post("/v1/models", json={"name": "released2", "source": "released"})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["shares_backbone_with"] == ["paper", "other"]
        refusals = [
            ({"name": "apart", "source": "apart"}, 409, "backbones no loaded set shares"),
            ({"name": "x", "source": "../outside"}, 404, "no export '../outside'"),
            ({"name": "paper", "source": "released"}, 409, "already loaded"),
            ({"name": "a b", "source": "released"}, 422, "letters"),
        ]
        for body, status, words in refusals:
            refused = c.post("/v1/models", json=body)
            assert refused.status_code == status and words in refused.json()["error"], (body, refused.text)

        reference = {"paper": three_sets["paper"], "other": three_sets["other"], "released2": three_sets["released"]}
        for name in ["paper", "released2", "other", "released2", "paper"]:  # each a cold set: max_resident 1
            answer = post(c, png(image), PHRASES[:2], model=name)
            assert answer.status_code == 200, answer.text
            assert_same_masks(answer.json(), reference[name], image, PHRASES[:2])
        listed = {m["name"]: m["resident"] for m in c.get("/v1/models").json()["models"]}
        assert listed == {"paper": True, "other": False, "released2": False}
        assert metric(c, "dcris_adapter_sets_resident") == 1 and metric(c, "dcris_adapter_sets_loaded") == 3
        assert metric(c, "dcris_adapter_set_loads_from_host_total", model="released2") == 2

        hold(multi)
        in_flight = pool.submit(post, c, png(image), [PHRASES[3]], model="released2")
        assert multi.entered.wait(15)
        unloading = pool.submit(c.delete, "/v1/models/released2")
        time.sleep(0.3)
        assert not unloading.done()  # it waits for the request in flight
        assert post(c, png(image), ["a"], model="released2").status_code == 404  # no new ones meanwhile
        multi.free.set()
        assert in_flight.result().status_code == 200
        assert_same_masks(in_flight.result().json(), three_sets["released"], image, [PHRASES[3]])
        assert unloading.result().status_code == 200
        assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["paper", "other"]
        assert "released2" not in multi.segmenters and metric(c, "dcris_adapter_sets_loaded") == 2


def test_shutdown_ends_within_the_drain_time_even_with_a_stuck_model(three_sets, probe):
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    with running(multi, ServeOptions(drain_timeout_s=1.0)) as c, ThreadPoolExecutor(1) as pool:
        hold(multi)
        stuck = pool.submit(post, c, png(image), [PHRASES[0]], model="paper")
        assert multi.entered.wait(15)
        start = time.monotonic()
        c.server.should_exit = True
        c.thread.join(timeout=20)
        seconds = time.monotonic() - start
        multi.free.set()
        assert not c.thread.is_alive() and seconds < 8, seconds
        with pytest.raises(httpx.HTTPError):  # the connection is closed: the client retries elsewhere
            stuck.result().raise_for_status()


def test_an_image_is_decoded_once_in_the_allowed_formats_only(shared, three_sets, probe):
    """WebP and BMP are served like PNG (the same masks); the magic bytes decide, not the file name."""
    image, _ = probe
    for data in (encoded(image, "WEBP", lossless=True), encoded(image, "BMP")):
        answer = shared.post("/v1/segment", files={"image": ("x.gif", data)}, data={"phrases": [PHRASES[0]]})
        assert answer.status_code == 200, answer.text
        assert_same_masks(answer.json(), three_sets["paper"], image, [PHRASES[0]])
