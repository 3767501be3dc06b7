"""Several faces of one photo, each driven by its own voice: a conversation video (issue 30).

``python -m sonic_core animate PHOTO --voice 1=alice.wav --voice 3=bob.wav -o talk.mp4 --crop --paste-back``
or, from one mixed recording and a speaker timeline (RTTM, what diarization tools write),
``animate PHOTO mixed.wav --timeline talk.rttm --speaker alice=1 --speaker bob=3 ...``.

Faces are numbered 1..N from the left, as ``--preview-faces faces.png`` draws them. Every face is
one Sonic run on its own crop (same frame count, fps and seed for all); the faces are sampled
together, windows of different faces sharing UNet calls as ``window_batch`` allows
(``sampler_faces``), each face's result its own run's. Every run's frames are pasted into the same
photo, chunk by chunk (``stream.video_frames_faces``): outside the driven faces' crops the video
is the photo, and no crop covers another face (``FaceBox.others``).

Everything that can be refused is refused before the heavy models load: the flags, the voices,
the timeline and its speakers, and the face numbers (the faces are found first, from the photo's
transparency or with the small face detector). Each face's sampling has its own resume state (its
fingerprint covers its crop, face mask and audio tokens); finished faces are kept until the video
is written, so a run resumed after a crash samples only what was left.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (GENERATED_FPS, OUTPUT_FPS, PASTE_COLOR_MATCH, RIFE_BATCH, RIFE_MULTIPLIER,
                     SAMPLER_DEFAULTS, VAE_SCALE)

log = logging.getLogger(__name__)

PAIR = re.compile(r"^\s*([^=]+?)\s*=\s*(.+?)\s*$")  # "key=value" of --voice / --speaker
FACE_NUMBER = re.compile(r"^[0-9]{1,3}$")  # a face number as typed (1-based)
DETECTOR_FILE = "yoloface_v5m.pt"
PREVIEW_HINT = "python -m sonic_core animate PHOTO --preview-faces faces.png"


@dataclass(frozen=True)
class Cast:
    """Who speaks with which face. ``voices``: face number -> audio file (``--voice``).
    ``timeline``: an RTTM file, with ``speakers``: face number -> speaker name (``--speaker``)."""

    voices: dict[int, str]
    timeline: str | None = None
    speakers: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def faces(self) -> list[int]:
        return sorted(self.voices or self.speakers)

    def source(self, number: int) -> str:
        """The flag that names face ``number``, for messages."""
        if self.voices:
            return f"--voice {number}={self.voices[number]}"
        return f"--speaker {self.speakers[number]}={number}"


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------
def configure_cli(p) -> None:
    """The conversation flags of ``animate`` (pipeline.configure_cli calls this)."""
    p.add_argument("--voice", action="append", default=[], metavar="N=AUDIO",
                   help="several faces: face N (1 = leftmost, as --preview-faces numbers them) speaks AUDIO; "
                        "repeat for each face; needs --crop --paste-back; the video's sound is the voices "
                        "mixed (README 'Conversations')")
    p.add_argument("--timeline", default=None, metavar="RTTM",
                   help="with AUDIO, a mixed recording: its speaker turns (RTTM lines 'SPEAKER <file> 1 "
                        "<start> <duration> <NA> <NA> <name> <NA> <NA>'); each --speaker's face hears its "
                        "own turns, the video keeps AUDIO's sound")
    p.add_argument("--speaker", action="append", default=[], metavar="NAME=N",
                   help="with --timeline: the timeline's speaker NAME is face N; repeat for each face")
    p.add_argument("--preview-faces", default=None, metavar="PNG",
                   help="write the photo with every face found boxed and numbered to PNG and exit (no audio, "
                        "no -o needed)")


def wanted(args) -> bool:
    """Whether ``args`` ask for a conversation or a face preview (else the one-face path runs as before)."""
    return bool(getattr(args, "voice", None) or getattr(args, "timeline", None)
                or getattr(args, "speaker", None) or getattr(args, "preview_faces", None))


def _pairs(values: list[str], flag: str, form: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        m = PAIR.match(value)
        if m is None:
            example = form.replace("N", "1").replace("AUDIO", "alice.wav").replace("NAME", "alice")
            raise ValueError(f"{flag} {value!r} is not {form}: write it like {flag} {example}")
        out.append((m.group(1), m.group(2)))
    return out


def _face_number(text: str, flag: str, value: str) -> int:
    if not FACE_NUMBER.match(text) or int(text) < 1:
        raise ValueError(f"{flag} {value}: {text!r} is not a face number; faces are numbered 1, 2, 3... "
                         f"from the left (see them with {PREVIEW_HINT})")
    return int(text)


def parse_cast(args) -> Cast:
    """The ``--voice`` / ``--timeline`` / ``--speaker`` flags as a Cast, every combination checked."""
    if args.voice and args.timeline:
        raise ValueError(f"--voice and --timeline {args.timeline} together: give each face its own file "
                         "with --voice N=AUDIO, or one mixed recording (AUDIO) with --timeline and --speaker "
                         "NAME=N")
    if args.speaker and not args.timeline:
        raise ValueError(f"--speaker {args.speaker[0]} needs --timeline RTTM (the file that says when each "
                         "speaker talks)")
    if args.timeline and not args.speaker:
        raise ValueError(f"--timeline {args.timeline} needs at least one --speaker NAME=N (which face is "
                         "which speaker)")
    flag = "--voice" if args.voice else "--timeline"
    if not (args.crop and args.paste_back):
        raise ValueError(f"{flag} needs --crop --paste-back: every face is animated on its own crop and "
                         "pasted back into the one photo")
    if args.voice:
        if args.audio is not None:
            raise ValueError(f"AUDIO {args.audio} and --voice together: with --voice every face's audio is "
                             "a --voice N=AUDIO (the video's sound is their mix); for one mixed recording "
                             "use AUDIO with --timeline and --speaker NAME=N")
        voices: dict[int, str] = {}
        for key, path in _pairs(args.voice, "--voice", "N=AUDIO"):
            n = _face_number(key, "--voice", f"{key}={path}")
            if n in voices:
                raise ValueError(f"--voice {n}={path}: face {n} already has the voice {voices[n]}; give each "
                                 "face one voice (mix them first if both should come from it)")
            voices[n] = path
        return Cast(voices=voices)
    if args.audio is None:
        raise ValueError(f"--timeline {args.timeline} needs AUDIO, the mixed recording it describes")
    speakers: dict[int, str] = {}
    for name, key in _pairs(args.speaker, "--speaker", "NAME=N"):
        n = _face_number(key, "--speaker", f"{name}={key}")
        if n in speakers:
            raise ValueError(f"--speaker {name}={n}: face {n} is already the speaker {speakers[n]!r}; give "
                             "each face one speaker")
        if name in speakers.values():
            raise ValueError(f"--speaker {name}={n}: {name!r} is already given a face; one face per speaker")
        speakers[n] = name
    return Cast(voices={}, timeline=args.timeline, speakers=speakers)


# ----------------------------------------------------------------------------------------------
# Voices
# ----------------------------------------------------------------------------------------------
def read_timeline(path: str | os.PathLike, names: list[str]) -> dict[str, list[tuple[float, float]]]:
    """The RTTM file's turns of each speaker in ``names``; a name not in the file is a ValueError
    that lists the names it holds."""
    from .speakers import parse_rttm

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--timeline {path} does not exist" if not p.exists() else
                                f"--timeline {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--timeline {path} is not UTF-8 text ({e}); give the RTTM file a diarization tool "
                         "wrote") from None
    turns = parse_rttm(text, f"--timeline {path}")
    for name in names:
        if name not in turns:
            held = ", ".join(sorted(turns)) or "none"
            raise ValueError(f"--speaker {name}: the timeline {path} has no speaker {name!r} (its speakers: "
                             f"{held}); use one of those names")
    return {name: turns[name] for name in names}


def read_voices(cast: Cast, audio_path: str | None, max_seconds: float) -> tuple[dict[int, torch.Tensor], int,
                                                                               torch.Tensor]:
    """Each face's voice ``[C, T]`` (all the same length, rate and channel count), the sample rate,
    and the video's sound ``[C, T]``: the voices mixed without clipping, or with a timeline the
    mixed recording itself (each face hearing its own turns, silence elsewhere)."""
    from .pipeline import read_audio
    from .speakers import match_voices, mix_voices, speaker_track

    if cast.timeline is not None:
        turns = read_timeline(cast.timeline, [cast.speakers[n] for n in cast.faces])
        wave, rate = read_audio(audio_path, max_seconds)  # [1,C,T]
        voices = {n: speaker_track(wave[0], rate, turns[cast.speakers[n]]) for n in cast.faces}  # [C,T] each
        for n in cast.faces:
            said = sum(e - s for s, e in turns[cast.speakers[n]])
            log.info("face %d: speaker %r, %.1f s of turns in %.1f s", n, cast.speakers[n], said,
                     wave.shape[-1] / rate)
        return voices, rate, wave[0]
    read = [read_audio(cast.voices[n], max_seconds) for n in cast.faces]  # [1,C,T] each
    matched, rate = match_voices([(w[0], r) for w, r in read])  # [C,T] each, padded to the longest
    rate = int(rate)
    for n, (w, r) in zip(cast.faces, read):
        log.info("face %d: voice %s, %.2f s", n, cast.voices[n], w.shape[-1] / r)
    voices = dict(zip(cast.faces, matched))
    return voices, rate, mix_voices(matched)


# ----------------------------------------------------------------------------------------------
# Faces
# ----------------------------------------------------------------------------------------------
def find_photo_faces(image: torch.Tensor, alpha_mask: torch.Tensor | None, models_dir: Path,
                     device: torch.device, photo: str, need_rife: bool = True):
    """Every face of the photo ``[1,H,W,3]`` (left to right), and the detector used (None when the
    transparency marks them). The detector (a small file) loads only when the transparency does not
    mark the faces; its absence is the missing-weights error."""
    from . import face
    from .pipeline import MissingWeights, missing_message, missing_weights

    if alpha_mask is not None:
        marked = face.find_faces(image[0], None, alpha_mask[0])
        if marked:
            return marked, None
    missing = missing_weights(models_dir, need_detector=True, need_rife=need_rife)
    if any(w.path == DETECTOR_FILE for w in missing):
        log.warning("photo %s: its transparency marks no face; the face detector is needed to find them",
                    photo)
        raise MissingWeights(missing_message(models_dir, missing))
    detector = face.load_detector(str(models_dir / DETECTOR_FILE), device)
    return face.find_faces(image[0], detector, alpha_mask[0] if alpha_mask is not None else None), detector


def check_face_numbers(cast: Cast, boxes: list, photo: str) -> None:
    """Every face number of the cast names a face found (ValueError naming the flag otherwise)."""
    for n in cast.faces:
        if n > len(boxes):
            found = f"faces 1..{len(boxes)} were found" if boxes else "no face was found"
            raise ValueError(f"{cast.source(n)}: face {n} is past the faces of {photo} ({found}, numbered "
                             f"from the left); see the numbers with {PREVIEW_HINT}")


def preview(args) -> int:
    """``--preview-faces PNG``: the photo with every face boxed and numbered, at the photo's size."""
    from PIL import Image

    from . import face
    from .config import U8_MAX
    from .pipeline import pick_device, read_image

    out = Path(args.preview_faces)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--preview-faces {out}: give a .png file name")
    if out.exists():
        raise FileExistsError(f"--preview-faces {out} already exists; choose another name (nothing is "
                              "overwritten)")
    image, alpha = read_image(args.image)  # [1,H,W,3], [1,H,W] or None
    boxes, _ = find_photo_faces(image, alpha, Path(args.models), pick_device(args.device), args.image,
                                need_rife=False)
    if not boxes:
        raise ValueError(f"no face found in {args.image}: crop it tighter around the faces, or make each "
                         "face transparent (each transparent region marks one face)")
    picture = face.face_preview(image[0], boxes, None)  # [H,W,3]
    u8 = (picture.clamp(0, 1) * U8_MAX).round().to(torch.uint8).cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(u8).save(out)
    log.info("%s: %d face(s) numbered 1..%d from the left", out, len(boxes), len(boxes))
    print(f"wrote {out}: {len(boxes)} face(s)")
    return 0


