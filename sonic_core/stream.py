"""Frames after the sampler, in chunks: VAE decode -> RIFE -> (paste back) -> encoder, never the whole clip.

The sampler's latents are small (64 KB a frame at 512x512); decoded frames are not (3 MB a frame
as float32, 7500 frames in ten minutes). Here every stage is a generator of ``[n, H, W, 3]``
chunks, so host memory holds one decode chunk plus one RIFE batch, whatever the length.

The result equals the all-at-once path (``vae.decode`` of every latent, then
``interpolate.interpolate``, then ``video.write_video``):

* decode chunks are the temporal decoder's own chunks (``decode_chunk_size`` consecutive frames,
  the last one shorter), because the decoder mixes frames only inside a chunk (SPEC §11);
* RIFE keeps the last frame of the previous chunk, so the pair that straddles a chunk border is
  interpolated from the same two frames as in one pass, and each original frame is emitted once.

Several faces of one photo (``video_frames_faces``) stream in lockstep: every face's chunks are
decoded side by side and each frame is pasted face after face, so one more face costs one chunk.

Segments (``plan_segments`` / ``decode_segment``) are the same idea across separate runs, for a
chain of other nodes that each need a whole IMAGE batch: a segment is a run of whole decoder
chunks, and every segment after the first starts with one *leading* frame, the last decoded frame
of the segment before. Any frame-by-frame chain (RIFE, an upscaler, a face restorer) then sees at
the border exactly what it sees in one pass, and dropping the first output frame of every later
segment leaves the one-pass video: RIFE over ``[prev, s0, s1, ...]`` gives
``prev, mid(prev, s0), s0, ...``, and ``prev`` was already written as the previous segment's end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .interpolate import MULTIPLIERS, _double, check_frame_count, interpolated_length

log = logging.getLogger(__name__)

Callback = Callable[[int, int], None] | None


def decode_chunks(vae, latents: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """VAE-space latents ``[F, 4, h, w]`` -> decoded chunks ``[c, H, W, 3]`` (0..1), in order.

    ``vae.decode`` is called once per temporal-decoder chunk of ``chunk_size`` frames, exactly the
    chunks a whole-clip ``vae.decode`` forms, so the frames are the same.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be [frames, 4, h, w], got {tuple(latents.shape)}")
    if chunk_size < 1:
        raise ValueError(f"decode chunk size {chunk_size} must be at least 1")
    for start in range(0, latents.shape[0], chunk_size):
        yield vae.decode(latents[start:start + chunk_size], chunk_size)  # [c,H,W,3]


