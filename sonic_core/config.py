"""Every number of the Sonic method, named once with its unit.

Sources: the official defaults (``config/inference/sonic.yaml`` and ``Sonic.process``) as
described in ../shared/SPEC.md. Module-level constants are facts of the method that never
change; the dataclasses hold user-facing defaults that nodes and the CLI expose.
"""

from __future__ import annotations

from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# Audio (SPEC §3, §4)
# ----------------------------------------------------------------------------------------------
SAMPLE_RATE = 16000  # Hz, whisper input rate
RESAMPLE_QUALITY = "HQ"  # soxr quality of librosa's default resampler (res_type "soxr_hq")
CHUNK_SECONDS = 30  # s, one whisper feature-extractor chunk
N_SAMPLES_CHUNK = CHUNK_SECONDS * SAMPLE_RATE  # 480000 samples per 30 s chunk
N_MELS = 80  # log-mel bins (whisper-tiny)
N_FFT = 400  # samples, STFT window of the whisper feature extractor
HOP_LENGTH = 160  # samples between mel frames (10 ms)
N_MEL_FRAMES = N_SAMPLES_CHUNK // HOP_LENGTH  # 3000 mel frames in a 30 s chunk
N_WHISPER_POSITIONS = N_MEL_FRAMES // 2  # 1500 encoder positions per 30 s (conv2 stride 2)
WHISPER_POSITIONS_PER_SECOND = N_WHISPER_POSITIONS // CHUNK_SECONDS  # 50 feature frames / s
SAMPLES_PER_25FPS_FRAME = 640  # samples, 40 ms = one 25 fps frame at 16 kHz
POSITIONS_PER_25FPS_FRAME = 2  # whisper positions per 25 fps frame
FRAME_STEP = 2  # 25 fps frames per generated frame (12.5 fps generated)
FRAME_CAP = 10000  # official cap on 25 fps frames (``frame_num``)
MIN_AUDIO_SECONDS = FRAME_STEP * SAMPLES_PER_25FPS_FRAME / SAMPLE_RATE  # 0.08 s = one video frame
MIN_SAMPLE_RATE = 4000  # Hz; lower audio rates are refused (telephone audio is 8000 Hz)
DECODE_MARGIN_S = 1.0  # s decoded past the last 30 s chunk a capped run needs (soxr's filter reaches ~ms past it)
TRUNCATED_AUDIO_TOLERANCE_S = 0.25  # s; decoded this much shorter than the file's declared length: warn

# token window (audio2token input): 10 positions centred on the frame, padding 4 before / 6 after
TOKEN_WINDOW = 10  # whisper positions per token window (0.2 s)
TOKEN_PAD_BEFORE = 4  # zero positions prepended
TOKEN_PAD_AFTER = 6  # zero positions appended
# bucket window (audio2bucket input): 50 positions (1 s), padding 24 before / 26 after
BUCKET_WINDOW = 50  # whisper positions per bucket window (1 s)
BUCKET_PAD_BEFORE = 24  # zero positions prepended
BUCKET_PAD_AFTER = 26  # zero positions appended
WINDOW_STRIDE = POSITIONS_PER_25FPS_FRAME * FRAME_STEP  # 4 positions between generated frames
TOKEN_BATCH_FRAMES = 128  # generated frames per audio2token call (bounds memory for long audio)

