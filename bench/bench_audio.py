"""Audio encode at real model sizes: seconds and peak RSS for 1, 5 and 10 minutes of speech.

Whisper-tiny-sized encoder (d 384, 4 layers, 6 heads, ffn 1536) and a full-size audio2token
(19200 -> 1024 -> 1024 -> 32x1024), random weights, float32, CPU. The speech is espeak-ng output
(22050 Hz, so resampling is part of the run) repeated to each length. Every length runs in a
fresh subprocess so its peak RSS (ru_maxrss) is its own. Prints a table and writes the figures
to bench/RESULTS.md (section "Audio encode").

    python bench/bench_audio.py [--minutes 1 5 10] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Audio encode (bench/bench_audio.py)"
SPEECH = ("Sonic animates one portrait photo from one speech track. Every generated frame listens to a "
          "fifth of a second of audio around it, and a longer second of context steers the head and "
          "the expression. Long clips are encoded thirty seconds at a time.")

sys.path.insert(0, str(REPO))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux -> MiB


def _mib(t) -> float:
    return t.numel() * t.element_size() / 2**20


def child(wav_path: str, minutes: float, threads: int) -> dict:
    """One measurement (runs in its own process)."""
    import numpy as np
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from sonic_core import config as C
    from sonic_core.audio import encode_audio
    from sonic_core.models import SonicModels
    from sonic_core.models.audio_proj import AudioProjModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=C.WHISPER_DIM, encoder_layers=C.WHISPER_LAYERS,
                        encoder_attention_heads=C.WHISPER_HEADS, encoder_ffn_dim=C.WHISPER_FFN_DIM,
                        num_mel_bins=C.N_MELS, max_source_positions=C.N_WHISPER_POSITIONS)
    models = SonicModels(unet=torch.nn.Identity(), audio2token=AudioProjModel().eval(),
                         audio2bucket=torch.nn.Identity(), whisper=WhisperEncoder(cfg).eval(),
                         feature_extractor=WhisperFeatureExtractor(), dtype=torch.float32)
    with wave.open(wav_path) as w:
        sr = w.getframerate()
        speech = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    n = int(minutes * 60 * sr)
    waveform = torch.from_numpy(np.tile(speech, -(-n // len(speech)))[:n].copy())[None, None]  # [1, 1, T]
    base = _rss_mib()
    t0 = time.perf_counter()
    out = encode_audio(models, waveform, sr)
    seconds = time.perf_counter() - t0
    peak = _rss_mib()
    features = _mib(out.token_features) + _mib(out.bucket_features)
    tokens = _mib(out.cond_tokens) + _mib(out.uncond_tokens)
    return {"minutes": minutes, "seconds": seconds, "frames": out.num_frames, "input_mib": _mib(waveform),
            "rss_before_mib": base, "rss_peak_mib": peak, "features_mib": features, "tokens_mib": tokens,
            "overhead_mib": peak - base - features - tokens}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def table(rows: list[dict]) -> str:
    head = ("| audio | frames | seconds | x realtime | peak RSS MiB | RSS before MiB | growth MiB | "
            "features MiB | tokens MiB | growth - outputs MiB |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        growth = r["rss_peak_mib"] - r["rss_before_mib"]
        lines.append(
            f"| {r['minutes']:g} min | {r['frames']} | {r['seconds']:.1f} | "
            f"{r['minutes'] * 60 / r['seconds']:.1f} | "
            f"{r['rss_peak_mib']:.0f} | {r['rss_before_mib']:.0f} | {growth:.0f} | {r['features_mib']:.0f} | "
            f"{r['tokens_mib']:.0f} | {r['overhead_mib']:.0f} |")
    return "\n".join(lines)


def write_results(text: str) -> None:
    """Replace (or add) this benchmark's section of bench/RESULTS.md, atomically."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip("\n") + ("\n\n" + old[end + 1:] if end >= 0 else "")
    fd, tmp = tempfile.mkstemp(prefix=".RESULTS.", suffix=".tmp", dir=HERE)
    with os.fdopen(fd, "w") as f:
        f.write(new.rstrip("\n") + "\n")
    os.replace(tmp, RESULTS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-write", action="store_true", help="print only, leave bench/RESULTS.md alone")
    ap.add_argument("--child", nargs=2, metavar=("WAV", "MINUTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.threads)))
        return 0
    exe = shutil.which("espeak-ng")
    if exe is None:
        print("espeak-ng is not installed (Debian: apt-get install espeak-ng)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        subprocess.run([exe, "-w", wav, SPEECH], check=True, capture_output=True)
        for m in args.minutes:
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", wav, str(m)]
            res = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{m:g} min: {r['seconds']:.1f} s, peak RSS {r['rss_peak_mib']:.0f} MiB", flush=True)
    text = table(rows)
    print(text)
    if not args.no_write:
        import torch

        torch.set_num_threads(args.threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        section = (f"{SECTION}\n\nMeasured {datetime.date.today().isoformat()} on {machine()}; load "
                   f"average {load:.1f} at the end (a load above the core count means the cores were "
                   "shared with other work and the seconds are pessimistic; RSS is unaffected).\n"
                   "Whisper-tiny-sized encoder and full-size audio2token with random weights, float32; "
                   "espeak-ng speech at 22050 Hz repeated (resampled to 16 kHz inside). Each length runs in "
                   "its own process. 'growth' = peak RSS - RSS before encoding (models and input already in "
                   "memory); 'outputs' = padded whisper features + float32 tokens kept in the SONIC_AUDIO "
                   "(tokens are stored in the UNet dtype, half this size in fp16/bf16).\n\n" + text + "\n")
        write_results(section)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
