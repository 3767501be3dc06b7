"""Checks the standalone run (``python -m sonic_core animate``) makes before it loads a model.

Bad numbers, an output that cannot be written, a device this PyTorch cannot use and a run whose
tensors cannot fit are all reported in a second, not after minutes of loading or rendering.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .audio import frame_cap
from .config import (
    FRAME_STEP,
    GENERATED_FPS,
    GUIDANCE_ROWS_CHOICES,
    LIMITS,
    RIFE_MULTIPLIER,
    SAMPLE_RATE,
    SAMPLER_DEFAULTS,
)

OUTPUT_SUFFIXES = {".mp4": "h264-mp4", ".webm": "vp9-webm", ".gif": "gif"}
DEVICE_TYPES = ("cpu", "cuda", "mps")
WRITE_PROBE_PREFIX = ".sonic-write-check-"


# AnimateSettings field -> config.LIMITS key: every number of the CLI is checked against the range
# of the node input it stands for (the flag named in the refusal is the limit's own)
SETTING_LIMITS = {"steps": "steps", "seed": "seed", "min_resolution": "min_resolution",
                  "dynamic_scale": "motion_scale", "max_seconds": "max_seconds", "window_batch": "window_batch",
                  "frames_per_window": "frames_per_window", "crf": "crf", "paste_feather": "paste_feather"}


def check_settings(settings, fps: float) -> None:
    """Raise ValueError naming the first bad number of an ``AnimateSettings`` (its flag, the value and
    the node's range; NaN and inf too), the crf's format and a clip too short for RIFE."""
    from .video import _check_args

    for field, key in SETTING_LIMITS.items():
        limit = LIMITS[key]
        setattr(settings, field, limit.check(getattr(settings, field), limit.flag or field))
    if getattr(settings, "guidance_rows", 0) not in (0, *GUIDANCE_ROWS_CHOICES):
        raise ValueError(f"--guidance-rows {settings.guidance_rows!r} must be one of {GUIDANCE_ROWS_CHOICES} "
                         "(0 = auto)")
    from .lowvram import WEIGHT_DTYPES

    if getattr(settings, "weight_dtype", "default") not in WEIGHT_DTYPES:
        raise ValueError(f"--weight-dtype {settings.weight_dtype!r} must be one of {list(WEIGHT_DTYPES)}")
    if settings.max_seconds > 0:  # the cap alone gives too few frames: said before any file is read
        check_frame_count(frame_cap(settings.max_seconds) // FRAME_STEP, settings.interpolate)
    _check_args(fps, "h264-mp4", settings.crf, "yuv420p")
    if getattr(settings, "paste_back", False):
        from .config import PASTE_REGIONS

        if not settings.crop:
            raise ValueError("--paste-back pastes the animated face crop back into the whole photo, so it needs "
                             "--crop (without --crop the video already shows the whole photo, at the working size)")
        if settings.paste_region not in PASTE_REGIONS:
            raise ValueError(f"--paste-region {settings.paste_region!r} must be one of {PASTE_REGIONS}")


def check_frame_count(frames: int, interpolate: bool) -> None:
    """Refuse a clip of fewer frames than RIFE needs when interpolation is on, naming --no-interpolate."""
    from .interpolate import MIN_FRAMES

    if interpolate and frames < MIN_FRAMES:
        raise ValueError(f"the audio gives {frames} video frame(s) (one per {1 / GENERATED_FPS:g} s, after "
                         f"--max-seconds); RIFE frame interpolation needs at least {MIN_FRAMES}: add "
                         "--no-interpolate to keep the frame as it is, or give more audio (a larger --max-seconds)")


def _nearest_folder(path: Path) -> Path:
    p = path.parent.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(output: str | os.PathLike) -> Path:
    """The output path, refused if it exists (or is a dangling symlink), has a wrong suffix, or its
    folder cannot be written (tried with a probe file, removed at once; nothing is created)."""
    from .video import _temp_overhead, check_name_length

    output = Path(output)
    if os.path.lexists(output):
        if not output.exists():
            raise FileExistsError(f"output {output} is a symlink to {os.readlink(output)!r}, which does not "
                                  "exist; remove the link or choose another output name (nothing is "
                                  "overwritten)")
        raise FileExistsError(f"{output} exists; choose another output name (nothing is overwritten)")
    check_no_other_writer(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {output} must end in {', '.join(OUTPUT_SUFFIXES)}")
    folder = _nearest_folder(output)
    if not folder.is_dir():
        raise NotADirectoryError(f"output {output}: {folder} is a file, not a folder; choose another -o")
    check_name_length(str(folder), output.name, _temp_overhead(output.suffix[1:]), "output file name")
    try:
        fd, probe = tempfile.mkstemp(prefix=WRITE_PROBE_PREFIX, dir=folder)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the output {output}: {folder} is not writable ({e.strerror}); "
                               "choose a writable folder for -o") from e
    os.close(fd)
    os.unlink(probe)
    return output


def check_no_other_writer(path: str | os.PathLike) -> None:
    """FileExistsError when a live encode (of another run) holds a temp video of ``path`` locked
    (sonic_core/video.py's temp names): it would publish first, and this run's video be discarded."""
    from .video import _PARTIAL_NAME, _try_lock

    folder, name = os.path.split(os.path.abspath(path))
    try:
        mine = [e.path for e in os.scandir(folder) if _PARTIAL_NAME.match(e.name) and e.name.startswith(f".{name}.")]
    except OSError:
        return
    for tmp in mine:
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                raise FileExistsError(f"another run is writing {path} now (its temporary file "
                                      f"{os.path.basename(tmp)}); wait for it to finish, or choose another name")
        finally:
            os.close(fd)


def check_device(name: str) -> torch.device:
    """``--device`` as a torch.device this build can use, or ValueError saying what to use instead."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:1 or mps") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name!r} is not supported here; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"--device {name}: {why}; use --device cpu (or auto), or install a CUDA build "
                             "of PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu or auto")
    return device


