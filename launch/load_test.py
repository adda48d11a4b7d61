"""Load benchmark of ``dcris serve``: a bounded run of concurrent clients against a real server on 127.0.0.1.

python launch/load_test.py --requests 200 --clients 8 --sets 3 --out load_test.json

Writes ``--sets`` random tiny exports sharing one backbone, starts ``dcris serve`` on them in a subprocess, sends
``--requests`` requests from ``--clients`` threads (random adapter set, image size and 1-3 phrases; every
``--bad-every``-th request malformed: not an image, a truncated JPEG, no phrases, an unknown model, a field of the
wrong type), then stops the server. Prints and writes: requests/s, p50/p95/p99 latency, mean batch size, 4xx and
5xx counts, and the good requests whose masks differ from ``Segmenter``'s (pixels within 1e-3 of the threshold
aside): that count must be 0. Needs the test extra (httpx).
"""

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--bad-every", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=20)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="load_test.json")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="dcris-load-"))
    exports = write_exports(folder, args.sets)
    references = {name: Segmenter.from_pretrained(path, device="cpu") for name, path in exports.items()}
    rng, gen = random.Random(0), np.random.default_rng(0)
    plan = []
    for i in range(args.requests):
        h, w = (int(n) for n in gen.integers(60, 240, 2))
        image = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        plan.append((i, rng.choice(list(exports)), image, rng.sample(PHRASES, rng.randint(1, 3))))
    weights = [f"{name}={path}" for name, path in exports.items()]
    command = [sys.executable, "-m", "dcris", "serve", "--weights", *weights, "--port", str(args.port), "--device",
               "cpu", "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=120)
    try:
        for _ in range(600):
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        def send(item: tuple) -> tuple[int, float, bool, bool]:
            i, name, image, phrases = item
            bad = args.bad_every and i % args.bad_every == args.bad_every - 1
            kwargs = malformed(i, image) if bad else {
                "files": {"image": ("x.png", encode(image))}, "data": {"phrases": phrases, "model": name}}  # fmt: skip
            start = time.perf_counter()
            response = client.post("/v1/segment", **kwargs)
            seconds = time.perf_counter() - start
            wrong = False
            if not bad and response.status_code == 200:
                expected = references[name](image, phrases)
                for got, want in zip(response.json()["results"], expected, strict=True):
                    mask = coco_mask.decode({"size": got["mask"]["size"], "counts": got["mask"]["counts"].encode()})
                    # batches of other sizes move fp32 logits by ~1e-6 relative; the random weights' logits run
                    # to thousands, so a pixel within 1e-3 of the threshold may flip either way
                    decided = np.abs(want.probability - MASK_THRESHOLD) > 1e-3
                    wrong |= bool((mask.astype(bool)[decided] != want.mask[decided]).any())
            return response.status_code, seconds, bad, wrong

        before = client.get("/healthz").json()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(send, plan))
        wall = time.perf_counter() - start
        after = client.get("/healthz").json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    good = [o for o in outcomes if not o[2]]
    latencies = np.array([o[1] for o in good]) * 1000
    batches, rows = after["batches"] - before["batches"], after["rows"] - before["rows"]
    result = {
        "requests": len(outcomes),
        "clients": args.clients,
        "adapter_sets": args.sets,
        "malformed": sum(o[2] for o in outcomes),
        "requests_per_s": round(len(outcomes) / wall, 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_batch_rows": round(rows / max(batches, 1), 2),
        "status_4xx": sum(400 <= o[0] < 500 for o in outcomes),
        "status_5xx": sum(o[0] >= 500 for o in outcomes),
        "malformed_not_4xx": sum(o[2] and not 400 <= o[0] < 500 for o in outcomes),
        "good_not_200": sum(not o[2] and o[0] != 200 for o in outcomes),
        "wrong_masks": sum(o[3] for o in outcomes),
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
    }
    print("| " + " | ".join(result) + " |\n|" + "---|" * len(result))
    print("| " + " | ".join(map(str, result.values())) + " |")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
