"""``python -m sonic_core <command>``: a small subcommand registry.

A command is a name, a one-line help, a ``configure(parser)`` that adds its arguments and a
``run(args) -> int`` returning the exit status. Either may be given as a ``"module:attribute"``
string (relative to ``sonic_core``) so that heavy modules are imported only when their command
runs. To add a command, append one ``Command(...)`` to ``COMMANDS``, e.g.::

    Command("animate", "image + audio -> video", "pipeline:configure_cli", "pipeline:run_cli")
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Union

logger = logging.getLogger(__name__)

Hook = Union[str, Callable]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Hook  # (argparse.ArgumentParser) -> None
    run: Hook  # (argparse.Namespace) -> int
    interrupted: str = "interrupted"  # the one line a Ctrl+C prints


def _resolve(hook: Hook) -> Callable:
    if callable(hook):
        return hook
    module, _, attr = hook.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


# ----------------------------------------------------------------------------------------------
# convert-weights
# ----------------------------------------------------------------------------------------------
def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="checkpoint to read (.safetensors, .pth, .pt, .bin, .ckpt, .pkl)")
    p.add_argument("output", help="file to write, ending in .safetensors (written atomically)")
    p.add_argument("--fp16", action="store_true", help="store floating-point tensors as float16")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (and its architecture .json); refused otherwise")


def _run_convert(args: argparse.Namespace) -> int:
    from .weights import convert_weights

    info = convert_weights(args.input, args.output, fp16=args.fp16, overwrite=args.overwrite)
    arch = f", architecture -> {info['architecture']}" if info["architecture"] else ""
    say(f"wrote {args.output}: {info['keys']} tensors, {info['bytes'] / 2**20:.1f} MiB{arch}")
    return 0


COMMANDS: list[Command] = [
    Command("animate", "portrait image + speech/singing audio -> talking-head video",
            "pipeline:configure_cli", "pipeline:run_cli",
            interrupted="interrupted; run the same command again with --resume to continue from the last saved "
                        "step"),
    Command("selftest", "tiny random models through the whole chain to a short mp4 (checks an install)",
            "selftest:configure_cli", "selftest:run_cli"),
    Command("convert-weights", "convert a checkpoint to .safetensors (optionally fp16)",
            _configure_convert, _run_convert),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sonic_core",
                                     description="Sonic audio-driven portrait animation, without ComfyUI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        _resolve(cmd.configure)(p)
        p.set_defaults(_run=cmd.run, _interrupted=cmd.interrupted)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> tuple[logging.Handler, int]:
    """Log sonic_core messages to stderr (the package logger only; the root logger is left alone).
    Returns the handler and the logger's previous level, for ``main`` to undo when it returns."""
    root = logging.getLogger(__package__)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    before = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    return handler, before


SIGTERM_EXIT = 128 + signal.SIGTERM  # the shell's status for a process ended by SIGTERM (143)
INTERRUPT_EXIT = 128 + signal.SIGINT  # the shell's status for a process ended by Ctrl+C (130)


def say(text: str) -> None:
    """A command's result line on stdout. A stdout that cannot take it (a closed pipe, /dev/full) does
    not fail a command whose work is done: warned on stderr, and stdout goes to the null device so
    that Python's own flush at exit cannot fail either."""
    try:
        print(text, flush=True)
    except OSError as e:  # BrokenPipeError, ENOSPC
        _drop_stdout(e)


def _drop_stdout(e: OSError) -> None:
    logger.warning("could not write to stdout (%s); the command itself succeeded",
                   e.strerror or type(e).__name__)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):  # no real stdout (a caller's capture): nothing to do
        pass


def _flush_stdout() -> None:
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as e:
        _drop_stdout(e)
    except ValueError:  # closed by the caller
        pass


def _exit_on_sigterm(signum, _frame) -> None:
    """SIGTERM (docker stop, systemd, kill) ends the run like Ctrl+C: cleanup code runs, so no
    temporary video stays behind (a SIGKILL cannot be caught: sonic_core.video removes those later)."""
    raise SystemExit(SIGTERM_EXIT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler, level_before = _setup_logging(args.verbose, args.quiet)
    if argv is None:  # the real command line, not a call from Python (whose handlers stay its own)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(_resolve(args._run)(args) or 0)
    except (OSError, ValueError) as e:  # bad input: one clear line, no traceback (use -v for one)
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: one line, no traceback (use -v for one)
        if args.verbose:
            raise
        print(args._interrupted, file=sys.stderr)
        return INTERRUPT_EXIT
    finally:
        _flush_stdout()  # a full or closed stdout after the work is done does not change the status
        # a caller from Python (tests, scripts) keeps no handler on a stream it may close
        logging.getLogger(__package__).removeHandler(handler)
        logging.getLogger(__package__).setLevel(level_before)
