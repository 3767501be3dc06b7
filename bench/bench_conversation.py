"""Conversations (issue 30 item 7): two faces against twice one face, wall time and peak RSS.

Tiny random models in the official formats (sonic_core.selftest.write_tiny_models), a photo with two
transparent faces side by side (tests/test_conversation_cli.write_photo), synthetic voices. Each run
is ``conversation.animate_faces`` as ``animate PHOTO --voice ... --crop --paste-back`` runs it, in a
fresh subprocess so its peak RSS (ru_maxrss) is its own:

* ``one``: face 1 only (``--voice 1=a.wav``), the same photo pasted back;
* ``two``: faces 1 and 3 (``--voice 1=a.wav --voice 3=b.wav``).

N faces are N Sonic runs one after another (same models, loaded once), then one streamed decode ->
RIFE -> paste -> encode pass over every face in lockstep. The figures to read: ``two / (2 x one)``
for the time (below 1: loading and encoding are shared) and ``two / one`` for the peak.

    python bench/bench_conversation.py [--seconds 4] [--steps 2] [--min-resolution 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from sonic_core import conversation, pipeline, sampler
    work, faces, steps, res = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    interp = sys.argv[6]
    voices = {1: f"{work}/a.wav", 3: f"{work}/b.wav"}
    cast = conversation.Cast(voices={n: voices[n] for n in list(voices)[:faces]})
    s = pipeline.AnimateSettings(steps=steps, min_resolution=res, crop=True, paste_back=True,
                                 interpolate=interp == "1")
    t = {"sampler": 0.0}
    real = sampler.generate
    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        t["sampler"] += time.perf_counter() - t0
        return out
    sampler.generate = timed
    t0 = time.perf_counter()
    conversation.animate_faces(f"{work}/photo.png", cast, f"{work}/out{faces}.mp4", f"{work}/models", s,
                               device="cpu", dtype=torch.float32)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps({"faces": faces, "wall_s": wall, "sampler_s": t["sampler"], "peak_rss_mb": peak}))
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="voice length in seconds (both voices)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--min-resolution", type=int, default=128)
    p.add_argument("--no-interpolate", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="runs of each, the fastest kept")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from sonic_core import selftest
    from tests.test_conversation_cli import voice_samples, write_photo, write_wav

    rows = []
    with tempfile.TemporaryDirectory(prefix="sonic-bench-conv-") as work:
        w = Path(work)
        selftest.write_tiny_models(w / "models")
        write_photo(w / "photo.png")
        write_wav(w / "a.wav", voice_samples(args.seconds, 140.0))
        write_wav(w / "b.wav", voice_samples(args.seconds, 220.0))
        for faces in (1, 2):
            best = None
            for _ in range(args.repeat):
                (w / f"out{faces}.mp4").unlink(missing_ok=True)
                run = subprocess.run([sys.executable, "-c", CHILD, str(REPO), work, str(faces),
                                      str(args.steps), str(args.min_resolution),
                                      "0" if args.no_interpolate else "1"],
                                     capture_output=True, text=True, cwd=REPO)
                if run.returncode:
                    raise SystemExit(run.stderr[-3000:])
                row = json.loads(run.stdout.strip().splitlines()[-1])
                best = row if best is None or row["wall_s"] < best["wall_s"] else best
            rows.append(best)
    one, two = rows
    summary = {"seconds": args.seconds, "steps": args.steps, "min_resolution": args.min_resolution,
               "time_ratio_two_vs_twice_one": two["wall_s"] / (2 * one["wall_s"]),
               "sampler_ratio_two_vs_twice_one": two["sampler_s"] / (2 * one["sampler_s"]),
               "peak_ratio_two_vs_one": two["peak_rss_mb"] / one["peak_rss_mb"], "runs": rows}
    text = json.dumps(summary, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
