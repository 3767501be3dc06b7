"""Voices of a conversation: SonicMixVoices (one AUDIO per face -> the mix + matched tracks) and
SonicSpeakerVoice (a mixed recording + an RTTM speaker timeline -> one speaker's voice)."""

from __future__ import annotations

from .nodes_audio import _check_audio
from .runtime import core

VOICES = 4  # voice inputs of Mix Voices (two required, two optional)


def _audio(waveform, sample_rate) -> dict:
    """ComfyUI AUDIO of a ``[C, T]`` waveform."""
    return {"waveform": waveform.unsqueeze(0).contiguous(), "sample_rate": sample_rate}  # [1, C, T]


class SonicMixVoices:
    DESCRIPTION = ("Conversations: one voice per face. Mixes the voices into the video's sound (summed, "
                   "scaled down only if it would clip) and gives every voice back at the same sample rate "
                   "and length (padded with silence to the longest), so all faces share the frame count. "
                   "A face whose voice is silent listens.")
    CATEGORY = "Sonic"
    FUNCTION = "mix"
    RETURN_TYPES = ("AUDIO",) * (1 + VOICES)
    RETURN_NAMES = ("mix",) + tuple(f"voice_{k}" for k in range(1, VOICES + 1))
    OUTPUT_TOOLTIPS = (
        "Every voice summed (no clipping): connect it to Latent To Video / Video Combine as the sound.",
    ) + tuple(f"Voice {k} at the mix's sample rate and length: connect it to the Whisper Audio Encode of "
              f"face {k}." + (f" Silence when voice_{k} is not connected." if k > 2 else "")
              for k in range(1, VOICES + 1))

    @classmethod
    def INPUT_TYPES(cls):
        def voice(k):
            return ("AUDIO", {"tooltip": f"The voice of face {k} (any sample rate, mono or stereo; silence "
                                         "where this face listens)."})

        return {"required": {f"voice_{k}": voice(k) for k in (1, 2)},
                "optional": {f"voice_{k}": voice(k) for k in range(3, VOICES + 1)}}

    def mix(self, voice_1, voice_2, voice_3=None, voice_4=None):
        voices = [_check_audio(v) if v is not None else None for v in (voice_1, voice_2, voice_3, voice_4)]
        mix, tracks, rate = core("speakers").mix_voice_tracks(voices)
        return (_audio(mix, rate),) + tuple(_audio(t, rate) for t in tracks)


class SonicSpeakerVoice:
    DESCRIPTION = ("Conversations from one mixed recording: keeps one speaker's turns of a speaker timeline "
                   "(RTTM, as diarization tools such as pyannote write) and silences the rest, so that "
                   "speaker's face talks in its turns and listens otherwise. Use the original recording as "
                   "the video's sound.")
    CATEGORY = "Sonic"
    FUNCTION = "voice"
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("voice",)
    OUTPUT_TOOLTIPS = ("The recording inside this speaker's turns, silence elsewhere (short fades at the "
                       "edges), as long as the input: connect it to this face's Whisper Audio Encode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "The mixed recording of the whole conversation."}),
            "timeline": ("STRING", {"multiline": True, "default": "", "tooltip":
                                    "RTTM text, one turn a line: SPEAKER <file> 1 <start s> <duration s> "
                                    "<NA> <NA> <name> <NA> <NA>. Lines starting with # are comments."}),
            "speaker": ("STRING", {"default": "", "tooltip": "The speaker name in the timeline whose face "
                                                             "this voice drives (case-sensitive)."}),
        }}

    def voice(self, audio, timeline, speaker):
        waveform, rate = _check_audio(audio)
        return (_audio(core("speakers").speaker_voice(waveform, rate, timeline, speaker), rate),)


NODE_CLASS_MAPPINGS = {"SonicMixVoices": SonicMixVoices, "SonicSpeakerVoice": SonicSpeakerVoice}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicMixVoices": "Mix Voices",
                              "SonicSpeakerVoice": "Speaker Voice From Timeline"}