# ----------------------------------------------------------------------------------------------
# Models (SPEC §1)
# ----------------------------------------------------------------------------------------------
AUDIO_TOKENS = 32  # K, audio context tokens per frame
CROSS_ATTENTION_DIM = 1024  # D, UNet cross-attention width
WHISPER_DIM = 384  # d, whisper-tiny width
WHISPER_LAYERS = 4  # L, whisper-tiny encoder layers (hidden states = L + 1)
WHISPER_HEADS = 6  # whisper-tiny encoder attention heads (head dim 64)
WHISPER_FFN_DIM = 1536  # whisper-tiny encoder feed-forward width
AUDIO_PROJ_HIDDEN = 1024  # audio2token / audio2bucket intermediate width
AUDIO2TOKEN_BLOCKS = WHISPER_LAYERS + 1  # whisper hidden states per position fed to audio2token (5)
AUDIO2BUCKET_BLOCKS = 1  # hidden states per position fed to audio2bucket (last one only)
AUDIO2BUCKET_OUTPUT_DIM = 1  # audio2bucket values per motion channel
MOTION_CHANNELS = 2  # audio2bucket outputs: head translation, expression
CLIP_EMBED_DIM = 1024  # ViT-H/14 projection width
LAYER_NORM_EPS = 1e-5  # audio2token output LayerNorm
KEYS_LISTED = 10  # state-dict keys named per kind (missing/unexpected/shape) in a load error
SAFETENSORS_HEADER_LENGTH_BYTES = 8  # little-endian u64 at the start of a .safetensors file
SAFETENSORS_MAX_HEADER_BYTES = 16 * 2**20  # bytes of JSON header read (the SVD-xt UNet's is ~0.2 MB)
SAFETENSORS_MAX_TENSORS = 100_000  # tensors per file (the largest file read, the Sonic UNet, holds 1,492)
VAE_SCALING_FACTOR = 0.18215  # SVD-xt VAE latent scale (hard-coded in the official encode path)
VAE_SCALE = 8  # pixels per latent pixel
LATENT_CHANNELS = 4  # VAE latent channels (UNet input = 2x: noisy latents ++ image latents)

# ----------------------------------------------------------------------------------------------
# Motion buckets (SPEC §4.5, §6)
# ----------------------------------------------------------------------------------------------
BUCKET_SCALE = 16.0  # raw audio2bucket output -> bucket: raw * 16 + 16
BUCKET_OFFSET = 16.0
BUCKET_RANGE = (0.0, 128.0)  # nominal bucket range (documentation; values are not clamped)
BUCKET_BATCH_FRAMES = 512  # frames per audio2bucket call (bounds the window copies in memory)

# ----------------------------------------------------------------------------------------------
# Image (SPEC §2)
# ----------------------------------------------------------------------------------------------
SIZE_MULTIPLE = 64  # px, working width and height are multiples of this
MASK_AREA = 1.1  # face mask = detected box scaled by this about its centre
CROP_EXPAND_RATIO = 0.5  # square crop helper expand ratio (demo.py / gradio app)
CLIP_SIZE = 224  # px, CLIP input side
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_IMAGE_SIDE = 64  # px, smaller images are refused (before any model loads): the smallest working size
#                      (SIZE_MULTIPLE) and the smallest face crop; a 64 px portrait is already upscaled 8x
MAX_WORKING_SIDE = 4096  # px, longest side of the working size (SVD-xt was trained at 1024x576)
MAX_WORKING_PIXELS = 2048 * 2048  # px (4.2 MP), working width x height; the UNet's cost grows with its square
U8_RANGE_PEAK = 2.0  # a float IMAGE peaking above this is taken as 0..255 and divided by U8_MAX
U8_MAX = 255  # uint8 full scale: pixel value = round(x * 255), x = u8 / 255
MASK_BOX_THRESHOLD = 0.5  # MASK values above this mark the face when a box is taken from a mask
U16_MAX = 65535  # 16-bit full scale: 16-bit greyscale PNG/TIFF (PIL modes I;16, I) read as x = v / 65535
# An alpha channel (or a MASK input) marks the face only when it plausibly is a face mask
# (sonic_core.face.judge_mask): one region, of plausible size, not covering much of the border.
MASK_FACE_MIN_SIDE_FRACTION = 0.05  # a face region's box: short side >= this x the image's (else a speck)
MASK_FACE_MAX_AREA_FRACTION = 0.9  # a face region's box covers at most this share of the image's area
MASK_CUTOUT_BORDER_FRACTION = 0.3  # marked on more than this share of the image border: a background cut-out
MASK_GRID_SIDE = 128  # cells on the long side of the grid on which separate regions are counted
CUTOUT_BACKGROUND = 1.0  # grey level (0..1) a cut-out is composited onto: white, as a studio backdrop

