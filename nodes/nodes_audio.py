"""SonicWhisperAudioEncode: ComfyUI AUDIO -> whisper features + audio tokens (type SONIC_AUDIO)."""

from __future__ import annotations

from . import runtime
from .runtime import core


def _check_audio(audio) -> tuple:
    """(waveform, sample_rate) of a ComfyUI AUDIO dict, or a ValueError naming what is wrong."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        got = sorted(audio) if isinstance(audio, dict) else type(audio).__name__
        raise ValueError(f"expected ComfyUI AUDIO {{'waveform': [B, C, T], 'sample_rate': Hz}}, got {got}; "
                         "connect a Load Audio node")
    return audio["waveform"], audio["sample_rate"]


class SonicWhisperAudioEncode:
    DESCRIPTION = ("Turns speech or singing into Sonic's audio conditioning: mono 16 kHz, whisper-tiny "
                   "features (every hidden state), the per-frame windows and audio tokens. The video "
                   "gets one frame per 80 ms of audio (12.5 fps before interpolation).")
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("whisper", "audio encode", "speech features", "voice", "音频编码")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ()
    FUNCTION = "encode"
    RETURN_TYPES = ("SONIC_AUDIO",)
    RETURN_NAMES = ("sonic_audio",)
    OUTPUT_TOOLTIPS = ("Whisper features, audio tokens, frame count and frame rate, plus the source "
                       "audio for muxing.",)

    @classmethod
    def INPUT_TYPES(cls):
        cfg = core("config")
        frame_seconds = cfg.SAMPLES_PER_25FPS_FRAME / cfg.SAMPLE_RATE  # 0.04 s, one 25 fps frame
        official_cap = cfg.FRAME_CAP * frame_seconds  # 400 s
        return runtime.advanced({
            "required": {
                "sonic_model": ("SONIC_MODEL", {"tooltip": "From Sonic Model Loader (whisper and audio2token "
                                                           "are used here)."}),
                "audio": ("AUDIO", {"tooltip": "Speech or singing; any sample rate, mono or stereo "
                                               "(averaged to mono), one clip."}),
                "max_seconds": cfg.LIMITS["max_seconds"].widget(
                    "Use at most this many seconds of audio (0 = all). The video length follows "
                    f"the audio. The official code stops at {official_cap:g} s.", step=frame_seconds),
            }
        }, cls.ADVANCED_INPUTS)

    def encode(self, sonic_model, audio, max_seconds=0.0):
        max_seconds = core("config").check_inputs({"max_seconds": max_seconds})["max_seconds"]
        waveform, sample_rate = _check_audio(audio)
        progress = runtime.Progress(1, "Whisper audio encode")
        result = core("audio").encode_audio(sonic_model, waveform, sample_rate, float(max_seconds),
                                            callback=progress.callback(),
                                            out_device=runtime.intermediate_device())
        return (result,)


NODE_CLASS_MAPPINGS = {"SonicWhisperAudioEncode": SonicWhisperAudioEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicWhisperAudioEncode": "Whisper Audio Encode"}
