"""Load benchmark of ``dcris serve``: a bounded run of concurrent clients against a real server on 127.0.0.1.

python launch/load_test.py --requests 200 --clients 8 --sets 3 --out load_test.json
python launch/load_test.py --max-resident 1 --out load_cold.json         # every set but one waits in host memory
python launch/load_test.py --slow-clients 4 --out load_slow.json          # and 4 clients trickling their uploads

Writes ``--sets`` random tiny exports sharing one backbone, starts ``dcris serve`` on them in a subprocess (the
server; this process is only its client), sends ``--requests`` requests from ``--clients`` threads (random adapter
set, image size and 1-3 phrases; every ``--bad-every``-th request malformed: not an image, a truncated JPEG, no
phrases, an unknown model, a field of the wrong type), optionally with ``--slow-clients`` threads that each send
uploads a few bytes at a time for the whole run, then measures cold and warm single requests one after another,
and stops the server. The timed threads only send and keep the answers: the reference masks (``Segmenter``'s) are
computed after the run. Prints and writes: the good requests' rate and p50/p95/p99 latency, the malformed ones'
count and statuses apart, the mean batch size, the slow uploads' statuses, the sets brought back from host memory,
the median latency of a request to a cold set and to a warm one, and the good requests whose masks differ from
``Segmenter``'s (pixels within 1e-3 of the threshold aside): that count must be 0. Needs the test extra (httpx).
"""

import argparse
import io
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as coco_mask  # noqa: E402

from dcris.config import preset  # noqa: E402
from dcris.metrics import MASK_THRESHOLD  # noqa: E402
from dcris.model import build_model, parameter_group  # noqa: E402
from dcris.segmenter import Segmenter  # noqa: E402

PHRASES = ["the red circle", "the big blue square", "a green triangle on the right", "the small one on the left"]


