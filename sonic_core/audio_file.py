"""An audio file (or a video with sound) -> waveform ``[1, C, T]`` float32 and its sample rate.

Everything a file can get wrong is said here, with the file's name, before any model loads:
a path that is not a file (sonic_core.paths), no audio, damaged or truncated data, a header that
declares a length other than what decodes (any container: PyAV's stream / container duration vs
the samples decoded; a WAV whose data chunk size is smaller than the sample bytes it holds is read
whole), NaN / inf or absurd sample values, and a file of several audio tracks whose first is silent
(the first track with sound is used, the others named).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

WAV_HEADER_BYTES = 12  # "RIFF" <u32 size> "WAVE"
WAV_CHUNK_HEADER_BYTES = 8  # <4-char id> <u32 size>
WAV_STREAMING_SIZE = 0xFFFFFFFF  # data size of a WAV written while streaming (length unknown)
TRAILING_TAGS = (b"ID3", b"TAG", b"APETAGEX")  # tags some taggers append after a WAV's chunks (not audio)
WAV_IGNORE_LENGTH = {"ignore_length": "1"}  # FFmpeg's wav demuxer option: read the samples to the file's end


@dataclass(frozen=True)
class WavSizes:
    declared_s: float  # seconds the data chunk's size declares
    undeclared_s: float  # seconds of sample bytes after the declared data that are not a chunk


def _is_chunk_id(raw: bytes) -> bool:
    return len(raw) == 4 and all(32 <= b < 127 for b in raw)


def wav_sizes(path: str | os.PathLike) -> WavSizes | None:
    """What a WAV file's header declares and what its data holds beyond that; None if not a WAV
    (or a streaming WAV of unknown length). Reads only the chunk headers."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(WAV_HEADER_BYTES)
            if len(head) < WAV_HEADER_BYTES or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = None
            while True:
                chunk = f.read(WAV_CHUNK_HEADER_BYTES)
                if len(chunk) < WAV_CHUNK_HEADER_BYTES:
                    return None
                cid, n = chunk[:4], int.from_bytes(chunk[4:], "little")
                if cid == b"fmt ":
                    fmt = f.read(n + n % 2)
                    byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) >= 12 else None
                elif cid == b"data":
                    if not byte_rate or n == WAV_STREAMING_SIZE:
                        return None
                    end = f.tell() + n + n % 2  # chunks are padded to even sizes
                    return WavSizes(n / byte_rate, _undeclared_bytes(f, end, size) / byte_rate)
                else:
                    f.seek(n + n % 2, os.SEEK_CUR)
    except OSError:
        return None


def _undeclared_bytes(f, end: int, size: int) -> int:
    """Bytes from ``end`` (after the data chunk) to the file's end that are not well-formed chunks."""
    pos = end
    while pos + WAV_CHUNK_HEADER_BYTES <= size:
        f.seek(pos)
        chunk = f.read(WAV_CHUNK_HEADER_BYTES)
        n = int.from_bytes(chunk[4:], "little")
        if chunk.startswith(TRAILING_TAGS):
            return 0  # a tag appended by a tagger, not samples
        if not _is_chunk_id(chunk[:4]) or pos + WAV_CHUNK_HEADER_BYTES + n > size:
            return size - end  # not a chunk: the data goes on past what its header declares
        pos += WAV_CHUNK_HEADER_BYTES + n + n % 2
    return 0 if pos >= size else size - pos


def wav_declared_seconds(path: str | os.PathLike) -> float | None:
    """Seconds of audio a WAV file's header declares (data chunk size / byte rate); None if not a WAV.

    FFmpeg reports a truncated WAV's duration from the bytes present, so the header is read here.
    """
    sizes = wav_sizes(path)
    return None if sizes is None else sizes.declared_s


@dataclass
class _Track:
    wave: np.ndarray  # [C, T] float32
    rate: int
    declared: float | None  # seconds the container says this track lasts
    damage: Exception | None  # FFmpeg error part way (what decoded before it is kept)
    stopped: bool  # decoding stopped at the --max-seconds cap on purpose
    tracks: int  # audio tracks in the file

    @property
    def seconds(self) -> float:
        return self.wave.shape[1] / self.rate

    @property
    def peak(self) -> float:
        return float(np.nanmax(np.abs(self.wave))) if self.wave.size else 0.0


