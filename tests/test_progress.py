"""The CLI's progress (issue 26): tqdm bars with elapsed time, rate and ETA on a terminal; readable log
lines with the same facts, and no control characters, when stderr is a file or a pipe."""

from __future__ import annotations

import io
import logging
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading

import pytest

from sonic_core import progress as P
from tests._golden import REPO

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # every control character but \t and \n
LINE = re.compile(r"^(\w+): (\d+)/(\d+) .* \((\d+)%\), ([\d:]+) elapsed, ([\d.?]+ [^,]+), (ETA [\d:?]+|done)$")
BAR_TIMES = re.compile(r"\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ ?(s/UNet call|UNet call/s)\]")  # [elapsed<ETA, rate]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == P.log.name]


def test_log_lines_without_a_terminal(caplog):
    """75 UNet calls 2 s apart, one line every 30 s: the first, every 15th call and the last, each with
    the count, elapsed time, rate and the ETA the remaining calls take at that rate."""
    caplog.set_level(logging.INFO, logger=P.log.name)
    clock, stream = Clock(), io.StringIO()
    progress = P.CliProgress(stream, interval_s=30.0, clock=clock)
    assert not progress.terminal, "a StringIO is not a terminal"
    for done in range(1, 76):
        progress("sampling", done, 75)
        clock.now += 2.0
    lines = _lines(caplog)
    assert stream.getvalue() == "", "without a terminal nothing is drawn on the stream itself"
    assert [int(LINE.match(x).group(2)) for x in lines] == [1, 16, 31, 46, 61, 75], lines
    assert lines[1] == "sampling: 16/75 UNet calls (21%), 00:30 elapsed, 2.00 s/UNet call, ETA 01:58", lines[1]
    assert lines[-1].endswith("02:28 elapsed, 2.00 s/UNet call, done"), lines[-1]
    assert not any(CONTROL.search(x) for x in lines)


def test_log_lines_of_a_resumed_run_time_only_new_work(caplog):
    """A sampling resumed at call 50 of 75 reports from 50: its rate and ETA ignore the 50 done before."""
    caplog.set_level(logging.INFO, logger=P.log.name)
    clock = Clock()
    progress = P.CliProgress(io.StringIO(), interval_s=10.0, clock=clock)
    for done in range(50, 76):
        progress("sampling", done, 75)
        clock.now += 0.5  # 2 calls a second
    lines = _lines(caplog)
    assert "ETA ?" in lines[0], "no rate before any new work"
    assert "2.00 UNet calls/s" in lines[1] and lines[1].endswith("ETA 00:02"), lines[1]


def test_tqdm_bar_on_a_terminal():
    stream = io.StringIO()
    progress = P.CliProgress(stream, terminal=True)
    for done in range(1, 6):
        progress("sampling", done, 5)
    for done in range(1, 4):
        progress("encoding", done, 3)
    out = stream.getvalue()
    assert "sampling: 100%" in out and "5/5" in out and "encoding: 100%" in out and "3/3" in out, out
    assert BAR_TIMES.search(out), out


def test_tqdm_bar_on_a_terminal_of_unknown_size():
    """A pseudo-terminal whose size was never set (``script``, CI runners) reports 0x0; tqdm would
    then print nothing at all, so the bar gets a fixed size."""
    master, slave = os.openpty()
    try:
        with os.fdopen(os.dup(slave), "w") as tty:
            assert P.is_terminal(tty) and P.terminal_size(tty) is None
            progress = P.CliProgress(tty)
            assert progress.terminal
            for done in range(1, 6):
                progress("sampling", done, 5)
        out = b""
        while select.select([master], [], [], 1.0)[0]:  # everything written so far, however it is chunked
            out += os.read(master, 65536)
        out = out.decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "sampling: 100%" in out and "5/5" in out and BAR_TIMES.search(out), repr(out)


# ----------------------------------------------------------------------------------------------
# The real CLI on tiny models, its stderr a pseudo-terminal, then a pipe
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from sonic_core import selftest

    root = tmp_path_factory.mktemp("cli_progress")
    models = selftest.write_tiny_models(root / "models")
    return (root, [sys.executable, "-m", "sonic_core", "animate", str(selftest.write_portrait(root / "p.png")),
                   str(selftest.write_voice(root / "v.wav")), "--models", str(models), "--steps", "2",
                   "--min-resolution", "128", "--device", "cpu"])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    env.pop("TERM", None)
    return env


def _run_on_pty(cmd: list[str]) -> tuple[int, str]:
    """``cmd`` with stderr on a pseudo-terminal (what an interactive shell gives): (status, stderr)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 lines x 120 columns
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave, stdin=subprocess.DEVNULL, env=_env(),
                            cwd=REPO)
    os.close(slave)
    chunks: list[bytes] = []

    def read():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    status = proc.wait(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    return status, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_cli_progress_on_a_terminal_and_in_a_pipe(tiny_run):
    root, cmd = tiny_run
    status, err = _run_on_pty([*cmd, "-o", str(root / "tty.mp4")])
    assert status == 0, err[-3000:]
    for stage in ("sampling", "encoding"):
        assert re.search(rf"{stage}: 100%\|.*\| (\d+)/\1 \[", err), f"no finished {stage} bar:\n{err[-3000:]}"
    assert BAR_TIMES.search(err) and "\r" in err, err[-3000:]

    run = subprocess.run([*cmd, "-o", str(root / "pipe.mp4")], capture_output=True, text=True, env=_env(),
                         cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not CONTROL.search(run.stderr), "control characters in a piped log: " + repr(run.stderr[-2000:])
    lines = [x.split(": ", 1)[1] for x in run.stderr.splitlines() if x.startswith(f"INFO {P.log.name}: ")]
    for stage in ("sampling", "encoding"):
        mine = [x for x in lines if x.startswith(f"{stage}: ")]
        assert mine and all(LINE.match(x) for x in mine), f"{stage} lines: {mine}\n{run.stderr[-3000:]}"
        assert "ETA" in mine[0] and mine[-1].endswith("done"), mine
