"""Access to ../shared (fixtures, ComfyUI schemas) and to golden parity cases.

A golden case is a pair ``<path>.json`` + ``<path>.safetensors`` in the format of
../shared/fixtures/golden/sonic_golden_public (SPEC.md §14). ``SONIC_GOLDEN`` names the case
(a path without extension); tests must hold for any case in that format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import cached_property
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SONIC_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DEFAULT_GOLDEN = FIXTURES / "golden" / "sonic_golden_public"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (tests that need ../shared skip without it)")
    return p


def load_json(*parts: str):
    return json.loads(shared_path(*parts).read_text())


class Golden:
    """One golden case: ``g.t(name)`` tensors, ``g.meta`` JSON, ``g.weights(prefix)`` state dicts."""

    def __init__(self, base: Path):
        self.base = base
        self.meta = json.loads(base.with_suffix(".json").read_text())
        from safetensors.torch import load_file

        self._tensors = load_file(str(base.with_suffix(".safetensors")))

    @property
    def name(self) -> str:
        return self.meta.get("case", self.base.name)

    def t(self, name: str) -> torch.Tensor:
        self._skip_if_stale(name)
        return self._tensors[name]

    def has(self, name: str) -> bool:
        return name in self._tensors and self.stale_reason(name) is None

    def stale_reason(self, name: str) -> str | None:
        """Why ``name`` (a tensor, or ``scalars.<key>``) is no official output of this case's
        settings (a variant derived with other self-consistency settings), or None."""
        return self.meta.get("derived_from", {}).get("stale", {}).get(name)

    def _skip_if_stale(self, name: str) -> None:
        why = self.stale_reason(name)
        if why is not None:
            pytest.skip(f"golden case {self.name}: {name} is no official output for its settings ({why}); "
                        "the parity check that reads it skips on this derived case")

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """State dict of one tiny model: ``weights.<prefix>.*`` with the prefix removed."""
        head = f"weights.{prefix}."
        return {k[len(head):]: v for k, v in self._tensors.items() if k.startswith(head)}

    @property
    def models(self) -> dict:
        return self.meta["models"]

    @cached_property
    def scalars(self) -> dict:
        return _Scalars(self, self.meta["scalars"])

    @property
    def pipeline_kwargs(self) -> dict:
        return self.meta["effective_pipeline_kwargs"]

    @property
    def config_overrides(self) -> dict:
        return self.meta["config_overrides"]

    @cached_property
    def windows(self) -> list[dict]:
        """The official windows as run (step, frames, sigma, ...): official outputs, so a derived case
        with other window or schedule settings has none (the test skips); count with sampler.*."""
        return self.scalars["windows"]

    @cached_property
    def case(self) -> "CaseSettings":
        """Every setting of this case, read in full from ``process_args`` + ``config_overrides``."""
        return case_settings(self.meta)


class _Scalars(dict):
    """``meta["scalars"]`` whose stale entries (see Golden.stale_reason) skip the test that reads them."""

    def __init__(self, golden: Golden, values: dict):
        super().__init__(values)
        self._golden = golden

    def __getitem__(self, key):
        self._golden._skip_if_stale(f"scalars.{key}")
        return super().__getitem__(key)

    def __contains__(self, key):
        self._golden._skip_if_stale(f"scalars.{key}")
        return super().__contains__(key)

    def get(self, key, default=None):
        self._golden._skip_if_stale(f"scalars.{key}")
        return super().get(key, default)


# ----------------------------------------------------------------------------------------------
# A golden case's settings, read in full
# ----------------------------------------------------------------------------------------------
class GoldenFieldError(AssertionError):
    """A golden case sets a field this harness does not apply (or applies differently)."""


FPS_25 = 25.0  # the official ``frame_num`` counts 25 fps frames (640 samples at 16 kHz)
OFFICIAL_FRAME_STEP = 2  # the only ``step`` the pack implements (config.FRAME_STEP)


@dataclasses.dataclass(frozen=True)
class CaseSettings:
    """What the official ``Sonic.process`` ran with, in the pack's terms (SPEC §0)."""

    min_resolution: int
    steps: int
    motion_scale: float  # process(dynamic_scale) -> config.motion_bucket_scale
    keep_resolution: bool  # export size only (ffmpeg -s): changes no golden tensor
    frames_per_window: int
    overlap: int
    shift_offset: int
    decode_chunk_size: int
    min_appearance_guidance: float
    max_appearance_guidance: float
    audio_guidance: float  # both ends of the official guidance_scale2 ramp
    i2i_strength: float
    fps_conditioning: float
    area: float
    noise_aug_strength: float
    use_interframe: bool
    frame_cap: int  # official frame_num: cap on audio_len in 25 fps frames
    audio_scale: float  # ip_audio_scale
    seed: int

    @property
    def max_seconds(self) -> float:
        """The node's ``max_seconds`` that caps at exactly ``frame_cap`` 25 fps frames."""
        return self.frame_cap / FPS_25


