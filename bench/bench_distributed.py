"""Benchmark: one clip's windows on 2 CPU ranks (gloo, loopback) vs one process (issue 16).

Runs tests/_dist_worker.py as real processes with the environment torchrun gives, on the tiny
cases the tests use: the selftest's tiny UNet (random inputs, 64x64 image, windows of 4) and the
golden case when ../shared is there. Times the sampler only (``sample()``, models built and
inputs made; the mean of ``--repeat`` runs after one warm-up, slowest rank), for

* 1 rank, 1 thread; 1 rank, 2 threads (all cores for one process); 2 ranks, 1 thread each,

and prints the speed-up of 2 ranks against each, the CPU seconds of one rank (which other work on
the machine does not inflate: on idle cores 2 ranks run in about the larger of their CPU times),
and the max abs difference of their latents.

    python bench/bench_distributed.py [--frames 48] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, threads: int, scenario: dict, frames: int) -> tuple[list[dict], float]:
    """``world`` worker ranks on 127.0.0.1 -> (each rank's result for the scenario, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="sonic-bench-dist-") as tmp:
        out = Path(tmp)
        spec = dict(frames=frames, threads=threads, timeout_s=300, out=str(out), scenarios=[scenario])
        (out / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads))
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "tests._dist_worker", str(out / "spec.json")]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(world)]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - t0
        if any(codes):
            raise SystemExit(f"a rank failed: exit codes {codes}")
        return [torch.load(out / f"rank{r}.pt")[scenario["name"]] for r in range(world)], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=48, help="frames of the selftest-tiny clip (windows of 4)")
    ap.add_argument("--repeat", type=int, default=3, help="timed sampler runs per configuration")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests._golden import golden_base

    cases = [("selftest tiny UNet", dict(name="t", case="tiny", repeat=args.repeat, warmup=True))]
    if golden_base().with_suffix(".json").exists():
        cases.append(("golden tiny case", dict(name="t", case="golden", repeat=args.repeat, warmup=True)))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average before {os.getloadavg()[0]:.1f}")
    print("| case | 1 rank x 1 thread s | 1 rank x 2 threads s | 2 ranks x 1 thread s | speed-up vs 1x1 | "
          "vs 1x2 | CPU s per rank 1x1 / 2x1 | max abs diff vs 1 rank | wall incl. start-up 1x1 / 2x1 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, sc in cases:
        one, wall_one = launch(1, 1, sc, args.frames)
        one2, _ = launch(1, 2, sc, args.frames)
        two, wall_two = launch(2, 1, sc, args.frames)
        t1, t12, t2 = one[0]["seconds"], one2[0]["seconds"], max(r["seconds"] for r in two)
        diff = max((r["latents"] - one[0]["latents"]).abs().max().item() for r in two)
        cpu = f"{one[0]['cpu_seconds']:.2f} / {max(r['cpu_seconds'] for r in two):.2f}"
        print(f"| {label} | {t1:.2f} | {t12:.2f} | {t2:.2f} | {t1 / t2:.2f}x | {t12 / t2:.2f}x | {cpu} | "
              f"{diff:.1e} | {wall_one:.0f} / {wall_two:.0f} |")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
