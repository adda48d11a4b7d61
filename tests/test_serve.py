"""The HTTP API against a real uvicorn server on 127.0.0.1: contract, every bad request, a failing batch, and
concurrent requests across adapter sets answered each with its own masks."""

from __future__ import annotations

import base64
import io
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import EPS, assert_same_masks, encoded, hold, jpeg, png, post, running

from dcris.cli import main as cli_main
from dcris.multi import MultiSegmenter
from dcris.serve import ServeOptions, decode_image
from dcris.tokenizer import tokenize

LONG = "the small red circle on the left next to the big blue square below the green triangle"
PHRASES = ["the red circle", "the big blue square", "a green triangle on the right", "the small one", LONG]
LIMITS = dict(max_upload_bytes=300_000, max_pixels=60_000, max_phrases=4, max_phrase_chars=200)


@pytest.fixture(scope="module")
def client(three_sets) -> Iterator[httpx.Client]:
    with running(MultiSegmenter(three_sets), ServeOptions(max_batch=8, max_wait_ms=30, **LIMITS)) as c:
        yield c


def test_api_contract(client, three_sets, probe):
    image, _ = probe
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["models"] == ["paper", "released", "other"]
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["released"]["context_length"] == 12 and models["paper"]["context_length"] == 17
    assert models["released"]["preset"] == "tiny-detris" and models["paper"]["image_size"] == 112
    assert models["paper"]["shares_backbone_with"] == ["released", "other"]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "phrases" in body["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200

    phrases = [PHRASES[0], LONG]
    answer = post(client, png(image), phrases, model="released")
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    assert answer["model"] == "released" and (answer["height"], answer["width"]) == image.shape[:2]
    assert_same_masks(answer, three_sets["released"], image, phrases)
    cut = answer["results"][1]
    assert cut["truncated"] and cut["truncation"]["tokens_needed"] > 12 and LONG.startswith(cut["truncation"]["kept"])
    assert answer["results"][0]["truncation"] is None and answer["results"][0]["seconds"] > 0
    assert answer["results"][0]["target_probability"] == 1.0 and answer["results"][0]["found"]  # no such output
    # a set with the no-target output (gRefCOCO): its probability that each phrase names something
    answer = post(client, png(image), PHRASES[:3], model="other").json()
    assert_same_masks(answer, three_sets["other"], image, PHRASES[:3])
    assert any(r["target_probability"] < 1 for r in answer["results"])  # read from the model, not the default
    for r in answer["results"]:
        assert r["found"] == (r["target_probability"] >= 0.5) and (r["found"] or r["area"] == 0)
    # JSON with the image in base64, PNG masks; no model named: the first one
    request = {"image": base64.b64encode(jpeg(image)).decode(), "phrases": [PHRASES[1]], "mask_format": "png"}
    answer = client.post("/v1/segment", json=request).json()
    assert answer["model"] == "paper"
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["results"][0]["mask"]["png"])))) > 127
    np.testing.assert_array_equal(served, three_sets["paper"](Image.open(io.BytesIO(jpeg(image))), PHRASES[1]).mask)


