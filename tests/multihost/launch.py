"""Start a multi-process JAX job on this machine, as several hosts would run it, and collect what each printed.

    from multihost.launch import launch
    procs = launch([sys.executable, "worker.py"], num_processes=2, devices_per_process=2)
    procs[0].out, procs[1].err, procs[0].rc ...

Every process gets the same command, on the CPU (JAX_PLATFORMS=cpu) with `devices_per_process` host
devices (`--xla_force_host_platform_device_count`), this checkout first on PYTHONPATH, and the job
in its environment: MLA_JAX_COORDINATOR (localhost and a free port), MLA_JAX_NUM_PROCESSES and
MLA_JAX_PROCESS_ID, which `mla_jax.parallel.initialize()` and the CLI's `--coordinator` flags read.
With `via_env=False` those three are left out, and "{coordinator}", "{num_processes}" and
"{process_id}" in the command are filled in instead (to pass them as flags):

    launch(["-m", "mla_jax.cli", "generate", ..., "--coordinator", "{coordinator}",
            "--num-processes", "{num_processes}", "--process-id", "{process_id}"], python=True, via_env=False)

The first process to fail (or the `timeout`) ends the job: the others are killed, since they would
wait for it forever inside a collective. With `check=True` (default) that raises JobFailed with
every process's exit code and the tail of its output; otherwise the results come back as they are
(rc None: killed). stderr comes back without the CUDA plugin's import notices (tests/cli_helpers.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import cli_env, strip_noise  # noqa: E402

# What gloo (the CPU backend's cross-process collectives) prints on stdout as its processes connect.
GLOO_PREFIX = "[Gloo] "


@dataclasses.dataclass
class Proc:
    process_id: int
    rc: int | None  # None: killed (another process failed, or the job timed out)
    out: str  # stdout without gloo's connection lines
    err: str  # stderr without the CUDA plugin's notices

    def tail(self, chars: int = 3000) -> str:
        return f"--- process {self.process_id} (rc {self.rc})\n{self.out[-chars:]}\n{self.err[-chars:]}"


class JobFailed(AssertionError):
    def __init__(self, why: str, procs: list[Proc]):
        super().__init__(why + "\n" + "\n".join(p.tail() for p in procs))
        self.procs = procs


def host_device_flags(count: int) -> str:
    """XLA_FLAGS with `count` host devices and this process's other XLA flags (the test run's)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([f"--xla_force_host_platform_device_count={count}", *kept])


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def without_gloo(stdout: str) -> str:
    return "".join(line for line in stdout.splitlines(keepends=True) if not line.startswith(GLOO_PREFIX))


def launch(command: Sequence[str], *, num_processes: int = 2, devices_per_process: int = 2, timeout: float = 300,
           env: dict[str, str] | None = None, cwd: str | None = None, python: bool = False, via_env: bool = True,
           check: bool = True) -> list[Proc]:
    """Runs `command` once per process (see the module docstring); returns one Proc per process, in order.

    `python`: the command is arguments to this Python interpreter. `env`: extra variables for every
    process (a value of None removes one).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes}, devices_per_process={devices_per_process}: expected >= 1")
    coordinator = f"localhost:{free_port()}"
    job = {"coordinator": coordinator, "num_processes": str(num_processes)}
    started, logs = [], []
    with tempfile.TemporaryDirectory(prefix="multihost-") as tmp:
        try:
            for i in range(num_processes):
                args = [a.format(**job, process_id=i) for a in command]
                if python:
                    args = [sys.executable, *args]
                extra = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": host_device_flags(devices_per_process),
                         **(env or {})}
                if via_env:
                    extra |= {"MLA_JAX_COORDINATOR": coordinator, "MLA_JAX_NUM_PROCESSES": str(num_processes),
                              "MLA_JAX_PROCESS_ID": str(i)}
                else:
                    extra |= {"MLA_JAX_COORDINATOR": None, "MLA_JAX_NUM_PROCESSES": None, "MLA_JAX_PROCESS_ID": None}
                out, err = (open(os.path.join(tmp, f"{i}.{s}"), "w+b") for s in ("out", "err"))
                logs.append((out, err))
                # Own session: ending a process takes whatever it started along (and nothing else).
                started.append(subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                                env=cli_env(**extra), cwd=cwd, start_new_session=True))
            why = _wait(started, timeout)
        finally:
            killed = [_end(p) for p in started]
        procs = []
        for i, (p, (out, err), k) in enumerate(zip(started, logs, killed)):
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode("utf-8", errors="replace"))
                f.close()
            procs.append(Proc(i, None if k else p.returncode, without_gloo(texts[0]), strip_noise(texts[1])))
    if why and check:
        raise JobFailed(why, procs)
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> str | None:
    """Waits for every process to end; the reason the job was cut short, or None."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, rc in enumerate(codes) if rc not in (None, 0)]
        if failed:
            return f"process {failed[0]} exited with {codes[failed[0]]}; the others were stopped"
        if all(rc == 0 for rc in codes):
            return None
        if time.monotonic() > deadline:
            return f"the job did not finish within {timeout:g} s; every process was stopped"
        time.sleep(0.1)


def _end(p: subprocess.Popen) -> bool:
    """Stops process `p` and its session if still running (SIGTERM, then SIGKILL after 5 s); whether it had to."""
    if p.poll() is not None:
        return False
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    return True
