"""Long clips: peak RSS, its growth and wall time of the CLI and ComfyUI paths against audio length.

Tiny random models in the official formats (sonic_core.selftest.write_tiny_models), a 512x512
portrait, RIFE 2x, the CLI chain (``pipeline.animate``: sampler, then decode -> RIFE -> encode
streamed in temporal-decoder chunks). Each length runs in a fresh subprocess, so its peak RSS
(ru_maxrss) is its own; growth is the peak minus the RSS right before sampling starts, which is
what grows with length when frames are held. Weights are negligible here, so the figures are the
pipeline's own buffers. ``--steps`` keeps the sampler short: memory does not depend on it.

Paths (``--paths``, default cli and comfyui):

* ``cli``: ``pipeline.animate`` as the CLI runs it.
* ``comfyui``: the same sampler, then the node classes of the long-clip segment path driven as
  ComfyUI's queue runs them: per segment Latent Segment -> Frame Interpolate -> Video Combine
  (``segment`` connected), each node's output kept until the next segment replaces it, as
  ComfyUI's cache keeps it.
* ``comfyui-stream``: the same sampler, then the Latent To Video node (the basic workflow).

    python bench/bench_long.py --seconds 20 120 [--json FILE] [--steps 1] [--paths cli comfyui]

``--photo 1080x1920``: a photo of that size with a transparent face square instead; the face is cropped
(``--side`` is then the crop's working size) and pasted back into the photo while streaming (issue 23):
the CLI with ``--crop --paste-back``, Latent To Video with its photo and face_box inputs.

Writes a JSON list of {"path": "cli" | "comfyui" | "comfyui-stream", "seconds": S, "peak_rss_mb": X,
"growth_mb": Y, "wall_s": Z, ...}.
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
SIDE = 512  # px, default portrait side (working size 512x512 at min_resolution 512)
RATE = 16000  # Hz, the synthetic voice
PATHS = ("cli", "comfyui", "comfyui-stream")

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    from PIL import Image
    sys.path.insert(0, sys.argv[1])
    from sonic_core import pipeline, sampler, selftest
    work, seconds, steps, path = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    photo = [int(v) for v in sys.argv[6].split("x")] if sys.argv[6] else None  # (w, h)
    models = selftest.write_tiny_models(work + "/models")
    pw, ph = photo or (%(side)d, %(side)d)
    img = np.full((ph, pw, 4), 255, np.uint8); img[..., :3] = 120
    f = min(pw, ph) // 4 if photo else %(side)d // 4  # face square side (half the portrait without --photo)
    fx, fy = (pw - f) // 2, ph // 3 if photo else %(side)d // 4
    img[fy:fy + (f if photo else %(side)d // 2), fx:fx + (f if photo else %(side)d // 2), 3] = 0  # transparent face
    Image.fromarray(img).save(work + "/face.png")
    import av
    n = int(seconds * %(rate)d); t = np.arange(n) / %(rate)d
    pcm = (0.3 * np.sin(2 * np.pi * 150 * t) * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) * 32767).astype(np.int16)
    with av.open(work + "/voice.wav", "w") as out:
        st = out.add_stream("pcm_s16le", rate=%(rate)d, layout="mono")
        fr = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono"); fr.sample_rate = %(rate)d
        for p in st.encode(fr): out.mux(p)
        for p in st.encode(None): out.mux(p)
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    import threading
    base = {"after_sampling_peak": 0.0}
    done = threading.Event()
    def watch():  # peak RSS after the sampler: the decode -> RIFE -> encode stage alone
        while not done.wait(0.05):
            if "after_sampling" in base:
                base["after_sampling_peak"] = max(base["after_sampling_peak"], rss())
    threading.Thread(target=watch, daemon=True).start()
    generate = sampler.generate
    def timed(*a, **k):
        base["before_sampling"], base["t_sampling"] = rss(), time.perf_counter()
        out = generate(*a, **k)
        base["after_sampling"], base["sampler_s"] = rss(), time.perf_counter() - base["t_sampling"]
        return out
    sampler.generate = timed
    class Sampled(Exception):
        pass
    if path != "cli":  # the same sampler, then the ComfyUI node classes on its latents
        def sample_then_stop(*a, **k):
            base["latents"] = timed(*a, **k)
            raise Sampled
        sampler.generate = sample_then_stop
    t0 = time.perf_counter()
    s = pipeline.AnimateSettings(steps=steps, min_resolution=%(side)d, crop=bool(photo), paste_back=bool(photo))
    try:
        pipeline.animate(work + "/face.png", work + "/voice.wav", work + "/out.mp4", models, s)
    except Sampled:
        import os
        os.environ["SONIC_MODELS_DIR"], os.environ["SONIC_OUTPUT_DIR"] = str(models), work + "/output"
        from nodes import nodes_long, nodes_video
        from sonic_core.models import svd
        vae, _clip = svd.load_svd(str(models / pipeline.SVD_FOLDER), __import__("torch").float32, "cpu")
        wave, rate = pipeline.read_audio(work + "/voice.wav")
        audio = {"waveform": wave[None], "sample_rate": rate}
        latent = {"samples": base.pop("latents")}
        if path == "comfyui-stream":
            paste = {}
            if photo:
                from sonic_core import face
                image, alpha = pipeline.read_image(work + "/face.png")
                paste = {"photo": image, "face_box": face.detect_face_mask(image, mask=alpha, crop=True).box}
            nodes_long.SonicLatentToVideo().save(latent, vae, 12.5, "RIFE/flownet.pkl", 2, "bench/long",
                                                 audio=audio, **paste)
        else:
            seg_node, rife_node = nodes_long.SonicLatentSegment(), nodes_video.SonicFrameInterpolate()
            combine, k, cache = nodes_video.SonicVideoCombine(), 0, None
            while True:
                cache = None  # ComfyUI replaces a node's cached output when the node runs again
                images, info = seg_node.decode(latent, vae, 96, k, unique_id="9")
                frames, fps = rife_node.interpolate(images, "RIFE/flownet.pkl", 2, 12.5, 4)
                combine.combine(frames, fps, "bench/long", audio=audio, segment=info)
                cache = (images, frames)  # what the cache holds until the next segment
                k += 1
                if info.segment.last:
                    break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    done.set()
    print(json.dumps({"peak_rss_mb": round(peak, 1), "growth_mb": round(peak - base["before_sampling"], 1),
                      "after_sampler_growth_mb": round(base["after_sampling_peak"] - base["after_sampling"], 1),
                      "wall_s": round(time.perf_counter() - t0, 1), "sampler_s": round(base["sampler_s"], 1),
                      "after_sampler_s": round(time.perf_counter() - base["t_sampling"] - base["sampler_s"], 1)}))
""")


