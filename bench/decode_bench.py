"""Decode + preprocess time on photo-sized JPEGs, full decode against photo-sized decoding.

    .venv/bin/python bench/decode_bench.py [--size 96] [--repeats 15] [--json PATH]

For 640x480, 1920x1080 and 4032x3024 JPEGs (a bundled scikit-image photograph scaled
up, with sensor-like noise, quality 90) it times the gateway's own steps,
``decode_image(spec=...)`` then ``preprocess_pixels`` into a batch row, for a spec
without ``decode_oversample`` (the full decode every older card keeps) and with 2.0
(new exports). Then it decodes the 4032x3024 JPEG in 1 and 8 threads: Pillow releases
the GIL while it decodes and resizes, so threads should scale up to the core count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contract.preprocessing import PreprocessSpec, decode_image, preprocess_pixels  # noqa: E402

SIZES = ((640, 480), (1920, 1080), (4032, 3024))


def photo_jpeg(width: int, height: int) -> bytes:
    """A photograph-like JPEG of the given size (skimage's astronaut, upscaled, noisy)."""
    import skimage.data

    img = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    noise = np.random.default_rng(0).integers(-10, 11, (height, width, 3), dtype=np.int16)
    noisy = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def one(data: bytes, spec: PreprocessSpec, row: np.ndarray) -> None:
    """What the gateway's service does per image (serving/service/inference.py)."""
    preprocess_pixels(decode_image(data, spec=spec), spec, out=row)


def median_ms(data: bytes, spec: PreprocessSpec, repeats: int) -> float:
    row = np.empty((spec.height, spec.width, 3), np.float32)
    one(data, spec, row)  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one(data, spec, row)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def threaded_rate(
    data: bytes, spec: PreprocessSpec, threads: int, per_thread: int
) -> tuple[float, float]:
    """(images per second, CPU seconds per wall second) with ``threads`` threads each
    preprocessing ``per_thread`` images. CPU/wall above 1 means decoding ran on several
    cores at once, i.e. nothing held the GIL across it (a busy host caps both)."""

    def work(_: int) -> None:
        row = np.empty((spec.height, spec.width, 3), np.float32)
        for _ in range(per_thread):
            one(data, spec, row)

    with ThreadPoolExecutor(threads) as pool:
        t0, c0 = time.perf_counter(), time.process_time()
        list(pool.map(work, range(threads)))
        wall = time.perf_counter() - t0
        return threads * per_thread / wall, (time.process_time() - c0) / wall


def gil_stall_ms(data: bytes, spec: PreprocessSpec, count: int) -> tuple[float, float]:
    """(longest stall of a pure-Python thread, median decode time), in ms, while the main
    thread preprocesses ``data`` ``count`` times. A decode that held the GIL would stall
    the other thread for a whole decode; released, it stalls for scheduling slices only."""
    stop, gaps = threading.Event(), [0.0]

    def probe() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    row = np.empty((spec.height, spec.width, 3), np.float32)
    one(data, spec, row)
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        one(data, spec, row)
        times.append(time.perf_counter() - t0)
    stop.set()
    thread.join()
    return gaps[0] * 1000, statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> dict:
    """Run the bench, print the tables, return (and optionally write) the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="model input side (default 96)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--per-thread", type=int, default=6, help="4032x3024 images per thread")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    full = PreprocessSpec(args.size, args.size)
    photo = PreprocessSpec(args.size, args.size, decode_oversample=2.0)
    result: dict = {"cpus": os.cpu_count(), "input": args.size, "latency_ms": [], "threads": []}
    print(f"decode + preprocess to {args.size}x{args.size}, median of {args.repeats} (ms)")
    print(f"{'JPEG':>10} {'bytes':>9} {'full':>8} {'oversample 2':>13} {'speed-up':>9}")
    images = {}
    for w, h in SIZES:
        data = images[(w, h)] = photo_jpeg(w, h)
        a, b = median_ms(data, full, args.repeats), median_ms(data, photo, args.repeats)
        result["latency_ms"].append(dict(jpeg=f"{w}x{h}", bytes=len(data), full=a, oversample2=b))
        print(f"{w}x{h:<5} {len(data):>9} {a:>8.1f} {b:>13.1f} {a / b:>8.1f}x")
    big = images[SIZES[-1]]
    print(f"\n4032x3024 JPEG in threads, {os.cpu_count()} CPUs (images/s)")
    print(f"{'spec':>13} {'c=1':>7} {'c=8':>7} {'c8/c1':>6} {'cpu/wall c=1':>13} {'c=8':>5}")
    for name, spec in (("full", full), ("oversample 2", photo)):
        r1, u1 = threaded_rate(big, spec, 1, args.per_thread * 2)
        r8, u8 = threaded_rate(big, spec, 8, args.per_thread)
        result["threads"].append(
            dict(spec=name, c1=r1, c8=r8, cpu_per_wall_c1=u1, cpu_per_wall_c8=u8)
        )
        print(f"{name:>13} {r1:>7.1f} {r8:>7.1f} {r8 / r1:>5.2f}x {u1:>13.2f} {u8:>5.2f}")
    stall, decode = gil_stall_ms(big, full, args.per_thread)
    result["gil"] = dict(longest_stall_ms=stall, decode_ms=decode)
    print(f"\nGIL probe: full decode {decode:.0f} ms, longest pure-Python stall {stall:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