# several faces in one photo (issue 30): numbered 1..N left to right by box centre, 0 = the largest
FACE_INDEX_MAX = 64  # highest face number a node or the CLI accepts
FACE_MATCH_MIN_IOU = 0.3  # re-detected on the crop: a face overlapping the chosen one by this IoU is it
FACE_PREVIEW_COLOUR = (255, 200, 0)  # u8 RGB of every face's box and number in the preview (amber)
FACE_PREVIEW_CHOSEN_COLOUR = (0, 230, 64)  # u8 RGB of the chosen face's box and number (green)
FACE_PREVIEW_DIGIT_COLOUR = (0, 0, 0)  # u8 RGB of the digits on their coloured label
FACE_PREVIEW_LINE_FRACTION = 0.004  # box line width, a fraction of the image's longer side
FACE_PREVIEW_LINE_MIN_PX = 2  # px, thinnest box line
FACE_PREVIEW_CHOSEN_LINE_SCALE = 2  # the chosen face's line is this many times thicker
FACE_PREVIEW_DIGIT_FRACTION = 0.05  # digit height, a fraction of the image's shorter side
FACE_PREVIEW_DIGIT_MIN_PX = 10  # px, smallest digit height (5 bitmap rows of 2 px)

# voices of a conversation (issue 30, sonic_core/speakers.py)
SPEAKER_FADE_S = 0.005  # s, linear fade in and out at each turn's edges (no click where a voice starts)
MIX_PEAK = 1.0  # full scale: a mix whose peak would exceed this is scaled down to it (never up)
RTTM_MIN_FIELDS = 8  # SPEAKER <file> <chan> <start> <duration> <ortho> <stype> <name> [<conf> <slat>]

# paste-back (issue 23, sonic_core/image.PasteBack): generated crop frames blended into the whole photo
PASTE_REGIONS = ("crop", "face")  # blended area: the whole crop square, or the face box scaled by PASTE_FACE_SCALE
PASTE_REGION = "crop"  # default: the crop moves as one piece (hair, ears, neck with the head); its edge is background
PASTE_FACE_SCALE = 1.5  # "face" region = the face box scaled by this about its centre (clipped to the crop)
PASTE_FEATHER = 0.1  # soft edge, as a fraction of the blended region's shorter side (0 = hard edge)
PASTE_FEATHER_MAX = 0.5  # at 0.5 the soft edges of opposite sides meet in the middle
PASTE_ASPECT_TOLERANCE = 0.1  # relative aspect difference allowed between the frames and the crop (x64 rounding)
# several faces in one photo (issue 30): every paste leaves out the head region of each other face found
PASTE_KEEPOUT_SCALE = 1.5  # another face's head region = its face box scaled by this about its centre (hair, chin)
PASTE_KEEPOUT_SOFT = 0.15  # soft edge outside that region, as a fraction of its shorter side (0 = hard edge)
# colour match (issue 30 item 8): each generated frame's low-frequency colour pulled to the photo's, measured
# where the crop meets the photo (the blend band), as a smooth per-channel gain over the pasted region
PASTE_COLOR_MATCH = True  # default of the color_match inputs: on, bench/RESULTS.md (drift 2.27 -> 0.37 levels)
PASTE_COLOR_BAND = 0.1  # measuring band along the crop's border, as a fraction of its side (whatever the feather)
PASTE_COLOR_GRID = 8  # cells on the region's shorter side of the grid the gain is measured on
PASTE_COLOR_SIGMA = 2.0  # Gaussian spread of the gain over that grid, in cells (low-pass: larger is smoother)
PASTE_COLOR_KEEPOUT_SCALE = 2.2  # not measured within another face's box scaled by this (its crop at expand 0.5)
PASTE_COLOR_PRIOR = 0.05  # weight of the whole band's mean gain where the band is far (the region's middle)
PASTE_COLOR_MAX_GAIN = 0.06  # the gain stays within 1 +- this: twice a 3% drift; a real difference is not undone

# ----------------------------------------------------------------------------------------------
# Face detector (YOLOv5-face, issue 4)
# ----------------------------------------------------------------------------------------------
DETECTOR_SHORT_SIDE = 416  # px, detector input short side
DETECTOR_STRIDE_MULTIPLE = 32  # px, detector input sides are multiples of this
DETECTOR_CONFIDENCE = 0.5
DETECTOR_NMS_IOU = 0.45
DETECTOR_STRIDES = (8, 16, 32)  # px per grid cell of the three YOLOv5-face output levels
DETECTOR_LANDMARKS = 5  # facial landmarks per detection (eyes, nose, mouth corners), x/y each
DETECTOR_BOX_FIELDS = 5 + 2 * DETECTOR_LANDMARKS  # cx, cy, w, h, objectness + 10 landmark coords
TORCHSCRIPT_MAX_ENTRY_BYTES = 64 * 2**20  # bytes, largest code/pickle entry the archive check reads
TORCHSCRIPT_FINDINGS_LISTED = 10  # refused constructs named in one TorchScript refusal message