def _int(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise GoldenFieldError(f"golden field {name}={v!r} must be an integer")
    return int(v)


def _float(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GoldenFieldError(f"golden field {name}={v!r} must be a finite number")
    return float(v)


def _bool(v, name):
    if not isinstance(v, bool):
        raise GoldenFieldError(f"golden field {name}={v!r} must be true or false")
    return v


def _step(v, name):
    if _int(v, name) != OFFICIAL_FRAME_STEP:
        raise GoldenFieldError(f"golden field {name}={v!r}: the pack generates one frame per "
                               f"{OFFICIAL_FRAME_STEP} audio frames only (config.FRAME_STEP); no mapping")
    return OFFICIAL_FRAME_STEP


def _weight_dtype(v, name):
    if v != "fp32":
        raise GoldenFieldError(f"golden field {name}={v!r}: goldens are compared in float32 only")
    return v


# official field -> (CaseSettings field or None when it is checked only, converter). Every field
# the official pipeline reads is here; anything else in a case fails loudly (never a default).
PROCESS_ARGS = {
    "min_resolution": ("min_resolution", _int),
    "inference_steps": ("steps", _int),
    "dynamic_scale": ("motion_scale", _float),
    "keep_resolution": ("keep_resolution", _bool),
    "seed": ("seed", _int),  # process(seed=...) overrides only if truthy (handled below)
}
CONFIG_OVERRIDES = {
    "n_sample_frames": ("frames_per_window", _int),
    "overlap": ("overlap", _int),
    "shift_offset": ("shift_offset", _int),
    "decode_chunk_size": ("decode_chunk_size", _int),
    "min_appearance_guidance_scale": ("min_appearance_guidance", _float),
    "max_appearance_guidance_scale": ("max_appearance_guidance", _float),
    "audio_guidance_scale": ("audio_guidance", _float),
    "i2i_noise_strength": ("i2i_strength", _float),
    "fps": ("fps_conditioning", _float),
    "step": (None, _step),
    "area": ("area", _float),
    "noise_aug_strength": ("noise_aug_strength", _float),
    "use_interframe": ("use_interframe", _bool),
    "frame_num": ("frame_cap", _int),
    "ip_audio_scale": ("audio_scale", _float),
    "seed": ("seed", _int),
    "num_inference_steps": ("steps", _int),  # process(inference_steps) overrides it
    "motion_bucket_scale": ("motion_scale", _float),  # process(dynamic_scale) overrides it
    "image_size": (None, _int),  # process(min_resolution) overrides it
    "weight_dtype": (None, _weight_dtype),
}
# The official defaults (config/inference/sonic.yaml, process() signature; SPEC §0).
OFFICIAL = dict(
    min_resolution=512, steps=25, motion_scale=1.0, keep_resolution=False, frames_per_window=25, overlap=0,
    shift_offset=7, decode_chunk_size=8, min_appearance_guidance=2.0, max_appearance_guidance=2.0,
    audio_guidance=7.5, i2i_strength=1.0, fps_conditioning=12.5, area=1.1, noise_aug_strength=0.0,
    use_interframe=True, frame_cap=10000, audio_scale=1.0, seed=72589,
)
# effective_pipeline_kwargs -> the CaseSettings field it must agree with
PIPELINE_KWARGS = {
    "num_inference_steps": "steps", "motion_bucket_scale": "motion_scale", "fps": "fps_conditioning",
    "noise_aug_strength": "noise_aug_strength", "decode_chunk_size": "decode_chunk_size",
    "min_guidance_scale1": "min_appearance_guidance", "max_guidance_scale1": "max_appearance_guidance",
    "min_guidance_scale2": "audio_guidance", "max_guidance_scale2": "audio_guidance",
    "overlap": "overlap", "shift_offset": "shift_offset", "frames_per_batch": "frames_per_window",
    "i2i_noise_strength": "i2i_strength",
}


def case_settings(meta: dict) -> CaseSettings:
    """Apply every field of ``config_overrides`` then ``process_args`` (process() wins, as in the
    official code) over the official defaults; an unknown field raises GoldenFieldError naming it."""
    values = dict(OFFICIAL)
    for section, table in (("config_overrides", CONFIG_OVERRIDES), ("process_args", PROCESS_ARGS)):
        fields = meta.get(section, {})
        unknown = sorted(set(fields) - set(table))
        if unknown:
            raise GoldenFieldError(f"golden case sets {section} field(s) {unknown} that the test harness "
                                   "does not apply; map each in tests/_golden.py before using this case")
        for name, raw in fields.items():
            target, convert = table[name]
            value = convert(raw, f"{section}.{name}")
            if section == "process_args" and name == "seed" and not value:
                continue  # official: `if seed: config.seed = seed`
            if target is not None:
                values[target] = value
    if "seed" in meta.get("inputs", {}):  # the seed the case was generated with
        values["seed"] = _int(meta["inputs"]["seed"], "inputs.seed")
    if "ip_adapter" in meta.get("models", {}):
        values["audio_scale"] = _float(meta["models"]["ip_adapter"]["scale"][0], "models.ip_adapter.scale")
    settings = CaseSettings(**values)
    effective = meta.get("effective_pipeline_kwargs", {})
    unknown = sorted(set(effective) - set(PIPELINE_KWARGS))
    if unknown:
        raise GoldenFieldError(f"golden case has effective_pipeline_kwargs {unknown} the harness does not know")
    for name, field in PIPELINE_KWARGS.items():
        if name in effective and effective[name] != getattr(settings, field):
            raise GoldenFieldError(f"golden effective_pipeline_kwargs.{name}={effective[name]!r} disagrees with "
                                   f"{field}={getattr(settings, field)!r} read from process_args/config_overrides")
    return settings


def golden_base() -> Path:
    return Path(os.environ.get("SONIC_GOLDEN", str(DEFAULT_GOLDEN)))


_CACHE: dict[Path, Golden] = {}


def load_golden() -> Golden:
    base = golden_base()
    if not base.with_suffix(".json").exists() or not base.with_suffix(".safetensors").exists():
        pytest.skip(f"golden case {base} is absent (set SONIC_GOLDEN or provide ../shared)")
    if base not in _CACHE:
        _CACHE[base] = Golden(base)
    return _CACHE[base]


# Two float32 computations of the same math that may take different kernels (a batch split in two,
# memory-mapped vs heap tensors, another ISA: CI runs on Xeon AVX-512 and EPYC AVX2 machines) agree
# only to rounding. Measured on this project's tests: audio2token in batches of 7 vs 128 frames
# differs by 2.8-3.4 ulps of the output scale (AVX-512, AVX2, default kernels); a summation of K
# terms reordered can move by ~sqrt(K) ulps, K <= 20224 here. 64 ulps (7.6e-6 relative) covers that
# with margin and is still ~200x below the smallest planted bug the tests check (a 1 % norm weight).
F32_EPS = float(torch.finfo(torch.float32).eps)  # 2**-23, one float32 ulp at 1.0
SAME_MATH_ULPS = 64.0
# Where a network amplifies round-off (the golden's tiny UNet), the tolerance is NOISE_FACTOR x the
# float32 round-off floor measured on the same inputs (float32 vs float64 of the same model).
NOISE_FACTOR = 20.0


def same_math_tol(floor: float = 0.0) -> float:
    """Relative tolerance for 'the same computation along other kernels' (see SAME_MATH_ULPS)."""
    return max(SAME_MATH_ULPS * F32_EPS, NOISE_FACTOR * floor)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|a-e| / max|e| in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    return err / scale if scale > 0 else err


def assert_same_math(actual: torch.Tensor, expected: torch.Tensor, what: str, floor: float = 0.0) -> float:
    """Same math, possibly other kernels: within same_math_tol(floor) relative to the output scale."""
    return assert_close_rel(actual, expected, same_math_tol(floor), what)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                     atol: float = 0.0) -> float:
    """max|a-e| <= rtol * max|e| + atol; returns the relative error and names ``what`` on failure."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    rel = err / scale if scale > 0 else err
    if os.environ.get(TOL_LOG_ENV):  # measuring tolerances: one JSON line per comparison
        with open(os.environ[TOL_LOG_ENV], "a") as f:
            f.write(json.dumps(dict(test=os.environ.get("PYTEST_CURRENT_TEST", ""), what=what, rel=rel,
                                    err=err, rtol=rtol, atol=atol)) + "\n")
    assert err <= rtol * scale + atol, f"{what}: max abs err {err:.3e} (rel {rel:.3e}) > rtol {rtol:g}"
    return rel


def with_weight_off(model: torch.nn.Module, factor: float = 1.01) -> torch.nn.Module:
    """A copy of ``model`` whose last LayerNorm/GroupNorm weight (else its first weight) is ``factor``
    x off: a key mis-assigned or cast wrongly, the planted bug a parity tolerance must catch."""
    import copy

    bad = copy.deepcopy(model)
    norms = [m for m in bad.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
             and m.weight is not None]
    weight = norms[-1].weight if norms else next(p for n, p in bad.named_parameters() if n.endswith("weight"))
    with torch.no_grad():
        weight.mul_(factor)
    return bad


def assert_planted_fails(bad: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                         margin: float = 10.0) -> float:
    """A planted bug's output must miss ``expected`` by more than ``margin`` x the tolerance ``rtol``."""
    rel = rel_err(bad, expected)
    assert rel > margin * rtol, f"planted bug ({what}) is within {margin:g} x rtol {rtol:g}: rel {rel:.2e}"
    return rel


TOL_LOG_ENV = "SONIC_TOL_LOG"  # a file: every assert_close_rel appends what it measured (tolerance audits)


# ----------------------------------------------------------------------------------------------
# A derived golden case with an effective frame cap
# ----------------------------------------------------------------------------------------------
def derive_frame_cap_case(src: Golden, dest_base: Path, extra_frames: int = 10) -> Path:
    """Write ``dest_base``.json/.safetensors: ``src`` with ``extra_frames`` 25 fps frames of zeros
    appended to its waveform and ``config_overrides.frame_num`` = its ``audio_len``.

    Exact for the official pipeline: whisper pads every 30 s chunk with zeros on the right, so the
    log-mel, the hidden states and everything after them are unchanged as long as the padded clip
    stays inside the same chunks; only ``audio_len = min(frame_num, samples // 640)`` now takes the
    cap. A harness that ignores ``frame_num`` encodes ``extra_frames`` more frames and fails.
    """
    from safetensors.torch import save_file

    audio_len = int(src.scalars["audio_len"])
    wav = src.t("input.waveform")
    pad = extra_frames * SAMPLES_PER_25FPS
    chunk = 480000  # samples per whisper chunk (30 s at 16 kHz)
    if -(-(wav.numel() + pad) // chunk) != -(-wav.numel() // chunk):
        raise ValueError("padding would add a whisper chunk; use fewer extra_frames")
    if (wav.numel() + pad) // SAMPLES_PER_25FPS <= audio_len:
        raise ValueError("padding too short for the cap to take effect")
    meta = json.loads(json.dumps(src.meta))
    meta["case"] = f"{src.name}+frame_cap"
    meta["config_overrides"]["frame_num"] = audio_len
    meta["scalars"]["num_samples"] = wav.numel() + pad
    meta["inputs"]["audio_seconds"] = (wav.numel() + pad) / meta["inputs"]["sample_rate"]
    prior = src.meta.get("derived_from", {})  # a variant's own changes (and stale outputs) stay
    padded = prior.get("waveform_zero_padding_samples", 0) + pad
    meta["derived_from"] = {**prior, "case": prior.get("case", src.name),
                            "waveform_zero_padding_samples": padded, "config_overrides.frame_num": audio_len}
    tensors = dict(src._tensors)
    tensors["input.waveform"] = torch.cat([wav, wav.new_zeros(pad)])  # [T + pad]
    dest_base.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest_base.with_suffix(".safetensors")))
    dest_base.with_suffix(".json").write_text(json.dumps(meta))
    return dest_base