def bad_requests(image: np.ndarray) -> list[tuple[str, dict, int, str]]:
    """(case, httpx.post keyword arguments, status, words of the message)."""
    good = png(image)
    b64 = base64.b64encode(good).decode()
    big = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)  # 90,000 pixels; PNG > 270 KB

    def form(image_bytes: bytes = good, phrases: list[str] | None = None, **fields: str) -> dict:
        return {"files": {"image": ("x", image_bytes)}, "data": {"phrases": phrases or ["the red circle"], **fields}}

    return [
        ("not an image", form(b"hello, not an image"), 415, "not an image of a served format (JPEG, PNG, WebP, BMP)"),
        ("an EPS file", form(EPS), 415, "not an image of a served format"),
        ("a GIF", form(encoded(image, "GIF")), 415, "not an image of a served format"),
        ("a TIFF", form(encoded(image, "TIFF")), 415, "not an image of a served format"),
        ("too many form fields", form(phrases=["a"] * 30), 413, "at most 6 form fields"),
        (
            "two image files",
            {"files": [("image", ("x", good)), ("image", ("y", good))], "data": {"phrases": ["a"]}},
            413,
            "at most one file",
        ),
        (
            "no multipart boundary",
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "malformed multipart body: missing boundary",
        ),
        ("truncated JPEG", form(jpeg(image)[: len(jpeg(image)) // 2]), 400, "truncated"),
        ("too many pixels", form(png(big[:201, :])), 413, "60000"),
        ("too many bytes", form(png(np.concatenate([big, big]))), 413, "300000"),
        ("no phrases", {"files": {"image": ("x", good)}, "data": {"model": "paper"}}, 422, "phrases"),
        ("no phrases (JSON)", {"json": {"image": b64, "phrases": []}}, 422, "at least one phrase"),
        ("an empty phrase", form(phrases=["the red circle", "  "]), 422, "empty"),
        ("too many phrases", form(phrases=["a"] * 5), 413, "at most 4"),
        ("too long a phrase", form(phrases=["a" * 201]), 413, "at most 200"),
        ("unknown model", form(model="nope"), 404, "unknown model 'nope'"),
        ("phrases not a list", {"json": {"image": b64, "phrases": "the red circle"}}, 422, "phrases"),
        ("model not a string", {"json": {"image": b64, "phrases": ["a"], "model": 3}}, 422, "model"),
        ("unknown mask format", form(mask_format="jpeg"), 422, "mask_format"),
        ("an unknown field", {"json": {"image": b64, "phrases": ["a"], "colour": "red"}}, 422, "colour"),
        ("image not a file", {"data": {"image": "abc", "phrases": ["a"]}, "files": {"x": ("x", b"")}}, 422, "file"),
        ("not base64", {"json": {"image": "***", "phrases": ["a"]}}, 400, "base64"),
        ("not JSON", {"content": b"{", "headers": {"content-type": "application/json"}}, 422, "json"),
        ("no body type", {"content": b"abc"}, 415, "multipart/form-data or application/json"),
    ]


def test_every_bad_request_is_a_4xx_with_one_message(client, three_sets, probe):
    image, _ = probe
    for case, kwargs, status, needle in bad_requests(image):
        response = client.post("/v1/segment", **kwargs)
        assert response.status_code == status, (case, response.text)
        body = response.json()
        assert list(body) == ["error"] and needle.lower() in body["error"].lower(), (case, body)
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    answer = post(client, png(image), ["the red circle"], model="other")  # still serving
    assert answer.status_code == 200
    assert_same_masks(answer.json(), three_sets["other"], image, ["the red circle"])


def test_exif_orientation_is_applied(client, three_sets, probe):
    """A phone photo stored in sensor orientation with EXIF orientation 6 (turn 90 degrees clockwise to view) is
    segmented upright: its answer has the upright size and the masks of the upright image."""
    image, _ = probe  # 90 x 130
    stored = np.ascontiguousarray(np.rot90(image, k=1))  # what the sensor wrote: the view turned a quarter left
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    answer = post(client, buffer.getvalue(), [PHRASES[0]], model="paper")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["height"], answer.json()["width"]) == image.shape[:2]
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))
    np.testing.assert_array_equal(upright, image)
    assert_same_masks(answer.json(), three_sets["paper"], image, [PHRASES[0]])


def test_decode_image_checks_the_pixels_before_decoding():
    with pytest.raises(Exception, match="pixels; at most 100") as exc:
        decode_image(png(np.zeros((11, 10, 3), np.uint8)), max_pixels=100)
    assert exc.value.status == 413
    assert decode_image(png(np.zeros((10, 10, 3), np.uint8)), max_pixels=100).size == (10, 10)


