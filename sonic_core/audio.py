"""Waveform -> 16 kHz mono -> whisper log-mel -> encoder hidden states -> per-frame windows.

The numerics follow SPEC §3-§4 (the official ``get_audio_feature`` + ``test``):

* ``to_mono_16k``: channel mean, then soxr at librosa's default quality (what
  ``librosa.load(path, sr=16000)`` does), length fixed to ``ceil(T * 16000 / sr)``.
* ``log_mel``: 30 s chunks, each through the whisper feature extractor on its own.
* ``whisper_hidden_states``: the encoder over 3000-frame windows, every hidden state kept.
* ``pad_features``: crop to ``2 * audio_len`` positions, zero padding 4/6 and 24/26.
* ``token_windows`` / ``bucket_windows``: the 10- and 50-position window of each frame.
* ``audio_tokens``: audio2token in float32, in batches of frames (bounded memory).
* ``encode_audio``: the whole chain, what SonicWhisperAudioEncode calls.

Devices and dtypes are arguments; nothing here picks one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .config import (
    BUCKET_PAD_AFTER,
    BUCKET_PAD_BEFORE,
    BUCKET_WINDOW,
    AUDIO_MAX_PEAK,
    DECODE_MARGIN_S,
    FRAME_STEP,
    GENERATED_FPS,
    MAX_AUDIO_CHANNELS,
    MIN_AUDIO_SECONDS,
    MIN_SAMPLE_RATE,
    N_MEL_FRAMES,
    N_SAMPLES_CHUNK,
    N_WHISPER_POSITIONS,
    POSITIONS_PER_25FPS_FRAME,
    RESAMPLE_QUALITY,
    SAMPLE_RATE,
    SAMPLES_PER_25FPS_FRAME,
    TOKEN_BATCH_FRAMES,
    TOKEN_PAD_AFTER,
    TOKEN_PAD_BEFORE,
    TOKEN_WINDOW,
    WINDOW_STRIDE,
)

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None]  # callback(done, total); may raise to cancel


@dataclass
class SonicAudio:
    """What SonicWhisperAudioEncode hands on (type SONIC_AUDIO).

    Padded whisper features (SPEC §4.2) and the audio tokens of every generated frame.
    """

    token_features: torch.Tensor  # [2*audio_len + 10, L+1, d] float32, zero padded 4 / 6 (audio_prompts)
    bucket_features: torch.Tensor  # [2*audio_len + 50, 1, d] float32, padded 24 / 26 (last_audio_prompts)
    cond_tokens: torch.Tensor  # [F, K, D] audio2token of each frame's window, UNet dtype
    uncond_tokens: torch.Tensor  # [K, D] audio2token of an all-zero window (same for every frame)
    num_frames: int  # F = audio_len // FRAME_STEP generated frames
    audio_len: int  # 25 fps frames covered (after the cap)
    fps: float  # generated frame rate (12.5)
    waveform: torch.Tensor  # [1, C, T] source audio (trimmed to the cap), for muxing
    sample_rate: int  # Hz of ``waveform``

    @property
    def duration(self) -> float:
        """Seconds of video the frames cover."""
        return self.num_frames / self.fps

    def token_windows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Token windows of frames ``start:stop``: ``[n, 10, L+1, d]`` (see ``token_windows``)."""
        return token_windows(self.token_features, start, self.num_frames if stop is None else stop)

    def bucket_windows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Bucket windows of frames ``start:stop``: ``[n, 50, 1, d]`` (see ``bucket_windows``)."""
        return bucket_windows(self.bucket_features, start, self.num_frames if stop is None else stop)


# ----------------------------------------------------------------------------------------------
# Validation and frame counts
# ----------------------------------------------------------------------------------------------
def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM -> float32 in [-1, 1): signed ``x / 2**(bits-1)``, unsigned ``(x - mid) / mid``.

    8-bit WAV is unsigned (silence = 128), 16/24/32-bit PCM is signed. Float input is returned
    as float32 unchanged.
    """
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    if samples.dtype.kind == "b":
        raise ValueError("audio samples are booleans; give PCM or float samples")
    info = np.iinfo(samples.dtype)
    if samples.dtype.kind == "u":
        mid = (int(info.max) + 1) // 2  # 128 for uint8
        return ((samples.astype(np.float64) - mid) / mid).astype(np.float32)
    return (samples.astype(np.float64) / -float(info.min)).astype(np.float32)  # / 32768 for int16