# ----------------------------------------------------------------------------------------------
# Scheduler (SPEC §8): SVD-xt EulerDiscreteScheduler, EDM / v-prediction, Karras sigmas
# ----------------------------------------------------------------------------------------------
SIGMA_MAX = 700.0
SIGMA_MIN = 0.002
KARRAS_RHO = 7.0

# ----------------------------------------------------------------------------------------------
# Window batching (issue 5): several windows of one step share a UNet call
# ----------------------------------------------------------------------------------------------
WINDOW_BATCH_CPU = 1  # windows per UNet call on a CPU: batching was 0.83x at 256x256 (bench_vs_official)
WINDOW_BATCH_MEMORY_MARGIN = 0.8  # fraction of free accelerator memory the auto batch may plan on
# bytes of 16-bit peak UNet activations per latent element (rows x W x h x w) of one UNet call: meta-counted
# 17,400-18,200 at 256-768 px with any guidance rows (bench/bench_vram.py), rounded up for allocator slack
WINDOW_BYTES_PER_LATENT_ELEMENT = 20000

# ----------------------------------------------------------------------------------------------
# Low-VRAM modes (issue 15, sonic_core/lowvram.py; the per-pixel costs are bench/bench_vram.py's
# meta-counted peaks, linear in frames and pixels)
# ----------------------------------------------------------------------------------------------
GUIDANCE_ROWS_CHOICES = (3, 1)  # CFG rows per UNet call: all three branches at once, or one after another
PLAN_MEMORY_MARGIN = WINDOW_BATCH_MEMORY_MARGIN  # share of free memory a planned chunk may use
VAE_DECODE_BYTES_PER_PIXEL = 2048  # bytes of 16-bit temporal-decoder activations per output pixel and frame
RIFE_BYTES_PER_PIXEL = 306  # bytes of float32 IFNet activations per pixel of one frame pair
RIFE_AUTO_BATCH_MAX = 16  # frame pairs per RIFE call at most when the batch is planned from free memory

# ----------------------------------------------------------------------------------------------
# Video (SPEC §12)
# ----------------------------------------------------------------------------------------------
GENERATED_FPS = 12.5  # frames/s the model generates (2 whisper-frames-pairs per frame)
RIFE_MULTIPLIER = 2  # frame interpolation factor to reach 25 fps
OUTPUT_FPS = GENERATED_FPS * RIFE_MULTIPLIER  # 25 fps after interpolation
RIFE_SCALES = (4, 2, 1)  # IFNet pyramid scales at scale 1
RIFE_CHANNELS = 90  # IFBlock feature width (c in the official HDv3 IFNet)
RIFE_RESBLOCKS = 4  # residual conv pairs per IFBlock (convblock0..3)
RIFE_IMAGE_CHANNELS = 3  # RGB channels of each warped input fed to an IFBlock
RIFE_FLOW_CHANNELS = 4  # bidirectional flow: 0->1 (x, y) and 1->0 (x, y), in pixels
RIFE_TEACHER_IN_CHANNELS = 14  # block_tea input (7 + 4 flow + 3 ground truth); never run
RIFE_PAD_MULTIPLE = 32  # px, frames are zero padded to this before RIFE (64-multiples pass unchanged)
RIFE_STATE_PREFIX = "module."  # official flownet.pkl keys carry it; the loader keeps and strips it
RIFE_BATCH = 4  # frame pairs per IFNet call (default of the node)