def write_exports(folder: Path, count: int) -> dict[str, Path]:
    """``count`` tiny exports on one random backbone, each with its own random adapters and head."""
    torch.manual_seed(0)
    backbone = {k: v for k, v in build_model(preset("tiny-dcris").model, False).state_dict().items()
                if parameter_group(k) == "backbone"}  # fmt: skip
    exports = {}
    for k in range(count):
        cfg = preset("tiny-dcris" if k % 2 == 0 else "tiny-detris")
        torch.manual_seed(k + 1)
        model = build_model(cfg.model, pretrained=False)
        model.load_state_dict(backbone, strict=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        exports[f"set{k}"] = Segmenter(model.eval(), cfg).save_pretrained(folder / f"set{k}")
    return exports


def encode(image: np.ndarray, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=kind)
    return buffer.getvalue()


def malformed(k: int, image: np.ndarray) -> dict:
    """The k-th kind of bad request, as httpx.post keyword arguments."""
    jpeg = encode(image, "JPEG")
    kinds = [
        {"files": {"image": ("x", b"not an image")}, "data": {"phrases": ["a"]}},
        {"files": {"image": ("x", jpeg[: len(jpeg) // 2])}, "data": {"phrases": ["a"]}},
        {"files": {"image": ("x", encode(image))}, "data": {}},
        {"files": {"image": ("x", encode(image))}, "data": {"phrases": ["a"], "model": "nope"}},
        {"json": {"image": "", "phrases": "not a list"}},
    ]
    return kinds[k % len(kinds)]


def slow_uploads(port: int, stop: threading.Event, every_s: float) -> list[int]:
    """Uploads sent 16 bytes every ``every_s`` seconds (a client on a bad link), one after another until ``stop``;
    the status of each that got an answer."""
    body = b'{"image": "' + b"A" * 4000 + b'", "phrases": ["a"]}'
    head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    statuses = []
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=every_s) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n")
            for start in range(0, len(body), 16):
                if stop.is_set():
                    break
                try:
                    reply = sock.recv(64)
                except TimeoutError:  # no answer yet: the next bytes
                    sock.sendall(body[start : start + 16])
                    continue
                if reply.startswith(b"HTTP/"):
                    statuses.append(int(reply.split()[1]))
                break
    return statuses


def counter(client: httpx.Client, name: str) -> float:
    """The sum of a metric's samples from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(client.get("/metrics").text)
    return sum(s.value for f in families for s in f.samples if s.name == name)


def single_latencies(client: httpx.Client, names: list[str], image: np.ndarray) -> list[float]:
    """Milliseconds of one request at a time to each set of ``names`` in turn."""
    data = encode(image)
    seconds = []
    for name in names:
        start = time.perf_counter()
        response = client.post("/v1/segment", files={"image": ("x.png", data)}, data={"phrases": [PHRASES[0]],
                                                                                      "model": name})  # fmt: skip
        seconds.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--bad-every", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=20)
    parser.add_argument("--max-resident", type=int, default=0, help="the server's (0: every set on the device)")
    parser.add_argument("--slow-clients", type=int, default=0, help="threads trickling one upload each")
    parser.add_argument("--body-timeout-s", type=float, default=5.0, help="the server's")
    parser.add_argument("--singles", type=int, default=10, help="one-at-a-time requests to cold and to warm sets")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="load_test.json")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="dcris-load-"))
    exports = write_exports(folder, args.sets)
    rng, gen = random.Random(0), np.random.default_rng(0)
    plan = []
    for i in range(args.requests):
        h, w = (int(n) for n in gen.integers(60, 240, 2))
        image = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        plan.append((i, rng.choice(list(exports)), image, rng.sample(PHRASES, rng.randint(1, 3))))
    weights = [f"{name}={path}" for name, path in exports.items()]
    command = [sys.executable, "-m", "dcris", "serve", "--weights", *weights, "--port", str(args.port), "--device",
               "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-resident", str(args.max_resident), "--body-timeout-s", str(args.body_timeout_s)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120)
    stop = threading.Event()
    try:
        for _ in range(600):
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

        def send(item: tuple) -> tuple[int, float, bool, dict | None]:
            i, name, image, phrases = item
            bad = args.bad_every and i % args.bad_every == args.bad_every - 1
            kwargs = malformed(i, image) if bad else {
                "files": {"image": ("x.png", encode(image))}, "data": {"phrases": phrases, "model": name}}  # fmt: skip
            start = time.perf_counter()
            response = client.post("/v1/segment", **kwargs)
            seconds = time.perf_counter() - start
            kept = response.json() if not bad and response.status_code == 200 else None
            return response.status_code, seconds, bad, kept

        before_batches, before_rows = counter(client, "dcris_batch_rows_count"), counter(client, "dcris_batch_rows_sum")
        before_cold = counter(client, "dcris_adapter_set_loads_from_host_total")
        with ThreadPoolExecutor(args.slow_clients or 1) as slow_pool:
            slow = [slow_pool.submit(slow_uploads, args.port, stop, 0.5) for _ in range(args.slow_clients)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                outcomes = list(pool.map(send, plan))
            wall = time.perf_counter() - start
            stop.set()
            slow_statuses = [status for f in slow for status in f.result()]
        batches = counter(client, "dcris_batch_rows_count") - before_batches
        rows = counter(client, "dcris_batch_rows_sum") - before_rows
        cold_loads = counter(client, "dcris_adapter_set_loads_from_host_total") - before_cold
        names, probe = list(exports), np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        # with --max-resident 1 each request of an alternation finds its set in host memory
        cold = single_latencies(client, [names[k % len(names)] for k in range(args.singles)], probe)
        warm = single_latencies(client, [names[0]] * args.singles, probe)
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=60)
    references = {name: Segmenter.from_pretrained(path, device="cpu") for name, path in exports.items()}
    wrong = 0
    for (_, name, image, phrases), (_, _, _, answer) in zip(plan, outcomes, strict=True):
        if answer is None:
            continue
        expected = references[name](image, phrases)
        for got, want in zip(answer["results"], expected, strict=True):
            mask = coco_mask.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()})
            # batches of other sizes move fp32 logits by ~1e-6 relative; the random weights' logits run to
            # thousands, so a pixel within 1e-3 of the threshold may flip either way
            decided = np.abs(want.probability - MASK_THRESHOLD) > 1e-3
            if (mask.astype(bool)[decided] != want.mask[decided]).any():
                wrong += 1
                break
    good = [o for o in outcomes if not o[2]]
    bad = [o for o in outcomes if o[2]]
    latencies = np.array([o[1] for o in good]) * 1000
    result = {
        "requests": len(outcomes),
        "clients": args.clients,
        "adapter_sets": args.sets,
        "max_resident": args.max_resident,
        "slow_clients": args.slow_clients,
        "good": len(good),
        "good_per_s": round(len(good) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "good_not_200": sum(o[0] != 200 for o in good),
        "malformed": len(bad),
        "malformed_4xx": sum(400 <= o[0] < 500 for o in bad),
        "malformed_5xx": sum(o[0] >= 500 for o in bad),
        "mean_batch_rows": round(rows / max(batches, 1), 2),
        "cold_loads": int(cold_loads),
        "single_cold_ms": round(float(np.median(cold)), 1),
        "single_warm_ms": round(float(np.median(warm)), 1),
        "slow_uploads_answered": len(slow_statuses),
        "slow_uploads_408": sum(s == 408 for s in slow_statuses),
        "wrong_masks": wrong,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }
    print("| " + " | ".join(result) + " |\n|" + "---|" * len(result))
    print("| " + " | ".join(map(str, result.values())) + " |")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
