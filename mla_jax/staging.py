"""Where checkpoints and exports are written: destination rules, a staging directory, atomic publication.

Every writer (`mla-jax convert`, `mla_jax.save`, `mla-jax export`) fills a hidden sibling
`.NAME.tmp-PID` of its destination and renames it into place when complete. The rules, checked
before any work:
  - a destination is never a source: not equal to it, not inside it, not containing it (after
    resolving symlinks), so replacing the destination can never delete what is being read;
  - an existing destination is replaced only with `overwrite`, and only if it is recognisably the
    same kind of output (`Kind`: an mla-jax checkpoint, an export written by us); anything else is
    named and left alone;
  - temporaries left by killed runs (`.NAME.tmp-PID` whose process is gone) are swept.
While a `Staging` is open, SIGINT (and SIGTERM, when the program handles it) are deferred to safe
points (`Staging.check()`), so an interrupt never lands inside orbax / tensorstore's asynchronous
writes; the interrupt then unwinds through `discard()`, which removes the temporary directory.
Disk-full and other OS errors while writing become one-line `CheckpointError`s (`write_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Iterator


class CheckpointError(ValueError):
    """A checkpoint (or its destination) that cannot be read or written as asked."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """A kind of output that `overwrite` may replace: `describe` names it, `test(path)` recognises it."""

    describe: str
    test: Callable[[str], bool]


def json_field_is(path: str, filename: str, field: str, value) -> bool:
    """Whether `path/filename` is a JSON object whose `field` equals `value`: how a writer recognises
    its own earlier output (`Kind.test`). Unreadable, missing or malformed files are simply False."""
    try:
        with open(os.path.join(path, filename)) as f:
            return json.load(f).get(field) == value
    except (OSError, ValueError, AttributeError):
        return False


def user_path(path: str | os.PathLike) -> str:
    """A path as the user meant it: `~` expanded, absolute."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def check_separate(dst: str | os.PathLike, *sources: str | os.PathLike) -> None:
    """Refuses a destination that is, lies inside or contains any source (symlinks resolved).

    The finetune command calls this for `--out` against its base checkpoint and data.
    """
    dst = user_path(dst)
    real_dst = os.path.realpath(dst)
    for source in sources:
        src = user_path(source)
        real_src = os.path.realpath(src)
        if real_dst == real_src:
            raise CheckpointError(f"destination {dst} is the source {src}; write to a new directory")
        if _within(real_dst, real_src):
            raise CheckpointError(f"destination {dst} lies inside the source {src}; choose a directory outside it")
        if _within(real_src, real_dst):
            raise CheckpointError(
                f"destination {dst} contains the source {src}; replacing it would delete the source"
            )


def check_destination(dst: str | os.PathLike, overwrite: bool, *, kind: Kind, sources=()) -> str:
    """Checks `dst` can be written (see module doc) and returns it absolute; sweeps stale temporaries."""
    dst = user_path(dst)
    check_separate(dst, *sources)
    sweep_stale(dst)
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")
        if os.path.islink(dst) or not kind.test(dst):
            what = "a symbolic link" if os.path.islink(dst) else "a file" if not os.path.isdir(dst) else "a directory"
            raise CheckpointError(
                f"destination {dst} is {what} but not {kind.describe}; --overwrite replaces only that, "
                "so remove it yourself or choose another destination"
            )
    parent = os.path.dirname(dst)
    existing = parent
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise CheckpointError(f"destination {dst} is not writable: {existing} is a file, not a directory")
    if existing and not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"destination {dst} is not writable: no write permission on {existing}")
    return dst


# ------------------------------------------------------------------------------ stale temporaries
def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(?P<pid>\d+)(?P<old>\.old)?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(dst: str) -> list[str]:
    """Removes `.NAME.tmp-PID` siblings of `dst` whose process is gone; returns what was removed.

    A killed publish can leave the previous destination moved aside as `.NAME.tmp-PID.old` with no
    `dst`: that one is put back, not removed.
    """
    parent, name = os.path.split(dst)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    pattern, removed = _temporary_pattern(name), []
    for entry in sorted(entries, key=lambda e: e.endswith(".old")):  # temporaries first, then the .old
        match = pattern.match(entry)
        if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        path = os.path.join(parent, entry)
        if match["old"] and not os.path.lexists(dst):
            os.rename(path, dst)
            continue
        _remove(path)
        removed.append(path)
    return removed