# encoding (sonic_core/video.py)
VIDEO_CRF = 18  # x264/x265/vp9 constant-rate factor of the official export (lower = better)
VIDEO_CRF_MAX = 63  # largest crf libvpx-vp9 accepts (x264/x265 stop at 51)
AUDIO_BITRATE = 192000  # bit/s for AAC / Opus
# the least a video takes on disk, for the free-space check before a run (bits per pixel per frame,
# by extension): measured at crf 18 on 512x512 frames, textured and moving: mp4 0.073, webm 0.040,
# gif 6.4 (a flat grey mp4: 0.0026); a talking head moves more than that, so these are floors
VIDEO_BITS_PER_PIXEL_FLOOR = {"mp4": 0.03, "webm": 0.02, "gif": 3.0}
OPUS_SAMPLE_RATE = 48000  # Hz, the rate audio is resampled to for Opus in webm
AAC_FALLBACK_RATE = 48000  # Hz, AAC rate for sources below AAC_MIN_RATE or at a rate AAC lacks
AAC_MIN_RATE = 44100  # Hz, lowest source rate kept as is (an AAC frame, 1024 samples, is then <= 23 ms)
FPS_DENOMINATOR = 1000  # frame rates are stored as fractions n / 1000 (12.5 -> 25/2)
OUTPUT_COUNTER_DIGITS = 5  # ComfyUI's output counter: <prefix>_00001_.mp4
PARTIAL_STALE_AGE_S = 3600  # s; an unlocked temp video of ours unchanged this long is a killed encode's
MAX_FILENAME_BYTES = 255  # bytes per file name where the OS does not say (NAME_MAX of ext4, NTFS, APFS)

# CLI progress (sonic_core/progress.py)
PROGRESS_LOG_INTERVAL_S = 30.0  # s between progress log lines when stderr is not a terminal (log files, CI)
PROGRESS_BAR_MIN_INTERVAL_S = 0.5  # s between redraws of a terminal progress bar
PROGRESS_BAR_FALLBACK_SIZE = (100, 24)  # (columns, lines) assumed for a terminal whose size is unknown


@dataclass(frozen=True)
class SamplerDefaults:
    """User-facing defaults of the sampler (SPEC §0)."""

    steps: int = 25
    seed: int = 72589
    min_resolution: int = 512  # px, short side before rounding to SIZE_MULTIPLE
    frames_per_window: int = 25  # W, frames denoised together
    overlap: int = 0  # frames shared by consecutive windows
    shift_offset: int = 7  # frames every window start moves after each step
    min_appearance_guidance: float = 2.0
    max_appearance_guidance: float = 2.0
    min_audio_guidance: float = 7.5
    max_audio_guidance: float = 7.5
    i2i_strength: float = 1.0
    noise_aug_strength: float = 0.0
    fps_conditioning: float = GENERATED_FPS
    audio_scale: float = 1.0  # official ip_audio_scale
    decode_chunk_size: int = 8  # frames per temporal-VAE decode call
    motion_bucket_scale: float = 1.0  # official dynamic_scale
    # CFG rows per UNet call (GUIDANCE_ROWS_CHOICES): 3 = the official single call per window, 1 = the
    # three guidance branches one after another (about a third of the activation memory, same result
    # within float rounding); how the sampler runs, not what it computes (not in the resume fingerprint)
    guidance_rows: int = 3


SAMPLER_DEFAULTS = SamplerDefaults()

# Resumable sampling (sonic_core/resume.py)
RESUME_FORMAT_VERSION = 1  # bump when the saved state's meaning changes (old states are then ignored)
RESUME_MAX_AGE_S = 7 * 24 * 3600  # s; states of other runs older than a week are deleted
RESUME_FOLDER = "sonic_resume"  # folder name under ComfyUI's user directory
# largest |value| a state or kept result read back may hold (sampler space, x 0.18215): an honest start is
# ref + sigma x noise <= ~9 + SIGMA_MAX (700) x 6.1 (the largest of ~1e9 unit normal draws) = ~4300, and
# every Euler step moves the latents toward the denoised estimate, never past both; 1e4 leaves 2.3x headroom,
# and a state beyond it (1e30, or NaN/inf, always refused) was not written by this sampler
RESUME_LATENT_ABS_MAX = 1e4
# Finished samplings kept beside the states (the same fingerprint: an identical rerun returns them at once,
# what keeps Latent Segment's later segments from sampling again when ComfyUI's cache forgot the result)
# MiB of kept results in all, the oldest evicted first: 4 ten-minute 512x512 clips in fp32 (491 MB each), 8 in fp16
RESULT_KEEP_MB = 2048
RESULT_KEEP_ENV = "SONIC_KEEP_MB"  # overrides RESULT_KEEP_MB (MiB; 0 = keep none)

