"""Voices of a conversation (issue 30 item 5): one AUDIO per face, a speaker timeline, the mix.

Waveforms are ``[C, T]`` float tensors (channels, samples) at a sample rate in Hz, as ComfyUI's
AUDIO holds them without the batch dimension. A timeline is RTTM text, what diarization tools such
as pyannote write, one turn a line::

    SPEAKER <file> <channel> <start s> <duration s> <NA> <NA> <name> <NA> <NA>

Project decisions: turns of one speaker that overlap or touch are merged; a face outside its
speaker's turns hears silence (a few ms of fade inside each turn's edges, ``SPEAKER_FADE_S``); the
mix is a plain sum, scaled down only if its peak would pass full scale (``MIX_PEAK``), so it is
never louder than the voices; tracks of different rates are resampled with soxr to the highest
rate, padded with silence to the longest.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from . import config
from .audio import check_waveform

log = logging.getLogger(__name__)

RTTM_TURN = "SPEAKER"
# the other RTTM line types (NIST RT-09): skipped, they carry no speaker turn
RTTM_OTHER = ("SPKR-INFO", "SEGMENT", "NOSCORE", "NO_RT_METADATA", "LEXEME", "NON-LEX", "NON-SPEECH",
              "FILLER", "EDIT", "IP", "END-OF-SENTENCE", "SU", "CB", "A/P")
RTTM_EXAMPLE = "SPEAKER talk 1 0.50 2.25 <NA> <NA> alice <NA> <NA>"


# ----------------------------------------------------------------------------------------------
# Timeline
# ----------------------------------------------------------------------------------------------
def merge_turns(turns) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` turns sorted, those that overlap or touch merged into one."""
    out: list[list[float]] = []
    for start, end in sorted(turns):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def parse_rttm(text: str, what: str = "the timeline") -> dict[str, list[tuple[float, float]]]:
    """Speaker name -> sorted, merged ``(start_s, end_s)`` turns of an RTTM text.

    Comments (``#``), blank lines, lines in any order, overlapping turns and the other RTTM line types
    are accepted; a SPEAKER line with a missing or bad field is a ValueError naming its line number
    and content, as are turns of several recordings (several ``<file>`` ids) and a text without turns.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be RTTM text, got {type(text).__name__}")
    turns: dict[str, list[tuple[float, float]]] = {}
    files: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        kind = fields[0].upper()
        if kind in RTTM_OTHER:
            continue

        def bad(why: str) -> ValueError:
            return ValueError(f"{what}, line {number} {raw.strip()!r}: {why}; each turn reads like "
                              f"{RTTM_EXAMPLE!r} (start and duration in seconds)")

        if kind != RTTM_TURN:
            raise bad(f"starts with {fields[0]!r}, not {RTTM_TURN}")
        if len(fields) < config.RTTM_MIN_FIELDS:
            raise bad(f"has {len(fields)} fields, at least {config.RTTM_MIN_FIELDS} are needed")
        try:
            start, duration = float(fields[3]), float(fields[4])
        except ValueError:
            raise bad(f"start {fields[3]!r} and duration {fields[4]!r} must be numbers of seconds") from None
        if not (math.isfinite(start) and math.isfinite(duration)) or start < 0 or duration < 0:
            raise bad(f"start {fields[3]} and duration {fields[4]} must be finite and >= 0")
        files.add(fields[1])
        if duration > 0:
            turns.setdefault(fields[7], []).append((start, start + duration))
    if len(files) > 1:
        raise ValueError(f"{what} holds turns of {len(files)} recordings ({', '.join(sorted(files))}): keep "
                         "the lines of the recording you animate (the second field names it)")
    if not turns:
        raise ValueError(f"{what} has no speaker turns: give RTTM lines like {RTTM_EXAMPLE!r} (what "
                         "diarization tools such as pyannote write)")
    return {name: merge_turns(t) for name, t in sorted(turns.items())}


def turns_of(timeline: dict[str, list[tuple[float, float]]], speaker: str,
             what: str = "the timeline") -> list[tuple[float, float]]:
    """The turns of ``speaker``, or a ValueError listing the names the timeline holds."""
    if speaker not in timeline:
        raise ValueError(f"speaker {speaker!r} is not in {what}; it names: {', '.join(timeline)} "
                         "(names are case-sensitive)")
    return timeline[speaker]


# ----------------------------------------------------------------------------------------------
# Tracks
# ----------------------------------------------------------------------------------------------
def turn_envelope(num_samples: int, sample_rate: float, turns,
                  fade_s: float = config.SPEAKER_FADE_S) -> torch.Tensor:
    """Gain ``[T]`` float32: 1 inside the turns, 0 outside, ramping linearly over ``fade_s`` inside each
    turn's edges (a turn shorter than two fades peaks below 1). Turns past the end are cut off."""
    env = torch.zeros(num_samples, dtype=torch.float32)
    fade = max(0, round(fade_s * sample_rate))  # samples per ramp
    for start, end in merge_turns(turns):
        s0, s1 = min(round(start * sample_rate), num_samples), min(round(end * sample_rate), num_samples)
        if s1 <= s0:
            continue
        k = torch.arange(s1 - s0, dtype=torch.float32)  # [n] sample index inside the turn
        ramp = torch.minimum(k + 1, (s1 - s0) - k) / (fade + 1)  # [n] rises from either edge
        env[s0:s1] = ramp.clamp(max=1.0)
    return env