def _decode_track(path, index: int, max_seconds: float, options: dict | None = None) -> _Track:
    """Decode audio track ``index`` of ``path`` (stopping at what a ``max_seconds`` cap needs)."""
    import av

    from .audio import pcm_to_float, source_samples_needed

    chunks, rate, declared, damage, limit, held = [], None, None, None, None, 0
    try:
        container = av.open(str(path), options=options or {})
    except av.error.FFmpegError as e:
        raise ValueError(f"audio {path} cannot be read ({e}); give a wav/mp3/flac/m4a file or a video "
                         "with sound") from e
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        tracks = len(container.streams.audio)
        stream = container.streams.audio[index]
        if stream.duration and stream.time_base:  # mp3 (Xing header), flac, m4a: from the file
            declared = float(stream.duration * stream.time_base)
        elif container.duration and len(container.streams) == 1:
            declared = container.duration / av.time_base
        try:
            for frame in container.decode(stream):
                arr = frame.to_ndarray()  # [C,n] planar or [1,n*C] packed
                if not frame.format.is_planar:
                    arr = arr.reshape(-1, len(frame.layout.channels)).T  # [n,C] -> [C,n]
                if limit is None and max_seconds:
                    limit = source_samples_needed(max_seconds, frame.sample_rate)
                if limit is not None:
                    arr = arr[:, :limit - held]  # [C, <=n] the samples the cap still needs
                chunks.append(pcm_to_float(arr))
                rate, held = frame.sample_rate, held + arr.shape[1]
                if limit is not None and held >= limit:
                    break  # the rest of the file is never decoded
        except av.error.FFmpegError as e:  # damaged data part way: keep what decoded
            damage = e
            if not chunks:
                raise ValueError(f"audio {path} cannot be decoded ({e}); re-export or download it "
                                 "again") from e
    if not chunks:
        raise ValueError(f"{path} holds no audio samples" + (f" in track {index + 1}" if tracks > 1 else ""))
    wave = np.concatenate(chunks, axis=1)  # [C,T]
    return _Track(wave, int(rate), declared, damage, limit is not None and held >= limit, tracks)


def _pick_track(path, first: _Track, max_seconds: float) -> _Track:
    """The first track with sound (peak above SILENT_TRACK_PEAK), said when it is not track 1."""
    from .config import SILENT_TRACK_PEAK

    if first.tracks == 1:
        return first
    if first.peak > SILENT_TRACK_PEAK:
        log.info("audio %s has %d audio tracks: track 1 is used, tracks 2..%d are not", path, first.tracks,
                 first.tracks)
        return first
    for index in range(1, first.tracks):
        track = _decode_track(path, index, max_seconds)
        if track.peak > SILENT_TRACK_PEAK:
            others = ", ".join(str(i + 1) for i in range(first.tracks) if i != index)
            log.warning("audio %s has %d audio tracks and track 1 is silent: track %d (the first with sound) "
                        "is used; not used: track(s) %s. Remux the file to choose another", path,
                        first.tracks, index + 1, others)
            return track
    log.warning("audio %s: all %d audio tracks are silent; track 1 is used (the face will barely move)", path,
                first.tracks)
    return first


def read_audio(path: str | os.PathLike, max_seconds: float = 0.0) -> tuple[torch.Tensor, int]:
    """Decode any audio (or video-with-audio) file with PyAV: waveform [1,C,T] float32, sample rate.

    Integer PCM becomes float (8-bit unsigned around 128, wider PCM signed). A file that decodes
    to less than it declares (a truncated download) is used as far as it goes, with a warning; one
    that decodes to more than it declares is used whole, with a warning naming both lengths (a
    WAV whose data chunk size is too small is read to its end). NaN / inf samples and samples
    beyond ``AUDIO_MAX_PEAK`` are refused, naming the file. Of several audio tracks the first with
    sound is used. ``max_seconds > 0``: decoding stops once the samples a run capped there reads
    are in (``audio.source_samples_needed``: the cap rounded up to whole 30 s whisper chunks, plus a
    second), so an hour-long file costs what half a minute does.
    """
    from .audio import check_samples
    from .config import TRUNCATED_AUDIO_TOLERANCE_S as TOLERANCE
    from .paths import check_input

    check_input(path, "audio", fix="give an audio file (wav, mp3, flac, m4a) or a video with sound")
    track = _pick_track(path, _decode_track(path, 0, max_seconds), max_seconds)
    sizes = wav_sizes(path)
    if track.stopped:
        log.info("audio %s: read the first %.1f s (--max-seconds %g and whole 30 s whisper chunks)", path,
                 track.seconds, max_seconds)
    elif sizes is not None and sizes.undeclared_s > TOLERANCE and track.damage is None:
        whole = _decode_track(path, 0, max_seconds, WAV_IGNORE_LENGTH)
        log.warning("audio %s: its WAV header declares %.2f s of audio but the file holds %.2f s of samples; "
                    "all %.2f s are used (the header is wrong: re-export the file to fix it)", path,
                    sizes.declared_s, whole.seconds, whole.seconds)
        track = whole
    check_samples(torch.from_numpy(track.wave), track.rate, f"audio {path}")  # before any model loads
    declared = sizes.declared_s if sizes is not None and track.tracks == 1 else track.declared
    decoded = track.seconds
    if track.damage is not None or (not track.stopped and declared is not None
                                    and declared - decoded > TOLERANCE):
        said = f"declares {declared:.2f} s of audio but" if declared else "is damaged:"
        log.warning("audio %s %s only %.2f s could be decoded%s; the file is probably truncated (an "
                    "interrupted download or copy): only the decoded part is used, the video will be that "
                    "long. Re-export or download it again for the whole clip", path, said, decoded,
                    f" ({track.damage})" if track.damage is not None else "")
    elif not track.stopped and declared is not None and decoded - declared > TOLERANCE and \
            not (sizes is not None and sizes.undeclared_s > TOLERANCE):
        log.warning("audio %s declares %.2f s of audio but %.2f s decode: its header is wrong; all %.2f s "
                    "are used (re-export the file to fix its header)", path, declared, decoded, decoded)
    return torch.from_numpy(track.wave)[None], track.rate
