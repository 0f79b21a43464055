"""What the two-process test computes, the same way in one process and in every process of a job:
float32 logits of a batch, 16 greedy tokens per prompt through the paged cache, and one fine-tuning
step (updated weights and metrics), each brought to host memory whole (`gather`).

On a mesh spanning processes no process holds a whole sharded array; `gather` collects the shards
(`multihost_utils.process_allgather`, a collective every process joins).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.train_helpers import batch  # noqa: E402

from mla_jax import parallel  # noqa: E402
from mla_jax.generate import generate  # noqa: E402
from mla_jax.training.config import TrainConfig  # noqa: E402
from mla_jax.training.step import Trainer  # noqa: E402

# The tiny checkpoint transformers wrote (checkpoints/tiny_v3: 4 heads, 8 experts, vocabulary 512,
# D 64): every split of a 4-device mesh divides, and so do the 4 rows below.
PROMPTS = [[0, 5, 6, 7, 8], [0, 9], [0, 10, 11, 12], [0, 13, 14, 15, 16, 17, 18]]
ROWS, LENGTH, NEW_TOKENS = 4, 16, 16
CLI_BEGIN, CLI_END = "=== mla-jax generate", "=== end"  # around what the CLI printed (mesh_worker.py)
# Adam's first update of a weight is lr·g/(|g| + eps): lr·sign(g) for nearly every weight, but where
# |g| is of the order of eps, the float32 rounding of g (its summation order differs between one
# device and a mesh) moves that weight by a good part of lr. With eps = 1e-8 one weight of 4,096 in
# a kv_b_proj (|g| ~ 5e-9) moved by 0.31·lr on one process and 0.40·lr on the mesh, 1.3e-5 of the
# tensor's norm; every other weight agreed to 6e-8. eps = 1e-6 keeps the update a smooth function
# of the gradient, so the comparison checks the gradients and the update, not that one rounding.
TC = TrainConfig(steps=4, seq_len=12, batch_size=ROWS, lr=1e-3, warmup_steps=0, eps=1e-6, param_dtype="float32")


def gather(x) -> np.ndarray:
    """The whole of array `x` on the host, whichever processes hold its shards."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, vocab, size=(ROWS, LENGTH)).astype(np.int32)


def compute(model) -> dict[str, np.ndarray]:
    """{"logits", "generated", "metric.NAME", "param.NAME"} of `model` (on a mesh or one device)."""
    mesh = parallel.mesh_of(model)
    ids = tokens(model.config.vocab_size)
    if mesh is not None:
        ids = jax.device_put(ids, parallel.shardings(mesh).batch(ids.shape))
    with parallel.on_mesh(mesh):
        logits = jax.jit(lambda m, t: m(t))(model, ids)
    out = {"logits": gather(logits)}
    generated = generate(model, PROMPTS, NEW_TOKENS, cache_dtype=jnp.float32)
    out["generated"] = np.asarray(generated, np.int32)  # greedy, no stop tokens: 16 per prompt
    trainer = Trainer(model, TC)
    state, metrics = trainer.train_step(trainer.init_state(), batch(3, rows=ROWS, t=TC.seq_len,
                                                                    vocab=model.config.vocab_size))
    out |= {f"metric.{k}": np.asarray(v) for k, v in metrics.items()}
    out |= {f"param.{k}": gather(v) for k, v in state["params"].items()}
    return out


def compare(got: dict, want: dict) -> dict[str, float]:
    """Relative error of each entry (0 for the generated tokens when equal, 1 when not)."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    errors = {}
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, (k, g.shape, w.shape)
        if k == "generated":
            errors[k] = float(not np.array_equal(g, w))
        elif np.all(np.isfinite(w)):
            w64, g64 = w.astype(np.float64), g.astype(np.float64)
            errors[k] = float(np.linalg.norm(g64 - w64) / max(np.linalg.norm(w64), 1e-30))
    return errors
