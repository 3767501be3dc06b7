"""SonicFrameInterpolate (RIFE 2x / 4x) and SonicVideoCombine (frames + audio -> a playable file)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from . import runtime
from .runtime import core

log = logging.getLogger(__name__)
_config = core("config")
_video = core("video")
_RIFE_DEFAULT = "RIFE/flownet.pkl"  # where the official checkpoint goes under models/sonic
_rife_cache: dict = {}  # {(path, mtime): ManagedModel}: one RIFE kept between runs
# A saved video's workflow is dropped back onto the canvas later. Frontend 1.27.10 checks it against
# its zod schema and shows an alert on a null where the schema wants an array, object or number
# (floatingLinks, extra.reroutes, definitions, slot_index, ...); there "absent" is written by leaving
# the key out. Null means something only at these keys (an unconnected slot, an empty config/extra):
_NULLABLE_KEYS = frozenset({"link", "links", "linkIds", "config", "extra"})
_REQUIRED_EMPTY = {"nodes": list, "flags": dict, "properties": dict}  # required: an empty one stays
_OPAQUE_KEYS = frozenset({"widgets_values", "properties"})  # a node's own values: kept as they are


def _rife_files() -> list[str]:
    rife = core("models.rife")
    files = [f for f in runtime.list_files(rife.RIFE_SUFFIXES)
             if "rife" in f.lower() or "flownet" in f.lower()]
    return files or [_RIFE_DEFAULT]


def _load_rife(name: str):
    """The RIFE model for ``name``, loaded once and kept (reloaded if the file changes)."""
    path = runtime.resolve_path(name)
    key = (path, os.path.getmtime(path))
    if key not in _rife_cache:
        _rife_cache.clear()
        module = core("models.rife").load_rife(path, runtime.offload_device())
        _rife_cache[key] = runtime.ManagedModel(module, name="RIFEFlowNet")
    return _rife_cache[key]


def frontend_safe_workflow(value):
    """A copy of a UI workflow without the nulls the frontend's schema rejects: a null key is left
    out (or, where the key is required, an empty list/object), except where null is valid. A node's
    widgets_values and properties are copied unchanged."""
    if isinstance(value, list):
        return [frontend_safe_workflow(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if v is None and key not in _NULLABLE_KEYS:
            if key in _REQUIRED_EMPTY:
                out[key] = _REQUIRED_EMPTY[key]()
            continue
        out[key] = v if key in _OPAQUE_KEYS else frontend_safe_workflow(v)
    return out


AUDIO_INPUT = ("AUDIO", {"tooltip": "Sound to mux (AAC in mp4, Opus in webm); trimmed or padded with silence "
                                     "to the video's length."})


def file_inputs() -> dict:
    """The video file's widgets (name, format, quality, pixel format), shared by every node that saves."""
    return {
        "filename_prefix": ("STRING", {"default": "Sonic/sonic",
                                       "tooltip": "Name inside the output folder; 'Sonic/clip' -> "
                                                  "output/Sonic/clip_00001_.mp4. Cannot leave the "
                                                  "output folder."}),
        "format": (list(_video.FORMATS), {"default": "h264-mp4",
                                          "tooltip": "h264-mp4 plays everywhere; h265 is smaller; "
                                                     "vp9-webm for the web; gif has no audio."}),
        "crf": _config.LIMITS["crf"].widget("Quality: lower is better and larger (18 is visually lossless "
                                            "for h264; h264/h265 accept 0-51, vp9 0-63). Ignored for gif."),
        "pix_fmt": (list(_video.PIX_FMTS), {"default": "yuv420p",
                                            "tooltip": "yuv420p plays everywhere (odd sizes are "
                                                       "padded by one pixel); yuv444p keeps full "
                                                       "colour; yuv420p10le is 10-bit (not vp9)."}),
    }


def audio_track(audio):
    """ComfyUI AUDIO -> (waveform [C, T], sample rate) for sonic_core.video, or None."""
    if audio is None:
        return None
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected ComfyUI AUDIO {'waveform': [B, C, T], 'sample_rate': Hz}; "
                         "connect a Load Audio node")
    # any layout other nodes produce ([B, C, T], channels-last, no batch axis...): [C, T] of the first item
    core("audio").check_sample_rate(audio["sample_rate"], "audio")  # NaN / text: said, not int()'s error
    return (core("audio").standard_waveform(audio["waveform"], "audio")[0][0], int(audio["sample_rate"]))