def float_waveform(waveform):
    """The one rule for AUDIO samples, used by every node that takes AUDIO (Whisper Audio Encode,
    Video Combine, Latent To Video): a floating-point waveform is returned as it is; integer PCM
    (int16, int32, uint8, ... from a torch tensor or a numpy array) becomes float32 by
    ``pcm_to_float``; booleans are refused. Returns a torch tensor (a numpy array: converted)."""
    if isinstance(waveform, torch.Tensor):
        if waveform.is_floating_point():
            return waveform
        if waveform.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"audio samples are {str(waveform.dtype).removeprefix('torch.')}; give PCM or float "
                             "samples")
        raw = waveform.detach().to("cpu").numpy()
    elif isinstance(waveform, np.ndarray):
        raw = waveform
    else:
        raise ValueError(f"audio waveform must be a torch.Tensor [B, C, T], got {type(waveform).__name__}")
    if raw.dtype.kind not in "iuf" and raw.dtype.kind != "b":
        raise ValueError(f"audio samples are {raw.dtype}; give PCM or float samples")
    if raw.dtype.kind in "iu":
        log.info("audio is %s PCM: converted to float", raw.dtype)
    return torch.from_numpy(np.ascontiguousarray(pcm_to_float(raw)))


STANDARD_LAYOUT = "[B, C, T]"


def standard_waveform(waveform, what: str = "audio") -> tuple[torch.Tensor, str]:
    """Any AUDIO waveform layout the nodes of ComfyUI's ecosystem produce -> ``([B, C, T] float,
    layout)``, the layout named as it came: ``[B, C, T]`` (ComfyUI's), ``[B, T, C]`` (channels-last:
    a last axis of at most MAX_AUDIO_CHANNELS beside a longer one), ``[C, T]``, ``[T, C]``, ``[T]``
    (mono, no channel axis). Integer PCM becomes float (``float_waveform``). Any other shape is a
    ValueError naming the shape and ``what``."""
    wave = float_waveform(waveform)
    shape, n = tuple(wave.shape), MAX_AUDIO_CHANNELS
    if wave.dim() == 1:
        return wave[None, None], "[T] (mono, no channel axis)"  # [T] -> [1, 1, T]
    if wave.dim() == 2:
        if shape[0] > n and shape[1] <= n:
            return wave.t()[None], "[T, C] (channels-last, no batch axis)"  # [T, C] -> [1, C, T]
        if shape[0] <= n:
            return wave[None], "[C, T] (no batch axis)"  # [C, T] -> [1, C, T]
    if wave.dim() == 3:
        if shape[1] > n and shape[2] <= n:
            return wave.transpose(1, 2), "[B, T, C] (channels-last)"  # [B, T, C] -> [B, C, T]
        if shape[1] <= n:
            return wave, STANDARD_LAYOUT
    raise ValueError(f"{what}: waveform shape {shape} is not an audio layout this pack reads: [B, C, T] "
                     f"(ComfyUI's), [B, T, C], [C, T], [T, C] or [T], with at most {n} channels; check the "
                     "node that produced the AUDIO")


def layout_note(layout: str, shape) -> str:
    """" (waveform shape (..), read as layout)" for errors about a waveform; "" for ComfyUI's own."""
    return f" (waveform shape {tuple(shape)}, read as {layout})"


def check_samples(wave: torch.Tensor, sample_rate: float, what: str = "audio") -> None:
    """Refuse NaN / inf samples and float samples beyond ``AUDIO_MAX_PEAK`` (not normalised audio:
    full scale is 1.0), naming ``what`` (the file or the input) and where the first one is."""
    bad = ~torch.isfinite(wave)
    if bool(bad.any()):
        where = int(bad.reshape(-1, wave.shape[-1]).nonzero()[0, 1])  # [rows, T] -> first bad sample
        raise ValueError(f"{what} has {int(bad.sum())} NaN or inf samples (first at sample {where}, "
                         f"{where / sample_rate:.3f} s); the audio is corrupt: clean or re-export it")
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak > AUDIO_MAX_PEAK:
        raise ValueError(f"{what} has samples of magnitude {peak:.3g}, beyond {AUDIO_MAX_PEAK:g} (audio "
                         "samples are within -1..1 at full scale): the audio is not normalised or is "
                         "corrupt; re-export it as normal PCM or float audio")


