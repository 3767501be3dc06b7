"""Frames (+ audio) -> mp4 / webm / gif with PyAV: streaming, atomic, inside the output folder.

* Frames are converted and encoded one at a time (a tensor or any iterable of ``[H,W,3]``
  frames in 0..1), so memory does not grow with the video's length. Audio is encoded alongside,
  interleaved with the video, and trimmed or padded with silence to the video's duration.
* The file is written under a hidden temporary name in the target folder and renamed when
  complete; an error or a cancel (the callback raising) removes it, so no partial file stays.
  The rename never replaces an existing file. The temporary file is locked (``flock``) while its
  encode runs; a process killed outright (SIGKILL, an OOM kill) cannot remove it, so every encode
  first removes the temporary files of our naming scheme in its folder that no process holds and
  that have not changed for ``PARTIAL_STALE_AGE_S``.
* Input checks: NaN/inf frames, NaN audio, frames larger than the encoder allows and file names
  longer than the filesystem allows are errors before anything is written. uint8 frames and
  float frames in 0..255 are converted (with a warning); integer PCM audio is converted to float
  (8-bit unsigned around 128, 16/32-bit signed) and float audio beyond [-1, 1] is clipped with a
  warning naming its peak.
* Colours: RGB is converted with the BT.709 matrix to limited range and tagged as BT.709.
  Frame values are rounded to 8 bit (16 bit for 10-bit pixel formats).
* Odd sizes: 4:2:0 pixel formats need even sizes, so an odd width or height is padded by
  repeating the last column or row once; 4:4:4 and gif keep the exact size.
* GIF: every frame gets its own 256-colour palette (median cut, no dithering); no audio track and
  no metadata; frame delays are whole centiseconds, so rates that do not divide 100 (e.g. 24 fps)
  play slightly off.
* AAC: sources below 44.1 kHz are resampled to 48 kHz, so the encoder's last 1024-sample frame
  (its padding) stays shorter than one video frame.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from .config import (
    FRAME_RATE_MAX,
    AAC_FALLBACK_RATE,
    AAC_MIN_RATE,
    AUDIO_BITRATE,
    FPS_DENOMINATOR,
    MAX_FILENAME_BYTES,
    OPUS_SAMPLE_RATE,
    OUTPUT_COUNTER_DIGITS,
    PARTIAL_STALE_AGE_S,
    U8_MAX,
    U8_RANGE_PEAK,
    VIDEO_BITS_PER_PIXEL_FLOOR,
    VIDEO_CRF,
    X264_LARGE_FRAME_PIXELS,
    X264_LARGE_LOOKAHEAD,
)

try:  # POSIX: a live temp file is locked, so another process never removes it
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there anyway
    fcntl = None

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None] | None
Audio = tuple[torch.Tensor, int] | None  # (waveform [C,T] float, sample rate Hz)

BT709 = 1  # AVCOL_SPC / AVCOL_PRI / AVCOL_TRC value of ITU-R BT.709
RANGE_LIMITED = 1  # AVCOL_RANGE_MPEG (16..235)
MAX_FPS = FRAME_RATE_MAX  # frames/s accepted
GIF_COLOURS = 256  # palette entries per GIF frame
AUDIO_FRAME_SAMPLES = 1024  # samples per audio frame handed to an encoder without a fixed frame size
PIX_FMTS = ("yuv420p", "yuv444p", "yuv420p10le")
PARTIAL_TAG = ".partial."  # temp name: .<name>.<12 hex>.partial.<ext>
PARTIAL_HEX = 12  # hex digits of the random part of a temp name


@dataclass(frozen=True)
class VideoFormat:
    """One choice of the ``format`` widget."""

    container: str  # libavformat muxer
    ext: str  # file extension
    codec: str  # video encoder
    audio_codec: str | None  # None: no audio track
    crf_max: int  # largest crf the encoder accepts
    max_side: int  # px, largest width or height the encoder opens (measured with PyAV 18's FFmpeg)
    codec_tag: str | None = None
    options: tuple[tuple[str, str], ...] = ()


FORMATS = {
    "h264-mp4": VideoFormat("mp4", "mp4", "libx264", "aac", 51, 16384),
    "h265-mp4": VideoFormat("mp4", "mp4", "libx265", "aac", 51, 65534, codec_tag="hvc1",
                            options=(("x265-params", "log-level=error"),)),
    "vp9-webm": VideoFormat("webm", "webm", "libvpx-vp9", "libopus", 63, 65536, options=(("row-mt", "1"),)),
    "gif": VideoFormat("gif", "gif", "gif", None, 0, 65535),
}
EXTENSIONS = tuple(sorted({f.ext for f in FORMATS.values()}))


# ----------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------
_DRIVE = re.compile(r"^[A-Za-z]:")


def split_prefix(prefix: str) -> tuple[str, str]:
    """``"Sonic/clip"`` -> ``("Sonic", "clip")``; refuses prefixes that could leave the folder.

    Both ``/`` and ``\\`` separate folders. Absolute paths, drive letters and ``..`` are errors.
    """
    raw = str(prefix).strip()
    parts = [p for p in re.split(r"[\\/]+", raw) if p not in ("", ".")]
    if not raw or not parts:
        raise ValueError(f"filename_prefix {prefix!r} is empty: give a name such as 'Sonic/clip'")
    if raw.startswith(("/", "\\")) or _DRIVE.match(raw) or os.path.isabs(raw):
        raise ValueError(f"filename_prefix {prefix!r} is an absolute path: give a path relative to "
                         "the output folder, such as 'Sonic/clip'")
    if any(p == ".." for p in parts):
        raise ValueError(f"filename_prefix {prefix!r} contains '..': it must stay inside the output folder")
    if any("\0" in p or ":" in p for p in parts):
        raise ValueError(f"filename_prefix {prefix!r} contains ':' or a NUL character; remove it")
    return "/".join(parts[:-1]), parts[-1]


def _inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def output_folder(output_dir: str, prefix: str) -> tuple[str, str, str]:
    """(absolute folder, subfolder, file stem) for ``prefix``; creates the subfolder."""
    subfolder, stem = split_prefix(prefix)
    folder = os.path.join(output_dir, *subfolder.split("/")) if subfolder else output_dir
    if not _inside(output_dir, folder):  # a symlinked subfolder pointing elsewhere
        raise ValueError(f"filename_prefix {prefix!r} resolves outside the output folder {output_dir}")
    for part in subfolder.split("/") if subfolder else ():
        check_name_length(output_dir, part, 0, "filename_prefix: the folder name")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the output folder {folder} ({e.strerror}): make the output "
                               "folder writable or choose another one") from e
    return folder, subfolder, stem


def _name_max(folder: str) -> int:
    """Bytes a file name may have in ``folder`` (the OS's NAME_MAX, else MAX_FILENAME_BYTES)."""
    probe = folder
    while probe and not os.path.isdir(probe):  # the folder itself may not exist yet
        parent = os.path.dirname(probe)
        probe = parent if parent != probe else ""
    try:
        return int(os.pathconf(probe or ".", "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf on Windows
        return MAX_FILENAME_BYTES


def check_name_length(folder: str, name: str, extra: int, what: str) -> None:
    """Raise if ``name`` plus ``extra`` bytes (counter, temp-name parts) is too long for ``folder``."""
    limit = _name_max(folder)
    size = len(os.fsencode(name))
    if size + extra > limit:
        room = f", of which the counter and the temporary name need {extra}" if extra else ""
        raise ValueError(f"{what} {name[:24]!r}... is {size} bytes long; this filesystem allows {limit} "
                         f"bytes per name{room}: shorten it to at most {limit - extra} bytes")


def _temp_overhead(ext: str) -> int:
    """Bytes a temp name adds to the final file name's stem: ``.`` + ``.<hex>.partial.<ext>``."""
    return 2 + PARTIAL_HEX + len(PARTIAL_TAG) + len(ext)


def next_counter(folder: str, stem: str) -> int:
    """ComfyUI's counter: one more than the largest ``<stem>_<digits>_`` file in ``folder``."""
    pattern = re.compile(re.escape(os.path.normcase(stem)) + r"_(\d+)_")
    best = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        m = pattern.match(os.path.normcase(name))
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def counter_name(stem: str, counter: int, ext: str) -> str:
    return f"{stem}_{counter:0{OUTPUT_COUNTER_DIGITS}d}_.{ext}"


def _publish(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final`` without ever replacing an existing file (FileExistsError)."""
    try:
        os.link(tmp, final)  # atomic, fails if final exists
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem
        if os.name == "nt":
            os.rename(tmp, final)  # refuses an existing target on Windows
            return
        if os.path.exists(final):
            raise FileExistsError(final) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# Frames and audio
# ----------------------------------------------------------------------------------------------
def _check_args(fps: float, format: str, crf: int, pix_fmt: str) -> VideoFormat:
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {list(FORMATS)}")
    spec = FORMATS[format]
    if not (0 < fps <= MAX_FPS):
        raise ValueError(f"frame rate {fps} must be in (0, {MAX_FPS}]")
    if spec.codec != "gif":
        if pix_fmt not in PIX_FMTS:
            raise ValueError(f"pix_fmt {pix_fmt!r} is not one of {PIX_FMTS}")
        import av

        supported = {f.name for f in av.codec.Codec(spec.codec, "w").video_formats or ()}
        if pix_fmt not in supported:
            raise ValueError(f"pix_fmt {pix_fmt!r} is not supported by {spec.codec} ({format}); "
                             f"use one of {sorted(set(PIX_FMTS) & supported)}")
        if not (0 <= crf <= spec.crf_max):
            raise ValueError(f"crf {crf} is out of range for {format}: use 0..{spec.crf_max}")
    return spec


def _gif_frame(arr: np.ndarray):
    """An HxWx3 uint8 frame as a pal8 VideoFrame with its own 256-colour palette."""
    import av
    from PIL import Image

    img = Image.fromarray(arr).quantize(GIF_COLOURS, method=Image.Quantize.MEDIANCUT,
                                        dither=Image.Dither.NONE)
    rgb = np.asarray(img.getpalette()[:3 * GIF_COLOURS], dtype=np.uint8).reshape(-1, 3)  # [n,3]
    palette = np.zeros((GIF_COLOURS, 4), dtype=np.uint8)  # [256,4] bytes A,R,G,B as PyAV expects
    palette[:, 0] = 255
    palette[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((np.asarray(img), palette), format="pal8")


def _even_pad(pix_fmt: str) -> bool:
    return "420" in pix_fmt


def _batch_in_u8_range(frames) -> bool:
    """True when a float frame tensor holds 0..255 values (its peak, frame by frame, exceeds 2)."""
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point() or frames.ndim != 4:
        return False
    peak = max((float(f.amax()) for f in frames if f.numel()), default=0.0)  # one frame at a time
    return peak > U8_RANGE_PEAK


def _frames(frames: torch.Tensor | Iterable, deep: bool) -> Iterator[np.ndarray]:
    """Each frame as HxWx3 uint8 (uint16 when ``deep``), rounded, one at a time.

    NaN/inf pixels are an error; integer frames and float frames in 0..255 are divided by 255
    (with one warning); other values are clamped to 0..1.
    """
    scale = 65535.0 if deep else 255.0
    dtype = np.uint16 if deep else np.uint8
    u8_batch = _batch_in_u8_range(frames)
    warned = False
    for i, f in enumerate(frames):
        t = torch.as_tensor(f).detach()
        if t.ndim != 3 or t.shape[-1] < 3:
            raise ValueError(f"each frame must be [H, W, 3] (IMAGE batches are [N, H, W, 3]), "
                             f"got {tuple(t.shape)}")
        t = t[..., :3].to("cpu")
        if t.dtype == torch.bool:
            raise ValueError(f"frame {i} is a bool tensor; IMAGE frames are float in 0..1")
        src_dtype = str(t.dtype).removeprefix("torch.")
        as_u8 = not t.is_floating_point() or u8_batch or float(t.amax()) > U8_RANGE_PEAK
        t = t.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"frame {i} has {bad} NaN or infinite pixel values (of {t.numel()}): the frames "
                             "are invalid, nothing was written. A VAE decode in fp16 can overflow: run the "
                             "models in bf16 or fp32, or check the node that made the frames")
        if as_u8:
            peak = float(t.amax())
            if peak > U8_MAX + 0.5:
                raise ValueError(f"frame {i} has values up to {peak:g}: IMAGE frames must be 0..1 (or "
                                 "0..255); check the node that made them")
            if not warned:
                log.warning("frames are %s in 0..255 (peak %g), not ComfyUI's 0..1 floats: divided by "
                            "255", src_dtype, peak)
                warned = True
            t = t / U8_MAX
        t = t.clamp(0, 1).mul_(scale).round_()  # one float copy of the frame, then in place
        arr = np.ascontiguousarray(t.numpy().astype(dtype))
        del f, t  # the frame is not held while the next one is made (a photo-sized frame is 12 B/px)
        yield arr


def _pad_even(a: np.ndarray) -> np.ndarray:
    """Repeat the last row / column once where the height / width is odd."""
    ph, pw = a.shape[0] % 2, a.shape[1] % 2
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")  # [H+ph, W+pw, 3]
    return a


def _audio_array(audio: tuple[torch.Tensor, int]) -> tuple[np.ndarray, int]:
    """(waveform [C,T] float32 numpy with C in {1,2}, sample rate).

    Any AUDIO layout, integer PCM converted (``audio.standard_waveform``, the rule every AUDIO input
    uses); NaN/inf and absurd samples are an error; float samples
    beyond [-1, 1] are clipped with a warning that names the peak.
    """
    from .audio import check_sample_rate, check_samples, layout_note, standard_waveform

    wave, sr = audio
    check_sample_rate(sr, "Video Combine audio:")
    wave = wave if isinstance(wave, torch.Tensor) else np.asarray(wave)
    original = tuple(wave.shape)
    wave, layout = standard_waveform(wave, "Video Combine audio")  # any layout, PCM -> [B, C, T] float32
    wave = wave[0].detach().to("cpu", torch.float32)  # [C, T]: the first item of a batch
    if wave.shape[1] == 0 or wave.shape[0] == 0:
        raise ValueError(f"audio is empty{layout_note(layout, original)}; connect audio with sound")
    finite = torch.isfinite(wave)
    if not bool(finite.all()):
        where = int((~finite).nonzero()[0, 1])
        raise ValueError(f"audio has {int((~finite).sum())} NaN or infinite samples (first at "
                         f"{where / sr:.3f} s); nothing was written. Clean or re-export the audio, or leave "
                         "the audio input unconnected")
    check_samples(wave, sr, "Video Combine audio")  # 1e30 samples are corrupt, not loud
    if wave.shape[0] > 2:
        log.warning("audio has %d channels; mixing down to mono", wave.shape[0])
        wave = wave.mean(0, keepdim=True)  # [1,T]
    peak = float(wave.abs().max())
    if peak > 1.0:
        clipped = int((wave.abs() > 1.0).sum())
        log.warning("audio peaks at %.3f, beyond the [-1, 1] float range: %d samples are clipped and will "
                    "distort; lower its volume (e.g. divide the waveform by %.3f) before Video Combine",
                    peak, clipped, peak)
    return np.ascontiguousarray(wave.clamp(-1, 1).numpy()), int(sr)


class _AudioTrack:
    """Encodes the source waveform in step with the video, trimmed/padded to its length."""

    def __init__(self, container, codec: str, wave: np.ndarray, sr: int, fps: Fraction):
        import av

        self.av = av
        self.wave, self.sr, self.fps = wave, sr, fps
        self.layout = "mono" if wave.shape[0] == 1 else "stereo"
        if codec == "libopus":
            rate = OPUS_SAMPLE_RATE
        else:
            rates = av.codec.Codec(codec, "w").audio_rates or ()
            rate = sr if (sr >= AAC_MIN_RATE and (not rates or sr in rates)) else AAC_FALLBACK_RATE
        self.stream = container.add_stream(codec, rate=rate, layout=self.layout)
        self.stream.bit_rate = AUDIO_BITRATE
        fmt = self.stream.codec_context.format.name
        size = self.stream.codec_context.frame_size or AUDIO_FRAME_SAMPLES
        self.resampler = av.AudioResampler(format=fmt, layout=self.layout, rate=rate, frame_size=size)
        self.sent = 0  # source samples handed to the encoder

    def _send(self, chunk: np.ndarray | None, container) -> None:
        if chunk is None:
            frames = self.resampler.resample(None)
        else:
            packed = np.ascontiguousarray(chunk.T).reshape(1, -1)  # [C,n] -> [1, n*C] interleaved
            frame = self.av.AudioFrame.from_ndarray(packed, format="flt", layout=self.layout)
            frame.sample_rate = self.sr
            frame.pts = self.sent
            frame.time_base = Fraction(1, self.sr)
            frames = self.resampler.resample(frame)
        for f in frames:
            for packet in self.stream.encode(f):
                container.mux(packet)
        if chunk is None:
            for packet in self.stream.encode(None):
                container.mux(packet)

    def advance(self, video_frames: int, container) -> None:
        """Send the source samples that cover the first ``video_frames`` frames (zeros past its end)."""
        end = round(video_frames * self.sr / self.fps)
        if end <= self.sent:
            return
        chunk = self.wave[:, self.sent:end]  # [C, <=end-sent]
        if chunk.shape[1] < end - self.sent:
            chunk = np.pad(chunk, ((0, 0), (0, end - self.sent - chunk.shape[1])))  # silence
        self._send(chunk, container)
        self.sent = end

    def finish(self, container) -> None:
        self._send(None, container)


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------
def _add_video_stream(container, spec: VideoFormat, rate: Fraction, width: int, height: int,
                      crf: int, pix_fmt: str):
    stream = container.add_stream(spec.codec, rate=rate)
    stream.width, stream.height = width, height
    if spec.codec == "gif":
        stream.pix_fmt = "pal8"
        return stream
    stream.pix_fmt = pix_fmt
    cc = stream.codec_context
    cc.colorspace = cc.color_primaries = cc.color_trc = BT709
    cc.color_range = RANGE_LIMITED
    stream.bit_rate = 0  # constant quality (crf) for vp9
    stream.options = {"crf": str(crf), **dict(spec.options)}
    if spec.codec == "libx264" and width * height > X264_LARGE_FRAME_PIXELS:  # photo-sized paste-back frames
        stream.options = {**stream.options, "rc-lookahead": str(X264_LARGE_LOOKAHEAD)}  # ~3 B/px a frame held
    if spec.codec_tag:
        cc.codec_tag = spec.codec_tag
    return stream


class _Encoder:
    """An open encode into ``path``: frames arrive in any number of ``add`` calls (a tensor or an
    iterable each time), the audio follows them, and ``finish`` flushes both and closes the file.
    ``close`` without ``finish`` just closes it (the caller removes the temp file)."""

    def __init__(self, path: str, spec: VideoFormat, fps: float, audio: Audio, crf: int, pix_fmt: str,
                 metadata: dict[str, str] | None):
        import av

        self.spec, self.crf, self.pix_fmt = spec, crf, pix_fmt
        self.rate = Fraction(round(fps * FPS_DENOMINATOR), FPS_DENOMINATOR)
        self.deep = spec.codec != "gif" and pix_fmt.endswith("10le")
        self.pad = spec.codec != "gif" and _even_pad(pix_fmt)
        options = {"movflags": "use_metadata_tags"} if spec.container == "mp4" else {}
        self.wave = _audio_array(audio) if audio is not None and spec.audio_codec else None
        if audio is not None and not spec.audio_codec:
            log.warning("%s has no audio track; the audio is left out", spec.container)
        self.container = av.open(path, mode="w", format=spec.container, options=options)
        if metadata and spec.container != "gif":
            for key, value in metadata.items():
                self.container.metadata[key] = value
        self.stream = self.track = self.size = None
        self.count = 0  # frames encoded so far

    def _pad_even(self, arr: np.ndarray) -> np.ndarray:
        padded = _pad_even(arr)
        if self.stream is None and padded.shape != arr.shape:  # said once, at the first frame
            odd = " and ".join(n for n, k in (("column", 1), ("row", 0)) if arr.shape[k] % 2)
            log.info("the frames are %dx%d px; %s needs even sides, so the video is %dx%d px (the last %s "
                     "repeated once)", arr.shape[1], arr.shape[0], self.pix_fmt, *padded.shape[1::-1], odd)
        return padded

    def add(self, frames, callback: Callback = None, total: int = 0) -> int:
        """Encode ``frames`` after those already added; ``callback(done, total)`` counts this call's
        frames. Returns how many were added."""
        import av
        from av.video.reformatter import ColorRange, Colorspace

        spec, container = self.spec, self.container
        added = 0
        for arr in _frames(frames, self.deep):
            if self.pad:
                arr = self._pad_even(arr)
            if self.stream is None:  # the first frame fixes the size; streams exist before the first mux
                self.size = arr.shape[:2]
                if max(self.size) > spec.max_side:
                    raise ValueError(f"frames are {arr.shape[1]}x{arr.shape[0]} px; {spec.codec} "
                                     f"({spec.container}) encodes at most {spec.max_side} px per side: "
                                     "downscale the frames (e.g. a lower min_resolution) or choose "
                                     f"{'h265-mp4 or ' if spec.max_side < 65534 else ''}vp9-webm")
                self.stream = _add_video_stream(container, spec, self.rate, arr.shape[1], arr.shape[0],
                                                self.crf, self.pix_fmt)
                if self.wave is not None:
                    self.track = _AudioTrack(container, spec.audio_codec, self.wave[0], self.wave[1], self.rate)
            if arr.shape[:2] != self.size:
                raise ValueError(f"frame {self.count} is {arr.shape[1]}x{arr.shape[0]} but the first frame "
                                 f"is {self.size[1]}x{self.size[0]}: all frames of a video must have one size")
            if spec.codec == "gif":
                frame = _gif_frame(arr)
            else:
                frame = av.VideoFrame.from_ndarray(arr, format="rgb48le" if self.deep else "rgb24")
                frame = frame.reformat(format=self.pix_fmt, src_colorspace=Colorspace.ITU709,
                                       dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
            frame.pts = self.count
            for packet in self.stream.encode(frame):
                container.mux(packet)
            self.count += 1
            added += 1
            if self.track is not None:
                self.track.advance(self.count, container)
            if callback is not None:
                callback(added, max(total, added))
        return added

    def finish(self) -> int:
        """Flush the encoders and close the file; returns the number of frames."""
        if self.stream is None:
            self.close()
            raise ValueError("no frames to encode: the IMAGE batch is empty")
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
            if self.track is not None:
                self.track.finish(self.container)
        except BaseException:
            self.close(discard=True)
            raise
        self.close()  # writes the trailer: a full disk can fail here too
        return self.count

    def close(self, discard: bool = False) -> None:
        """Close the file; with ``discard`` (an error is on its way, the file goes) a failing close,
        e.g. the trailer on a full disk, is only logged, so the first error is the one reported."""
        if self.container is not None:
            container, self.container = self.container, None
            try:
                container.close()
            except Exception as e:
                if not discard:
                    raise
                log.debug("closing a discarded video: %s", e)


NO_SPACE_ERRNOS = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n))


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def estimate_bytes(frames: int, width: int, height: int, ext: str, audio_seconds: float = 0.0) -> int:
    """The least a video of ``frames`` frames of ``width x height`` takes on disk, with its audio
    (config.VIDEO_BITS_PER_PIXEL_FLOOR; a real one is usually larger)."""
    bits = frames * width * height * VIDEO_BITS_PER_PIXEL_FLOOR[ext]
    if ext != "gif":
        bits += audio_seconds * AUDIO_BITRATE
    return int(bits / 8)


def out_of_space(e: BaseException, target: str, tmp: str, done: int, total: int) -> OSError | None:
    """``e`` as a clear OSError if it is a full disk (or quota, or file size limit) while ``tmp`` was
    being written for ``target``: names the video, not its hidden temp file, and the space it needs
    and has. None for any other error. Called before the temp file is removed."""
    if not isinstance(e, OSError) or e.errno not in NO_SPACE_ERRNOS:
        return None
    folder = os.path.dirname(os.path.abspath(tmp))
    try:
        written = os.path.getsize(tmp)
    except OSError:
        written = 0
    try:
        free = _mib(shutil.disk_usage(folder).free + written)  # once the temp file is gone
    except OSError:
        free = "unknown space"
    why = ("the file size limit (ulimit -f) was reached" if e.errno == getattr(errno, "EFBIG", None)
           else "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is used up")
    need = f", about {_mib(written * total / done)} for all {total}" if total > done > 0 else ""
    return OSError(e.errno, f"cannot write the video {target}: {why} after {_mib(written)} ({done} frames"
                            f"{need}); {free} free in {folder}. Free space there or write the video to "
                            "another disk; nothing was kept of this attempt")


def _encode(frames, path: str, spec: VideoFormat, fps: float, audio: Audio, crf: int, pix_fmt: str,
            metadata: dict[str, str] | None, callback: Callback, total: int, target: str) -> int:
    enc = _Encoder(path, spec, fps, audio, crf, pix_fmt, metadata)
    try:
        enc.add(frames, callback, total)
        return enc.finish()
    except OSError as e:
        full = out_of_space(e, target, path, enc.count, total)
        if full is None:
            raise
        raise full from None
    finally:
        enc.close(discard=True)  # a no-op after finish; after an error the temp file goes anyway


_PARTIAL_NAME = re.compile(r"^\..+\.[0-9a-f]{%d}%s(?:%s)$" % (
    PARTIAL_HEX, re.escape(PARTIAL_TAG), "|".join(re.escape(f.ext) for f in FORMATS.values())))


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another process holds one."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks: rely on the age alone
        return True


def remove_stale_partials(folder: str, max_age_s: float = PARTIAL_STALE_AGE_S) -> list[str]:
    """Remove temp videos of our naming scheme (``.<name>.<12 hex>.partial.<ext>``) in ``folder``
    that are regular files, unchanged for ``max_age_s`` and locked by no process (a live encode
    holds its lock), i.e. those a killed encode left behind. Returns the removed paths."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _PARTIAL_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not entry.is_file(follow_symlinks=False) or now - st.st_mtime < max_age_s:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):  # a live encode (of this or another process) holds it
                continue
            if os.fstat(fd).st_ino != st.st_ino:  # replaced meanwhile: not the file we judged
                continue
            os.unlink(entry.path)
            removed.append(entry.path)
            log.info("removed %s: a temporary video left by an encode that was killed %.1f h ago "
                     "(%.1f MiB)", entry.path, (now - st.st_mtime) / 3600, st.st_size / 2**20)
        except OSError as e:  # e.g. still open on Windows, or no permission: leave it
            log.debug("could not remove %s: %s", entry.path, e)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _partial_file(folder: str, stem: str, ext: str) -> Iterator[str]:
    """A new hidden temp file in ``folder``, locked while the block runs, removed at its end unless
    it was renamed (published). Stale temp files of killed encodes are removed first."""
    remove_stale_partials(folder)
    while True:
        tmp = os.path.join(folder, f".{stem}.{uuid.uuid4().hex[:PARTIAL_HEX]}{PARTIAL_TAG}{ext}")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"cannot write in the output folder {folder} ({e.strerror}): make it "
                                   "writable, free space, or choose another output folder") from e
    try:
        _try_lock(fd)
        yield tmp
    finally:
        try:
            if os.path.exists(tmp):  # errors and cancels (KeyboardInterrupt too) leave no file
                os.unlink(tmp)
        finally:
            os.close(fd)  # releases the lock after the file is gone




def write_video(frames: torch.Tensor | Iterable, path: str, fps: float, audio: Audio = None,
                format: str = "h264-mp4", crf: int = VIDEO_CRF, pix_fmt: str = "yuv420p",
                metadata: dict[str, str] | None = None, callback: Callback = None) -> str:
    """Encode ``frames`` (``[N,H,W,3]`` tensor in 0..1, or an iterable of ``[H,W,3]``) to ``path``.

    ``audio`` = (waveform [C,T] float, sample rate) is muxed (AAC in mp4, Opus in webm) and
    trimmed or padded to N / fps seconds. ``metadata`` values are stored as container tags.
    ``callback(done, total)`` runs after every frame and may raise to cancel. ``path`` must not
    exist; it appears only once the file is complete. Returns ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.lexists(path):
        kind = "is a symlink to a missing file" if not os.path.exists(path) else "already exists"
        raise FileExistsError(f"{path} {kind}; choose another name (nothing is overwritten)")
    spec = _check_args(fps, format, crf, pix_fmt)
    stem = os.path.basename(path)
    check_name_length(folder, stem, _temp_overhead(spec.ext), "output file name")
    total = len(frames) if hasattr(frames, "__len__") else 0
    with _partial_file(folder, stem, spec.ext) as tmp:
        count = _encode(frames, tmp, spec, fps, audio, crf, pix_fmt, metadata, callback, total, path)
        try:
            _publish(tmp, path)
        except FileExistsError:  # nothing is overwritten
            raise FileExistsError(f"{path} was written by another run (or program) while this one was encoding "
                                  "it; this video is discarded: choose another output name") from None
    log.info("video: %d frames at %g fps -> %s", count, fps, path)
    return path


def save_video(frames: torch.Tensor | Iterable, output_dir: str, filename_prefix: str, fps: float,
               audio: Audio = None, format: str = "h264-mp4", crf: int = VIDEO_CRF,
               pix_fmt: str = "yuv420p", metadata: dict[str, str] | None = None,
               callback: Callback = None) -> tuple[str, str, str]:
    """``write_video`` under ``output_dir`` with ComfyUI's counter: ``<prefix>_00001_.<ext>``.

    The prefix may name subfolders ("Sonic/clip"); it cannot leave ``output_dir``. The counter
    is taken when the file is complete and the name is claimed atomically, so concurrent or
    repeated runs never overwrite each other. Returns (path, subfolder, filename).
    """
    writer = VideoWriter(output_dir, filename_prefix, fps, audio, format, crf, pix_fmt, metadata)
    writer.write(frames, callback)
    return writer.close()


class VideoWriter:
    """One video written in parts (``save_video``'s file, named the same way): ``write`` frames as
    often as needed, then ``close`` publishes the file under the next free counter name, or
    ``abort`` removes it. Until then it is a locked hidden temp file in the target folder; an error
    or a cancel inside ``write`` aborts, and a process killed outright leaves only a stale temp file
    that the next encode in that folder removes. The audio (the whole track) is given once and
    follows the frames: each part muxes the sound under its frames, so parts join without a seam.
    """

    def __init__(self, output_dir: str, filename_prefix: str, fps: float, audio: Audio = None,
                 format: str = "h264-mp4", crf: int = VIDEO_CRF, pix_fmt: str = "yuv420p",
                 metadata: dict[str, str] | None = None):
        spec = _check_args(fps, format, crf, pix_fmt)
        check_name_length(output_dir, split_prefix(filename_prefix)[1], _temp_overhead(spec.ext),
                          "filename_prefix: the file name")
        self.spec, self.fps = spec, fps
        self.folder, self.subfolder, self.stem = output_folder(output_dir, filename_prefix)
        self._stack = contextlib.ExitStack()
        self.temp_path = self._stack.enter_context(_partial_file(self.folder, self.stem, spec.ext))
        self._target = os.path.join(self.folder, f"{self.stem}_{'#' * OUTPUT_COUNTER_DIGITS}_.{spec.ext}")
        try:
            self._enc: _Encoder | None = _Encoder(self.temp_path, spec, fps, audio, crf, pix_fmt, metadata)
        except BaseException:
            self._stack.close()
            raise

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._enc.count if self._enc is not None else 0

    @property
    def is_open(self) -> bool:
        return self._enc is not None

    def write(self, frames: torch.Tensor | Iterable, callback: Callback = None) -> int:
        """Append ``frames`` (``[N,H,W,3]`` in 0..1 or an iterable of ``[H,W,3]``); returns how many.
        ``callback(done, total)`` counts this call's frames and may raise to cancel (which aborts)."""
        if self._enc is None:
            raise ValueError("this video is already closed; start a new one")
        try:
            return self._enc.add(frames, callback, len(frames) if hasattr(frames, "__len__") else 0)
        except BaseException as e:
            full = out_of_space(e, self._target, self.temp_path, self._enc.count, 0)
            self.abort()
            if full is None:
                raise
            raise full from None

    def close(self) -> tuple[str, str, str]:
        """Finish the file and publish it; returns (path, subfolder, filename)."""
        if self._enc is None:
            raise ValueError("this video is already closed")
        enc, self._enc = self._enc, None
        try:
            try:
                count = enc.finish()
            except OSError as e:
                full = out_of_space(e, self._target, self.temp_path, enc.count, 0)
                if full is None:
                    raise
                raise full from None
            while True:
                name = counter_name(self.stem, next_counter(self.folder, self.stem), self.spec.ext)
                path = os.path.join(self.folder, name)
                try:
                    _publish(self.temp_path, path)
                    break
                except FileExistsError:
                    continue  # another run took this number meanwhile
        finally:
            enc.close(discard=True)  # a no-op after finish
            self._stack.close()  # removes the temp file unless it was published
        log.info("video: %d frames at %g fps -> %s", count, self.fps, path)
        return path, self.subfolder, name

    def abort(self) -> None:
        """Stop and remove the temp file; nothing is published. Safe to call twice."""
        enc, self._enc = self._enc, None
        try:
            if enc is not None:
                enc.close(discard=True)
        finally:
            self._stack.close()