def file_metadata(prompt, extra_pnginfo) -> dict:
    """The workflow and prompt as container tags (none with --disable-metadata)."""
    if not runtime.metadata_enabled():
        return {}
    metadata = {k: json.dumps(frontend_safe_workflow(v) if k == "workflow" else v)
                for k, v in (extra_pnginfo or {}).items()}
    if prompt is not None:
        metadata["prompt"] = json.dumps(prompt)
    return metadata


VIDEO_TIP = ("The saved file as ComfyUI's VIDEO, for core nodes such as Get Video Components or Save "
             "Video. With segments, nodes after it run once, after the last segment, on the whole video.")


def saved(path: str, subfolder: str, name: str) -> dict:
    """A saving node's return: the file shown in the UI, its path (STRING) and the core VIDEO."""
    preview = {"filename": name, "subfolder": subfolder, "type": "output"}
    return {"ui": {"images": [preview], "animated": (True,)}, "result": (path, runtime.video_output(path))}


# ----------------------------------------------------------------------------------------------
# Segments of a long clip: appended to one open file across queue runs
# ----------------------------------------------------------------------------------------------
SEGMENT_IDLE_S = 3600.0  # an unfinished segmented video untouched this long is given up (its temp file removed)


@dataclasses.dataclass
class _LiveVideo:
    writer: object  # sonic_core.video.VideoWriter
    settings: tuple  # (fps, prefix, format, crf, pix_fmt): the same for every segment
    next_index: int
    count: int
    touched: float
    audio: tuple | None = None  # _audio_key of the audio given with segment 1 (the one muxed)


_live: dict[str, _LiveVideo] = {}  # SONIC_SEGMENT job -> its open video


def _audio_key(sound) -> tuple | None:
    """What tells one audio track from another: its rate, shape and a hash of every sample (a 10-minute
    stereo track hashes in a fraction of a second; sampled values would miss an edit)."""
    if sound is None:
        return None
    import hashlib

    import torch

    wave, rate = sound
    samples = wave.detach().to("cpu")
    if samples.dtype not in (torch.float32, torch.float64, torch.int16, torch.int32):
        samples = samples.to(torch.float32)  # bfloat16 has no numpy buffer
    digest = hashlib.blake2b(samples.contiguous().numpy(), digest_size=16).hexdigest()
    return rate, tuple(wave.shape), str(wave.dtype), digest


def _drop_live(job: str, why: str) -> None:
    live = _live.pop(job, None)
    if live is not None:
        log.info("Video Combine: %s; its unfinished video (%d frames) is removed", why, live.writer.frames)
        live.writer.abort()