def run(seconds: float, steps: int, side: int = SIDE, repo: Path = REPO, path: str = "cli", photo: str = "") -> dict:
    child = CHILD % {"side": side, "rate": RATE}
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, "-c", child, str(repo), work, str(seconds), str(steps), path, photo],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{seconds} s failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"path": path, "seconds": seconds, "side": side, **({"photo": photo} if photo else {}), **row}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, nargs="+", default=[20.0, 120.0])
    p.add_argument("--steps", type=int, default=1, help="denoising steps (memory does not depend on it)")
    p.add_argument("--side", type=int, default=SIDE, help="portrait side in px (512 = the official size)")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout to measure (e.g. an older commit)")
    p.add_argument("--paths", nargs="+", default=["cli", "comfyui"], choices=PATHS)
    p.add_argument("--json", default=None, help="write the rows to this file (after every row)")
    p.add_argument("--photo", default="", help="WxH: crop the face of a photo this size and paste it back (cli, "
                                               "comfyui-stream)")
    args = p.parse_args()
    rows = []
    for s, path in [(s, path) for s in args.seconds for path in args.paths]:
        if args.photo and path == "comfyui":
            raise SystemExit("--photo: the segment path pastes back with the Sonic Paste Back node; use cli or "
                             "comfyui-stream")
        rows.append(run(s, args.steps, args.side, args.repo, path, args.photo))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        r = rows[-1]
        print(f"{r['path']:8s} {r['seconds']:7.0f} s {r['side']}px {args.photo} peak {r['peak_rss_mb']:8.1f} MB  "
              f"growth "
              f"{r['growth_mb']:8.1f} MB  after sampler {r['after_sampler_growth_mb']:8.1f} MB  "
              f"wall {r['wall_s']:7.1f} s (sampler {r['sampler_s']:.1f} s, after it {r['after_sampler_s']:.1f} s)",
              flush=True)


if __name__ == "__main__":
    main()
