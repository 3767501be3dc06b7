"""Which reduced-precision CPU kernels this process can run, for the bf16/fp16 tests.

CI runs parts of the suite with ``ATEN_CPU_CAPABILITY`` forced below the host's own (.ci/run). On a
host with AMX or AVX-512 bf16 (Intel Sapphire Rapids and later, AMD Zen 4), PyTorch's bf16 attention
still decides from the real CPU that its operands must be packed for those instructions, while the
packing code it dispatches to is the forced capability's, which has none: "pack_vnni2 is only
supported when avx512 is supported". That is PyTorch's combination, not the pack's; such a test is
skipped with that reason in that pass only, and runs everywhere else (every pass without the
override, every host without those instructions).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"
# The forced capabilities whose kernels hold no AVX-512 code (the packing routines need it).
BELOW_AVX512 = frozenset({"default", "avx2", "zvector", "sve256"})
# /proc/cpuinfo flags that make PyTorch pick the packed bf16/fp16 paths from the real CPU.
PACKING_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16")
# The words of PyTorch's refusal (ATen/cpu/vec/vec_half.h: pack_vnni2 / pack_vnni4).
KERNEL_GAP = "is only supported when avx512 is supported"


def host_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is absent: not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def forced_below_host(env: dict | None = None, flags: set[str] | None = None) -> str | None:
    """Why this process's bf16/fp16 kernels may be the forced capability's while PyTorch packs for
    the real CPU (``"ATEN_CPU_CAPABILITY=avx2 on a host with amx_bf16"``), or None."""
    env = os.environ if env is None else env
    forced = env.get(CAPABILITY_ENV, "").strip().lower()
    if forced not in BELOW_AVX512:
        return None
    flags = host_flags() if flags is None else flags
    have = [f for f in PACKING_FLAGS if f in flags]
    if not have:
        return None
    return f"{CAPABILITY_ENV}={forced} on a host with {', '.join(have)}"


@contextlib.contextmanager
def reduced_precision_kernels():
    """Run a bf16/fp16 computation; PyTorch's packing refusal under a forced lower capability on a
    host with AMX / AVX-512 bf16 skips the test with that reason. Any other error, and that error
    in any other setting, fails the test."""
    try:
        yield
    except RuntimeError as e:
        why = forced_below_host()
        if why is None or KERNEL_GAP not in str(e):
            raise
        pytest.skip(f"PyTorch cannot run bf16/fp16 kernels under {why} ({str(e).splitlines()[0]}); "
                    "they are tested in the passes without the override")