def speaker_track(waveform: torch.Tensor, sample_rate: float, turns) -> torch.Tensor:
    """``waveform [C, T]`` kept inside the turns and silent outside them (short fades at the edges)."""
    env = turn_envelope(waveform.shape[-1], sample_rate, turns).to(waveform.device)  # [T]
    return waveform * env.to(waveform.dtype)  # [C, T] * [T]


def speaker_voice(waveform: torch.Tensor, sample_rate: float, timeline: str, speaker: str,
                  what: str = "the timeline") -> torch.Tensor:
    """One speaker's voice ``[C, T]`` from a mixed recording (``[C, T]`` or ``[1, C, T]``) and an RTTM
    timeline: the mix inside that speaker's turns, silence elsewhere, the input's length."""
    name = speaker.strip() if isinstance(speaker, str) else speaker
    turns = turns_of(parse_rttm(timeline, what), name, what)
    wave = check_waveform(waveform, sample_rate)  # [C, T]
    seconds = wave.shape[-1] / sample_rate
    if turns[0][0] >= seconds:
        log.warning("speaker %r: every turn starts after the audio ends (%.2f s): the voice is silent",
                    speaker, seconds)
    return speaker_track(wave, sample_rate, turns)


def _resample(wave: torch.Tensor, rate: float, target: float) -> torch.Tensor:
    """``[C, T]`` from ``rate`` to ``target`` Hz with soxr, ``round(T * target / rate)`` samples long."""
    import soxr

    if rate == target:
        return wave
    n = round(wave.shape[-1] * target / rate)
    x = wave.detach().to("cpu", torch.float32).numpy().T  # [T, C]: soxr takes time first
    y = soxr.resample(np.ascontiguousarray(x), rate, target, quality=config.RESAMPLE_QUALITY)  # [~n, C]
    y = torch.from_numpy(np.ascontiguousarray(y.T))  # [C, ~n]
    if y.shape[-1] < n:
        y = torch.nn.functional.pad(y, (0, n - y.shape[-1]))
    return y[:, :n].to(wave.dtype)


def match_voices(voices) -> tuple[list[torch.Tensor], float]:
    """``[(waveform, sample_rate), ...]`` -> (``[C, T]`` each, sample rate): every track at the highest
    rate (soxr), with the most channels (a mono track repeated; another count averaged to mono first)
    and padded with silence to the longest. Waveforms may be ``[C, T]`` or ``[1, C, T]``."""
    if not voices:
        raise ValueError("no voices given: connect at least one AUDIO")
    checked = []
    for k, (wave, rate) in enumerate(voices, 1):
        try:
            checked.append((check_waveform(wave, rate), rate))
        except ValueError as e:
            raise ValueError(f"voice {k}: {e}") from None
    target = max(rate for _, rate in checked)
    channels = max(w.shape[0] for w, _ in checked)
    tracks = []
    for k, (wave, rate) in enumerate(checked, 1):
        if rate != target:
            log.info("voice %d: resampled from %g to %g Hz", k, rate, target)
        wave = _resample(wave.to(torch.float32), rate, target)  # [C, T']
        if wave.shape[0] != channels:
            wave = wave.mean(dim=0, keepdim=True).expand(channels, -1)  # [channels, T']
        tracks.append(wave)
    longest = max(w.shape[-1] for w in tracks)
    tracks = [torch.nn.functional.pad(w, (0, longest - w.shape[-1])) for w in tracks]  # [C, longest] each
    return tracks, target


def mix_voices(waveforms) -> torch.Tensor:
    """The sum of same-shaped ``[C, T]`` tracks, scaled down only if its peak would pass ``MIX_PEAK``
    (no clipping, never louder than the sum)."""
    shapes = {tuple(w.shape) for w in waveforms}
    if len(shapes) != 1:
        raise ValueError(f"voices to mix have shapes {sorted(shapes)}: match them first (match_voices)")
    mix = torch.stack(list(waveforms)).sum(dim=0)  # [N, C, T] -> [C, T]
    peak = float(mix.abs().max()) if mix.numel() else 0.0
    if peak > config.MIX_PEAK:
        log.info("voice mix peaks at %.3f: scaled by %.3f to stay under full scale", peak,
                 config.MIX_PEAK / peak)
        mix = mix * (config.MIX_PEAK / peak)
    return mix


def mix_voice_tracks(voices) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """``[(waveform, sample_rate) or None, ...]`` -> (mix ``[C, T]``, one ``[C, T]`` per entry, rate):
    the given voices matched (``match_voices``) and mixed; a None entry becomes silence of that length."""
    given = [v for v in voices if v is not None]
    tracks, rate = match_voices(given)
    silence = torch.zeros_like(tracks[0])  # [C, T]
    it = iter(tracks)
    return mix_voices(tracks), [next(it) if v is not None else silence.clone() for v in voices], rate
