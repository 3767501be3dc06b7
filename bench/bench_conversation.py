"""Conversations (issue 30 item 7): two faces against twice one face, wall time and peak RSS.

Tiny random models in the official formats (sonic_core.selftest.write_tiny_models), a photo with two
transparent faces side by side (tests/test_conversation_cli.write_photo), synthetic voices. Each run
is ``conversation.animate_faces`` as ``animate PHOTO --voice ... --crop --paste-back`` runs it, in a
fresh subprocess so its peak RSS (ru_maxrss) is its own:

* ``one``: face 1 only (``--voice 1=a.wav``), the same photo pasted back;
* ``two-sequential``: faces 1 and 3 (``--voice 1=a.wav --voice 3=b.wav``), sampled one after the
  other (``animate_faces(shared_calls=False)``);
* ``two-shared``: the same two faces sampled together, windows of both faces sharing UNet calls
  (``sampler_faces``, the CLI's path), ``--window-batch`` windows per call in every mode.

N faces are N Sonic samplings (same models, loaded once), then one streamed decode -> RIFE ->
paste -> encode pass over every face in lockstep. The figures to read: ``two / (2 x one)`` for the
time (below 1: loading and encoding are shared), ``shared / sequential`` for the sampler time, and
``two / one`` for the peak. Each mode runs ``--repeat`` times; the median is reported.

    python bench/bench_conversation.py [--seconds 1.6] [--steps 2] [--min-resolution 128] [--window-batch 2]
        [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    from sonic_core import conversation, pipeline, sampler_faces
    work, faces, steps, res = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    interp, shared, batch = sys.argv[6], sys.argv[7] == "1", int(sys.argv[8])
    voices = {1: f"{work}/a.wav", 3: f"{work}/b.wav"}
    cast = conversation.Cast(voices={n: voices[n] for n in list(voices)[:faces]})
    s = pipeline.AnimateSettings(steps=steps, min_resolution=res, crop=True, paste_back=True,
                                 interpolate=interp == "1", window_batch=batch)
    t = {"sampler": 0.0}
    real = sampler_faces.generate_faces
    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        t["sampler"] += time.perf_counter() - t0
        return out
    sampler_faces.generate_faces = timed
    t0 = time.perf_counter()
    conversation.animate_faces(f"{work}/photo.png", cast, f"{work}/out{faces}.mp4", f"{work}/models", s,
                               device="cpu", dtype=torch.float32, shared_calls=shared)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(json.dumps({"faces": faces, "shared": shared, "wall_s": wall, "sampler_s": t["sampler"],
                      "peak_rss_mb": peak}))
""")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.6, help="voice length in seconds (both voices)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--min-resolution", type=int, default=128)
    p.add_argument("--window-batch", type=int, default=2, help="windows per UNet call, every mode")
    p.add_argument("--no-interpolate", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode, interleaved; the median is kept")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from sonic_core import selftest
    from tests.test_conversation_cli import voice_samples, write_photo, write_wav

    modes = {"one": (1, False), "two-sequential": (2, False), "two-shared": (2, True)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="sonic-bench-conv-") as work:
        w = Path(work)
        selftest.write_tiny_models(w / "models")
        write_photo(w / "photo.png")
        write_wav(w / "a.wav", voice_samples(args.seconds, 140.0))
        write_wav(w / "b.wav", voice_samples(args.seconds, 220.0))
        for _ in range(args.repeat):  # interleaved, so a change of the machine's load hits every mode alike
            for mode, (faces, shared) in modes.items():
                (w / f"out{faces}.mp4").unlink(missing_ok=True)
                run = subprocess.run([sys.executable, "-c", CHILD, str(REPO), work, str(faces),
                                      str(args.steps), str(args.min_resolution),
                                      "0" if args.no_interpolate else "1", "1" if shared else "0",
                                      str(args.window_batch)],
                                     capture_output=True, text=True, cwd=REPO)
                if run.returncode:
                    raise SystemExit(run.stderr[-3000:])
                runs[mode].append(json.loads(run.stdout.strip().splitlines()[-1]))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    one, seq, shared = "one", "two-sequential", "two-shared"
    summary = {"seconds": args.seconds, "steps": args.steps, "min_resolution": args.min_resolution,
               "window_batch": args.window_batch, "repeat": args.repeat, "load_average": os.getloadavg(),
               "median": {m: {k: med(m, k) for k in ("wall_s", "sampler_s", "peak_rss_mb")} for m in modes},
               "time_ratio_shared_vs_twice_one": med(shared, "wall_s") / (2 * med(one, "wall_s")),
               "time_ratio_sequential_vs_twice_one": med(seq, "wall_s") / (2 * med(one, "wall_s")),
               "sampler_ratio_shared_vs_sequential": med(shared, "sampler_s") / med(seq, "sampler_s"),
               "sampler_ratio_shared_vs_twice_one": med(shared, "sampler_s") / (2 * med(one, "sampler_s")),
               "peak_ratio_shared_vs_one": med(shared, "peak_rss_mb") / med(one, "peak_rss_mb"),
               "peak_ratio_sequential_vs_one": med(seq, "peak_rss_mb") / med(one, "peak_rss_mb"),
               "runs": runs}
    text = json.dumps(summary, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
