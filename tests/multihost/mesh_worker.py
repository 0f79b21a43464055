"""Run by tests/multihost/test_two_processes.py in each process of a two-process job (launch.py):
joins the job (`mla_jax.parallel.initialize`, from $MLA_JAX_*); for each case loads the checkpoint
onto a mesh over both processes' devices and writes what `mesh_cases.compute` returns to
OUT/CASE.PROCESS.npz; then, with --cli, runs `mla-jax generate ARGS...` (its `main`, in this process,
with the job's --coordinator / --num-processes / --process-id flags), between two marker lines.

Usage: python mesh_worker.py CHECKPOINT OUT CASE... [--cli ARGS...]
CASE is "<mesh>@<explicit|auto>", e.g. fsdp=4@explicit.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mla_jax  # noqa: E402
from mla_jax import parallel  # noqa: E402
from mesh_cases import CLI_BEGIN, CLI_END, compute  # noqa: E402


def main(checkpoint: str, out: str, cases: list[str], cli: list[str]) -> int:
    assert parallel.initialize(), "started without a job ($MLA_JAX_COORDINATOR ...)"
    import jax

    for case in cases:
        axes, types = case.split("@")
        mesh = parallel.make_mesh(axes, axis_types=types)
        model = mla_jax.load(checkpoint, dtype="float32", mesh=mesh)
        result = compute(model)
        np.savez(os.path.join(out, f"{case}.{jax.process_index()}.npz"), **result)
        print(f"{case}: done", flush=True)
    if not cli:
        return 0
    from mla_jax import cli as command

    job = ["--coordinator", os.environ["MLA_JAX_COORDINATOR"], "--num-processes", str(jax.process_count()),
           "--process-id", str(jax.process_index())]
    print(CLI_BEGIN, flush=True)
    rc = command.main(["generate", *cli, *job])
    print(CLI_END, flush=True)
    return rc


if __name__ == "__main__":
    args = sys.argv[1:]
    cli = args[args.index("--cli") + 1:] if "--cli" in args else []
    args = args[:args.index("--cli")] if "--cli" in args else args
    sys.exit(main(args[0], args[1], args[2:], cli))
