"""One clip on several processes (torch.distributed): the windows of every step split across ranks.

Position shift makes this natural (SPEC §9): the windows of one denoising step all read the
latents of the previous step, so each rank runs the UNet for a share of them; their Euler
outputs are exchanged and every rank accumulates all of them, so every rank holds the same
latents after each step and the result is the single-process one.

How the result stays the single-process result (not just close to it):

* Windows are cut into *rounds* of ``world x batch`` consecutive windows (``plan_rounds``); in a
  round, rank r runs one contiguous block of them (blocks differ by at most one window, so an
  uneven split only leaves a rank idle for part of the last round).
* After a round the ranks ``all_gather`` their windows' Euler outputs (zero-padded to the round's
  largest block). A gather copies bytes; it adds nothing, so no rounding happens in the
  exchange, whatever order the backend (NCCL rings/trees, gloo) moves data in. Reducing partial
  sums instead (``all_reduce`` of each rank's ``acc``/``cnt``) would add the per-frame partial
  sums in the backend's order, which differs from the official order and from run to run.
* Every rank then adds the round's outputs into its ``acc``/``cnt`` in the official window order
  (rank 0's block, then rank 1's, ...: the blocks are consecutive windows), with the same
  ``index_add_`` calls the single process makes. So each frame's sum is formed in exactly the
  single-process order, on every rank.
* What can still differ is rounding *inside* a UNet call: with ``window_batch`` > 1 the windows
  that share a call are not the same as in one process (BLAS may round a window differently in
  another batch, see sampler.py). With one window per call the arithmetic is the same.

Memory: one round is buffered, ``world x batch x W`` latent frames (~8 MB for 8 ranks x 1 window
x 25 frames at 512 px in float16), whatever the clip length; gathering a whole step instead
(300 windows x 25 frames of a 10-minute clip = 7500 frames x 64 KB = 490 MB in float32) would
grow with the length. The traffic is the same either way: every window's output reaches every
rank once per step (10 minutes, 512 px: ~490 MB per step and rank in float32, half in fp16).

Failures: every collective runs under the process group's timeout (``init_from_env``,
``--dist-timeout``); a rank that dies or stalls makes the others raise ``DistributedError``
naming the step and the exchange, instead of hanging. With gloo a dead peer is usually seen at
once (its socket closes); a stalled one after the timeout. With NCCL the watchdog aborts the
communicator after the timeout.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import time
import traceback
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import DIST_TIMEOUT_S

log = logging.getLogger(__name__)

WORLD_SIZE_ENV = "WORLD_SIZE"  # set by torchrun for every rank
LOCAL_RANK_ENV = "LOCAL_RANK"  # rank on this machine (torchrun): picks the GPU
# what check_same_run compares across ranks, in order
RUN_FIELDS = ("frames", "channels", "height", "width", "steps", "windows", "window batch",
              "bytes per element")
# torch modules that put the default process group into default arguments when first imported
# (torch.distributed.nn.functional's ``group=group.WORLD``, ZeroRedundancyOptimizer, FSDP's grad
# scaler). transformers imports them (via torch.distributed.fsdp) when Whisper loads, after the
# group exists, and those defaults would keep the group alive past destroy_process_group (see
# leave()). Imported before the group exists, they hold None.
BINDS_WORLD_ON_IMPORT = ("torch.distributed.nn.functional", "torch.distributed.optim",
                         "torch.distributed.fsdp")
LEAVE_DRAIN_S = 0.2  # s without the GIL when the group outlives leave(), for its threads to finish


class DistributedError(ConnectionError):
    """A collective failed: another rank died, stalled past the timeout, or runs other inputs."""


@dataclass(frozen=True)
class Shard:
    """Where this process stands in the run: ``rank`` of ``world`` in ``group`` (None: one process)."""

    group: object | None = None  # a torch.distributed ProcessGroup
    rank: int = 0
    world: int = 1
    timeout_s: float | None = None  # the group's collective timeout, for error messages

    @classmethod
    def of(cls, group) -> "Shard":
        if group is None:
            return cls()
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("a process group was given but torch.distributed is not initialised: "
                             "call torch.distributed.init_process_group first (torchrun does it via "
                             "sonic_core.distributed.init_from_env)")
        return cls(group, dist.get_rank(group), dist.get_world_size(group), _timeouts.get(id(group)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (each wrapped so a failure names itself) --------------------------------------
    def _fail(self, what: str, err: Exception) -> DistributedError:
        limit = f"the {self.timeout_s:g} s collective timeout" if self.timeout_s else "the collective timeout"
        return DistributedError(
            f"distributed sampling failed on rank {self.rank} of {self.world} during {what}: another rank "
            f"died or did not answer within {limit} (--dist-timeout); see that rank's log for why. "
            f"Backend said: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")

    def check_same_run(self, numbers: list[int], device: torch.device) -> None:
        """All ranks must run the same clip with the same plan, or the exchanges would mismatch."""
        mine = torch.tensor(numbers, dtype=torch.int64, device=device)  # [len(RUN_FIELDS)]
        got = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(got, mine, group=self.group)
        except RuntimeError as e:
            raise self._fail("the start-up check", e) from e
        for r, theirs in enumerate(got):
            if not torch.equal(theirs, mine):
                diff = ", ".join(f"{name} {a} vs {b}" for name, a, b in
                                 zip(RUN_FIELDS, mine.tolist(), theirs.tolist()) if a != b)
                raise DistributedError(f"rank {self.rank} and rank {r} do not run the same clip ({diff}): "
                                       "give every rank the same image, audio and settings")

    def broadcast_state(self, step: int, latents: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Rank 0's (steps done, latents) on every rank: all start from the same state (a resume
        state is read by rank 0 only)."""
        step_t = torch.tensor([step], dtype=torch.int64, device=latents.device)
        latents = latents.contiguous()
        src = dist.get_global_rank(self.group, 0)
        try:
            dist.broadcast(step_t, src=src, group=self.group)
            dist.broadcast(latents, src=src, group=self.group)
        except RuntimeError as e:
            raise self._fail("the start-state broadcast", e) from e
        return int(step_t.item()), latents

    def gather_round(self, outs: list[torch.Tensor], plan: list[tuple[int, int]], window: int,
                     like: torch.Tensor, step: int) -> list[torch.Tensor]:
        """Every rank's Euler outputs of one round, in window order (a copy: exact, see module doc).

        ``outs``: this rank's outputs ``[W,4,h,w]`` for its block ``plan[rank]``; ``like``: the
        latents ``[F,4,h,w]`` (dtype and device of the exchange); ``window``: W.
        """
        width = max(hi - lo for lo, hi in plan)
        mine = like.new_zeros((width, window, *like.shape[1:]))  # [c_max,W,4,h,w], zero-padded
        for k, x in enumerate(outs):
            mine[k] = x
        got = [torch.empty_like(mine) for _ in range(self.world)]  # world x [c_max,W,4,h,w]
        try:
            dist.all_gather(got, mine, group=self.group)
        except RuntimeError as e:
            raise self._fail(f"the window exchange of step {step + 1}", e) from e
        return [got[r][k] for r, (lo, hi) in enumerate(plan) for k in range(hi - lo)]


