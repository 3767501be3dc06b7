"""The CLI's progress on stderr: a tqdm bar per stage on a terminal, plain log lines elsewhere.

A run can last an hour, so each stage (audio encoding, sampling, and the stream after the sampler:
decode -> RIFE -> encode) says how far it is, how long it has run, its rate and when it will end.
On a terminal that is a tqdm bar (``sampling: 40%|####  | 30/75 [01:02<01:33, 2.07s/UNet call]``).
Written to a file or a pipe (nohup, CI, a log collector), a bar's carriage returns would pile up, so
the same facts go out as log lines on the ``sonic_core.progress`` logger instead: the first update, one
every PROGRESS_LOG_INTERVAL_S seconds, and the last, e.g.
``sampling: 30/75 UNet calls (40%), 1:02 elapsed, 2.07 s/UNet call, ETA 1:33``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
from typing import Callable, Iterator, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import PROGRESS_BAR_FALLBACK_SIZE, PROGRESS_BAR_MIN_INTERVAL_S, PROGRESS_LOG_INTERVAL_S

log = logging.getLogger(__name__)

STAGE_UNITS = {"audio": "step", "sampling": "UNet call", "encoding": "frame"}  # what ``done`` counts


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def terminal_size(stream: TextIO) -> tuple[int, int] | None:
    """(columns, lines) of the terminal, or None where unknown: not a terminal, or a pseudo-terminal
    whose size was never set (``script``, some CI runners), where tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return (size.columns, size.lines) if size.columns > 0 and size.lines > 0 else None


def _clock(seconds: float) -> str:
    return tqdm.format_interval(seconds)  # 75 -> "01:15", 3725 -> "1:02:05"


def _rate(done: int, elapsed: float, unit: str) -> str:
    if done <= 0 or elapsed <= 0:
        return f"? s/{unit}"
    per_second = done / elapsed
    return f"{per_second:.2f} {unit}s/s" if per_second >= 1 else f"{1 / per_second:.2f} s/{unit}"


class CliProgress:
    """``progress(stage, done, total)`` for ``pipeline.animate``.

    ``terminal``: draw tqdm bars (default: whether ``stream`` is a terminal); otherwise log lines at
    most every ``interval_s`` seconds of ``clock``, plus the first and the last of each stage.
    """

    def __init__(self, stream: TextIO | None = None, *, terminal: bool | None = None,
                 interval_s: float = PROGRESS_LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.interval_s = interval_s
        self.clock = clock
        self._stage: str | None = None
        self._bar: tqdm | None = None
        self._start = self._last_line = 0.0
        self._base = 0  # ``done`` at the stage's first report

    def __call__(self, stage: str, done: int, total: int) -> None:
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        if stage != self._stage:  # a stage's first report: timing starts here, counting from ``done``
            self.close()  # (a resumed sampling starts at its saved step: rate and ETA count only new work)
            self._stage, self._start, self._last_line, self._base = stage, self.clock(), -math.inf, done
            if self.terminal:
                known = terminal_size(self.stream) is not None  # known: follow resizes; else a fixed size
                columns, lines = (None, None) if known else PROGRESS_BAR_FALLBACK_SIZE
                self._bar = tqdm(total=total, initial=done, desc=stage, unit=STAGE_UNITS.get(stage, "step"),
                                 file=self.stream, mininterval=PROGRESS_BAR_MIN_INTERVAL_S, leave=True,
                                 dynamic_ncols=known, ncols=columns, nrows=lines)
        if self._bar is not None:
            if self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._bar.n)
        else:
            now = self.clock()
            if done >= total or now - self._last_line >= self.interval_s:
                self._last_line = now
                self._log_line(stage, done, total, now - self._start)
        if done >= total:
            self.close()

    def _log_line(self, stage: str, done: int, total: int, elapsed: float) -> None:
        unit = STAGE_UNITS.get(stage, "step")
        new = done - self._base  # units done since timing started
        if done >= total:
            eta = "done"
        elif new > 0 and elapsed > 0:
            eta = f"ETA {_clock((total - done) * elapsed / new)}"
        else:
            eta = "ETA ?"
        log.info("%s: %d/%d %ss (%d%%), %s elapsed, %s, %s", stage, done, total, unit, 100 * done // total,
                 _clock(elapsed), _rate(new, elapsed, unit), eta)

    def close(self) -> None:
        """End the current stage's bar (the run ended early, or failed)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None

    @contextlib.contextmanager
    def logging_around_bars(self) -> Iterator[None]:
        """While bars are drawn, log records of sonic_core go through tqdm.write, above the bar, so
        they never break it; without a terminal nothing changes. Closes any open bar at the end."""
        try:
            if self.terminal:
                with logging_redirect_tqdm(loggers=[logging.getLogger(__package__)]):
                    yield
            else:
                yield
        finally:
            self.close()