def interpolate_chunks(model: nn.Module, chunks: Iterable[torch.Tensor], multiplier: int = 2,
                       batch_size: int = 4, callback: Callback = None,
                       total_pairs: int = 0) -> Iterator[torch.Tensor]:
    """RIFE over a stream of ``[n, H, W, 3]`` chunks -> interpolated chunks, in order.

    The first chunk's first frame is emitted as is; every later output chunk is what one pass
    gives after the frame already emitted: ``mid(prev, c0), c0, mid(c0, c1), ..., c_{n-1}``.
    ``multiplier`` 4 chains two 2x passes. ``callback(done, total_pairs)`` counts frame pairs.
    """
    if multiplier not in MULTIPLIERS:
        raise ValueError(f"multiplier {multiplier} is not supported: use one of {MULTIPLIERS}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if callback is not None:
            callback(done, max(total_pairs, done))

    def one_pass(stream: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        prev = None  # [1, H, W, 3], the last frame emitted
        for chunk in stream:
            if chunk.shape[0] == 0:
                continue
            if prev is None:
                yield chunk[:1]
                frames = chunk
            else:
                frames = torch.cat([prev, chunk[..., :3]])  # [n+1, H, W, 3]
            if frames.shape[0] > 1:
                yield _double(model, frames, batch_size, step)[1:]  # [2n-1 or 2n, H, W, 3]
            prev = frames[-1:, ..., :3]

    out: Iterable[torch.Tensor] = chunks
    for _ in range(multiplier.bit_length() - 1):
        out = one_pass(out)
    yield from out


class FrameStream:
    """An iterable of ``[H, W, 3]`` frames drawn from chunks, with a known length for progress."""

    def __init__(self, chunks: Iterable[torch.Tensor], length: int):
        self.chunks = chunks
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self.chunks:
            yield from chunk
            del chunk  # not held while the next chunk is made (paste-back: one photo-sized frame each)


def paste_chunks(paste, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each frame of a stream of crop chunks ``[n, h, w, 3]`` pasted into the photo by ``paste``
    (a ``sonic_core.image.PasteBack``), one ``[1, H, W, 3]`` at a time on the chunk's device, so
    one photo-sized frame is alive however large the chunks are."""
    done = 0
    for chunk in chunks:
        for k in range(chunk.shape[0]):
            yield paste(chunk[k:k + 1], start=done)  # [1, H, W, 3]; frame done into base frame done
            done += 1


def _crop_chunks(vae, latents: torch.Tensor, chunk_size: int, rife: nn.Module | None, multiplier: int,
                 batch_size: int, callback: Callback) -> tuple[Iterable[torch.Tensor], int]:
    """Decoded (and RIFE-interpolated when ``rife`` is given) chunks ``[c, h, w, 3]`` of one clip, and
    how many frames they hold in all. Lazy: nothing runs until iterated."""
    num = latents.shape[0]
    chunks: Iterable[torch.Tensor] = decode_chunks(vae, latents, chunk_size)
    length = num
    if rife is not None:
        check_frame_count(num)
        length = interpolated_length(num, multiplier)
        pairs, n = 0, num
        for _ in range(multiplier.bit_length() - 1):  # each 2x pass interpolates n - 1 pairs
            pairs, n = pairs + n - 1, 2 * n - 1
        chunks = interpolate_chunks(rife, chunks, multiplier, batch_size, callback, pairs)
    return chunks, length


def video_frames(vae, latents: torch.Tensor, chunk_size: int, rife: nn.Module | None = None,
                 multiplier: int = 2, batch_size: int = 4, callback: Callback = None,
                 paste=None) -> FrameStream:
    """Latents ``[F, 4, h, w]`` -> a FrameStream of the output video's frames (decoded, then
    RIFE-interpolated when ``rife`` is given, then pasted into the whole photo when ``paste``, a
    ``sonic_core.image.PasteBack``, is given). Nothing runs until the stream is iterated."""
    num = latents.shape[0]
    chunks, length = _crop_chunks(vae, latents, chunk_size, rife, multiplier, batch_size, callback)
    if paste is not None:
        paste.check_count(length)
        chunks = paste_chunks(paste, chunks)
    log.info("streaming %d latents -> %d frames in chunks of %d%s", num, length, chunk_size,
             ", pasted into the %dx%d photo" % paste.size if paste is not None else "")
    return FrameStream(chunks, length)


def check_faces(faces) -> int:
    """Several faces of one photo, ``[(latents [F, 4, h, w], paste), ...]``: refused (naming the face
    and the counts) unless every face has a PasteBack onto a photo of one size and the same latent
    frame count. Returns that count."""
    if not faces:
        raise ValueError("no face to paste: give at least one (latents, paste-back) pair")
    counts = []
    for i, (latents, paste) in enumerate(faces, 1):
        if paste is None:
            raise ValueError(f"face {i} has no paste-back (its face box has no crop): with several faces every "
                             "face must be cropped (Face Mask Detect crop on, --crop)")
        if latents.ndim != 4:
            raise ValueError(f"face {i}: latents must be [frames, 4, h, w], got {tuple(latents.shape)}")
        counts.append(latents.shape[0])
        if paste.size != faces[0][1].size:
            raise ValueError(f"face {i} is pasted into a {paste.size[0]}x{paste.size[1]} photo but face 1 into "
                             f"a {faces[0][1].size[0]}x{faces[0][1].size[1]} one: every face must come from the "
                             "same photo")
    for i, c in enumerate(counts[1:], 2):
        if c != counts[0]:
            raise ValueError(f"face {i} has {c} latent frames but face 1 has {counts[0]}: every face must have "
                             "the same frame count (pad every voice to the longest, the same max seconds and "
                             "fps for every face)")
    return counts[0]


def paste_faces(faces: list, streams: list[Iterable[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Lockstep over one frame stream per face (``[H, W, 3]`` crop frames): frame k of every face
    pasted in turn, face 1 into its photo (or base frame k), each later face onto the result, so
    one photo-sized frame ``[1, H, W, 3]`` is alive at a time."""
    iters = [iter(s) for s in streams]
    pastes = [paste for _, paste in faces]
    k = 0
    while True:
        crops = [next(it, None) for it in iters]
        if all(c is None for c in crops):
            return
        if any(c is None for c in crops):
            short = [i for i, c in enumerate(crops, 1) if c is None]
            raise ValueError(f"face(s) {short} ran out of frames at frame {k}: every face needs the same count")
        frame = pastes[0](crops[0][None], start=k)  # [1, H, W, 3]
        for paste, crop in zip(pastes[1:], crops[1:]):
            paste(crop[None], out=frame, start=k, base=frame)  # in place: face after face
        yield frame
        k += 1


def video_frames_faces(vae, faces: list, chunk_size: int, rife: nn.Module | None = None,
                       multiplier: int = 2, batch_size: int = 4, callback: Callback = None) -> FrameStream:
    """Several faces of one photo -> a FrameStream of the video's photo-sized frames ``[H, W, 3]``.

    ``faces``: ``[(latents [F, 4, h, w], paste), ...]``, one per face, ``paste`` a
    ``sonic_core.image.PasteBack`` built on the same photo (its face box's ``others`` keep every other
    face out of its blend). Every face's latents are decoded (and RIFE-interpolated) chunk by chunk in
    lockstep, so one more face holds one more decode chunk and RIFE batch, never a clip. Frame k is
    face 1's frame k pasted into the photo, then face 2's onto that, and so on: the frames of chained
    Sonic Paste Back nodes. ``callback(done, total)`` counts face 1's RIFE pairs. Refused before any
    decode when the faces' frame counts or photo sizes differ (``check_faces``)."""
    num = check_faces(faces)
    streams, length = [], num
    for i, (latents, paste) in enumerate(faces):
        chunks, length = _crop_chunks(vae, latents, chunk_size, rife, multiplier, batch_size,
                                      callback if i == 0 else None)
        paste.check_count(length)
        streams.append(FrameStream(chunks, length))
    log.info("streaming %d faces of %d latents -> %d frames in chunks of %d, pasted into the %dx%d photo",
             len(faces), num, length, chunk_size, *faces[0][1].size)
    return FrameStream(paste_faces(faces, streams), length)


@dataclass(frozen=True)
class Segment:
    """Latent frames ``[start, stop)`` of a clip rendered in ``count`` segments (``index`` from 0)."""

    index: int
    count: int
    start: int
    stop: int
    total: int  # latent frames of the whole clip
    leading: int  # frames before the segment's own (1 after the first segment: the previous last frame)

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def segment_length(segment_frames: int, chunk_size: int) -> int:
    """``segment_frames`` rounded up to whole decoder chunks (at least one chunk)."""
    if segment_frames < 1:
        raise ValueError(f"segment_frames {segment_frames} must be at least 1")
    if chunk_size < 1:
        raise ValueError(f"decode chunk size {chunk_size} must be at least 1")
    return max(1, math.ceil(segment_frames / chunk_size)) * chunk_size


def plan_segments(num_frames: int, segment_frames: int, chunk_size: int) -> list[Segment]:
    """The segments of a clip of ``num_frames`` latents: whole decoder chunks each, the last shorter."""
    if num_frames < 1:
        raise ValueError(f"the latent has {num_frames} frames; connect the sampler's latent")
    length = segment_length(segment_frames, chunk_size)
    starts = list(range(0, num_frames, length))
    return [Segment(index=k, count=len(starts), start=s, stop=min(s + length, num_frames), total=num_frames,
                    leading=1 if k else 0) for k, s in enumerate(starts)]


def decode_segment(vae, latents: torch.Tensor, segment: Segment, chunk_size: int) -> torch.Tensor:
    """Frames ``[leading + stop - start, H, W, 3]`` of one segment: its decoded latents, after the
    previous segment's last frame when ``segment.leading`` (decoded within its own chunk, so it is
    the very frame the previous segment ended with). ``vae.decode(latents, chunk_size)`` is called
    once per decoder chunk, the chunks of a one-pass decode."""
    if segment.start % chunk_size:
        raise ValueError(f"segment start {segment.start} is not on a decoder chunk border ({chunk_size})")
    parts = []
    if segment.leading:
        parts.append(vae.decode(latents[segment.start - chunk_size:segment.start], chunk_size)[-1:])  # [1,H,W,3]
    parts.extend(decode_chunks(vae, latents[segment.start:segment.stop], chunk_size))
    return torch.cat(parts)  # [leading + n, H, W, 3]
