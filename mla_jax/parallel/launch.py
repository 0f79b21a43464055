"""The command line's way onto a mesh and onto several hosts: `--mesh`, `--mesh-axes` and the
`jax.distributed` flags, shared by `mla-jax generate` and `mla-jax finetune`.

Multi-host: every host runs the same command with its own `--process-id` (or MLA_JAX_PROCESS_ID);
`--coordinator host:port` (MLA_JAX_COORDINATOR) and `--num-processes` (MLA_JAX_NUM_PROCESSES) are
the same everywhere. `jax.distributed.initialize` then joins the processes before any device is
touched, and the mesh spans every process's devices.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from mla_jax.errors import UsageError

AXIS_TYPES = ("auto", "explicit")  # mla_jax.parallel.mesh.AXIS_TYPES

ENV = {"coordinator": "MLA_JAX_COORDINATOR", "num_processes": "MLA_JAX_NUM_PROCESSES",
       "process_id": "MLA_JAX_PROCESS_ID"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="run on a device mesh, axes named after presets: data, fsdp, tensor, expert "
                        "(e.g. data=2,tensor=4; default: one device)")
    p.add_argument("--mesh-axes", choices=AXIS_TYPES, default="explicit",
                   help="jax mesh axis types (default explicit)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"multi-host: process 0's address (or ${ENV['coordinator']})")
    p.add_argument("--num-processes", type=int, default=None, help=f"multi-host: processes in the job (or ${ENV['num_processes']})")
    p.add_argument("--process-id", type=int, default=None, help=f"multi-host: this process's index (or ${ENV['process_id']})")


def distributed_settings(args) -> dict | None:
    """{coordinator_address, num_processes, process_id} from the flags or the environment, or None."""
    return settings(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                    getattr(args, "process_id", None))


def settings(coordinator=None, num_processes=None, process_id=None) -> dict | None:
    """{coordinator_address, num_processes, process_id}: each argument, else its MLA_JAX_* variable;
    None when neither names a job (a single-process run)."""
    values = {}
    for name, value in (("coordinator", coordinator), ("num_processes", num_processes), ("process_id", process_id)):
        if value is None and os.environ.get(ENV[name]):
            value = os.environ[ENV[name]]
        values[name] = value
    if all(v is None for v in values.values()):
        return None
    missing = [f"--{k.replace('_', '-')} (${ENV[k]})" for k, v in values.items() if v is None]
    if missing:
        raise UsageError(f"multi-host start-up needs --coordinator, --num-processes and --process-id; missing {missing}")
    try:
        n, i = int(values["num_processes"]), int(values["process_id"])
    except ValueError:
        raise UsageError(f"--num-processes / --process-id: expected integers, found {values['num_processes']!r}, "
                         f"{values['process_id']!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--process-id {i} with --num-processes {n}: expected 0 <= id < count")
    if not re.fullmatch(r"\S+:\d+", str(values["coordinator"])):
        raise UsageError(f"--coordinator {values['coordinator']!r}: expected HOST:PORT (process 0's address), "
                         "e.g. 10.0.0.1:1234")
    return {"coordinator_address": str(values["coordinator"]), "num_processes": n, "process_id": i}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to a multi-host job (`jax.distributed.initialize`) when the arguments or
    MLA_JAX_COORDINATOR / MLA_JAX_NUM_PROCESSES / MLA_JAX_PROCESS_ID name one; returns whether it did.

    Call it first, before anything touches a device. The one place the package joins a job, so a
    CPU job works too: the CPU backend exchanges data between processes only through a collectives
    implementation, gloo (TCP) unless $JAX_CPU_COLLECTIVES_IMPLEMENTATION chose another ("mpi").
    jax 0.10 defaults to gloo; older versions had none, and their cross-process collectives fail.
    """
    import jax

    job = settings(coordinator, num_processes, process_id)
    if job is None:
        return False
    if jax.distributed.is_initialized():  # joined already (a program that also calls the CLI's main)
        if (jax.process_count(), jax.process_index()) != (job["num_processes"], job["process_id"]):
            raise UsageError(f"this process already runs as process {jax.process_index()} of {jax.process_count()}; "
                             f"asked to join as {job['process_id']} of {job['num_processes']}")
        return True
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**job)
    return True


def is_main_process() -> bool:
    """Whether this process speaks for the job (prints, writes shared files): process 0, or the only one."""
    import jax

    return jax.process_index() == 0


def native_stdout_to_stderr() -> None:
    """From now on, what native libraries write to stdout goes to stderr; Python's `print` keeps stdout.

    The CLI's stdout is its result (the generated text). In a CPU job, gloo writes a line to the
    process's stdout ("[Gloo] Rank 0 is connected to 1 peer ranks...") each time a new group of
    devices first exchanges data, which would land in the middle of the streamed text.
    """
    sys.stdout.flush()
    python_stdout = os.dup(1)
    os.dup2(2, 1)  # file descriptor 1 (native code's stdout) is now stderr
    sys.stdout = open(python_stdout, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def start(args):
    """Joins the multi-host job when asked, then the mesh `--mesh` names (None without one)."""
    from mla_jax.parallel.mesh import make_mesh

    if initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                  getattr(args, "process_id", None)):
        native_stdout_to_stderr()
    if args.mesh is None:
        return None
    try:
        return make_mesh(args.mesh, axis_types=args.mesh_axes)
    except ValueError as e:
        raise UsageError(str(e) if str(e).startswith("--mesh") else f"--mesh {args.mesh}: {e}") from None