# ----------------------------------------------------------------------------------------------
# The chain
# ----------------------------------------------------------------------------------------------
def conversation_store(output: Path, state_dir, resume: bool):
    """The run's ResumeStore. Finished faces stay kept until the video is written, in the default
    folder too, so a run resumed after a crash samples only the faces left; ``forget`` lists what
    to remove once the video exists (everything this run kept, unless the user keeps results)."""
    from .pipeline import state_store
    from .resume import keep_limit_bytes

    store = state_store(output, state_dir, resume, keep_result=True)
    if store.off is None and not store.keep_bytes:
        store.keep_bytes = keep_limit_bytes()
    return store


@torch.no_grad()
def animate_faces(image_path: str | os.PathLike, cast: Cast, output: str | os.PathLike,
                  models_dir: str | os.PathLike, settings, *, audio_path: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  svd_dir: str | os.PathLike | None = None, progress=None,
                  state_dir: str | os.PathLike | None = None, resume: bool = False,
                  keep_result: bool = True, shared_calls: bool = True) -> Path:
    """Photo + one voice per face (or a mixed recording + timeline) -> ``output``, every face pasted
    into the photo. ``settings``: pipeline.AnimateSettings with ``crop`` and ``paste_back`` on.
    ``keep_result`` False (``--no-keep-result``): the faces kept while the run lasted are removed
    once the video is written (the default state folder never keeps them past that either).
    ``shared_calls`` (default): the faces are sampled together, windows of different faces sharing
    UNet calls as free memory allows (``sampler_faces``); False: one face after another (the bench's
    comparison)."""
    from . import audio as audio_mod
    from . import budget, face, lowvram, motion, preflight, sampler_faces, stream, video, weights
    from . import image as image_mod
    from .models import svd
    from .models.rife import load_rife
    from .pipeline import (SVD_FOLDER, WHISPER_FOLDER, MissingWeights, missing_message, missing_weights,
                           read_image)

    if not (settings.crop and settings.paste_back):
        raise ValueError("several faces need crop and paste_back on (--crop --paste-back)")
    output = preflight.check_output(output)
    preflight.check_settings(settings, OUTPUT_FPS if settings.interpolate else GENERATED_FPS)
    models_dir = Path(models_dir)
    device = torch.device(device)
    image, alpha_mask = read_image(image_path)  # [1,H,W,3], [1,H,W] or None
    voices, rate, sound = read_voices(cast, None if audio_path is None else str(audio_path),
                                      settings.max_seconds)  # {n: [C,T]}, Hz, [C,T]
    length = sound.shape[-1]
    estimate = preflight.estimate_run(tuple(image.shape[1:3]), length, rate, settings, dtype, device,
                                      channels=sound.shape[0] * (len(voices) + 1))
    preflight.check_frame_count(estimate.frames, settings.interpolate)
    budget.check_fits(estimate, device, "this run")
    preflight.check_output_space(output, tuple(image.shape[1:3]), length, rate, settings)
    photo = Path(image_path).name
    boxes, detector = find_photo_faces(image, alpha_mask, models_dir, device, str(image_path),
                                       settings.interpolate)
    check_face_numbers(cast, boxes, str(image_path))
    log.info("%s: %d face(s) found; driving %s", photo, len(boxes),
             ", ".join(f"face {n}" for n in cast.faces))
    found = {n: face.detect_face_mask(image, detector=detector, mask=alpha_mask, crop=True, face_index=n,
                                      mask_name=f"the transparency of {photo}") for n in cast.faces}
    pastes = {n: image_mod.PasteBack(image, found[n].box, settings.paste_feather, settings.paste_region,
                                     getattr(settings, "color_match", PASTE_COLOR_MATCH)) for n in cast.faces}
    missing = missing_weights(models_dir, need_detector=detector is not None, need_rife=settings.interpolate)
    if svd_dir is not None:
        missing = [w for w in missing if w.path != SVD_FOLDER]
    if missing:
        raise MissingWeights(missing_message(models_dir, missing))
    store = conversation_store(output, state_dir, resume)  # before any model loads

    def stage(name: str):
        if progress is None:
            return None
        return lambda done, total, *_: progress(name, done, total)

    t0 = time.perf_counter()
    sonic = models_dir / "Sonic"
    models = weights.load_sonic_models(sonic / "unet.pth", sonic / "audio2token.pth",
                                       sonic / "audio2bucket.pth", models_dir / WHISPER_FOLDER,
                                       dtype=dtype, device=device, load_device=device,
                                       weight_dtype=lowvram.WEIGHT_DTYPES[settings.weight_dtype])
    vae, clip = svd.load_svd(svd_dir or models_dir / SVD_FOLDER, dtype, device)
    log.info("models loaded in %.1f s", time.perf_counter() - t0)
    run = dataclasses.replace(SAMPLER_DEFAULTS, steps=settings.steps, min_resolution=settings.min_resolution,
                              frames_per_window=settings.frames_per_window)
    kept, fps, driven = [], GENERATED_FPS, []
    for n in cast.faces:  # N faces, N Sonic runs: the same frame count, fps and seed
        log.info("face %d of %d (%s)", n, len(boxes), cast.source(n))
        sonic_audio = audio_mod.encode_audio(models, voices[n][None], rate, settings.max_seconds,
                                             callback=stage("audio"), out_device=torch.device("cpu"))
        ref_image, ref_mask = found[n].image[None], found[n].mask[None]  # [1,h,w,3], [1,h,w]
        embeds = motion.reference_embeds(clip, ref_image, settings.min_resolution)
        sonic_motion = motion.predict_motion(models.load("audio2bucket"), sonic_audio, embeds,
                                             settings.dynamic_scale, settings.dynamic_scale)
        driven.append((ref_image, ref_mask, sonic_audio, sonic_motion))
        fps = sonic_audio.fps
        del sonic_audio, sonic_motion, embeds
    # sampled together (windows of different faces share UNet calls), or one face after another
    together = [driven] if shared_calls else [[face] for face in driven]
    numbered = [cast.faces] if shared_calls else [[n] for n in cast.faces]
    latents = []
    for faces_now, numbers in zip(together, numbered):
        window_batch, rows = plan_face_batching(faces_now, run, settings, dtype, device)
        latents += sampler_faces.generate_faces(models.load("unet"), vae, clip, faces_now,
                                                settings=dataclasses.replace(run, guidance_rows=rows),
                                                seed=settings.seed, dtype=dtype, window_batch=window_batch,
                                                callback=stage("sampling"), resume=store, kept=kept,
                                                labels=[f"face {n}" for n in numbers])  # VAE space
    del driven, together, faces_now
    faces = [(lat, pastes[n]) for n, lat in zip(cast.faces, latents)]  # [F,4,h,w] VAE space, its paste
    del latents
    rife = None
    if settings.interpolate:
        rife = load_rife(str(models_dir / "RIFE" / "flownet.pkl"), device)
        fps = OUTPUT_FPS
    free = budget.device_free_bytes(device)
    h_max = max(int(f[0].shape[-2]) * VAE_SCALE for f in faces)
    w_max = max(int(f[0].shape[-1]) * VAE_SCALE for f in faces)
    chunk = lowvram.auto_decode_chunk(free, h_max, w_max, dtype, vae.decode_chunk_size)
    pairs = lowvram.auto_rife_batch(free, h_max, w_max, torch.float32, cpu=RIFE_BATCH)
    frames = stream.video_frames_faces(vae, faces, chunk, rife, RIFE_MULTIPLIER, pairs)
    fmt = {".mp4": "h264-mp4", ".webm": "vp9-webm", ".gif": "gif"}[output.suffix.lower()]
    output.parent.mkdir(parents=True, exist_ok=True)
    video.write_video(frames, str(output), fps, audio=(sound, rate), format=fmt, crf=settings.crf,
                      callback=stage("encoding"))
    if state_dir is None or not keep_result:  # kept only for this run's resume: the video now exists
        for p in kept:
            p.unlink(missing_ok=True)
    store.remove_folder_if_empty()
    log.info("%s: %d face(s), %d frames at %g fps in %.1f s", output, len(faces), len(frames), fps,
             time.perf_counter() - t0)
    return output


