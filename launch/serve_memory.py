"""Resident memory one request adds to ``dcris serve``: the worst image the pixel limit allows, several phrases.

python launch/serve_memory.py --side 6300 --phrases 1,4 --out serve_memory.json

Serves one random tiny adapter set with uvicorn in this process (on 127.0.0.1, ``--workers 1``,
``--max-pixels`` = side x side), sends a blank PNG of side x side pixels with each phrase count in turn (after one
small request that pays the one-time costs), and samples this process's resident memory every 2 ms while each
request runs, after handing freed memory back to the system. Prints and writes, per phrase count: the status,
the growth in MiB and in bytes per pixel of the image, and the seconds.
"""

import argparse
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's dcris, also when not installed

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from dcris.config import preset  # noqa: E402
from dcris.model import build_model  # noqa: E402
from dcris.multi import MultiSegmenter, return_freed_memory  # noqa: E402
from dcris.segmenter import Segmenter  # noqa: E402
from dcris.serve import ServeOptions, build_app, server_config  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=6300, help="the image's width and height")
    parser.add_argument("--phrases", default="1,4", help="phrase counts, one request each")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", default="serve_memory.json")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.phrases.split(",")]
    torch.manual_seed(0)
    cfg = preset("tiny-dcris")
    multi = MultiSegmenter({"tiny": Segmenter(build_model(cfg.model, pretrained=False).eval(), cfg)})
    options = ServeOptions(max_pixels=args.side**2, max_phrases=max(counts), max_batch=max(counts), workers=1,
                           max_upload_bytes=2**30, request_timeout_s=600)  # fmt: skip
    server = uvicorn.Server(server_config(build_app(multi, options), options, "127.0.0.1", args.port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=600)
    rows = []
    try:
        while not server.started or client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        client.post("/v1/segment", files={"image": ("x.png", png(np.zeros((40, 50, 3), np.uint8)))},
                    data={"phrases": ["a"]}).raise_for_status()  # fmt: skip
        image = np.zeros((args.side, args.side, 3), np.uint8)
        image[: args.side // 2] = 200
        data = png(image)
        for count in counts:
            return_freed_memory()
            base, peak, done = rss(), [0], threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.perf_counter()
            phrases = [f"the thing number {i}" for i in range(count)]
            response = client.post("/v1/segment", files={"image": ("x.png", data)}, data={"phrases": phrases})
            seconds = time.perf_counter() - start
            done.set()
            sampler.join()
            grown = peak[0] - base
            rows.append({"side": args.side, "pixels": args.side**2, "phrases": count, "status": response.status_code,
                         "grown_mib": round(grown / 2**20), "bytes_per_pixel": round(grown / args.side**2, 1),
                         "seconds": round(seconds, 1)})  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(map(str, row.values())) + " |")
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
