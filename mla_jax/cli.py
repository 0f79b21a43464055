"""`mla-jax` command line: argument parsing only; every command calls a library function.

Each command lives in the module that owns it, which exposes `register(subparsers)`; that function
adds the sub-parser and sets `func` (called with the parsed args, returning an exit code).

`main` is the one error boundary of every command:
* a failure the user can cause and fix (`mla_jax.errors.user_errors()`, an OSError on a path) ends
  in one line `mla-jax COMMAND: error: ...` on stderr, exit 1; argparse's own errors stay exit 2;
* anything else is a bug: one line too, plus how to get the traceback (exit 1);
* Ctrl-C, and SIGTERM (turned into the same KeyboardInterrupt), end in one line, exit 130;
* `MLA_JAX_DEBUG=1` or `--debug` lets every exception through with its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

from mla_jax.errors import Terminated, raise_interrupt, user_errors

# Modules that register a sub-command, in the order `mla-jax --help` lists them. `checkpoints` sits
# above `mla_jax` in the import graph, so its commands are imported only when the CLI starts.
COMMAND_MODULES = [
    "checkpoints.demo",
    "checkpoints.cli",
    "mla_jax.training.cli",
    "mla_jax.generate_cli",
    "mla_jax.parallel.cli",
]
DEBUG_ENV = "MLA_JAX_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_DEBUG_HELP = f"show the full traceback of a failure (same as {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():
        # Also accepted after the command; SUPPRESS keeps a top-level --debug from being reset.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no") or bool(getattr(args, "debug", False))


def one_line(text: str, limit: int = 1000) -> str:
    """`text` on one line (a message from a library may span several), cut at `limit` characters."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_os_error(e: OSError) -> str:
    """"PATH: what went wrong" for an OSError, in place of Python's "[Errno N] ...: 'PATH'"."""
    what = e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e)
    if e.errno == errno.ENOSPC:
        what = "no space left on the device"
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(map(os.fsdecode, paths))}: {what}" if paths else one_line(str(e) or what)


def _install_signal_handlers() -> dict:
    """SIGTERM (and Ctrl-C, unless someone else handles it) raise in the main thread; returns the
    handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, raise_interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, raise_interrupt)
    return previous


def _finish_stdout() -> None:
    """Flush what a command printed before its failure, so the error line comes after it."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    previous = _install_signal_handlers()  # before the command modules' imports: they take seconds
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)  # argparse's errors exit 2 with their usage line
        except KeyboardInterrupt as e:
            return _report_interrupt("mla-jax", e, None)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return run_command(args.command, args.func, args)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_command(command: str, func, args: argparse.Namespace) -> int:
    """Calls `func(args)` inside the boundary described in the module docstring."""
    prefix = f"mla-jax {command}"
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt as e:
        return _report_interrupt(prefix, e, args)
    except BrokenPipeError:
        # The reader of our output went away (`| head`): nothing to report, and nowhere to report it.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - this is the boundary
        if debug_requested(args):
            raise
        _finish_stdout()
        if isinstance(e, user_errors()):
            message = one_line(str(e))
        elif isinstance(e, OSError):
            message = describe_os_error(e)
        else:
            message = (f"unexpected {type(e).__name__}: {one_line(str(e), 300)} (a bug; run with "
                       f"{DEBUG_ENV}=1 for the traceback)")
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _report_interrupt(prefix: str, e: KeyboardInterrupt, args) -> int:
    if debug_requested(args):
        raise e
    _finish_stdout()
    how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
    # A command may say what the interruption left behind: `raise type(e)("resume with ...")`.
    detail = f"; {one_line(e.args[0])}" if e.args else ""
    print(f"{prefix}: {how}{detail}", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