def _append_segment(images, segment, fps, prefix, format, crf, pix_fmt, sound, metadata):
    """Write one segment's frames (after its leading frame) to the clip's open video; publish it after
    the last segment, else queue the next segment. Segment 0 always starts a new file."""
    if not hasattr(segment, "segment") or not hasattr(segment, "job"):
        raise ValueError(f"segment is a {type(segment).__name__}; connect Latent Segment (long clips)")
    seg, job = segment.segment, segment.job
    now = time.monotonic()
    for other in [j for j, v in _live.items() if now - v.touched > SEGMENT_IDLE_S]:
        _drop_live(other, f"no segment arrived for {SEGMENT_IDLE_S / 60:.0f} min")
    settings = (fps, prefix, format, crf, pix_fmt)
    audio = _audio_key(sound)
    if seg.index == 0:
        _drop_live(job, "the clip starts again from segment 1")
        writer = _video.VideoWriter(runtime.output_dir(), prefix, fps, audio=sound, format=format, crf=crf,
                                    pix_fmt=pix_fmt, metadata=metadata)
        _live[job] = _LiveVideo(writer, settings, 0, seg.count, now, audio)
    live = _live.get(job)
    if live is None or live.next_index != seg.index:
        want = "segment 1" if live is None else f"segment {live.next_index + 1}"
        raise ValueError(f"segment {seg.index + 1} of {seg.count} arrived, but this clip's video expects {want}: "
                         "set Latent Segment's segment_index to 0 and queue again (the segments render "
                         "in order into one file)")
    if live.settings != settings:
        _drop_live(job, "its settings changed between segments")
        raise ValueError("frame_rate, filename_prefix, format, crf or pix_fmt changed between segments of "
                         "one clip: set segment_index to 0 and queue again")
    if live.audio != audio:
        _drop_live(job, "its audio changed between segments")
        was, now_is = ("no audio" if k is None else f"{k[1][-1]} samples at {k[0]} Hz" for k in (live.audio, audio))
        raise ValueError(f"the audio changed between segments of one clip (segment 1 had {was}, segment "
                         f"{seg.index + 1} has {now_is}{', other samples' if was == now_is else ''}): the video "
                         "has one audio track, the one given with segment 1. Connect the same audio for every "
                         "segment, set segment_index to 0 and queue again")
    frames = images[seg.leading:]
    if frames.shape[0] == 0:
        raise ValueError(f"segment {seg.index + 1} has no frames after its leading frame: the nodes between "
                         "Latent Segment and Video Combine must keep every frame")
    progress = runtime.Progress(frames.shape[0], f"Video Combine (segment {seg.index + 1}/{seg.count})")
    try:
        live.writer.write(frames, callback=progress.callback())  # aborts the file on an error or cancel
    except BaseException:
        _live.pop(job, None)
        raise
    live.next_index, live.touched = seg.index + 1, time.monotonic()
    if not seg.last:
        if runtime.cache_forgets_outputs():
            log.info("ComfyUI runs with --cache-none: the nodes before Latent Segment run again for the next "
                     "segment (the sampler returns its kept result)")
        queued = runtime.queue_prompt_again(segment.node_id, "segment_index", seg.index + 1)
        log.info("Video Combine: segment %d/%d appended (%d frames so far); %s", seg.index + 1, seg.count,
                 live.writer.frames, "the next one is queued" if queued else
                 f"run segment_index {seg.index + 1} next")
        return {"ui": {"text": [f"segment {seg.index + 1}/{seg.count}"]},
                "result": ("", runtime.video_not_ready())}  # no file yet: nodes after VIDEO wait
    del _live[job]
    path, subfolder, name = live.writer.close()
    return saved(path, subfolder, name)


RIFE_BATCH_TIP = ("Frame pairs RIFE computes together; 0 = as many as the free memory of RIFE's device "
                  f"allows (at most {_config.RIFE_AUTO_BATCH_MAX}; {_config.RIFE_BATCH} on a CPU). Pairs are "
                  "independent: only speed and memory change.")


def rife_batch(requested: int, rife, height: int, width: int) -> int:
    """``requested`` frame pairs per RIFE call, or for 0 as many as fit RIFE's device (sonic_core.lowvram)."""
    if int(requested) > 0:
        return int(requested)
    p = next(rife.parameters())
    return core("lowvram").auto_rife_batch(runtime.free_memory(p.device), height, width, p.dtype)


def _check_images(images, what: str):
    if not hasattr(images, "ndim") or images.ndim != 4 or images.shape[-1] not in (3, 4):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what}: expected an IMAGE batch [N, H, W, 3], got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{what}: the IMAGE batch is empty; connect the sampler's decoded frames")
    return images


