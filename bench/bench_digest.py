"""The cost of keying results by the whole UNet (sonic_core/digest.py, issue 29 item 3).

A 3 GB file (the fp16 Sonic UNet's size) in a temporary folder, hashed whole with SHA-256 (what
digest.file_digest uses) and BLAKE2b for comparison, streamed in DIGEST_CHUNK_BYTES reads; then
file_digest's first call (hash + cache write) and its cache hit (stat + JSON read/write, no byte of
the file read). "sparse": a file of holes (reads cost no disk: the hash's own speed); "real": random
data written first (then in the page cache, as right after a download or a load). One untimed read
first puts every page in memory, so each timed row costs the hash, not the first touch of the pages. The file is
removed at the end.

    python bench/bench_digest.py [--gib 3] [--folder /tmp] [--kinds sparse,real]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sonic_core import digest  # noqa: E402
from sonic_core.config import DIGEST_CHUNK_BYTES  # noqa: E402

BLOCK = 64 * 2**20  # bytes of random data written per write for the "real" file
HITS = 20  # cache hits timed (best and median)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stream(path: Path, algorithm: str) -> tuple[float, float]:
    """(wall s, CPU s) of hashing ``path`` whole."""
    h = hashlib.new(algorithm)
    buf = bytearray(DIGEST_CHUNK_BYTES)
    view = memoryview(buf)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    h.hexdigest()
    return time.perf_counter() - t0, time.process_time() - c0


def make(path: Path, size: int, kind: str) -> None:
    with open(path, "wb") as f:
        if kind == "sparse":
            f.truncate(size)
            return
        block = os.urandom(BLOCK)
        left = size
        while left:
            left -= f.write(block[:min(left, BLOCK)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--folder", default=tempfile.gettempdir())
    ap.add_argument("--kinds", default="sparse,real")
    args = ap.parse_args()
    size = int(args.gib * 2**30)
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print("| file | algorithm / call | wall s | CPU s | GiB/s (wall) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.folder) as d:
        for kind in args.kinds.split(","):
            path = Path(d) / f"{kind}.bin"
            make(path, size, kind)
            cache = Path(d) / f"{kind}-digests.json"
            try:
                stream(path, "md5")  # untimed: pages in memory first, so no algorithm pays for that alone
                for algorithm in ("sha256", "blake2b"):
                    wall, cpu = stream(path, algorithm)
                    print(f"| {args.gib:g} GiB {kind} | {algorithm} streamed | {wall:.1f} | {cpu:.1f} | "
                          f"{args.gib / wall:.2f} |")
                t0, c0 = time.perf_counter(), time.process_time()
                digest.file_digest(path, cache)
                print(f"| {args.gib:g} GiB {kind} | file_digest, first (hash + cache write) | "
                      f"{time.perf_counter() - t0:.1f} | {time.process_time() - c0:.1f} | |")
                hits = []
                for _ in range(HITS):
                    t0 = time.perf_counter()
                    digest.file_digest(path, cache)
                    hits.append(time.perf_counter() - t0)
                hits.sort()
                print(f"| {args.gib:g} GiB {kind} | file_digest, cache hit (best / median of {HITS}) | "
                      f"{hits[0] * 1e3:.2f} ms / {hits[HITS // 2] * 1e3:.2f} ms | | |")
            finally:
                path.unlink()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
