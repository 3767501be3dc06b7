"""Access to ../shared (fixtures, ComfyUI schemas) and to golden parity cases.

A golden case is a pair ``<path>.json`` + ``<path>.safetensors`` in the format of
../shared/fixtures/golden/sonic_golden_public (SPEC.md §14). ``SONIC_GOLDEN`` names the case
(a path without extension); tests must hold for any case in that format.
"""

from __future__ import annotations

import json
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
        return self._tensors[name]

    def has(self, name: str) -> bool:
        return name in self._tensors

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """State dict of one tiny model: ``weights.<prefix>.*`` with the prefix removed."""
        head = f"weights.{prefix}."
        return {k[len(head):]: v for k, v in self._tensors.items() if k.startswith(head)}

    @property
    def models(self) -> dict:
        return self.meta["models"]

    @property
    def scalars(self) -> dict:
        return self.meta["scalars"]

    @property
    def pipeline_kwargs(self) -> dict:
        return self.meta["effective_pipeline_kwargs"]

    @property
    def config_overrides(self) -> dict:
        return self.meta["config_overrides"]

    @cached_property
    def windows(self) -> list[dict]:
        return self.scalars["windows"]


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


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                     atol: float = 0.0) -> float:
    """max|a-e| <= rtol * max|e| + atol; returns the relative error and names ``what`` on failure."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    rel = err / scale if scale > 0 else err
    assert err <= rtol * scale + atol, f"{what}: max abs err {err:.3e} (rel {rel:.3e}) > rtol {rtol:g}"
    return rel