SAMPLES_PER_25FPS = 640  # samples of 16 kHz audio in one 25 fps frame


# ----------------------------------------------------------------------------------------------
# Derived variants: the case with other self-consistency settings
# ----------------------------------------------------------------------------------------------
# The official outputs that depend on a setting (SPEC §8-§10): a variant that changes the setting
# drops them (its parity tests skip); every input, weight and earlier output stays exact, so every
# self-consistency test must pass on it. Names are prefixes of tensor names or ``scalars.<key>``.
_LOOP_OUTPUTS = ("win.", "pipe.latents_after_step", "pipe.latents_final", "pipe.frames_decoded", "out.video",
                 "scalars.windows")
OUTPUTS_OF_SETTING = {
    "i2i_noise_strength": _LOOP_OUTPUTS + ("pipe.timesteps", "pipe.guidance_scale1", "pipe.guidance_scale2",
                                           "pipe.latents_init", "scalars.num_denoising_steps_run"),
    "overlap": _LOOP_OUTPUTS,  # which frames each window holds
    "shift_offset": _LOOP_OUTPUTS,
}
# The variants CI runs (.ci/run): each value a valid setting the public case does not have
# (public: i2i 1.0, overlap 1 of a 4-frame window, shift 3, no effective frame cap).
VARIANTS = {
    "frame_cap": dict(frame_cap=True),
    "i2i": dict(settings={"i2i_noise_strength": 0.75}),  # 3 steps -> int(3 x 0.75) = 2 run
    "overlap": dict(settings={"overlap": 2}),  # stride 2: every frame in two windows
    "shift0": dict(settings={"shift_offset": 0}),  # the same windows at every step
    "settings": dict(frame_cap=True, settings={"i2i_noise_strength": 0.75, "overlap": 2, "shift_offset": 0}),
}


