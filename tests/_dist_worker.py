"""One rank of a distributed sampler run, started by tests/test_distributed.py (and bench/).

``python -m tests._dist_worker SPEC.json`` with the torchrun environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK) set by the test. SPEC (JSON):

    frames: clip length of the tiny case; threads: torch threads of this rank
    timeout_s: collective timeout; out: folder for ``rank<R>.pt`` (results), ``rank<R>.error`` and
    ``rank<R>.left`` (the gloo threads still running after leaving the group)
    import_whisper: import transformers' Whisper after joining, as the CLI does
    fail: (a scenario key) raise an error out of the group's block from inside the scenario, whose
          frame holds the group, as animate's does in the CLI
    scenarios: list of {name, case ("tiny": the selftest's tiny UNet, random inputs, no ../shared;
               "golden": the golden case), window_batch, dtype ("fp32"/"fp64"), settings
               (overrides), resume (bool), die (rank, at, how: "kill"/"stall"), other_frames (rank
               that runs another clip), reference (also run one process on rank 0), repeat and
               warmup (timing), expect_error (a DistributedError is the result)}

Rank 0 also runs each scenario with ``group=None`` (one process, same threads and kernels) when
``reference`` is set, so the test compares against exactly the single-process computation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from sonic_core import sampler
from sonic_core.config import DIST_ERROR_EXIT, SAMPLER_DEFAULTS
from sonic_core.distributed import DistributedError, joined

TINY_HW = (8, 8)  # latent h, w of the tiny case (64 x 64 image; the selftest UNet downsamples 3x)
TINY_TOKENS = 4  # audio tokens per frame
TINY_SETTINGS = dict(steps=3, frames_per_window=4, overlap=0, shift_offset=3)
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def tiny_case(frames: int, seed: int = 0):
    from sonic_core.models.unet import build_sonic_unet
    from sonic_core.selftest import TINY_UNET, TINY_WIDTH

    torch.manual_seed(seed)
    unet = build_sonic_unet(dict(TINY_UNET)).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    h, w = TINY_HW
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., 16:48, 16:48] = 1.0
    inputs = dict(
        image_latents=torch.randn(1, 4, h, w, generator=gen),
        ref_latents=torch.randn(1, 4, h, w, generator=gen) * 0.18,
        clip_embeds=torch.randn(1, TINY_WIDTH, generator=gen),
        cond_tokens=torch.randn(frames, TINY_TOKENS, TINY_WIDTH, generator=gen),
        uncond_tokens=torch.randn(TINY_TOKENS, TINY_WIDTH, generator=gen),
        buckets=16 + 8 * torch.rand(frames, 2, generator=gen),
        face_mask=mask,
        noise=torch.randn(frames, 4, h, w, generator=gen),
    )
    return unet, inputs, dataclasses.replace(SAMPLER_DEFAULTS, **TINY_SETTINGS)


def golden_case():
    from tests._golden import load_golden
    from tests.test_sampler import golden_inputs, golden_settings, golden_unet

    g = load_golden()
    return golden_unet(g), golden_inputs(g), golden_settings(g)


class SpyStore:
    """A ResumeStore that records which calls reached it."""

    def __init__(self, folder, keep_bytes: int = 0):
        from sonic_core.resume import ResumeStore

        self.store, self.calls = ResumeStore(folder, keep_bytes=keep_bytes), []

    def __getattr__(self, name):
        real = getattr(self.store, name)
        if name in ("find_result", "load", "save", "finish", "clear"):
            def spy(*a, **k):
                self.calls.append(name)
                return real(*a, **k)
            return spy
        return real


class StopAfterStep(Exception):
    pass


def run_scenario(sc: dict, base, group, rank: int, out: Path) -> dict:
    if sc.get("fail"):
        raise RuntimeError(f"planned failure in scenario {sc['name']}")
    unet, inputs, settings = base
    dtype = DTYPES[sc.get("dtype", "fp32")]
    if next(unet.parameters()).dtype != dtype:
        unet = unet.to(dtype)
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    settings = dataclasses.replace(settings, **sc.get("settings", {}))
    if sc.get("other_frames") == rank:  # this rank runs a shorter clip
        inputs = {k: v[:-1] if k in ("cond_tokens", "buckets", "noise") else v for k, v in inputs.items()}
    die = sc.get("die")
    seen, steps = [], []

    def callback(done, total, _preview):
        seen.append((done, total))
        if die and die["rank"] == rank and done == die["at"]:
            (out / f"rank{rank}.died").write_text(str(time.time()))
            if die["how"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # "stall": alive but never answers

    kw = dict(settings=settings, dtype=dtype, window_batch=sc.get("window_batch", 1))
    store = None
    if sc.get("kept"):  # a finished run of one process kept its result: every rank returns it, no step runs
        store = SpyStore(out / "state", keep_bytes=2**30)
        if rank == 0:
            sampler.sample(unet, **inputs, **kw, resume=store.store)
    if sc.get("resume"):
        store = SpyStore(out / "state")
        if rank == 0:  # a run of one process stopped after its first step leaves a state behind
            def stop(i, _x):
                raise StopAfterStep
            try:
                sampler.sample(unet, **inputs, **kw, on_step=stop, resume=store.store)
            except StopAfterStep:
                pass
    result = {}
    if sc.get("warmup"):  # timing: one untimed run first (allocator, kernels, first collectives)
        sampler.sample(unet, **inputs, **kw, group=group)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(sc.get("repeat", 1)):
        seen.clear(), steps.clear()
        result["latents"] = sampler.sample(unet, **inputs, **kw, callback=callback, resume=store, group=group,
                                           on_step=lambda i, x: steps.append(x.clone()))
    result.update(seconds=(time.perf_counter() - t0) / sc.get("repeat", 1),
                  cpu_seconds=(time.process_time() - c0) / sc.get("repeat", 1), progress=seen, steps=steps,
                  store_calls=store.calls if store else None,
                  states_left=sorted(p.name for p in (out / "state").glob("*")) if store else None)
    if sc.get("reference") and rank == 0:
        result["reference"] = sampler.sample(unet, **inputs, **kw)
    return result


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group (Linux /proc)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []
    return [n for n in names if "gloo" in n]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 1))
    out = Path(spec["out"])
    rank = int(os.environ.get("RANK", "0"))
    cases = {}
    results = {}
    try:
        with joined(torch.device("cpu"), spec.get("timeout_s", 60)) as run:
            if spec.get("import_whisper"):  # what the CLI does after joining: transformers binds the group
                import transformers.models.whisper.modeling_whisper  # noqa: F401
            try:
                for sc in spec["scenarios"]:
                    try:
                        case = sc.get("case", "tiny")
                        if case not in cases:
                            cases[case] = (tiny_case(spec.get("frames", 12)) if case == "tiny"
                                           else golden_case())
                        results[sc["name"]] = run_scenario(sc, cases[case], run.group, rank, out)
                    except DistributedError as e:
                        (out / f"rank{rank}.error").write_text(
                            json.dumps({"time": time.time(), "error": str(e)}))
                        if not sc.get("expect_error"):
                            print(f"error: {e}", file=sys.stderr)
                            return DIST_ERROR_EXIT
                        results[sc["name"]] = {"error": str(e)}
            finally:
                torch.save(results, out / f"rank{rank}.pt")
    finally:  # out of the group (also after an error): its worker threads must have ended (leave())
        (out / f"rank{rank}.left").write_text(json.dumps({"threads": gloo_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
