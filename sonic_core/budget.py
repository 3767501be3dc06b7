"""What a run's main tensors cost, said before running; runs that cannot fit are refused.

The tensors whose size grows with the audio's length or the working size (the models are
counted by their loaders and ComfyUI, not here):

* SONIC_AUDIO: whisper features of every position (float32) and the audio tokens of every frame
  (``[F, 32, 1024]`` in the UNet dtype), plus the 16 kHz waveform and log-mel while encoding.
* Sampler: the seeded noise and the returned latents (float32, host), the latents in the UNet
  dtype (updated in place; the step's accumulator only holds the frames several windows share)
  and the audio tokens on the compute device.
* Decode: one temporal-decoder chunk of float32 frames and its RIFE output.
* Paste-back (issue 29): frames at the photo's own size. Reading the photo (``check_image_read``,
  from the file's header, before its pixels are decoded); per output frame one pasted float32
  frame, its float32 / uint8 / yuv copies for the encoder and the frames x264 holds in its
  look-ahead (``add_paste``, counted by the CLI's estimate and Latent To Video before any model
  loads or anything decodes); Sonic Paste Back's whole IMAGE batch (``check_paste_batch``).

The figures are lower bounds (activations are not counted), so a refusal is certain: the run's
tensors alone do not fit. Host memory is MemAvailable of /proc/meminfo, bounded by the cgroup
limit of a container (``os.sysconf`` where /proc is absent); device memory is CUDA's free memory.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from .config import (
    AUDIO2TOKEN_BLOCKS,
    AUDIO_TOKENS,
    BUCKET_PAD_AFTER,
    BUCKET_PAD_BEFORE,
    CROSS_ATTENTION_DIM,
    FRAME_STEP,
    GENERATED_FPS,
    HOP_LENGTH,
    LATENT_CHANNELS,
    N_MELS,
    POSITIONS_PER_25FPS_FRAME,
    SAMPLE_RATE,
    TOKEN_PAD_AFTER,
    TOKEN_PAD_BEFORE,
    VAE_SCALE,
    WHISPER_DIM,
    X264_LARGE_FRAME_PIXELS,
    X264_LARGE_LOOKAHEAD,
    X264_LOOKAHEAD,
    X264_PIPELINE_FRAMES,
)

log = logging.getLogger(__name__)

FLOAT32_BYTES = 4
RGB_CHANNELS = 3
MEMINFO = "/proc/meminfo"
CGROUP_V2 = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current")
CGROUP_V1 = ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
KIB = 1024
GIB = 2**30
HOST, DEVICE = "host", "device"
YUV420_BYTES = 1.5  # bytes per pixel of a yuv420p frame (8-bit luma, chroma at a quarter)
# measured (bench/RESULTS.md, issue 29): x264 holds ~3.1-3.3 bytes a pixel for every frame in flight (the yuv
# frame and its half-resolution look-ahead planes), for at least the frames of its rc-lookahead
ENCODER_BYTES_PER_PIXEL = 3.0  # bytes per pixel of one frame held by the encoder (a floor)
# reading a photo (pipeline.read_image): at least its RGB uint8 pixels and their float32 copy
IMAGE_READ_BYTES_PER_PIXEL = RGB_CHANNELS * (1 + FLOAT32_BYTES)
PASTE_ADVICE = ("give a smaller photo (downscale it: the face crop is taken from it, and the video has its size), "
                "or leave paste-back out (the crop video) and free memory")


class MemoryBudgetError(ValueError):
    """The run's main tensors alone need more memory than the host or the device has free."""


@dataclass
class MemoryEstimate:
    """Bytes of a run's main tensors, by name, each on the host or the compute device."""

    frames: int
    size: tuple[int, int] | None = None  # (w, h) px working size, when known
    parts: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (bytes, HOST / DEVICE)
    photo_size: tuple[int, int] | None = None  # (w, h) px of the photo pasted into, when pasting back

    def add(self, name: str, nbytes: float, where: str) -> None:
        self.parts[name] = (int(nbytes), where)

    def total(self, where: str) -> int:
        return sum(b for b, w in self.parts.values() if w == where)

    def describe(self, where: str | None = None) -> str:
        return ", ".join(f"{name} {_size(b)}" for name, (b, w) in self.parts.items()
                         if where is None or w == where)


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------
def add_audio(est: MemoryEstimate, token_dtype: torch.dtype, where: str = HOST) -> MemoryEstimate:
    """SONIC_AUDIO of ``est.frames`` frames (tokens in ``token_dtype``) and the encoding's buffers."""
    f = est.frames
    positions = POSITIONS_PER_25FPS_FRAME * FRAME_STEP * f  # whisper positions of the frames
    features = ((positions + TOKEN_PAD_BEFORE + TOKEN_PAD_AFTER) * AUDIO2TOKEN_BLOCKS * WHISPER_DIM
                + (positions + BUCKET_PAD_BEFORE + BUCKET_PAD_AFTER) * WHISPER_DIM) * FLOAT32_BYTES
    est.add(f"audio tokens ({_dtype_name(token_dtype)})",
            f * AUDIO_TOKENS * CROSS_ATTENTION_DIM * _bytes(token_dtype), where)
    est.add("whisper features", features, where)
    seconds = f / GENERATED_FPS
    est.add("16 kHz audio and log-mel while encoding",
            seconds * SAMPLE_RATE * FLOAT32_BYTES * (1 + N_MELS / HOP_LENGTH), HOST)
    return est


