"""What a user can cause and fix, as opposed to a bug: the `mla-jax` error boundary prints the former
as one line and asks for a traceback only for the latter.

Every module keeps its own error class (ConfigError, CheckpointError, DataError, ...) so a caller
can catch just that kind; `user_errors()` lists them all for the boundary in `mla_jax.cli`.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading


class UsageError(ValueError):
    """An argument (a command-line option or an API parameter) outside what it accepts."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong kind (a float where token ids go, a flat list for a batch)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes whose message alone tells the user what to fix.

    Imported on demand: the boundary needs them only once something failed.
    """
    from mla_jax.cache import CacheError
    from mla_jax.config import ConfigError
    from mla_jax.store import CheckpointError
    from mla_jax.tokenizer import TokenizerError
    from mla_jax.training.data import DataError
    from mla_jax.training.config import RunError

    found: list[type[BaseException]] = [UsageError, CacheError, ConfigError, CheckpointError, TokenizerError,
                                        DataError, RunError]
    try:  # checkpoints sits above mla_jax; present in every install, but never required here
        from checkpoints.safetensors_io import SafetensorsError

        found.append(SafetensorsError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs."""


def raise_interrupt(signum, frame) -> None:
    """A signal handler: KeyboardInterrupt for SIGINT, `Terminated` for SIGTERM, in the main thread.

    Where an exception would be printed and dropped instead of propagating (inside a garbage
    collector callback, which jax registers, or a `__del__`), the signal is delivered again shortly
    instead, so that an interruption is never lost. Places the frames do not show (a weakref's
    callback run by the collector) are caught when Python drops the exception (`_install_redelivery`).
    """
    if _swallowing(frame):
        _deliver_again(signum)
        return
    _install_redelivery()
    error = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    error.mla_jax_signal = signum
    raise error


def _deliver_again(signum) -> None:
    threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()


def _install_redelivery() -> None:
    """Chains sys.unraisablehook (what Python calls with an exception it drops) so that an
    interruption `raise_interrupt` raised and Python dropped is delivered again."""
    previous = sys.unraisablehook
    if getattr(previous, "redelivers_interrupts", False):
        return

    def hook(unraisable) -> None:
        signum = getattr(unraisable.exc_value, "mla_jax_signal", None)
        if signum is None:
            previous(unraisable)
        else:
            _deliver_again(signum)

    hook.redelivers_interrupts = True
    sys.unraisablehook = hook


def _swallowing(frame) -> bool:
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False