class SonicFrameInterpolate:
    DESCRIPTION = ("Doubles the frame rate with RIFE (HDv3, Sonic's RIFE/flownet.pkl): a new frame between "
                   "every pair, N frames -> 2N-1 as the official pipeline does (12.5 fps -> 25 fps). "
                   "Multiplier 4 applies it twice (4N-3 frames).")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("rife", "frame interpolation", "interpolate", "smooth video", "插帧")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("batch_size",)
    FUNCTION = "interpolate"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "frame_rate")
    OUTPUT_TOOLTIPS = ("The frames with the interpolated ones in between (2N-1 or 4N-3 frames).",
                       "The new frame rate: the input frame rate times the multiplier.")

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames in order (e.g. the decoded Sonic frames)."}),
                "rife_model": (_rife_files(), {"tooltip": "RIFE weights under models/sonic (the official "
                                                          "RIFE/flownet.pkl, or a .safetensors copy)."}),
                "multiplier": _config.LIMITS["rife_multiplier"].widget(
                    "2: one new frame per pair; 4: the 2x pass twice.", step=2),
                "frame_rate": _config.LIMITS["frame_rate"].widget(
                    "Frame rate of the input frames (Sonic generates 12.5 fps); the output is this times the "
                    "multiplier.", step=0.01),
                "batch_size": _config.LIMITS["rife_batch"].widget(RIFE_BATCH_TIP),
            }
        }, cls.ADVANCED_INPUTS)

    def interpolate(self, images, rife_model, multiplier=_config.RIFE_MULTIPLIER,
                    frame_rate=_config.GENERATED_FPS, batch_size=_config.RIFE_BATCH):
        n = _config.check_inputs(dict(multiplier=multiplier, frame_rate=frame_rate, batch_size=batch_size),
                                 {"multiplier": "rife_multiplier", "batch_size": "rife_batch"})
        multiplier, frame_rate, batch_size = n["multiplier"], n["frame_rate"], n["batch_size"]
        images = _check_images(images, "Frame Interpolate")
        interp = core("interpolate")
        if multiplier not in interp.MULTIPLIERS:
            raise ValueError(f"multiplier {multiplier} is not supported: use one of {interp.MULTIPLIERS}")
        interp.check_frame_count(images.shape[0])  # one frame: said before RIFE loads
        model = _load_rife(rife_model).load()
        progress = runtime.Progress(1, "Frame Interpolate (RIFE)")
        batch = rife_batch(batch_size, model, images.shape[1], images.shape[2])
        frames = interp.interpolate(model, images[..., :3].to(runtime.intermediate_device()),
                                    multiplier, batch, callback=progress.callback())
        return (frames, float(frame_rate) * multiplier)


class SonicVideoCombine:
    DESCRIPTION = ("Saves frames (and audio) as a video in the output folder with PyAV: h264/h265 mp4 with "
                   "AAC audio, vp9 webm with Opus audio, or gif. The audio is trimmed or padded to the "
                   "video's length; the workflow is stored in the file. Shows the video in the UI.")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("save video", "video combine", "mp4", "export video", "保存视频")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("pix_fmt",)
    FUNCTION = "combine"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("filename", "video")
    OUTPUT_TOOLTIPS = ("Full path of the saved video file (empty after a segment that is not the last).",
                       VIDEO_TIP)

    @classmethod
    def INPUT_TYPES(cls):
        return runtime.advanced({
            "required": {
                "images": ("IMAGE", {"tooltip": "Video frames in order."}),
                "frame_rate": _config.LIMITS["frame_rate"].widget(
                    "Frames per second of the file (25 after RIFE 2x of Sonic's 12.5 fps).",
                    default=_config.OUTPUT_FPS, step=0.01),
                **file_inputs(),
            },
            "optional": {
                "audio": AUDIO_INPUT,
                "segment": ("SONIC_SEGMENT", {"tooltip": "From Latent Segment (long clips): the frames are one "
                                                         "segment of a clip; each is appended to one video "
                                                         "file and the next segment is queued by itself. "
                                                         "Leave unconnected for a whole clip."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }, cls.ADVANCED_INPUTS)

    def combine(self, images, frame_rate, filename_prefix, format="h264-mp4", crf=_config.VIDEO_CRF,
                pix_fmt="yuv420p", audio=None, segment=None, prompt=None, extra_pnginfo=None):
        n = _config.check_inputs(dict(frame_rate=frame_rate, crf=crf))  # NaN, inf, out of range
        frame_rate, crf = n["frame_rate"], n["crf"]
        images = _check_images(images, "Video Combine")
        sound = audio_track(audio)
        metadata = file_metadata(prompt, extra_pnginfo)
        if segment is not None:
            return _append_segment(images, segment, float(frame_rate), filename_prefix, format, int(crf),
                                   pix_fmt, sound, metadata)
        progress = runtime.Progress(images.shape[0], "Video Combine")
        path, subfolder, name = _video.save_video(
            images, runtime.output_dir(), filename_prefix, float(frame_rate), audio=sound, format=format,
            crf=int(crf), pix_fmt=pix_fmt, metadata=metadata, callback=progress.callback())
        return saved(path, subfolder, name)


NODE_CLASS_MAPPINGS = {"SonicFrameInterpolate": SonicFrameInterpolate, "SonicVideoCombine": SonicVideoCombine}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicFrameInterpolate": "Frame Interpolate (RIFE)",
                              "SonicVideoCombine": "Video Combine"}