def add_source_audio(est: MemoryEstimate, num_samples: int, channels: int) -> MemoryEstimate:
    """The decoded source waveform (float32, every channel at its own rate), held for muxing."""
    est.add("source audio (float32)", num_samples * channels * FLOAT32_BYTES, HOST)
    return est


def add_sampler(est: MemoryEstimate, size: tuple[int, int], dtype: torch.dtype,
                on_device: bool) -> MemoryEstimate:
    """The sampler's noise, latents and start at the working ``size = (w, h)`` px (its step
    accumulator only holds the frames several windows share: under one window, not counted)."""
    est.size = size
    latent = est.frames * LATENT_CHANNELS * (size[0] // VAE_SCALE) * (size[1] // VAE_SCALE)  # elements
    compute = DEVICE if on_device else HOST
    est.add("noise and returned latents (float32)", 2 * latent * FLOAT32_BYTES, HOST)
    est.add(f"latents ({_dtype_name(dtype)}) + float32 start",
            latent * (_bytes(dtype) + FLOAT32_BYTES), compute)
    if on_device:
        est.add(f"audio tokens on the device ({_dtype_name(dtype)})",
                est.frames * AUDIO_TOKENS * CROSS_ATTENTION_DIM * _bytes(dtype), DEVICE)
    return est


def add_decode(est: MemoryEstimate, size: tuple[int, int], chunk: int,
               rife_multiplier: int) -> MemoryEstimate:
    """One decoded chunk of float32 frames and what RIFE makes of it."""
    frame = size[0] * size[1] * RGB_CHANNELS * FLOAT32_BYTES
    est.add(f"decoded frames (one chunk of {chunk})", chunk * frame * (1 + max(rife_multiplier, 1)), HOST)
    return est


def add_paste(est: MemoryEstimate, photo_size: tuple[int, int], output_frames: int,
              encoder: bool = True) -> MemoryEstimate:
    """Paste-back into a photo of ``photo_size = (w, h)`` px: one pasted float32 frame, its float32,
    uint8 and yuv copies for the encoder and (``encoder``: x264) the frames its look-ahead holds, up to
    its rc-lookahead and pipeline of the ``output_frames``. The photo itself is not counted: it is read
    already (the CLI) or held by ComfyUI (the nodes)."""
    est.photo_size = tuple(photo_size)
    pixels = photo_size[0] * photo_size[1]
    frame = pixels * RGB_CHANNELS * FLOAT32_BYTES
    est.add("paste-back frame and its encoder copies (float32, uint8, yuv)",
            2 * frame + pixels * (RGB_CHANNELS + YUV420_BYTES), HOST)
    if encoder:
        lookahead = X264_LARGE_LOOKAHEAD if pixels > X264_LARGE_FRAME_PIXELS else X264_LOOKAHEAD  # video.py's choice
        held = min(max(output_frames, 1), lookahead + X264_PIPELINE_FRAMES)
        est.add(f"encoder look-ahead ({held} frames at the photo's size)", held * pixels * ENCODER_BYTES_PER_PIXEL,
                HOST)
    return est


# ----------------------------------------------------------------------------------------------
# What is free
# ----------------------------------------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def host_available_bytes() -> int | None:
    """Memory new allocations can get: MemAvailable, bounded by a container's cgroup limit (None: unknown)."""
    avail = None
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * KIB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # Windows, macOS without the names
            avail = None
    for limit_file, usage_file in (CGROUP_V2, CGROUP_V1):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:  # v1 says "no limit" with ~2**63
            room = max(limit - usage, 0)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def device_free_bytes(device: torch.device | str | None) -> int | None:
    """Free bytes on a CUDA device (free memory plus what torch's cache holds unused); None otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _photo_bytes(est: MemoryEstimate) -> int:
    return sum(b for name, (b, w) in est.parts.items() if w == HOST and name.startswith(("paste-back", "encoder")))


# ----------------------------------------------------------------------------------------------
# The guard
# ----------------------------------------------------------------------------------------------
def check_image_read(width: int, height: int, what: str, host_free: int | None = None) -> None:
    """Refuse, from its header, a ``width`` x ``height`` image whose pixels and their float32 copy
    cannot fit the free host memory (before Pillow decodes it)."""
    need = width * height * IMAGE_READ_BYTES_PER_PIXEL
    free = host_available_bytes() if host_free is None else host_free
    if free is not None and need > free:
        raise MemoryBudgetError(
            f"{what} is {width}x{height} px ({width * height / 1e6:.0f} MP): reading it needs at least "
            f"{_size(need)} of host memory (RGB pixels and their float32 copy), but {_size(free)} is free: "
            "downscale it (the model works at 512 px; a photo of a few megapixels keeps paste-back sharp) or "
            "free memory")


def check_paste_stream(photo_size: tuple[int, int], output_frames: int, what: str = "Latent To Video",
                       encoder: bool = True, host_free: int | None = None) -> MemoryEstimate:
    """Refuse a streamed paste-back into a ``photo_size = (w, h)`` photo (``add_paste``) whose
    photo-sized buffers cannot fit the free host memory, before anything decodes."""
    est = add_paste(MemoryEstimate(output_frames), photo_size, output_frames, encoder)
    need = est.total(HOST)
    free = host_available_bytes() if host_free is None else host_free
    log.info("%s: paste-back into the %dx%d photo needs %s of host memory (%s)", what, *photo_size, _size(need),
             est.describe())
    if free is not None and need > free:
        raise MemoryBudgetError(
            f"{what} cannot fit: pasting back into the {photo_size[0]}x{photo_size[1]} photo needs at least "
            f"{_size(need)} of host memory ({est.describe()}), but {_size(free)} is free: {PASTE_ADVICE}")
    return est


def check_paste_batch(frames: int, photo_size: tuple[int, int], device: torch.device | str | None,
                      what: str = "Sonic Paste Back", host_free: int | None = None,
                      device_free: int | None = None) -> None:
    """Refuse an IMAGE batch of ``frames`` float32 frames at ``photo_size = (w, h)`` px that cannot fit
    where it is allocated (the host, or a CUDA device), before it is allocated."""
    w, h = photo_size
    need = frames * w * h * RGB_CHANNELS * FLOAT32_BYTES
    on_device = device is not None and torch.device(device).type == "cuda"
    free = (device_free if device_free is not None else device_free_bytes(device)) if on_device else \
        (host_available_bytes() if host_free is None else host_free)
    log.info("%s: %d frames of %dx%d px as float32 need %s", what, frames, w, h, _size(need))
    if free is None or need <= free:
        return
    fit = int(free // (w * h * RGB_CHANNELS * FLOAT32_BYTES))
    raise MemoryBudgetError(
        f"{what} cannot fit: {frames} frames of the {w}x{h} photo as float32 (an IMAGE batch) need {_size(need)} "
        f"of {'memory on ' + str(device) if on_device else 'host memory (RAM)'}, but {_size(free)} is free "
        f"(room for about {fit} frame(s)): paste fewer frames per call (Latent Segment with a smaller "
        "segment_frames), or use Latent To Video's photo and face_box inputs instead (it pastes one frame at a "
        "time while it writes the video), or give a smaller photo")


def check_fits(est: MemoryEstimate, device: torch.device | str | None = None, what: str = "this run",
               host_free: int | None = None, device_free: int | None = None) -> None:
    """Log the estimate; raise MemoryBudgetError, with the numbers and a length that would fit, if
    its host or device part exceeds what is free (``host_free`` / ``device_free`` override the
    measured figures, e.g. ComfyUI's own free-memory count)."""
    seconds = est.frames / GENERATED_FPS
    at = f" at {est.size[0]}x{est.size[1]}" if est.size else ""
    log.info("%s: %d frames (%.0f s of audio)%s; main tensors: %s", what, est.frames, seconds, at,
             est.describe())
    host_free = host_available_bytes() if host_free is None else host_free
    device_free = device_free_bytes(device) if device_free is None else device_free
    for where, free, name in ((HOST, host_free, "host memory (RAM)"),
                              (DEVICE, device_free, f"memory on {device}")):
        need = est.total(where)
        if free is None or need <= free:
            continue
        fit_seconds = math.floor(seconds * free / need) if need else 0
        shorter = (f"set max_seconds to {fit_seconds} or less (and animate the rest of the audio as "
                   "further clips)" if fit_seconds >= 1 else "free memory first")
        smaller = ", or lower min_resolution" if est.size else ""
        photo = _photo_bytes(est) if where == HOST else 0
        if est.photo_size and photo > need / 2:  # mostly frames at the photo's size: a shorter clip hardly helps
            shorter, smaller = (f"{_size(photo)} of it is paste-back into the {est.photo_size[0]}x"
                                f"{est.photo_size[1]} photo: {PASTE_ADVICE}"), ""
        raise MemoryBudgetError(
            f"{what} cannot fit: {est.frames} frames ({seconds:.0f} s of audio){at} need at least "
            f"{_size(need)} of {name} for their main tensors alone ({est.describe(where)}), but "
            f"{_size(free)} is free: {shorter}{smaller}")