def _remove_settled(path: str, attempts: int = 20) -> None:
    """Removes `path` and makes sure it stays gone: after a failed write, a straggling tensorstore
    operation may still create a file in it (recreating the directory) just after it was removed."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)
        if not os.path.lexists(path):
            return


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


# ------------------------------------------------------------------------------ staging
def temporary_path(dst: str, pid: int) -> str:
    """The hidden sibling `.NAME.tmp-PID` that process `pid` fills before renaming it onto `dst`."""
    parent, name = os.path.split(dst)
    return os.path.join(parent, f".{name}.tmp-{pid}")


class Staging:
    """A hidden sibling `.NAME.tmp-PID` of `dst` to fill, then `publish()` onto `dst` in one rename.

    `discard()` (or leaving a `with` block by an exception) removes it. Signals are deferred while it
    is open: call `check()` at points where an interrupt may safely unwind.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False, kind: Kind, sources=()):
        self.dst = check_destination(dst, overwrite, kind=kind, sources=sources)
        self.overwrite, self.kind = overwrite, kind
        parent = os.path.dirname(self.dst)
        self.tmp = temporary_path(self.dst, os.getpid())
        self._signals = DeferredSignals()
        try:
            with write_errors(self.dst):
                os.makedirs(parent, exist_ok=True)
                if os.path.lexists(self.tmp):  # left by a killed run that had our pid: never a checkpoint
                    _remove(self.tmp)
                os.makedirs(self.tmp)
        except BaseException:
            self._signals.restore()
            raise

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard(interrupted=issubclass(exc_type, KeyboardInterrupt))
        return False

    def check(self) -> None:
        """A safe point: a signal received since the last one is acted on now (e.g. KeyboardInterrupt)."""
        self._signals.deliver()

    def publish(self) -> str:
        self.check()
        with write_errors(self.dst):
            publish(self.tmp, self.dst, self.overwrite, self.kind)
        self._signals.restore()
        return self.dst

    def discard(self, interrupted: bool = False) -> None:
        """Removes the temporary directory; signals arriving meanwhile wait until it is gone."""
        _remove_settled(self.tmp)
        self._signals.restore(deliver=not interrupted)


def publish(tmp: str, dst: str, overwrite: bool, kind: Kind) -> None:
    """Renames the finished `tmp` onto `dst`; an old `dst` is moved aside first, then deleted."""
    old = None
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"destination {dst} appeared while writing; left it as it is and wrote nothing")
        if os.path.islink(dst) or not kind.test(dst):
            raise CheckpointError(
                f"destination {dst} changed while writing and is no longer {kind.describe}; "
                "left it as it is and wrote nothing"
            )
        old = f"{tmp}.old"
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        _remove(old)


# ------------------------------------------------------------------------------ signals
class DeferredSignals:
    """Holds SIGINT / SIGTERM while installed and hands them to their own handler at `deliver()`.

    Only signals whose handler is a Python function are deferred (SIGINT's default raises
    KeyboardInterrupt; the CLI makes SIGTERM do the same); a signal left to the system (SIG_DFL)
    still ends the process at once, and the next run sweeps its temporary. Installed only in the
    main thread, where Python runs signal handlers.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._previous: dict[int, Callable] = {}
        self._pending: list[int] = []
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                self._previous[signum] = handler
                signal.signal(signum, self._hold)

    def _hold(self, signum, frame) -> None:
        self._pending.append(signum)

    def deliver(self) -> None:
        if self._pending:
            signum = self._pending.pop(0)
            self._pending.clear()
            self._previous[signum](signum, None)

    def restore(self, deliver: bool = True) -> None:
        """Puts the original handlers back; a signal held meanwhile is then delivered (or dropped)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        previous, self._previous = self._previous, {}
        if deliver and self._pending:
            signum = self._pending[0]
            self._pending.clear()
            previous[signum](signum, None)
        self._pending.clear()


# ------------------------------------------------------------------------------ write errors
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _os_error_code(exc: BaseException) -> int | None:
    """The errno of an OSError, or of a tensorstore error that carries one in its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        match = re.search(r"os_error_code='?(\d+)", str(exc))
        if match:
            return int(match[1])
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def write_errors(dst: str) -> Iterator[None]:
    """Turns a full disk or another OS error while writing `dst` into one-line CheckpointErrors."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        code = _os_error_code(e)
        if code in _NO_SPACE:
            raise CheckpointError(f"no space left on device writing {dst}") from None
        if code is not None:
            detail = os.strerror(code)
            where = getattr(e, "filename", None)
            raise CheckpointError(f"cannot write {dst}: {detail}" + (f" ({where})" if where else "")) from None
        raise


class _QuietOrbax(logging.Filter):
    """Drops orbax's logged copies of a background write error; the error itself reaches the caller."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _closed_loop_callback(unraisable) -> bool:
    """tensorstore completing a write for an orbax event loop that already ended (after another
    write failed): harmless, and reported by tensorstore as an 'unraisable' RuntimeError."""
    if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
        return False
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def _install_closed_loop_filter() -> None:
    """Once per process: drop those reports (they arrive on tensorstore's threads, even after the
    write has been abandoned, so a filter scoped to the write would miss some); anything else goes
    to the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "_mla_jax_filter", False):
        return

    def hook(unraisable):
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._mla_jax_filter = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_orbax_errors() -> Iterator[None]:
    """While orbax writes or reads for us, its logged copies of an error we re-raise are dropped."""
    _install_closed_loop_filter()
    quiet = _QuietOrbax()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