def plan_rounds(n_windows: int, world: int, batch: int) -> list[list[tuple[int, int]]]:
    """Rounds of consecutive windows: per round, the ``(lo, hi)`` window range of every rank.

    A round holds ``world x batch`` windows (the last fewer); rank r takes the r-th contiguous
    block, blocks as even as possible (sizes differ by at most one, the larger ones on the lower
    ranks, so rank 0, which shows progress, always has work; with fewer windows than ranks the
    last blocks are empty). With one rank a round is one UNet call of ``batch`` windows.
    """
    if world < 1 or batch < 1:
        raise ValueError(f"world={world} and batch={batch} must be at least 1")
    per_rank = max(1, min(batch, -(-n_windows // world)))  # no round larger than the step needs
    size = world * per_rank
    rounds = []
    for base in range(0, n_windows, size):
        q, extra = divmod(min(size, n_windows - base), world)  # the first `extra` ranks take q + 1
        starts = [base + r * q + min(r, extra) for r in range(world + 1)]
        rounds.append(list(zip(starts[:-1], starts[1:])))
    return rounds


_timeouts: dict[int, float] = {}  # id(process group) -> its collective timeout in s (messages only)


def world_size_from_env() -> int:
    return int(os.environ.get(WORLD_SIZE_ENV, "1"))


def init_from_env(device: torch.device, timeout_s: float = DIST_TIMEOUT_S):
    """Join the run torchrun started (``WORLD_SIZE`` > 1) -> ``(group, device)``; ``(None, device)``
    when there is one process. NCCL on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on the CPU.
    ``timeout_s`` bounds every collective (and the rendezvous)."""
    world = world_size_from_env()
    if world <= 1:
        return None, device
    if not timeout_s > 0:
        raise ValueError(f"--dist-timeout {timeout_s} must be more than 0 seconds")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: run one process (no torchrun)")
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device} names one GPU, but torchrun runs {world} ranks: give "
                             "--device cuda (or auto) and each rank takes cuda:LOCAL_RANK")
        local = int(os.environ.get(LOCAL_RANK_ENV, "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank with LOCAL_RANK {local} has no GPU (this machine has "
                             f"{torch.cuda.device_count()}): use --nproc_per_node "
                             f"{torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device} cannot run on several ranks: use cuda (NCCL) or cpu (gloo)")
    for name in BINDS_WORLD_ON_IMPORT:  # before the group exists: their defaults then hold None
        try:
            importlib.import_module(name)
        except ImportError as e:  # a trimmed torch build: nothing of it can hold the group then
            log.debug("could not import %s before joining: %s", name, e)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the {world}-rank run ({backend}): {e}") from e
    group = dist.group.WORLD
    _timeouts[id(group)] = float(timeout_s)
    log.info("rank %d of %d on %s (%s, collective timeout %g s)", dist.get_rank(), world, device, backend,
             timeout_s)
    return group, device


@dataclass
class Membership:
    """This process's place in a torchrun run: ``group`` (None: one process, or after leaving)
    and the ``device`` it runs on (``cuda:LOCAL_RANK`` under NCCL)."""

    group: object | None
    device: torch.device


@contextmanager
def joined(device: torch.device, timeout_s: float = DIST_TIMEOUT_S):
    """``with joined(device, timeout_s) as run:``: join the run torchrun started (``init_from_env``),
    give ``run.group`` / ``run.device`` to the work, and leave the group on the way out, also on
    an error (``leave``). Hold the group only through ``run`` (no other variable that outlives
    the block), so that leaving can end the group's threads."""
    group, device = init_from_env(device, timeout_s)
    run = Membership(group, device)
    del group
    try:
        yield run
    finally:
        err = sys.exc_info()[1]
        if err is not None and run.group is not None:
            # the finished frames of the error's traceback (animate, the sampler, their Shard)
            # still hold the group; clear their locals so it can go (the messages keep their lines)
            traceback.clear_frames(err.__traceback__)
            del err
        leave(run)


def leave(run: Membership) -> bool:
    """Leave the process group and end its worker threads while the interpreter still runs ->
    True when they have ended (also for one process), False when something else still holds the
    group (then it waits ``LEAVE_DRAIN_S`` without the GIL instead).

    Why: gloo's worker threads drop each collective's work, and with it the tensors it used,
    *after* the call has returned, and dropping a tensor Python also sees takes the GIL. A thread
    still waiting for the GIL when the interpreter shuts down is ended inside that destructor and
    the process aborts (``terminate called without an active exception``, SIGABRT). A rank that
    does not write the video exits right after the last exchange, so that is where it hit (1 CLI
    run in ~40; half the runs of a bare all_gather-then-exit script). ``destroy_process_group``
    does not stop those threads; the ProcessGroup's own destructor joins them, with the GIL
    released, once the last reference to it is gone, so this drops ``run.group`` and checks
    that the group was freed.
    """
    group, run.group = run.group, None
    if group is None:
        return True
    _timeouts.pop(id(group), None)
    if dist.is_initialized():
        dist.destroy_process_group()
    gone = weakref.ref(group)
    del group
    if gone() is not None:
        gc.collect()  # a reference cycle (a traceback, a closure) may hold it
    if gone() is None:
        return True
    log.debug("the process group is still referenced after leaving (%d references): waiting %g s "
              "for its threads to finish their last work", sys.getrefcount(gone()) - 1, LEAVE_DRAIN_S)
    time.sleep(LEAVE_DRAIN_S)
    return False


def rank_of(group) -> int:
    return 0 if group is None else dist.get_rank(group)
