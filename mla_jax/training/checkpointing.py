"""Resumable run checkpoints: orbax's `CheckpointManager`, keeping the last N steps.

Each step directory holds two items: `state` (the train state pytree: float32 master weights,
router biases, optimizer state, RNG key, step) and `meta` (JSON: data position, data fingerprint,
the resolved train config). Orbax writes each step into a temporary directory and renames it when
complete, so an interrupted save never looks like a checkpoint. Saving is synchronous: the train
step donates the state's buffers, so nothing may still be reading them once `save` returns.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class RunCheckpoints:
    def __init__(self, directory: str | os.PathLike, keep: int):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, meta: dict) -> None:
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """(state, meta) saved at `step`; `abstract_state` gives every leaf's shape and dtype, and
        its layout where it has one (a state on a mesh: each device reads only its shards)."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step}; saved steps are {self.steps()}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
            else device), abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.meta

    def discard_after(self, step: int) -> None:
        """Deletes the checkpoints past `step`: a run resumed from an earlier step writes them anew."""
        for later in [s for s in self.steps() if s > step]:
            self.manager.delete(later)

    def close(self) -> None:
        self.manager.close()