def check_sample_rate(sample_rate, what: str = "audio") -> None:
    """Raise unless ``sample_rate`` is a finite number of Hz of at least ``MIN_SAMPLE_RATE``."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)) \
            or not math.isfinite(sample_rate) or sample_rate <= 0:
        raise ValueError(f"{what} sample_rate must be a positive number of Hz, got {sample_rate!r}; "
                         "check the node that produced the AUDIO")
    if sample_rate < MIN_SAMPLE_RATE:
        raise ValueError(f"{what} sample_rate is {sample_rate:g} Hz, below the {MIN_SAMPLE_RATE} Hz minimum "
                         "(speech needs at least telephone quality, 8000 Hz); the rate is probably wrong: "
                         "check the node or file that produced the AUDIO, or resample it")


def check_waveform(waveform: torch.Tensor, sample_rate: float) -> torch.Tensor:
    """Validate a ComfyUI-style waveform and return it as ``[C, T]`` float (``float_waveform``).

    Accepts every layout ``standard_waveform`` reads (``[B, C, T]``, ``[B, T, C]``, ``[C, T]``,
    ``[T, C]``, ``[T]``); raises ValueError naming the bad value and the layout otherwise.
    """
    original = tuple(getattr(waveform, "shape", ()))
    waveform, layout = standard_waveform(waveform)  # [B, C, T] float
    note = layout_note(layout, original)
    check_sample_rate(sample_rate)
    if waveform.shape[0] != 1:
        raise ValueError(f"audio batch size is {waveform.shape[0]}{note}; Sonic animates one track: pass a "
                         "single clip (batch 1)")
    waveform = waveform[0]  # [C, T]
    if waveform.shape[0] == 0 or waveform.shape[1] == 0:
        raise ValueError(f"audio is empty{note}; load a clip with sound")
    check_samples(waveform, sample_rate)
    seconds = waveform.shape[1] / sample_rate
    if seconds < MIN_AUDIO_SECONDS:
        raise ValueError(f"audio is {seconds * 1000:.1f} ms long ({waveform.shape[1]} samples at "
                         f"{sample_rate:g} Hz{note}); at least {MIN_AUDIO_SECONDS * 1000:.0f} ms (one video "
                         "frame) is needed")
    return waveform


def frame_cap(max_seconds: float) -> int:
    """25 fps frames ``max_seconds`` allows (the official ``frame_num``); ValueError for a bad cap."""
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) \
            or not math.isfinite(max_seconds) or max_seconds < 0:
        raise ValueError(f"max_seconds must be 0 (all) or a positive number of seconds, got {max_seconds!r}")
    # 40 ms frames; rounding to 1e-6 frame first keeps 8.04 s -> 201 (8.04 * 25 = 200.99999999999997)
    return math.floor(round(max_seconds * SAMPLE_RATE / SAMPLES_PER_25FPS_FRAME, 6))


def source_samples_needed(max_seconds: float, sample_rate: float) -> int | None:
    """Source samples (at ``sample_rate``) a run capped at ``max_seconds`` reads; None: all (no cap).

    The capped frames, rounded up to whole 30 s whisper chunks (each chunk is encoded whole, so a
    capped run's values equal an uncapped one's), plus DECODE_MARGIN_S for the resampler's filter.
    """
    if not max_seconds:
        return None
    positions = POSITIONS_PER_25FPS_FRAME * frame_cap(max_seconds)  # whisper positions the frames use
    chunks = max(1, -(-positions // N_WHISPER_POSITIONS))
    return math.ceil((chunks * N_SAMPLES_CHUNK / SAMPLE_RATE + DECODE_MARGIN_S) * sample_rate)


def frame_counts(num_samples_16k: int, max_seconds: float = 0.0) -> tuple[int, int]:
    """``(audio_len, num_frames)`` for a 16 kHz waveform of ``num_samples_16k`` samples.

    ``audio_len = floor(num_samples / 640)`` 25 fps frames, capped like the official
    ``frame_num`` at ``floor(max_seconds * 25)`` when ``max_seconds > 0``;
    ``num_frames = audio_len // 2`` generated frames (SPEC §3, §4.3).
    """
    cap = frame_cap(max_seconds)  # validates max_seconds
    audio_len = num_samples_16k // SAMPLES_PER_25FPS_FRAME
    if max_seconds > 0:
        audio_len = min(audio_len, cap)
    num_frames = audio_len // FRAME_STEP
    if num_frames < 1:
        limit = f" (max_seconds {max_seconds:g})" if max_seconds > 0 else ""
        raise ValueError(f"audio covers {audio_len * SAMPLES_PER_25FPS_FRAME / SAMPLE_RATE * 1000:.0f} ms"
                         f"{limit}, less than one video frame ({MIN_AUDIO_SECONDS * 1000:.0f} ms); "
                         "use a longer clip or a larger max_seconds")
    return audio_len, num_frames


# ----------------------------------------------------------------------------------------------
# Waveform -> log-mel
# ----------------------------------------------------------------------------------------------
def to_mono_16k(waveform: torch.Tensor, sample_rate: float) -> np.ndarray:
    """``[C, T]`` or ``[1, C, T]`` at ``sample_rate`` -> mono float32 ``[T16]`` at 16 kHz.

    Same steps as ``librosa.load(path, sr=16000)`` (librosa 0.10): float32 channel mean, soxr
    at librosa's ``soxr_hq`` quality, then the length fixed to ``ceil(T * 16000 / sr)``
    (zero padded or trimmed) with librosa's float ratio.
    """
    import soxr

    wav = check_waveform(waveform, sample_rate)
    x = wav.detach().to("cpu", torch.float32).numpy()  # [C, T]
    mono = x[0] if x.shape[0] == 1 else np.mean(x, axis=0)  # [T] float32, librosa.to_mono
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if sample_rate == SAMPLE_RATE:
        return mono
    n_out = int(np.ceil(mono.shape[0] * (float(SAMPLE_RATE) / sample_rate)))  # librosa's fix length
    y = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)  # [~n_out] float32
    if y.shape[0] >= n_out:
        return np.ascontiguousarray(y[:n_out], dtype=np.float32)
    return np.concatenate([y, np.zeros(n_out - y.shape[0], dtype=np.float32)])  # [n_out]


def num_chunks(num_samples: int) -> int:
    """30 s feature-extractor chunks covering ``num_samples`` (the last one may be short)."""
    return max(1, -(-num_samples // N_SAMPLES_CHUNK))


def log_mel(wave16k: np.ndarray, feature_extractor: Any, callback: Callback | None = None) -> torch.Tensor:
    """Whisper log-mel of a 16 kHz waveform: ``[80, 3000 * n_chunks]`` float32 (SPEC §3).

    The waveform is cut into 480000-sample chunks; each goes through the feature extractor on
    its own (zero padded to 30 s; the ``max - 8`` floor is per chunk). Memory per call: one chunk.
    """
    n = num_chunks(len(wave16k))
    feats = []
    for c in range(n):
        chunk = wave16k[c * N_SAMPLES_CHUNK:(c + 1) * N_SAMPLES_CHUNK]
        out = feature_extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        f = out["input_features"][0].to(torch.float32)  # [1, 80, 3000] -> [80, 3000]
        if f.shape[-1] != N_MEL_FRAMES:
            raise ValueError(f"the whisper feature extractor returned {f.shape[-1]} mel frames for a 30 s "
                             f"chunk, expected {N_MEL_FRAMES}; use the whisper-tiny preprocessor_config.json")
        feats.append(f)
        if callback is not None:
            callback(c + 1, n)
    return torch.cat(feats, dim=-1)  # [80, 3000 * n_chunks]


# ----------------------------------------------------------------------------------------------
# Log-mel -> whisper hidden states
# ----------------------------------------------------------------------------------------------
def _check_features(features: torch.Tensor) -> int:
    total = features.shape[-1] // N_MEL_FRAMES
    if features.dim() != 2 or features.shape[-1] != total * N_MEL_FRAMES or total == 0:
        raise ValueError(f"features must be [n_mels, {N_MEL_FRAMES} * n], got {tuple(features.shape)}")
    return total


@torch.no_grad()
def _encoder_windows(encoder: torch.nn.Module, features: torch.Tensor, n: int,
                     callback: Callback | None = None):
    """Yield ``(hidden [1500, L+1, d], last [1500, 1, d])`` of the first ``n`` 3000-frame windows."""
    p = next(encoder.parameters())
    for w in range(n):
        x = features[:, w * N_MEL_FRAMES:(w + 1) * N_MEL_FRAMES]  # [80, 3000]
        x = x[None].to(device=p.device, dtype=p.dtype)  # [1, 80, 3000]
        out = encoder(x, output_hidden_states=True)
        hs = torch.stack(out.hidden_states, dim=2)[0]  # L+1 x [1, 1500, d] -> [1500, L+1, d]
        lhs = out.last_hidden_state[0, :, None]  # [1, 1500, d] -> [1500, 1, d]
        del out
        yield hs, lhs
        if callback is not None:
            callback(w + 1, n)


def whisper_hidden_states(encoder: torch.nn.Module, features: torch.Tensor, windows: int | None = None,
                          out_device: torch.device | None = None,
                          callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder over 3000-frame windows (SPEC §4.1).

    ``features`` ``[80, 3000*n]`` -> ``hidden [1500*w, L+1, d]`` (every hidden state: the conv
    stem + positions, each layer's output, the last one after the final LayerNorm) and
    ``last [1500*w, 1, d]`` (= ``last_hidden_state``, which equals ``hidden[:, -1:]``), float32 on
    ``out_device`` (default: the features' device). ``windows`` limits how many windows run
    (the ones a frame cap needs); default all.
    """
    total = _check_features(features)
    n = total if windows is None else min(windows, total)
    out_device = features.device if out_device is None else out_device
    hidden, last = [], []
    for hs, lhs in _encoder_windows(encoder, features, n, callback):
        hidden.append(hs.to(out_device, torch.float32))
        last.append(lhs.to(out_device, torch.float32))
    return torch.cat(hidden, dim=0), torch.cat(last, dim=0)  # [1500*n, L+1, d], [1500*n, 1, d]