def plan_face_batching(faces: list[tuple], run, settings, dtype: torch.dtype,
                       device: torch.device) -> tuple[int, int]:
    """(windows per UNet call, CFG rows per call) for faces sampled together (``(image, mask, audio,
    motion)`` each): the windows of all faces count together against free memory (the largest crop's
    size, so any call fits), and so does every face's clip state (latents, audio tokens)."""
    from . import budget, sampler
    from . import image as image_mod

    sizes = [image_mod.working_size(img.shape[2], img.shape[1], settings.min_resolution) for img, *_ in faces]
    h = max(hh for _, hh in sizes) // VAE_SCALE
    w = max(ww for ww, _ in sizes) // VAE_SCALE
    windows = sum(sampler.window_count(audio.num_frames, run) for _, _, audio, _ in faces)
    clip_bytes = sum(sampler.clip_state_bytes(audio.num_frames, hh // VAE_SCALE, ww // VAE_SCALE,
                                              audio.cond_tokens.shape, dtype)
                     for (ww, hh), (_, _, audio, _) in zip(sizes, faces))
    batch, rows = sampler.plan_batching(budget.device_free_bytes(device), h, w, run.frames_per_window, dtype,
                                        windows, settings.window_batch, settings.guidance_rows, clip_bytes)
    log.info("sampler: %d face(s), %d window(s) x %d guidance row(s) per UNet call", len(faces), batch, rows)
    return batch, rows