def derive_variant(src: Golden, dest_base: Path, settings: dict | None = None, frame_cap: bool = False,
                   label: str | None = None) -> Path:
    """Write ``dest_base``.json/.safetensors: ``src`` with ``config_overrides`` fields ``settings``
    changed (only those OUTPUTS_OF_SETTING knows) and, with ``frame_cap``, an effective frame cap
    (derive_frame_cap_case). The official outputs a changed setting would change are left out and
    named in ``derived_from.stale``; Golden.t/scalars skip the test that asks for one."""
    from safetensors.torch import save_file

    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(OUTPUTS_OF_SETTING))
    if unknown:
        raise ValueError(f"derive_variant: no rule for which official outputs {unknown} change; "
                         f"known: {sorted(OUTPUTS_OF_SETTING)}")
    trial = json.loads(json.dumps(src.meta))
    for name, value in settings.items():
        if value == trial["config_overrides"].get(name):
            raise ValueError(f"derive_variant: {name}={value!r} is already the case's value")
        trial["config_overrides"][name] = value
        trial.get("effective_pipeline_kwargs", {}).pop(name, None)
    _check_runs(case_settings(trial))  # before anything is written
    if frame_cap:
        src = Golden(derive_frame_cap_case(src, dest_base))
    meta = json.loads(json.dumps(src.meta))
    tensors = dict(src._tensors)
    stale = dict(meta.get("derived_from", {}).get("stale", {}))
    changed = {}
    for name, value in settings.items():
        old = meta["config_overrides"].get(name)
        meta["config_overrides"][name] = value
        changed[f"config_overrides.{name}"] = value
        why = f"config_overrides.{name}={value!r}, the official outputs had {old!r}"
        for key in list(tensors) + [f"scalars.{k}" for k in meta["scalars"]]:
            if not key.startswith("weights.") and key.startswith(OUTPUTS_OF_SETTING[name]):
                stale.setdefault(key, why)
        if name in meta.get("effective_pipeline_kwargs", {}):  # the same name there for these three
            meta["effective_pipeline_kwargs"][name] = value
    for key in stale:  # dropped, so that no test can read a stale value by another way
        if key.startswith("scalars."):
            meta["scalars"].pop(key[len("scalars."):], None)
        else:
            tensors.pop(key, None)
            meta.get("tensors", {}).pop(key, None)
    meta["case"] = label or "+".join([src.name] + [f"{k}={v}" for k, v in settings.items()])
    derived = dict(meta.get("derived_from", {"case": src.name}))
    derived.update(changed)
    derived["stale"] = stale
    meta["derived_from"] = derived
    case_settings(meta)  # every field still read, and agreeing with effective_pipeline_kwargs
    dest_base.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest_base.with_suffix(".safetensors")))
    dest_base.with_suffix(".json").write_text(json.dumps(meta))
    return dest_base