def padded_features(encoder: torch.nn.Module, features: torch.Tensor, audio_len: int,
                    out_device: torch.device | None = None,
                    callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pad_features(*whisper_hidden_states(...), audio_len)`` without the intermediate copies.

    Runs only the windows ``audio_len`` needs and writes each one straight into the padded
    buffers, so peak memory is the padded features plus one window.
    """
    total = _check_features(features)
    n_pos = POSITIONS_PER_25FPS_FRAME * audio_len
    n = -(-n_pos // N_WHISPER_POSITIONS)
    if n > total:
        raise ValueError(f"{total} whisper window(s) cannot cover audio_len {audio_len} ({n_pos} positions)")
    out_device = features.device if out_device is None else out_device
    tok = buck = None
    for w, (hs, lhs) in enumerate(_encoder_windows(encoder, features, n, callback)):
        if tok is None:
            tok = torch.zeros((TOKEN_PAD_BEFORE + n_pos + TOKEN_PAD_AFTER, *hs.shape[1:]),
                              dtype=torch.float32, device=out_device)  # [2a+10, L+1, d]
            buck = torch.zeros((BUCKET_PAD_BEFORE + n_pos + BUCKET_PAD_AFTER, *lhs.shape[1:]),
                               dtype=torch.float32, device=out_device)  # [2a+50, 1, d]
        s = w * N_WHISPER_POSITIONS
        k = min(N_WHISPER_POSITIONS, n_pos - s)  # positions of this window that are kept
        tok[TOKEN_PAD_BEFORE + s:TOKEN_PAD_BEFORE + s + k] = hs[:k]
        buck[BUCKET_PAD_BEFORE + s:BUCKET_PAD_BEFORE + s + k] = lhs[:k]
    return tok, buck


def pad_features(hidden: torch.Tensor, last: torch.Tensor,
                 audio_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop to ``2 * audio_len`` positions and zero pad (SPEC §4.2).

    ``hidden [P, L+1, d]`` -> ``[4 + 2*audio_len + 6, L+1, d]`` (audio_prompts);
    ``last [P, 1, d]`` -> ``[24 + 2*audio_len + 26, 1, d]`` (last_audio_prompts).
    """
    n = POSITIONS_PER_25FPS_FRAME * audio_len
    if hidden.shape[0] < n or last.shape[0] < n:
        raise ValueError(f"{hidden.shape[0]} whisper positions cannot cover audio_len {audio_len} "
                         f"({n} positions)")
    tok = hidden.new_zeros((TOKEN_PAD_BEFORE + n + TOKEN_PAD_AFTER, *hidden.shape[1:]))  # [n+10, L+1, d]
    tok[TOKEN_PAD_BEFORE:TOKEN_PAD_BEFORE + n] = hidden[:n]
    buck = last.new_zeros((BUCKET_PAD_BEFORE + n + BUCKET_PAD_AFTER, *last.shape[1:]))  # [n+50, 1, d]
    buck[BUCKET_PAD_BEFORE:BUCKET_PAD_BEFORE + n] = last[:n]
    return tok, buck


def _windows(padded: torch.Tensor, size: int, start: int, stop: int, what: str) -> torch.Tensor:
    """Rows ``[4i, 4i + size)`` of ``padded`` for frames ``i = start..stop-1``: ``[n, size, ...]``."""
    count = (padded.shape[0] - size) // WINDOW_STRIDE + 1
    if not 0 <= start <= stop <= count:
        raise IndexError(f"{what} windows {start}:{stop} out of range 0:{count}")
    if stop == start:
        return padded.new_zeros((0, size, *padded.shape[1:]))
    part = padded[WINDOW_STRIDE * start:WINDOW_STRIDE * (stop - 1) + size]  # rows these frames need
    view = part.unfold(0, size, WINDOW_STRIDE)  # [n, *rest, size] view (no copy)
    return view.movedim(-1, 1)  # [n, size, *rest] view


def token_windows(token_features: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """audio2token inputs of frames ``start:stop``: ``[n, 10, L+1, d]`` (a view; SPEC §4.3).

    Frame ``i`` sees padded rows ``[4i, 4i+10)`` = unpadded positions ``[4i-4, 4i+6)``.
    """
    return _windows(token_features, TOKEN_WINDOW, start, stop, "token")


def bucket_windows(bucket_features: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """audio2bucket inputs of frames ``start:stop``: ``[n, 50, 1, d]`` (a view; SPEC §4.3).

    Frame ``i`` sees padded rows ``[4i, 4i+50)`` = unpadded positions ``[4i-24, 4i+26)``.
    """
    return _windows(bucket_features, BUCKET_WINDOW, start, stop, "bucket")


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def audio_tokens(audio2token: torch.nn.Module, token_features: torch.Tensor, num_frames: int,
                 dtype: torch.dtype, out_device: torch.device | None = None,
                 batch_frames: int = TOKEN_BATCH_FRAMES,
                 callback: Callback | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """audio2token of every frame's window and of an all-zero window (SPEC §4.4).

    Runs in the module's dtype (float32 officially) ``batch_frames`` frames at a time, so only
    one batch of windows is ever materialised. Returns ``cond [F, K, D]`` and ``uncond [K, D]``
    in ``dtype`` on ``out_device`` (default: the features' device).
    """
    out_device = token_features.device if out_device is None else out_device
    p = next(audio2token.parameters())
    batches = max(1, -(-num_frames // batch_frames))
    zero = torch.zeros((1, TOKEN_WINDOW, *token_features.shape[1:]),
                       dtype=p.dtype, device=p.device)  # [1, 10, L+1, d]
    uncond = audio2token(zero)[0].to(out_device, dtype)  # [K, D]
    cond = torch.empty((num_frames, *uncond.shape), dtype=dtype, device=out_device)  # [F, K, D]
    for b in range(batches):
        s, e = b * batch_frames, min(num_frames, (b + 1) * batch_frames)
        win = token_windows(token_features, s, e).to(device=p.device, dtype=p.dtype)  # [n, 10, L+1, d] copy
        cond[s:e] = audio2token(win).to(out_device, dtype)  # [n, K, D]
        if callback is not None:
            callback(b + 1, batches)
    return cond, uncond


# ----------------------------------------------------------------------------------------------
# The whole chain
# ----------------------------------------------------------------------------------------------
class _Stages:
    """Maps per-stage ``callback(done, total)`` calls onto one overall ``callback(done, total)``."""

    def __init__(self, callback: Callback | None, sizes: list[int]):
        self.callback, self.sizes = callback, sizes

    def stage(self, i: int) -> Callback | None:
        if self.callback is None:
            return None
        base, total = sum(self.sizes[:i]), sum(self.sizes)
        return lambda done, _n: self.callback(base + done, total)


def trim_waveform(waveform: torch.Tensor, sample_rate: float, audio_len: int) -> torch.Tensor:
    """Source audio ``[1, C, T]`` cut to ``audio_len`` 25 fps frames (used when a cap applies)."""
    wav = waveform if waveform.dim() == 3 else waveform[None]  # [C, T] -> [1, C, T]
    keep = round(audio_len * SAMPLES_PER_25FPS_FRAME * sample_rate / SAMPLE_RATE)
    return wav[..., :keep] if keep < wav.shape[-1] else wav


def encode_audio(models: Any, waveform: torch.Tensor, sample_rate: float, max_seconds: float = 0.0,
                 callback: Callback | None = None, out_device: torch.device | None = None) -> SonicAudio:
    """ComfyUI-style audio -> SonicAudio (features, tokens, frame count), SPEC §3-§4.

    ``models`` is a SonicModels: ``models.load("whisper")`` / ``load("audio2token")`` give the
    modules on their compute device; ``feature_extractor`` makes the log-mel; tokens are stored
    in ``models.dtype`` on ``out_device`` (default: the waveform's device), features in float32.
    ``max_seconds > 0`` caps the frames like the official ``frame_num``; only the 30 s chunks
    the capped frames need are encoded (each still sees its full 30 s, so values are unchanged).
    ``callback(done, total)`` is called after every chunk, whisper window and token batch.
    """
    from .budget import DEVICE, HOST, MemoryEstimate, add_audio, check_fits

    from .config import check_inputs

    max_seconds = check_inputs({"max_seconds": max_seconds})["max_seconds"]  # the node's range, NaN refused
    # any layout (Video Combine's rule too), checked as it came so errors name that layout
    waveform = check_waveform(waveform, sample_rate)[None]  # [C, T] -> [1, C, T] float
    out_device = waveform.device if out_device is None else out_device
    n16 = int(np.ceil(waveform.shape[-1] * (float(SAMPLE_RATE) / sample_rate)))
    check_fits(add_audio(MemoryEstimate(frame_counts(n16, max_seconds)[1]), models.dtype,
                         HOST if torch.device(out_device).type == "cpu" else DEVICE),
               out_device, "Whisper Audio Encode")  # before anything of that size is allocated
    wave16k = to_mono_16k(waveform, sample_rate)  # [T16] float32
    audio_len, num_frames = frame_counts(len(wave16k), max_seconds)
    capped = audio_len < len(wave16k) // SAMPLES_PER_25FPS_FRAME
    needed = -(-POSITIONS_PER_25FPS_FRAME * audio_len // N_WHISPER_POSITIONS)  # 30 s windows the frames need
    wave16k = wave16k[:needed * N_SAMPLES_CHUNK]
    batches = max(1, -(-num_frames // TOKEN_BATCH_FRAMES))
    stages = _Stages(callback, [needed, needed, batches])
    log.info("audio: %.2f s at 16 kHz, audio_len %d, %d frames, %d whisper window(s)",
             len(wave16k) / SAMPLE_RATE, audio_len, num_frames, needed)

    features = log_mel(wave16k, models.feature_extractor, stages.stage(0))  # [80, 3000*needed]
    del wave16k
    encoder = models.load("whisper")
    token_features, bucket_features = padded_features(  # [2a+10, L+1, d], [2a+50, 1, d]
        encoder, features, audio_len, out_device, stages.stage(1))
    del features
    audio2token = models.load("audio2token")
    cond, uncond = audio_tokens(audio2token, token_features, num_frames, models.dtype, out_device,
                                callback=stages.stage(2))
    wav = waveform[:1]  # [1, C, T] (check_waveform refused a batch of several)
    return SonicAudio(
        token_features=token_features,
        bucket_features=bucket_features,
        cond_tokens=cond,
        uncond_tokens=uncond,
        num_frames=num_frames,
        audio_len=audio_len,
        fps=GENERATED_FPS,
        waveform=trim_waveform(wav, sample_rate, audio_len) if capped else wav,
        sample_rate=int(sample_rate),
    )