def run_cli(args, settings) -> int:
    """``animate`` with --voice / --timeline (or --preview-faces): called by pipeline.run_cli once
    the numbers are checked."""
    from . import distributed
    from .pipeline import (MissingWeights, download_weights, missing_weights, pick_device, pick_dtype,
                           state_store)
    from .preflight import check_output
    from .progress import CliProgress

    if args.preview_faces:
        try:
            return preview(args)
        except MissingWeights as e:
            print(str(e), file=sys.stderr)
            return 3
    cast = parse_cast(args)
    if args.output is None:
        raise ValueError("-o/--output is required: the video to write (.mp4, .webm or .gif)")
    if distributed.world_size_from_env() > 1:
        raise ValueError("several faces (--voice/--timeline) run in one process: start it without torchrun")
    output = check_output(args.output)
    if args.state_dir is not None:  # a bad --state-dir is refused before any download
        state_store(output, args.state_dir, args.resume, True)
    device = pick_device(args.device)
    progress = CliProgress()
    try:
        if args.download and missing_weights(args.models, need_rife=not args.no_interpolate):
            download_weights(args.models, need_rife=not args.no_interpolate)
        with progress.logging_around_bars():
            out = animate_faces(args.image, cast, output, args.models, settings, audio_path=args.audio,
                                device=device, dtype=pick_dtype(args.dtype, device), svd_dir=args.svd,
                                progress=progress, state_dir=args.state_dir, resume=args.resume,
                                keep_result=not args.no_keep_result)
    except MissingWeights as e:
        print(str(e), file=sys.stderr)
        return 3
    print(f"wrote {out}")
    return 0
