"""Peak live tensor bytes of a computation, counted without computing (``meta``) or measured (CPU).

``LiveBytes`` is a TorchDispatchMode that sees every ATen op's outputs: a storage it has not
seen is an allocation of ``storage.nbytes()``; a weak reference on each output tensor tells when
the last tensor of that storage dies. Storages alive before the mode (weights, inputs: pass them
as ``external``) are never counted, also when ops return views of them. On the ``meta`` device
this gives the exact tensor bytes a run would hold at its peak, at any size, in seconds.

Attention: on CUDA, ``F.scaled_dot_product_attention`` runs a fused kernel (flash or
memory-efficient) that never holds the ``[n, heads, L, L]`` score matrix, but on ``meta`` PyTorch
takes the math path, which does. ``FlashSDPA`` (a TorchFunctionMode) makes every SDPA call on
meta tensors run ATen's flash-attention op instead, whose meta kernel allocates exactly what the
CUDA kernel returns: the output and a float32 log-sum-exp ``[n, heads, L]``. The kernels' own
scratch (on-chip tiles) is not tensor memory and is not counted.

What this does not count, on any device: the CUDA caching allocator's rounding and fragmentation
(``memory_reserved`` > ``memory_allocated``), cuDNN / cuBLAS workspaces, the CUDA context.

``cpu_peak_bytes`` measures a real CPU run with ``torch.profiler`` (``profile_memory``): every
allocation and free of the CPU allocator in order, the running sum's maximum. It validates the
counter at sizes where both can run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: shared by every view


class LiveBytes(TorchDispatchMode):
    """Current and peak bytes of the storages created while the mode is active."""

    def __init__(self, external: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.external = {_storage_key(t) for t in external}
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, Python tensors alive on it]
        self.tracked: set[int] = set()  # id() of the tensors with a finalizer
        self.current = 0
        self.peak = 0

    def _release(self, obj: int, key: int) -> None:
        self.tracked.discard(obj)
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        if id(t) in self.tracked:  # an in-place op returns its input
            return
        key = _storage_key(t)
        if key in self.external:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        self.tracked.add(id(t))
        weakref.finalize(t, self._release, id(t), key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class FlashSDPA(TorchFunctionMode):
    """SDPA on ``meta`` tensors through ATen's flash-attention op (output + log-sum-exp, no scores)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            q, k, v = args[:3]
            if kwargs.get("attn_mask") is not None or len(args) > 3:
                raise NotImplementedError("FlashSDPA counts mask-free attention only")
            self.calls += 1
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, bool(kwargs.get("is_causal", False)), False, scale=kwargs.get("scale"))
            return out[0]  # [n, heads, L, d]; the log-sum-exp [n, heads, L] dies here
        return func(*args, **kwargs)


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``modules`` (what ``LiveBytes(external=...)`` should skip)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def meta_peak_bytes(fn: Callable[[], object], external: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(peak, left alive at the end) tensor bytes of ``fn()`` on meta tensors, beyond ``external``."""
    counter = LiveBytes(external)
    with FlashSDPA(), counter, torch.no_grad():
        result = fn()
        left = counter.current
    del result
    return counter.peak, left


def counted_peak_bytes(fn: Callable[[], object], external: Iterable[torch.Tensor]) -> int:
    """The same counter on real tensors (any device; SDPA runs natively)."""
    counter = LiveBytes(external)
    with counter, torch.no_grad():
        result = fn()
    del result
    return counter.peak


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes the CPU allocator held during ``fn()`` beyond what it held before (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        result = fn()
    del result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    return peak
