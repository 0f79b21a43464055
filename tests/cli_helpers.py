"""Run `mla-jax` as a user does, in a subprocess, and read what it printed.

`run_cli` returns (exit code, stdout, stderr) with the lines that every `import jax` prints through
the CUDA compile-only plugin on a machine without a GPU removed from stderr (`plugin_noise`), so a
test can ask for "exactly one line". `run_cli_signalled` sends a signal once a marker has appeared
in the output, for Ctrl-C / SIGTERM cases.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the CUDA plugin's import prints on a machine without a GPU (absl's pre-init notice and the
# cudart stub's search for drivers); nothing that mla-jax itself writes matches these.
_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^[EWI]\d{4} .*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"),
)


class Result(NamedTuple):
    rc: int
    out: str
    err: str  # stderr without the plugin's noise lines

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def all_output(self) -> str:
        return self.out + self.err


def plugin_noise(line: str) -> bool:
    return any(p.search(line) for p in _NOISE)


def strip_noise(stderr: str) -> str:
    return "".join(line for line in stderr.splitlines(keepends=True) if not plugin_noise(line.rstrip("\n")))


def cli_env(**extra: str | None) -> dict[str, str]:
    """The test process's environment with this checkout first on PYTHONPATH, on the CPU; a value
    of None removes that variable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.pop("MLA_JAX_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _command(args) -> list[str]:
    return [sys.executable, "-m", "mla_jax.cli", *map(os.fspath, args)]


def run_cli(*args, env: dict[str, str] | None = None, cwd=None, timeout: float = 300, stdin=None) -> Result:
    """`mla-jax ARGS...` to completion."""
    p = subprocess.run(_command(args), capture_output=True, text=True, env=env or cli_env(), cwd=cwd,
                       timeout=timeout, stdin=subprocess.DEVNULL if stdin is None else stdin)
    return Result(p.returncode, p.stdout, strip_noise(p.stderr))


def run_cli_signalled(*args, marker: str, signals=(signal.SIGINT,), gap: float = 0.0,
                      env: dict[str, str] | None = None, cwd=None, timeout: float = 300) -> Result:
    """`mla-jax ARGS...`, sending `signals` one after another (`gap` seconds apart) as soon as
    `marker` appears in its stdout or stderr; fails if it never does."""
    proc = subprocess.Popen(_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env or cli_env(), cwd=cwd, stdin=subprocess.DEVNULL)
    chunks = {"out": bytearray(), "err": bytearray()}
    seen = threading.Event()
    wanted = marker.encode()

    def pump(stream, name):
        # Raw chunks, not lines: a marker may be printed without a newline (a streamed prompt).
        while data := os.read(stream.fileno(), 65536):
            chunks[name] += data
            if wanted in chunks[name]:
                seen.set()
        stream.close()

    readers = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while not seen.is_set():
            if proc.poll() is not None:
                for t in readers:
                    t.join(5)
                raise AssertionError(f"exited {proc.returncode} before printing {marker!r}:\n"
                                     + _text(chunks["out"]) + strip_noise(_text(chunks["err"])))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{marker!r} not printed within {timeout} s")
            seen.wait(0.05)
        for i, sig in enumerate(signals):
            if i and gap:
                time.sleep(gap)
            proc.send_signal(sig)
        rc = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in readers:
        t.join(5)
    return Result(rc, _text(chunks["out"]), strip_noise(_text(chunks["err"])))


def _text(data: bytes) -> str:
    return bytes(data).decode("utf-8", errors="replace")


def error_line(result: Result) -> str:
    """The one line a failed command printed on stderr; fails on a traceback or on more lines."""
    assert "Traceback" not in result.all_output, result.all_output
    assert len(result.err_lines) == 1, result.err
    return result.err_lines[0]
