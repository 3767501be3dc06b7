"""``python -m sonic_core selftest``: prove an install works before downloading 10 GB of weights.

Writes tiny random-weight models in the official formats and folder layout (unet.pth with an
architecture JSON beside it, audio2token/audio2bucket .pth, whisper-tiny and SVD-xt folders in
Hugging Face / diffusers layout, RIFE/flownet.pkl with its ``module.`` keys), makes a portrait
(transparent pixels mark the face, so no detector is needed) and a short voice-like clip, runs
the whole chain of ``pipeline.animate`` and checks the mp4 by decoding it back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# Tiny architecture: the SVD-xt block layout at small widths (cross-attention width 32).
TINY_WIDTH = 32  # cross-attention / CLIP projection width
TINY_WHISPER = dict(d_model=24, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48,
                    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=16, vocab_size=64,
                    num_mel_bins=80, max_source_positions=1500, max_target_positions=16,
                    pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
TINY_UNET = dict(sample_size=8, in_channels=8, out_channels=4,
                 down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
                 up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
                 block_out_channels=[32, 64, 64, 64], addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24, layers_per_block=1, cross_attention_dim=TINY_WIDTH,
                 transformer_layers_per_block=1, num_attention_heads=[2, 4, 4, 4], num_frames=25)
TINY_AUDIO2TOKEN = dict(seq_len=10, blocks=3, channels=24, intermediate_dim=48, output_dim=TINY_WIDTH,
                        context_tokens=4)
TINY_AUDIO2BUCKET = dict(seq_len=50, blocks=1, channels=24, clip_channels=TINY_WIDTH, intermediate_dim=40,
                         output_dim=1, context_tokens=2)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=4, sample_size=64)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, projection_dim=TINY_WIDTH, num_hidden_layers=2,
                 num_attention_heads=2, patch_size=32, image_size=224)
TINY_RIFE_CHANNELS = 16  # IFBlock width (official 90)
SELFTEST_SECONDS = 1.6  # s of audio -> 20 generated frames
SELFTEST_SAMPLE_RATE = 22050  # Hz, not 16 kHz on purpose: the resampler runs
SELFTEST_IMAGE = (160, 192)  # px (w, h) of the portrait


def write_tiny_models(root: str | os.PathLike, seed: int = 0) -> Path:
    """Random tiny models in the documented models/sonic layout under ``root``."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, WhisperConfig,
                              WhisperFeatureExtractor, WhisperModel)

    from .models.audio_proj import Audio2BucketModel, AudioProjModel
    from .models.rife import IFNet
    from .models.unet import build_sonic_unet
    from .pipeline import SVD_FOLDER, WHISPER_FOLDER

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar is noise here
    torch.manual_seed(seed)
    root = Path(root)
    (root / "Sonic").mkdir(parents=True, exist_ok=True)
    unet = build_sonic_unet(dict(TINY_UNET))
    torch.save(unet.state_dict(), root / "Sonic" / "unet.pth")
    (root / "Sonic" / "unet.json").write_text(json.dumps(TINY_UNET))
    for name, cls, cfg in (("audio2token", AudioProjModel, TINY_AUDIO2TOKEN),
                           ("audio2bucket", Audio2BucketModel, TINY_AUDIO2BUCKET)):
        torch.save(cls(**cfg).state_dict(), root / "Sonic" / f"{name}.pth")
        (root / "Sonic" / f"{name}.json").write_text(json.dumps(cfg))
    whisper = WhisperModel(WhisperConfig(**TINY_WHISPER))
    whisper.save_pretrained(str(root / WHISPER_FOLDER))
    WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"]).save_pretrained(str(root / WHISPER_FOLDER))
    svd = root / SVD_FOLDER
    AutoencoderKLTemporalDecoder(**TINY_VAE).save_pretrained(str(svd / "vae"))
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(str(svd / "image_encoder"))
    (svd / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    (root / "RIFE").mkdir(exist_ok=True)
    rife = IFNet(TINY_RIFE_CHANNELS)
    torch.save({f"module.{k}": v for k, v in rife.state_dict().items()}, root / "RIFE" / "flownet.pkl")
    return root


def write_portrait(path: str | os.PathLike) -> Path:
    """A drawn head on a background; the face ellipse is transparent-ish (alpha 0) so it marks the face."""
    from PIL import Image, ImageDraw

    w, h = SELFTEST_IMAGE
    im = Image.new("RGBA", (w, h), (70, 110, 160, 255))
    d = ImageDraw.Draw(im)
    d.rectangle((w // 4, int(h * 0.75), 3 * w // 4, h), fill=(40, 40, 60, 255))  # shoulders
    face = (w // 4, h // 5, 3 * w // 4, int(h * 0.7))
    d.ellipse(face, fill=(225, 185, 150, 0))  # face (alpha 0: the face mask)
    d.ellipse((w * 0.38, h * 0.38, w * 0.45, h * 0.43), fill=(30, 30, 30, 0))
    d.ellipse((w * 0.55, h * 0.38, w * 0.62, h * 0.43), fill=(30, 30, 30, 0))
    d.ellipse((w * 0.43, h * 0.55, w * 0.57, h * 0.6), fill=(150, 60, 60, 0))
    im.save(path)
    return Path(path)


def write_voice(path: str | os.PathLike) -> Path:
    """A voice-like clip (harmonics of a gliding pitch, syllable envelope) as 16-bit PCM WAV, via PyAV."""
    import av

    n = int(SELFTEST_SECONDS * SELFTEST_SAMPLE_RATE)
    t = np.arange(n) / SELFTEST_SAMPLE_RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)  # Hz
    phase = 2 * np.pi * np.cumsum(pitch) / SELFTEST_SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None)  # ~3 syllables per second
    pcm = (0.3 * voice * envelope / np.abs(voice).max() * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=SELFTEST_SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        frame.sample_rate = SELFTEST_SAMPLE_RATE
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return Path(path)


def probe(path: str | os.PathLike) -> dict:
    """Decode the file back: frames, fps, size, audio duration."""
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(v))
        info = {"frames": frames, "fps": float(v.average_rate), "width": v.codec_context.width,
                "height": v.codec_context.height, "audio_seconds": 0.0}
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_seconds"] = sum(f.samples for f in c.decode(a)) / a.rate
    return info


def run_selftest(output: str | os.PathLike | None = None, device: str = "cpu") -> dict:
    """Build tiny models, animate, probe. Returns the probe dict plus ``seconds`` and ``path``."""
    from .pipeline import AnimateSettings, animate

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sonic-selftest-") as tmp:
        tmp = Path(tmp)
        models = write_tiny_models(tmp / "models")
        image = write_portrait(tmp / "portrait.png")
        voice = write_voice(tmp / "voice.wav")
        out = Path(output) if output else tmp / "selftest.mp4"
        settings = AnimateSettings(steps=3, min_resolution=128, frames_per_window=8, window_batch=2)
        animate(image, voice, out, models, settings, device=device, dtype=torch.float32)
        info = probe(out)
        info.update(path=str(out) if output else None, seconds=time.perf_counter() - t0)
    expected = 2 * int(SELFTEST_SECONDS * 12.5) - 1  # 2F - 1 frames after RIFE
    if info["frames"] != expected or info["audio_seconds"] <= 0:
        raise RuntimeError(f"selftest video is wrong: {info} (expected {expected} frames with audio)")
    return info


def configure_cli(p) -> None:
    p.add_argument("-o", "--output", default=None, help="keep the test video here (default: a temporary file)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")


def run_cli(args) -> int:
    info = run_selftest(args.output, args.device)
    where = f" -> {info['path']}" if info["path"] else ""
    from .cli import say

    say(f"selftest ok: {info['frames']} frames {info['width']}x{info['height']} at {info['fps']:g} fps "
        f"with {info['audio_seconds']:.2f} s of audio in {info['seconds']:.1f} s{where}")
    return 0