# Several processes on one clip (sonic_core/distributed.py, torchrun)
# s; bound on every collective (and the start-up rendezvous): a rank that died or stalls makes the
# others fail after this long instead of hanging. Must exceed the longest gap between two exchanges:
# model loading + audio encoding before the first one (minutes for a 10-minute clip on a CPU), one
# UNet call per window between later ones.
DIST_TIMEOUT_S = 900.0
DIST_ERROR_EXIT = 4  # CLI exit status when another rank failed (2: bad input, 3: missing weights)


# ----------------------------------------------------------------------------------------------
# Limits of every user-facing number (issue 22): the nodes' widgets take min/max/default from here
# and the CLI checks each of its numbers against the node's own range. NaN and inf are refused.
# ----------------------------------------------------------------------------------------------
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # largest noise seed (ComfyUI's seed widgets stop here)
STEPS_MAX = 1000  # denoising steps
GUIDANCE_MAX = 100.0  # appearance / audio guidance scale
WINDOW_MAX = 256  # frames per window (and overlap / shift offset)
WINDOW_BATCH_MAX = 64  # windows per UNet call
FPS_CONDITIONING_MAX = 120.0  # frames/s the UNet may be conditioned on
AUDIO_SCALE_MAX = 10.0  # weight of the audio cross-attention
MIN_RESOLUTION_MAX = 4096  # px, short side of the working size
MAX_SECONDS_LIMIT = 36000.0  # s (10 h) of audio at most; 0 = the whole clip
MOTION_SCALE_MAX = 10.0  # multiplier of a motion bucket (official dynamic_scale)
BUCKET_FIXED_MAX = 1024.0  # a fixed motion bucket value
BUCKET_PREDICT = -1.0  # fixed-bucket value meaning "use the prediction"
FRAME_RATE_MIN = 0.01  # frames/s of a video file
FRAME_RATE_MAX = 1000.0  # frames/s of a video file
DIST_TIMEOUT_MIN_S = 1.0  # s, shortest bound on a torchrun exchange
DIST_TIMEOUT_MAX_S = 7 * 24 * 3600.0  # s, longest (a week: longer ones overflow nothing but help no one)


