"""`mla-jax`'s one error boundary: one line per failure, exit 1 (2 for argparse), 130 on Ctrl-C or
SIGTERM, the traceback only with MLA_JAX_DEBUG=1 or --debug."""

import argparse
import errno
import gc
import os
import signal
import time
import weakref

import pytest

from checkpoints.make_tiny import SHIPPED
from cli_helpers import error_line, run_cli, run_cli_signalled
from mla_jax import cli
from mla_jax.config import ConfigError
from mla_jax.errors import Terminated


def _boundary(exc: BaseException, capsys, **args) -> tuple[int, str]:
    def command(_):
        raise exc

    code = cli.run_command("cmd", command, argparse.Namespace(**args))
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def test_a_user_error_is_one_line_with_exit_1(capsys):
    got = _boundary(ConfigError("x/config.json: vocab_size=True; expected a positive integer"), capsys)
    assert got == (1, "mla-jax cmd: error: x/config.json: vocab_size=True; expected a positive integer\n")


def test_a_multi_line_message_is_joined_into_one(capsys):
    assert _boundary(ConfigError("first\n  second\n"), capsys) == (1, "mla-jax cmd: error: first second\n")


def test_an_os_error_names_the_path(capsys):
    e = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.jsonl")
    assert _boundary(e, capsys) == (1, "mla-jax cmd: error: /data/x.jsonl: No such file or directory\n")


def test_a_full_disk_says_so(capsys):
    e = OSError(errno.ENOSPC, "No space left on device", "/ckpt/part_00001")
    assert _boundary(e, capsys) == (1, "mla-jax cmd: error: /ckpt/part_00001: no space left on the device\n")


def test_a_bug_is_one_line_that_says_how_to_see_the_traceback(capsys):
    code, err = _boundary(ZeroDivisionError("division by zero"), capsys)
    assert (code, err) == (1, "mla-jax cmd: error: unexpected ZeroDivisionError: division by zero (a bug; run "
                              "with MLA_JAX_DEBUG=1 for the traceback)\n")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_lets_the_exception_through(capsys, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("MLA_JAX_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        _boundary(ZeroDivisionError("division by zero"), capsys, debug=how == "flag")


def test_ctrl_c_is_one_line_with_exit_130(capsys):
    assert _boundary(KeyboardInterrupt(), capsys) == (130, "mla-jax cmd: interrupted (Ctrl-C)\n")


def test_sigterm_is_reported_as_such(capsys):
    assert _boundary(Terminated(), capsys) == (130, "mla-jax cmd: terminated (SIGTERM)\n")


def test_an_interruption_may_say_what_it_left(capsys):
    got = _boundary(KeyboardInterrupt("run/ resumes from step 3 with --resume"), capsys)
    assert got == (130, "mla-jax cmd: interrupted (Ctrl-C); run/ resumes from step 3 with --resume\n")


def test_debug_is_accepted_before_and_after_the_command():
    parser = cli.build_parser()
    before = parser.parse_args(["--debug", "generate", "--ckpt", "c", "--prompt", "p"])
    after = parser.parse_args(["generate", "--ckpt", "c", "--prompt", "p", "--debug"])
    assert (before.debug, after.debug) == (True, True)


# ---------------------------------------------------------------------------- as a user runs it
def test_cli_user_error_in_a_subprocess(tmp_path):
    r = run_cli("generate", "--ckpt", tmp_path / "missing", "--prompt", "hi")
    assert (r.rc, error_line(r)) == (1, f"mla-jax generate: error: --ckpt {tmp_path}/missing: no such directory")


def test_cli_argparse_errors_keep_exit_2():
    r = run_cli("generate", "--ckpt", "x", "--prompt", "p", "--page-size", "many")
    assert (r.rc, r.err_lines[-1]) == (2, "mla-jax generate: error: argument --page-size: invalid int value: 'many'")


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "interrupted (Ctrl-C)"),
                                       (signal.SIGTERM, "terminated (SIGTERM)")])
def test_cli_signal_during_generate_is_one_line_with_exit_130(sig, said):
    # The prompt is printed before compilation and decoding start: the signal lands mid-work.
    r = run_cli_signalled("generate", "--ckpt", SHIPPED, "--prompt", "Once upon a time", "--max-new-tokens", "900",
                          "--dtype", "float32", marker="Once upon a time", signals=(sig,))
    assert (r.rc, error_line(r)) == (130, f"mla-jax generate: {said}")
    assert r.out.startswith("Once upon a time") and r.out.endswith("\n") and "tok/s" not in r.out


def test_a_signal_that_lands_in_a_gc_callback_is_not_lost():
    # jax registers a gc callback; an exception raised inside one is printed and dropped, so the
    # handler delivers the signal again once out of it.
    def callback(phase, info):
        if phase == "start":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside the callback

    previous = cli._install_signal_handlers()
    gc.callbacks.append(callback)
    try:
        with pytest.raises(Terminated):
            gc.collect()
            gc.callbacks.remove(callback)
            time.sleep(5)
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_signal_that_lands_in_a_weakref_callback_is_not_lost():
    # The collector runs weakref callbacks (a WeakKeyDictionary's clean-up) and drops what they raise;
    # no frame shows it, so the dropped interruption is delivered again (sys.unraisablehook).
    class Thing:
        pass

    def callback(_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here, inside the weakref callback

    previous = cli._install_signal_handlers()
    thing = Thing()
    ref = weakref.ref(thing, callback)
    try:
        with pytest.raises(Terminated):
            del thing  # the callback runs now, and its Terminated is dropped
            time.sleep(5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert ref() is None


# ---------------------------------------------------------------------------- generate's options
@pytest.mark.parametrize("option, message", [
    (["--page-size", "0"], "--page-size 0: expected an integer >= 1 (tokens per cache page)"),
    (["--prefill-chunk", "0"], "--prefill-chunk 0: expected an integer >= 1 (prompt tokens per prefill step)"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0 (0 = greedy)"),
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0 (0 = greedy)"),
    (["--top-p", "0"], "--top-p 0.0: expected a number in (0, 1] or None"),
    (["--top-p", "nan"], "--top-p nan: expected a number in (0, 1] or None"),
    (["--top-k", "-1"], "--top-k -1: expected an integer >= 0 (0 or None = no cut) or None"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: expected an integer >= 0"),
    (["--implementation", "mosaic_gpu"], "--implementation mosaic_gpu needs an sm90+ (Hopper or newer) CUDA GPU; "
                                         "this process runs on the CPU; use 'xla' or leave it unset"),
])
def test_generate_options_are_checked_before_anything_is_printed(capsys, option, message):
    code = cli.main(["generate", "--ckpt", SHIPPED, "--prompt", "Four score", *option])
    captured = capsys.readouterr()
    assert (code, captured.out, captured.err) == (1, "", f"mla-jax generate: error: {message}\n")
