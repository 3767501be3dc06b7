"""The CPU kernel settings a run was asked for really took effect (see tests/conftest.py).

Float results differ in the last bits between ATen's vectorised kernels (AVX-512, AVX2, default)
and oneDNN's ISA paths; CI runs the suite under several of them, so each setting must be real.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import THREADS_ENV

CONV_PROBE = ("import torch; x = torch.randn(2, 64, 32, 32); w = torch.randn(64, 64, 3, 3); "
              "torch.nn.functional.conv2d(x, w, padding=1)")


def test_aten_cpu_capability_is_the_requested_one():
    want = os.environ.get("ATEN_CPU_CAPABILITY")
    got = torch.backends.cpu.get_cpu_capability()
    if not want:
        assert got in ("DEFAULT", "AVX2", "AVX512", "VSX", "ZVECTOR", "SVE256", "NEON")
        return
    assert got == want.upper(), f"ATEN_CPU_CAPABILITY={want} asked for, ATen runs {got}"


def test_torch_threads_are_the_requested_number():
    want = os.environ.get(THREADS_ENV)
    if not want:
        pytest.skip(f"{THREADS_ENV} is not set")
    assert torch.get_num_threads() == int(want)


def test_onednn_isa_is_the_requested_one():
    """oneDNN reports its ISA and each convolution's implementation with ONEDNN_VERBOSE=all."""
    want = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    env = dict(os.environ, ONEDNN_VERBOSE="all")
    out = subprocess.run([sys.executable, "-c", CONV_PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    isa = [ln for ln in out.splitlines() if ",info,cpu,isa:" in ln]
    convs = [ln for ln in out.splitlines() if ",exec,cpu,convolution," in ln]
    assert isa and convs, f"oneDNN printed no ISA / convolution line:\n{out[:2000]}"
    if want and want.upper() == "AVX2":
        assert "AVX-512" not in isa[0] and "AVX2" in isa[0], isa[0]
        assert all("avx512" not in ln for ln in convs), convs


def test_bf16_kernel_gap_skips_only_under_a_forced_lower_capability_on_a_packing_host(monkeypatch, tmp_path):
    """tests/_cpu_kernels.py: PyTorch's "pack_vnni2 is only supported when avx512 is supported" is a
    skip only with ATEN_CPU_CAPABILITY forced below AVX-512 on a host with AMX / AVX-512 bf16; any
    other error, or that error anywhere else, fails the test."""
    from tests import _cpu_kernels as k

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    amx = k.host_flags(cpuinfo)
    assert {"avx2", "amx_bf16"} <= amx
    assert k.forced_below_host({"ATEN_CPU_CAPABILITY": "avx2"}, amx) == \
        "ATEN_CPU_CAPABILITY=avx2 on a host with amx_bf16, amx_tile"
    assert k.forced_below_host({}, amx) is None  # the host's own kernels: bf16 must work
    assert k.forced_below_host({"ATEN_CPU_CAPABILITY": "avx512"}, amx) is None
    assert k.forced_below_host({"ATEN_CPU_CAPABILITY": "avx2"}, {"avx2", "fma"}) is None  # no packing
    gap = RuntimeError("pack_vnni2 is only supported when avx512 is supported")
    monkeypatch.setattr(k, "host_flags", lambda *_: amx)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(pytest.skip.Exception, match="ATEN_CPU_CAPABILITY=avx2 on a host with amx_bf16"):
        with k.reduced_precision_kernels():
            raise gap
    with pytest.raises(RuntimeError, match="shapes"):  # another error is never a skip
        with k.reduced_precision_kernels():
            raise RuntimeError("shapes cannot be multiplied")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    with pytest.raises(RuntimeError, match="pack_vnni2"):  # not forced: a real failure
        with k.reduced_precision_kernels():
            raise gap
