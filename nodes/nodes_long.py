"""Long clips: SonicLatentToVideo (decode + RIFE + save, streaming) and SonicLatentSegment (one
segment of a clip at a time through any chain of IMAGE nodes, appended by Video Combine), and
SonicAddFace (the other faces of a conversation, for Latent To Video's more_faces).

The sampler's LATENT is small (64 KB a frame at 512x512); decoded frames are not (3 MB a frame as
float32, and ComfyUI keeps every node's output). Both nodes decode in the temporal decoder's own
chunks (sonic_core/stream.py), so the frames equal a one-pass decode of that chunk size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import torch

from . import runtime
from .nodes_paste import color_input, paste_inputs
from .nodes_video import (AUDIO_INPUT, RIFE_BATCH_TIP, VIDEO_TIP, _load_rife, _rife_files, audio_track,
                          file_inputs, file_metadata, rife_batch, saved)
from .runtime import core

log = logging.getLogger(__name__)

_config = core("config")
_video = core("video")
NO_RIFE = "none"
LIMIT_OF = {"fps": "frame_rate", "multiplier": "rife_multiplier", "decode_chunk_size": "decode_chunk_or_auto",
            "rife_batch_size": "rife_batch", "paste_feather": "paste_feather"}  # input name -> config.LIMITS key
KEY_SAMPLES = 4096  # latent values hashed to tell one clip from another


def _latents(latent, what: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] < 1:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
        raise ValueError(f"{what}: expected the Sonic Sampler's LATENT (samples [frames, 4, h, w]), got {got}")
    if samples.shape[1] != _config.LATENT_CHANNELS:  # before any decode: the VAE's conv would fail on it
        raise ValueError(
            f"{what}: the LATENT has {samples.shape[1]} channels (samples {tuple(samples.shape)}), but Sonic / SVD-xt "
            f"latents have {_config.LATENT_CHANNELS}: this one comes from another model's sampler or VAE (16 "
            "channels: SD3, Flux, Wan). Connect the Sonic Sampler's latent, decoded with the SVD-xt VAE (SVD VAE "
            "+ Image Encoder Loader or the svd_xt checkpoint)")
    return samples


def _chunk_input(tip_extra: str = "") -> tuple:
    return _config.LIMITS["decode_chunk_or_auto"].widget(
        "Frames the temporal VAE decodes together; 0 = the VAE's own setting (SVD VAE "
        "Loader's decode_chunk_size, else the official 8)." + tip_extra)


@dataclasses.dataclass(frozen=True)
class SonicSegment:
    """What Latent Segment tells Video Combine (the SONIC_SEGMENT type)."""

    segment: object  # sonic_core.stream.Segment
    job: str  # one clip: its latents and segment settings
    node_id: str  # the Latent Segment node in the prompt, whose segment_index the next run changes


class SonicLatentToVideo:
    DESCRIPTION = ("Decodes the Sonic Sampler's latent, doubles the frame rate with RIFE and saves the video, "
                   "all in chunks: memory stays the same for a 10-minute clip as for 10 seconds. Use it "
                   "instead of VAE Decode -> Frame Interpolate -> Video Combine when nothing else goes in "
                   "between; for upscalers or face restorers on long clips use Latent Segment. With photo and "
                   "face_box connected it pastes the animated crop back into the whole photo while it streams "
                   "(as Sonic Paste Back), so the video has the photo's own resolution; more_faces (Add Face) pastes "
                   "the other faces of a conversation into the same frames in the same pass.")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("decode video", "latent to video", "save video", "mp4",
                                            "paste back", "解码视频")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("pix_fmt", "decode_chunk_size", "rife_batch_size", "paste_feather", "paste_region")
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("filename", "video")
    OUTPUT_TOOLTIPS = ("Full path of the saved video file.", VIDEO_TIP)

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "latent": ("LATENT", {"tooltip": "From Sonic Sampler: one latent per generated frame."}),
                "vae": ("VAE", {"tooltip": "The SVD-xt VAE the sampler used (SVD VAE + Image Encoder Loader or "
                                           "the svd_xt checkpoint)."}),
                "fps": _config.LIMITS["frame_rate"].widget(
                    "Frame rate of the generated frames: connect the sampler's fps (12.5). The file plays at "
                    "this times the multiplier.", step=0.01),
                "rife_model": ([NO_RIFE, *_rife_files()], {
                    "default": _rife_files()[0],
                    "tooltip": "RIFE weights under models/sonic (the official RIFE/flownet.pkl), or none to "
                               "save the generated frames as they are."}),
                "multiplier": _config.LIMITS["rife_multiplier"].widget(
                    "2: one new frame per pair (12.5 -> 25 fps); 4: twice.", step=2),
                **file_inputs(),
            },
            "optional": {
                "audio": AUDIO_INPUT,
                "decode_chunk_size": _chunk_input(),
                "rife_batch_size": _config.LIMITS["rife_batch"].widget(RIFE_BATCH_TIP),
                "photo": ("IMAGE", {"tooltip": "Paste-back: the original photo (the image given to Face Mask "
                                               "Detect). With face_box, the video is the whole photo at its own "
                                               "resolution with the animated crop blended in."}),
                "face_box": ("SONIC_FACE_BOX", {"tooltip": "Paste-back: Face Mask Detect's face_box (crop on). "
                                                          "Connect it together with photo."}),
                **paste_inputs("paste_"),
                "more_faces": ("SONIC_FACES", {"tooltip": "Several faces of one photo: the other faces, each "
                                                          "its own sampler's latent and face box bundled by Add "
                                                          "Face. They are decoded in step with this latent and "
                                                          "pasted into the same frames (photo and face_box must be "
                                                          "connected too); an extra face costs one decode chunk "
                                                          "of memory, not a clip."}),
                "color_match": color_input(),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }, cls.ADVANCED_INPUTS)

    def save(self, latent, vae, fps, rife_model, multiplier, filename_prefix, format="h264-mp4",
             crf=_config.VIDEO_CRF, pix_fmt="yuv420p", audio=None, decode_chunk_size=0,
             rife_batch_size=_config.RIFE_BATCH, photo=None, face_box=None, paste_feather=_config.PASTE_FEATHER,
             paste_region=_config.PASTE_REGION, more_faces=None, color_match=_config.PASTE_COLOR_MATCH, prompt=None,
             extra_pnginfo=None):
        stream, interp = core("stream"), core("interpolate")
        n = _config.check_inputs(dict(fps=fps, multiplier=multiplier, crf=crf, decode_chunk_size=decode_chunk_size,
                                      rife_batch_size=rife_batch_size, paste_feather=paste_feather),
                                 LIMIT_OF)  # NaN, inf, out of range
        fps, multiplier, crf = n["fps"], n["multiplier"], n["crf"]
        decode_chunk_size, rife_batch_size = n["decode_chunk_size"], n["rife_batch_size"]
        paste_feather = n["paste_feather"]
        latents = _latents(latent, "Latent To Video")
        multiplier = int(multiplier)
        if multiplier not in interp.MULTIPLIERS:
            raise ValueError(f"multiplier {multiplier} is not supported: use one of {interp.MULTIPLIERS}")
        out_fps = float(fps) * (multiplier if rife_model != NO_RIFE else 1)
        _video._check_args(out_fps, format, int(crf), pix_fmt)  # before any decode
        if rife_model != NO_RIFE:
            interp.check_frame_count(latents.shape[0])  # before RIFE loads or anything decodes
        sound = audio_track(audio)
        h, w = (n * _config.VAE_SCALE for n in latents.shape[-2:])  # frame size in px
        paste = None
        if (photo is None) != (face_box is None):
            raise ValueError(f"Latent To Video: paste-back needs both photo and face_box; only "
                             f"{'photo' if face_box is None else 'face_box'} is connected (connect the other, "
                             "or neither for the crop video)")
        if more_faces and photo is None:
            raise ValueError("Latent To Video: more_faces are pasted into the photo: connect photo and face_box "
                             "(the first face) too")
        if photo is not None:
            paste = core("image").plan_paste(photo, face_box, float(paste_feather), paste_region, bool(color_match))
            if paste is not None:
                paste.check_frames(h, w)  # before any decode
                out_frames = latents.shape[0] * (multiplier if rife_model != NO_RIFE else 1)
                core("budget").check_paste_stream(paste.size, out_frames, encoder=format == "h264-mp4")  # photo-sized
        faces = _faces(latents, paste, more_faces, photo, float(paste_feather), paste_region, bool(color_match))
        decoder = runtime.ChunkDecoder(vae)
        chunk = decoder.chunk_size(int(decode_chunk_size))
        rife = _load_rife(rife_model).load() if rife_model != NO_RIFE else None
        pairs = rife_batch(rife_batch_size, rife, h, w) if rife is not None else 1
        if faces:
            frames = stream.video_frames_faces(decoder, faces, chunk, rife, multiplier, pairs)
        else:
            frames = stream.video_frames(decoder, latents, chunk, rife, multiplier, pairs, paste=paste)
        log.info("Latent To Video: %d latents -> %d frames at %g fps; holds one decode chunk of %d and one "
                 "RIFE batch at a time", latents.shape[0], len(frames), out_fps, chunk)
        progress = runtime.Progress(len(frames), "Latent To Video")
        path, subfolder, name = _video.save_video(
            frames, runtime.output_dir(), filename_prefix, out_fps, audio=sound, format=format, crf=int(crf),
            pix_fmt=pix_fmt, metadata=file_metadata(prompt, extra_pnginfo), callback=progress.callback())
        return saved(path, subfolder, name)


def _faces(latents, paste, more_faces, photo, feather: float, region: str, color_match: bool) -> list | None:
    """Latent To Video's faces ``[(latents, PasteBack), ...]`` when ``more_faces`` is connected (else None):
    the first face, then each of more_faces, all checked (crop, frame size, frame count) before any decode."""
    if not more_faces:
        return None
    if paste is None:
        raise ValueError("Latent To Video: face_box has no crop, so more_faces cannot be pasted: turn crop on in "
                         "every Face Mask Detect")
    faces = [(latents, paste)]
    for i, face in enumerate(_check_faces(more_faces, "Latent To Video: more_faces"), 2):
        samples = face["latent"]["samples"]
        one = core("image").plan_paste(photo, face["face_box"], feather, region, color_match)
        if one is None:
            raise ValueError(f"Latent To Video: face {i}'s face box has no crop: turn crop on in its Face Mask Detect")
        one.check_frames(*(n * _config.VAE_SCALE for n in samples.shape[-2:]))
        faces.append((samples, one))
    core("stream").check_faces(faces)  # the same frame count, named face by face
    return faces


def _check_faces(faces, what: str) -> list:
    """A SONIC_FACES list (Add Face): ``[{"latent": LATENT, "face_box": FaceBox}, ...]``, checked."""
    if not isinstance(faces, (list, tuple)) or not all(
            isinstance(f, dict) and {"latent", "face_box"} <= set(f) for f in faces):
        raise ValueError(f"{what}: expected Add Face's faces (SONIC_FACES), got {type(faces).__name__}")
    for i, f in enumerate(faces, 1):
        _latents(f["latent"], f"{what} face {i}")
        if not hasattr(f["face_box"], "crop_xyxy"):
            raise ValueError(f"{what} face {i}: expected Face Mask Detect's face_box, got "
                             f"{type(f['face_box']).__name__}")
    return list(faces)


class SonicAddFace:
    DESCRIPTION = ("Several faces of one photo (a conversation): bundles one face's sampler latent with its face "
                   "box for Latent To Video's more_faces. Chain one Add Face per extra face (faces -> faces). "
                   "Every face comes from the same photo (its own Face Mask Detect with face_index and crop on) "
                   "and its own Sonic Sampler run with the same frame count; Latent To Video decodes them all in "
                   "step and pastes each into the same frames.")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("add face", "multiple faces", "several faces", "conversation", "多人")
    ADVANCED_INPUTS = ()
    FUNCTION = "add"
    RETURN_TYPES = ("SONIC_FACES",)
    RETURN_NAMES = ("faces",)
    OUTPUT_TOOLTIPS = ("The faces so far, this one last: connect to Latent To Video's more_faces or to the next "
                       "Add Face.",)

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "latent": ("LATENT", {"tooltip": "This face's Sonic Sampler latent (same frame count as the "
                                                 "other faces)."}),
                "face_box": ("SONIC_FACE_BOX", {"tooltip": "This face's face_box from Face Mask Detect (crop on, "
                                                          "on the same photo as the other faces)."}),
            },
            "optional": {
                "faces": ("SONIC_FACES", {"tooltip": "Faces added before (an earlier Add Face), to chain three or "
                                                     "more faces."}),
            },
        }, cls.ADVANCED_INPUTS)

    def add(self, latent, face_box, faces=None):
        new = _check_faces([{"latent": latent, "face_box": face_box}], "Add Face")
        if getattr(face_box, "crop_xyxy", None) is None:
            raise ValueError("Add Face: the face box has no crop; turn crop on in its Face Mask Detect (a face is "
                             "pasted back into the photo)")
        before = _check_faces(faces, "Add Face: faces") if faces is not None else []
        return (before + new,)


def _job_key(samples: torch.Tensor, length: int, chunk: int) -> str:
    """Tells one clip's latents from another's without hashing all of them (490 MB at 10 min)."""
    flat = samples.reshape(-1)
    step = max(1, flat.numel() // KEY_SAMPLES)
    picked = flat[::step][:KEY_SAMPLES].to("cpu", torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=12)
    h.update(repr((tuple(samples.shape), str(samples.dtype), length, chunk)).encode())
    h.update(picked.numpy().tobytes())
    return h.hexdigest()


def _check_cache(latent: dict, segments: int) -> None:
    """Segments re-queue the workflow; what the sampler costs each time depends on ComfyUI's cache.
    Classic and --cache-lru keep its output. RAM pressure (--cache-ram, ComfyUI 0.33's default) may
    drop it and --cache-none always does:
    then the sampler runs again, which is cheap only when it kept its result on disk (the LATENT
    says so, see runtime.KEPT_RESULT_KEY): it returns that without sampling."""
    mode = runtime.cache_mode()
    kept = latent.get(runtime.KEPT_RESULT_KEY) if isinstance(latent, dict) else None
    if mode not in ("none", "ram"):
        return
    if kept:
        log.info("Latent Segment: ComfyUI runs with %s; the nodes before this one may run again for "
                 "each of the %d segments, but the sampler returns its kept result %s without sampling",
                 runtime.CACHE_MODE_NAMES[mode], segments, kept)
        return
    why = (f"the Sonic Sampler did not keep its result on disk ({runtime.RESUME_ENV} not writable, "
           f"{_config.RESULT_KEEP_ENV}=0, or the result is over that cap)")
    if mode == "none":
        raise ValueError("ComfyUI runs with --cache-none, which forgets the sampler's result between "
                         f"segments, and {why}, so all {segments} segments would sample the clip again: raise "
                         f"{_config.RESULT_KEEP_ENV} or fix the folder, start ComfyUI without --cache-none, "
                         "or use Latent To Video (streaming)")
    log.warning("Latent Segment: ComfyUI runs with %s, which may drop the sampler's result between "
                "segments, and %s: a later segment may sample the clip again", runtime.CACHE_MODE_NAMES[mode], why)


def _follow(leader, plan: list, frames: int) -> int:
    """The segment index of ``leader`` (another face's Latent Segment output), refused unless this latent
    splits into the very same segments (same frame count, segment_frames and decode chunk)."""
    seg = getattr(leader, "segment", None)
    if seg is None or not hasattr(leader, "job"):
        raise ValueError(f"same_segment_as is a {type(leader).__name__}; connect another Latent Segment's segment")
    if seg.total != frames:
        raise ValueError(f"Latent Segment: this latent has {frames} frames but the one of same_segment_as has "
                         f"{seg.total}: every face must have the same frame count")
    mine = plan[seg.index] if seg.index < len(plan) else None
    if len(plan) != seg.count or mine is None or (mine.start, mine.stop) != (seg.start, seg.stop):
        raise ValueError(f"Latent Segment: {len(plan)} segment(s) here but {seg.count} in same_segment_as: use the "
                         "same segment_frames and decode_chunk_size in every face's Latent Segment")
    return seg.index


class SonicLatentSegment:
    DESCRIPTION = ("Long clips through any IMAGE nodes (upscalers, face restorers, ...): decodes one segment of "
                   "the sampler's latent at a time. Connect its segment to Sonic Video Combine, which appends "
                   "every segment to one video and queues the next by itself while ComfyUI keeps the "
                   "sampler's result, so only one segment of frames is ever in memory. Every segment after "
                   "the first starts with the previous one's last frame, so RIFE joins them exactly; "
                   "Video Combine drops it.")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("long video", "segment", "decode segment", "长视频")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("segment_index", "decode_chunk_size")
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "SONIC_SEGMENT")
    RETURN_NAMES = ("images", "segment")
    OUTPUT_TOOLTIPS = ("This segment's frames (after the first segment, led by the previous segment's last "
                       "frame), for frame-by-frame nodes such as Frame Interpolate or an upscaler.",
                       "Which segment this is: connect to Sonic Video Combine's segment input.")

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "latent": ("LATENT", {"tooltip": "From Sonic Sampler: one latent per generated frame."}),
                "vae": ("VAE", {"tooltip": "The SVD-xt VAE the sampler used."}),
                "segment_frames": _config.LIMITS["segment_frames"].widget(
                    "Generated frames per segment (rounded up to whole decode chunks; 96 is 7.7 s). Memory grows "
                    "with it: lower it for big upscales, raise it for fewer queue runs."),
                "segment_index": _config.LIMITS["segment_index"].widget(
                    "Leave at 0: queueing renders segment 0 and each later one is queued by itself. The next "
                    "runs change it server-side; the widget stays 0."),
            },
            "optional": {
                "decode_chunk_size": _chunk_input(" Must stay the same for every segment."),
                "same_segment_as": ("SONIC_SEGMENT", {
                    "tooltip": "Several faces: connect the first face's Latent Segment segment output. This "
                               "node then decodes the same segment of its own latent (its segment_index is "
                               "ignored), so each queued run renders every face's segment; chain the faces' "
                               "Sonic Paste Backs and give Video Combine either segment."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }, cls.ADVANCED_INPUTS)

    def decode(self, latent, vae, segment_frames, segment_index, decode_chunk_size=0, same_segment_as=None,
               unique_id=None):
        stream = core("stream")
        n = _config.check_inputs(dict(segment_frames=segment_frames, segment_index=segment_index,
                                      decode_chunk_size=decode_chunk_size), LIMIT_OF)
        segment_frames, segment_index, decode_chunk_size = (n["segment_frames"], n["segment_index"],
                                                            n["decode_chunk_size"])
        latents = _latents(latent, "Latent Segment")
        decoder = runtime.ChunkDecoder(vae)
        chunk = decoder.chunk_size(int(decode_chunk_size))
        plan = stream.plan_segments(latents.shape[0], int(segment_frames), chunk)
        index = int(segment_index)
        if same_segment_as is not None:
            index = _follow(same_segment_as, plan, latents.shape[0])
        if not 0 <= index < len(plan):
            raise ValueError(f"segment_index {index} is past the last segment: this clip has {len(plan)} "
                             f"segment(s) of {plan[0].stop - plan[0].start} frames; set it to 0")
        if len(plan) > 1:
            _check_cache(latent, len(plan))
        seg = plan[index]
        log.info("Latent Segment %d/%d: latent frames %d-%d of %d", index + 1, len(plan), seg.start, seg.stop - 1,
                 seg.total)
        images = stream.decode_segment(decoder, latents, seg, chunk)  # [leading + n, H, W, 3]
        key = _job_key(latents, plan[0].stop - plan[0].start, chunk)
        if same_segment_as is not None:  # one clip, queued through the first face's node
            return (images, SonicSegment(seg, f"{same_segment_as.job}+{key}", same_segment_as.node_id))
        return (images, SonicSegment(seg, key, str(unique_id) if unique_id is not None else ""))


NODE_CLASS_MAPPINGS = {"SonicLatentToVideo": SonicLatentToVideo, "SonicLatentSegment": SonicLatentSegment,
                       "SonicAddFace": SonicAddFace}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicLatentToVideo": "Latent To Video (streaming decode + RIFE + save)",
                              "SonicLatentSegment": "Latent Segment (long clips)",
                              "SonicAddFace": "Add Face (conversation)"}