def estimate_run(image_hw: tuple[int, int], num_samples: int, sample_rate: int, settings,
                 dtype: torch.dtype, device: torch.device, channels: int = 1):
    """The run's main tensors (sonic_core.budget) from the input sizes, before any model loads.

    ``num_samples`` x ``channels`` at ``sample_rate``: the decoded source audio the run holds (kept
    for muxing), counted as it is.

    Raises the working-size error (image.working_size) and returns a ``MemoryEstimate``. With crop
    the face crop is a square of at most the short side, so that square's working size is used.
    """
    from .audio import check_sample_rate, frame_counts
    from .budget import HOST, MemoryEstimate, add_audio, add_decode, add_paste, add_sampler, add_source_audio
    from .image import working_size

    h, w = image_hw
    side = min(h, w)
    size = working_size(side, side, settings.min_resolution) if settings.crop else \
        working_size(w, h, settings.min_resolution)
    check_sample_rate(sample_rate)
    frames = frame_counts(math.ceil(num_samples * SAMPLE_RATE / sample_rate), settings.max_seconds)[1]
    est = add_source_audio(add_audio(MemoryEstimate(frames), dtype, HOST), num_samples, channels)
    add_sampler(est, size, dtype, device.type != "cpu")
    add_decode(est, size, SAMPLER_DEFAULTS.decode_chunk_size, RIFE_MULTIPLIER if settings.interpolate else 1)
    if getattr(settings, "paste_back", False):
        add_paste(est, (w, h), frames * (RIFE_MULTIPLIER if settings.interpolate else 1))
    return est


def check_output_space(output: Path, image_hw: tuple[int, int], num_samples: int, sample_rate: int,
                       settings) -> int:
    """Refuse a run whose video cannot fit the free space of ``output``'s disk, before any model
    loads: the video's least size (video.estimate_bytes, a floor) from the frame count the audio
    gives and the working size. Returns that estimate in bytes."""
    from .audio import frame_counts
    from .config import GENERATED_FPS, OUTPUT_FPS
    from .image import working_size
    from .video import estimate_bytes

    h, w = image_hw
    side = min(h, w)
    width, height = working_size(side, side, settings.min_resolution) if settings.crop else \
        working_size(w, h, settings.min_resolution)
    frames = frame_counts(math.ceil(num_samples * SAMPLE_RATE / sample_rate), settings.max_seconds)[1]
    fps = GENERATED_FPS
    if settings.interpolate:
        frames, fps = frames * RIFE_MULTIPLIER, OUTPUT_FPS
    need = estimate_bytes(frames, width, height, output.suffix[1:].lower(), frames / fps)
    folder = _nearest_folder(output)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return need  # the write probe (check_output) already passed; the late error is clear too
    if free < need:
        raise OSError(errno.ENOSPC, f"cannot write the output {output}: the video needs at least about "
                                    f"{need / 2**20:.1f} MiB ({frames} frames of {width}x{height} px at "
                                    f"{fps:g} fps) and {folder} has {free / 2**20:.1f} MiB free: free space "
                                    "there or choose another -o")
    return need