def test_a_failing_batch_fails_only_its_request(three_sets, probe):
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    forward = multi.forward
    poisoned = "the zebra"
    poison = int(tokenize([poisoned], 17)[0, 2])  # a row holding the token of "zebra" makes the forward fail

    def failing(parts):
        if any((tokens == poison).any() for _, _, tokens in parts):
            raise RuntimeError("this row cannot be computed")
        return forward(parts)

    multi.forward = failing
    with running(multi, ServeOptions(max_batch=16, max_wait_ms=400)) as c:
        jobs = [("paper", [PHRASES[0]]), ("other", [poisoned]), ("released", [PHRASES[1]]), ("paper", [PHRASES[2]])]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: post(c, png(image), job[1], model=job[0]), jobs))
        assert [a.status_code for a in answers] == [200, 500, 200, 200], [a.text for a in answers]
        # no internals in the body: one message and the request id that finds the log's lines
        assert answers[1].json() == {"error": "internal error", "request_id": answers[1].headers["x-request-id"]}
        for (name, phrases), answer in zip(jobs, answers, strict=True):
            if answer.status_code == 200:
                assert_same_masks(answer.json(), three_sets[name], image, phrases)
        assert c.get("/healthz").json()["status"] == "ok"


def test_a_full_queue_is_answered_503_at_once_and_the_server_keeps_serving(three_sets, probe):
    """With the model held busy, one request runs, ``max_queue`` wait and the rest are refused with 503 without
    waiting; once the model is free the waiting ones are answered and new requests are served."""
    image, _ = probe
    multi = MultiSegmenter(three_sets)
    with running(multi, ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2, max_phrases=1)) as c:
        hold(multi)
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(post, c, png(image), [PHRASES[0]], model="paper") for _ in range(6)]
            deadline = time.monotonic() + 60
            while sum(a.done() for a in answers) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            refused = [a.result() for a in answers if a.done()]
            multi.free.set()
            statuses = sorted(a.result().status_code for a in answers)
        assert [r.status_code for r in refused] == [503] * 3 and statuses == [200] * 3 + [503] * 3
        assert "busy" in refused[0].json()["error"]
        later = post(c, png(image), [PHRASES[1]], model="paper")
        assert later.status_code == 200
        assert_same_masks(later.json(), three_sets["paper"], image, [PHRASES[1]])


def test_concurrent_requests_are_each_answered_with_their_own_masks(three_sets):
    """Load, for correctness: every request answered, with its own image's and phrases' masks, none lost or
    crossed, while batches mix requests and adapter sets."""
    multi = MultiSegmenter(three_sets)
    forward, seen = multi.forward, []
    multi.forward = lambda parts: seen.append([name for name, _, _ in parts]) or forward(parts)
    rng = random.Random(0)
    gen = np.random.default_rng(0)
    requests = []
    for _ in range(24):
        h, w = (int(n) for n in gen.integers(40, 140, 2))
        image = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        requests.append((rng.choice(multi.names), image, rng.sample(PHRASES, rng.randint(1, 3))))
    with running(multi, ServeOptions(max_batch=8, max_wait_ms=50, max_phrases=3)) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda r: post(c, png(r[1]), r[2], model=r[0]), requests))
        stats = c.get("/healthz").json()
    assert [a.status_code for a in answers] == [200] * len(requests)
    for (name, image, phrases), answer in zip(requests, answers, strict=True):
        answer = answer.json()
        assert answer["model"] == name and (answer["height"], answer["width"]) == image.shape[:2]
        assert_same_masks(answer, three_sets[name], image, phrases)
    assert stats["rows"] == sum(len(p) for _, _, p in requests) and stats["queued"] == 0
    assert stats["batches"] < len(requests)  # requests were batched together
    assert any(len(set(names)) > 1 for names in seen)  # and adapter sets mixed in one forward
    assert max(len(names) for names in seen) <= 8


def test_serve_arguments_are_checked(capsys, monkeypatch):
    assert cli_main(["serve", "--weights", "w", "--max-phrases", "9", "--max-batch", "8"]) == 2
    assert "exceeds --max-batch 8" in capsys.readouterr().err
    monkeypatch.delenv("DCRIS_API_KEY", raising=False)
    assert cli_main(["serve", "--weights", "w", "--require-key"]) == 2
    assert "--require-key needs a key" in capsys.readouterr().err
    for bad in (["--max-resident", "-1"], ["--request-timeout-s", "0"], ["--workers", "0"]):
        assert cli_main(["serve", "--weights", "w", *bad]) == 2, bad
    with pytest.raises(SystemExit):
        cli_main(["serve", "--weights", "w", "--max-batch", "x"])