def _number_text(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Limit:
    """Range and default of one number a user sets (a node widget and/or a CLI flag).

    ``integer``: whole numbers only. ``flag``: the CLI flag checked against this range (None: the
    CLI has none). ``hint``: what the number means, said in the refusal.
    """

    lo: float
    hi: float
    default: float
    integer: bool = False
    flag: str | None = None
    hint: str = ""

    def widget(self, tooltip: str, default=None, **extra) -> tuple[str, dict]:
        """A ComfyUI INT/FLOAT input of this range: ``("INT", {"default", "min", "max", ...})``."""
        opts = {"default": self.default if default is None else default, "min": self.lo, "max": self.hi}
        return ("INT" if self.integer else "FLOAT", {**opts, **extra, "tooltip": tooltip})

    def check(self, value, name: str):
        """``value`` as an int / float inside the range, or a ValueError naming ``name``, the value,
        the range and what the number means (NaN, inf, booleans and text are refused)."""
        kind = "a whole number" if self.integer else "a finite number"
        hint = f" ({self.hint})" if self.hint else ""
        span = f"{kind} from {_number_text(self.lo)} to {_number_text(self.hi)}{hint}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise ValueError(f"{name} {value!r} must be {span}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of several values
            raise ValueError(f"{name} {value!r} must be {span}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"{name} {value!r} must be {span}")
        if self.integer:
            if number != int(number) and not isinstance(value, int):
                raise ValueError(f"{name} {value!r} must be {span}")
            number = int(value) if isinstance(value, int) else int(number)
        if not self.lo <= number <= self.hi:
            raise ValueError(f"{name} {value!r} is out of range: must be {span}")
        return number


_D = SAMPLER_DEFAULTS
LIMITS: dict[str, Limit] = {
    # Sonic Sampler
    "seed": Limit(0, SEED_MAX, _D.seed, True, "--seed", "the noise seed"),
    "steps": Limit(1, STEPS_MAX, _D.steps, True, "--steps", "denoising steps; official 25"),
    "min_resolution": Limit(SIZE_MULTIPLE, MIN_RESOLUTION_MAX, _D.min_resolution, True, "--min-resolution",
                            "short side in px before rounding to a multiple of 64; official 512"),
    "min_appearance_guidance": Limit(0.0, GUIDANCE_MAX, _D.min_appearance_guidance),
    "max_appearance_guidance": Limit(0.0, GUIDANCE_MAX, _D.max_appearance_guidance),
    "min_audio_guidance": Limit(0.0, GUIDANCE_MAX, _D.min_audio_guidance),
    "max_audio_guidance": Limit(0.0, GUIDANCE_MAX, _D.max_audio_guidance),
    "frames_per_window": Limit(1, WINDOW_MAX, _D.frames_per_window, True),
    "overlap": Limit(0, WINDOW_MAX - 1, _D.overlap, True),
    "shift_offset": Limit(0, WINDOW_MAX, _D.shift_offset, True),
    "i2i_strength": Limit(0.01, 1.0, _D.i2i_strength),
    "noise_aug": Limit(0.0, 1.0, _D.noise_aug_strength),
    "fps_conditioning": Limit(0.0, FPS_CONDITIONING_MAX, _D.fps_conditioning, hint="official 12.5"),
    "audio_scale": Limit(0.0, AUDIO_SCALE_MAX, _D.audio_scale),
    # the node's 0 = auto; the CLI's default stays 1 window per call (its --window-batch 0 is auto)
    "window_batch": Limit(0, WINDOW_BATCH_MAX, 0, True, "--window-batch",
                          "windows per UNet call; 0 = as many as free GPU memory allows"),
    # Whisper Audio Encode
    "max_seconds": Limit(0.0, MAX_SECONDS_LIMIT, 0.0, flag="--max-seconds", hint="0 = the whole audio"),
    # Motion Bucket Predict (the CLI's --dynamic-scale sets both scales, as the official dynamic_scale)
    "motion_scale": Limit(0.0, MOTION_SCALE_MAX, _D.motion_bucket_scale, flag="--dynamic-scale",
                          hint="0.5 mild, 1.0 normal, 2.0 intense"),
    "fixed_bucket": Limit(BUCKET_PREDICT, BUCKET_FIXED_MAX, BUCKET_PREDICT, hint="-1 = predict"),
    # Face Mask Detect
    "expand_ratio": Limit(0.0, 5.0, CROP_EXPAND_RATIO),
    "mask_area": Limit(0.1, 5.0, MASK_AREA),
    "confidence": Limit(0.01, 0.99, DETECTOR_CONFIDENCE),
    "face_index": Limit(0, FACE_INDEX_MAX, 0, True,
                        hint="0 = the largest face, 1..N = the N-th from the left"),
    # decoding, interpolation and saving
    "decode_chunk_size": Limit(1, 1024, _D.decode_chunk_size, True),  # SVD loader; Latent nodes: 0 = the VAE's
    "decode_chunk_or_auto": Limit(0, 1024, 0, True),
    "rife_multiplier": Limit(2, 4, RIFE_MULTIPLIER, True),
    "rife_batch": Limit(0, 256, RIFE_BATCH, True),
    "crf": Limit(0, VIDEO_CRF_MAX, VIDEO_CRF, True),
    "frame_rate": Limit(FRAME_RATE_MIN, FRAME_RATE_MAX, GENERATED_FPS),  # Video Combine's default: 25
    "segment_frames": Limit(1, 100_000, 96, True),
    "segment_index": Limit(0, 100_000, 0, True),
    # Sonic Paste Back and Latent To Video's paste_feather (the CLI's --paste-feather)
    "paste_feather": Limit(0.0, PASTE_FEATHER_MAX, PASTE_FEATHER, flag="--paste-feather",
                           hint="a fraction of the pasted region's shorter side; 0 = hard edge"),
    # CLI only
    "dist_timeout": Limit(DIST_TIMEOUT_MIN_S, DIST_TIMEOUT_MAX_S, DIST_TIMEOUT_S, flag="--dist-timeout",
                          hint="seconds a torchrun rank waits for the others"),
}
del _D


def check_inputs(values: dict, limit_of: dict | None = None) -> dict:
    """``{input name: value}`` checked against ``LIMITS[limit_of.get(name, name)]`` (a node's numbers,
    before any heavy work: ComfyUI's own min/max check lets NaN through and skips linked inputs).
    Returns the values as int / float; raises the first ValueError."""
    limit_of = limit_of or {}
    return {name: LIMITS[limit_of.get(name, name)].check(v, name) for name, v in values.items()}
