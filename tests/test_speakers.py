"""Voices of a conversation (issue 30 item 5): RTTM timelines, one speaker's track, matching and mixing.

The audio is made in Python (tones and a chirp at real sample rates) and checked by its samples and
its spectrum; the resampling is soxr's.
"""

from __future__ import annotations

import math

import pytest
import torch

from sonic_core import config, speakers

RTTM = """# pyannote-style timeline of talk.wav, lines out of order on purpose
SPEAKER talk 1 3.000 1.500 <NA> <NA> bob <NA> <NA>

SPEAKER talk 1 0.500 1.000 <NA> <NA> alice <NA> <NA>
SPKR-INFO talk 1 <NA> <NA> <NA> unknown alice <NA> <NA>
SPEAKER talk 1 1.200 0.800 <NA> <NA> alice <NA> <NA>
SPEAKER talk 1 2.000 0.500 <NA> <NA> alice <NA> <NA>   # touches the turn before: merged
SPEAKER talk 1 1.800 1.400 <NA> <NA> bob <NA> <NA>
SPEAKER talk 1 5.0 0 <NA> <NA> carol <NA> <NA>
"""


def tone(freq, seconds, rate, amp=0.5, channels=1):
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).to(torch.float32).expand(channels, -1).clone()  # [C, T]


def flat(turns):
    return [t for turn in turns for t in turn]


def peak_hz(wave, rate):
    spec = torch.fft.rfft(wave[0].to(torch.float64)).abs()  # [T // 2 + 1]
    return float(spec.argmax()) * rate / wave.shape[-1]


# ----------------------------------------------------------------------------------------------
# timeline
# ----------------------------------------------------------------------------------------------
def test_parse_rttm_sorts_merges_and_skips_comments():
    turns = speakers.parse_rttm(RTTM)
    assert list(turns) == ["alice", "bob"]  # carol's only turn lasts 0 s
    assert flat(turns["alice"]) == pytest.approx([0.5, 2.5])  # 0.5-1.5 overlaps 1.2-2.0, touching 2.0-2.5
    assert flat(turns["bob"]) == pytest.approx([1.8, 4.5])  # 1.8-3.2 and 3.0-4.5 overlap: merged
    two = speakers.parse_rttm("SPEAKER f 1 4 1 <NA> <NA> a <NA> <NA>\nSPEAKER f 1 0 1 <NA> <NA> a <NA> <NA>")
    assert two == {"a": [(0.0, 1.0), (4.0, 5.0)]}


@pytest.mark.parametrize("line, why", [
    ("SPEAKER talk 1 0.5 1.0 <NA> <NA>", "has 7 fields"),
    ("SPEAKER talk 1 zero 1.0 <NA> <NA> alice <NA> <NA>", "must be numbers of seconds"),
    ("SPEAKER talk 1 0.5 -1 <NA> <NA> alice <NA> <NA>", "must be finite and >= 0"),
    ("SPEAKER talk 1 nan 1 <NA> <NA> alice <NA> <NA>", "must be finite and >= 0"),
    ("alice 0.5 1.0", "starts with 'alice', not SPEAKER"),
])
def test_parse_rttm_names_the_bad_line(line, why):
    text = "# header\nSPEAKER talk 1 0 1 <NA> <NA> bob <NA> <NA>\n" + line + "\n"
    with pytest.raises(ValueError, match=rf"the timeline, line 3 '{line[:12]}.*{why}"):
        speakers.parse_rttm(text)


def test_parse_rttm_refuses_empty_and_mixed_recordings_and_names_the_speakers():
    with pytest.raises(ValueError, match="has no speaker turns"):
        speakers.parse_rttm("# nothing\n\n")
    with pytest.raises(ValueError, match=r"2 recordings \(a, b\)"):
        speakers.parse_rttm("SPEAKER a 1 0 1 <NA> <NA> x <NA> <NA>\nSPEAKER b 1 0 1 <NA> <NA> y <NA> <NA>")
    turns = speakers.parse_rttm(RTTM, "talk.rttm")
    with pytest.raises(ValueError, match=r"speaker 'Alice' is not in talk.rttm; it names: alice, bob"):
        speakers.turns_of(turns, "Alice", "talk.rttm")


# ----------------------------------------------------------------------------------------------
# one speaker's track
# ----------------------------------------------------------------------------------------------
def test_speaker_track_is_silent_outside_the_turns_and_fades_at_the_edges():
    rate = 16000
    mixed = tone(220, 5.0, rate, amp=0.8, channels=2)  # [2, 80000]
    out = speakers.speaker_track(mixed, rate, [(0.5, 2.5), (4.0, 4.25)])
    assert out.shape == mixed.shape
    fade = round(config.SPEAKER_FADE_S * rate)  # 80 samples
    s0, s1 = round(0.5 * rate), round(2.5 * rate)
    assert torch.equal(out[:, :s0], torch.zeros(2, s0))
    assert torch.equal(out[:, s1:64000], torch.zeros(2, 64000 - s1))
    assert torch.equal(out[:, 68000:], torch.zeros(2, 12000))
    assert torch.equal(out[:, s0 + fade:s1 - fade], mixed[:, s0 + fade:s1 - fade])  # gain exactly 1
    env = speakers.turn_envelope(80000, rate, [(0.5, 2.5)])
    ramp = env[s0:s0 + fade + 1]
    assert float(ramp[0]) == pytest.approx(1 / (fade + 1)) and bool((ramp[1:] > ramp[:-1]).all())
    assert float(env[s1 - 1]) == pytest.approx(1 / (fade + 1)) and float(env[s1]) == 0.0
    # a turn past the end is cut off; one starting after it leaves the track silent
    assert speakers.turn_envelope(100, rate, [(0.005, 1.0)])[-1] > 0
    assert speakers.turn_envelope(100, rate, [(1.0, 2.0)]).eq(0).all()


