"""Press cancel while a job runs (outside ComfyUI a cancel pressed while idle is dropped when the
next job starts, as ComfyUI does per prompt; issue 13)."""

from __future__ import annotations

import contextlib

from nodes import runtime


@contextlib.contextmanager
def cancel_during_next_job():
    """Within the block, the first progress update of a job requests the interrupt right before
    its check, as a user pressing cancel mid-run."""
    real = runtime.Progress.update

    def update(self, *args, **kwargs):
        runtime.request_interrupt()
        return real(self, *args, **kwargs)

    runtime.Progress.update = update
    try:
        yield
    finally:
        runtime.Progress.update = real