def _check_runs(c: CaseSettings) -> None:
    """A variant's settings must be ones the official pipeline runs (never a case no test can honour)."""
    if not 0 <= c.overlap < c.frames_per_window:
        raise ValueError(f"overlap={c.overlap} must be in [0, frames_per_window={c.frames_per_window})")
    if c.shift_offset < 0:
        raise ValueError(f"shift_offset={c.shift_offset} must be >= 0")
    if not 0 < c.i2i_strength <= 1 or int(c.steps * c.i2i_strength) < 1:
        raise ValueError(f"i2i_noise_strength={c.i2i_strength} with steps={c.steps} runs no step")


if __name__ == "__main__":  # python -m tests._golden derive VARIANT DEST_BASE | derive-frame-cap DEST_BASE
    import sys

    args = sys.argv[1:]
    if args[:1] == ["derive-frame-cap"] and len(args) == 2:
        args = ["derive", "frame_cap", args[1]]
    if len(args) != 3 or args[0] != "derive" or args[1] not in VARIANTS:
        raise SystemExit(f"usage: python -m tests._golden derive {{{','.join(VARIANTS)}}} DEST_BASE "
                         "(no extension)")
    if not DEFAULT_GOLDEN.with_suffix(".json").exists():
        raise SystemExit(f"{DEFAULT_GOLDEN} is absent")
    spec = VARIANTS[args[1]]
    print(derive_variant(Golden(DEFAULT_GOLDEN), Path(args[2]), spec.get("settings"),
                         spec.get("frame_cap", False), label=f"public+{args[1]}"))