def test_speaker_voice_node(caplog):
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from nodes.nodes_speakers import SonicSpeakerVoice

    assert NODE_CLASS_MAPPINGS["SonicSpeakerVoice"] is SonicSpeakerVoice
    assert NODE_DISPLAY_NAME_MAPPINGS["SonicSpeakerVoice"] == "Speaker Voice From Timeline"
    rate = 22050
    wave = tone(300, 5.0, rate)[None]  # [1, 1, T]
    (voice,) = SonicSpeakerVoice().voice({"waveform": wave, "sample_rate": rate}, RTTM, " bob ")
    assert voice["sample_rate"] == rate and voice["waveform"].shape == wave.shape
    w = voice["waveform"][0, 0]
    assert w[: round(1.8 * rate)].eq(0).all() and w[round(4.5 * rate):].eq(0).all()
    mid = slice(round(2.0 * rate), round(4.0 * rate))
    assert torch.equal(w[mid], wave[0, 0, mid])
    with pytest.raises(ValueError, match="speaker 'dave' is not in the timeline; it names: alice, bob"):
        SonicSpeakerVoice().voice({"waveform": wave, "sample_rate": rate}, RTTM, "dave")


# ----------------------------------------------------------------------------------------------
# matching and mixing
# ----------------------------------------------------------------------------------------------
def test_match_voices_resamples_to_the_highest_rate_and_pads_to_the_longest():
    a = tone(440, 1.0, 16000)  # mono, 1 s at 16 kHz
    b = tone(1000, 1.5, 24000, channels=2)[None]  # stereo, 1.5 s at 24 kHz, [1, C, T]
    tracks, rate = speakers.match_voices([(a, 16000), (b, 24000)])
    assert rate == 24000 and [tuple(t.shape) for t in tracks] == [(2, 36000), (2, 36000)]
    assert torch.equal(tracks[0][0], tracks[0][1])  # mono repeated on both channels
    assert tracks[0][:, 24000:].eq(0).all()  # padded with silence after its 1 s
    assert peak_hz(tracks[0][:, :24000], 24000) == pytest.approx(440, abs=1)  # same pitch after soxr
    body = tracks[0][0, 1000:23000]
    assert float(body.abs().max()) == pytest.approx(0.5, abs=0.01)  # same level
    assert torch.equal(tracks[1], b[0])  # already at the rate: untouched
    with pytest.raises(ValueError, match="voice 2: audio has 800 NaN"):
        speakers.match_voices([(a, 16000), (torch.tensor([[0.1, float("nan")] * 800]), 16000)])


def test_mix_voices_never_clips_and_is_never_louder_than_the_sum():
    rate = 16000
    loud = [tone(200, 1.0, rate, amp=0.8), tone(200, 1.0, rate, amp=0.7)]  # in phase: sum peaks at 1.5
    mix = speakers.mix_voices(loud)
    assert float(mix.abs().max()) == pytest.approx(config.MIX_PEAK, abs=1e-6)
    assert torch.allclose(mix, (loud[0] + loud[1]) / float((loud[0] + loud[1]).abs().max()), atol=1e-6)
    quiet = [tone(200, 1.0, rate, amp=0.2), tone(330, 1.0, rate, amp=0.3)]
    assert torch.allclose(speakers.mix_voices(quiet), quiet[0] + quiet[1], atol=1e-7)  # no gain applied
    with pytest.raises(ValueError, match="match them first"):
        speakers.mix_voices([tone(200, 1.0, rate), tone(200, 0.5, rate)])


def test_mix_voices_node_pads_and_fills_missing_voices_with_silence():
    from nodes.nodes_speakers import SonicMixVoices

    a = {"waveform": tone(440, 0.5, 16000, amp=0.9)[None], "sample_rate": 16000}
    b = {"waveform": tone(440, 1.0, 44100, amp=0.9)[None], "sample_rate": 44100}
    pcm = (tone(660, 0.25, 8000, amp=0.5) * 32767).to(torch.int16)[None]  # int16 PCM [1, 1, T]
    c = {"waveform": pcm, "sample_rate": 8000}
    mix, v1, v2, v3, v4 = SonicMixVoices().mix(a, b, voice_3=c)
    n = 44100
    for out in (mix, v1, v2, v3, v4):
        assert out["sample_rate"] == 44100 and out["waveform"].shape == (1, 1, n)
    assert v4["waveform"].eq(0).all() and v1["waveform"][0, 0, 22050:].eq(0).all()
    assert float(mix["waveform"].abs().max()) <= config.MIX_PEAK
    assert float(v3["waveform"].abs().max()) == pytest.approx(0.5, abs=0.02)
    assert torch.allclose(mix["waveform"][0, 0, 30000:], v2["waveform"][0, 0, 30000:] * float(
        mix["waveform"][0, 0, 30000:].abs().max() / v2["waveform"][0, 0, 30000:].abs().max()), atol=1e-5)
