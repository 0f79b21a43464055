"""Run by tests/test_parallel_mesh.py in a subprocess with 8 host devices: every preset on a mesh
computes what one device computes. Prints one JSON line per case.

Usage: python tests/parallel_mesh_check.py CASE... where CASE is "<mesh>@<explicit|auto>", e.g. data=8@explicit.
"""

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=8", *(
    f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from training.train_helpers import batch  # noqa: E402

from mla_jax import Config, Transformer, parallel  # noqa: E402
from mla_jax.generate import generate  # noqa: E402
from mla_jax.training.config import TrainConfig  # noqa: E402
from mla_jax.training.step import Trainer  # noqa: E402

# Every split of every preset divides: 8 heads, D 64, F 64 / 16, 8 experts, vocabulary 96, batch 8.
CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=2, vocab_size=96, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
    num_attention_heads=8, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=128)
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11], [12, 13, 14, 15, 16, 17], [1, 1, 1], [2, 2], [3]]
TC = TrainConfig(steps=4, seq_len=12, batch_size=8, lr=1e-3, warmup_steps=0, param_dtype="float32")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def collectives(compiled) -> dict:
    text = compiled.as_text()
    return {c: len(re.findall(rf"= [^=]*\b{c}(-start)?\(", text)) for c in COLLECTIVES}


def run(model, tokens, train_batch):
    """(logits, generated tokens, state after one step, metrics, HLO collectives of forward and step)."""
    forward = jax.jit(lambda m, t: m(t))
    with parallel.on_mesh(parallel.mesh_of(nnx.state(model))):
        logits = forward(model, tokens)
        hlo_forward = collectives(forward.lower(model, tokens).compile())
    out = generate(model, PROMPTS, 16, cache_dtype=jnp.float32)
    trainer = Trainer(model, TC)
    state = trainer.init_state()
    with parallel.on_mesh(trainer.mesh):
        hlo_step = collectives(trainer._step_fn.lower(state, trainer.frozen, trainer.place_batch(train_batch)).compile())
    state, metrics = trainer.train_step(state, train_batch)
    return logits, out, jax.device_get(state["params"]), metrics, hlo_forward, hlo_step


def main(cases):
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CONFIG.vocab_size)
    train_batch = batch(3, rows=8, t=12, vocab=CONFIG.vocab_size)
    ref_logits, ref_out, ref_params, ref_metrics, _, _ = run(model, tokens, train_batch)
    for case in cases:
        axes, types = case.split("@")
        mesh = parallel.make_mesh(axes, axis_types=types)
        sharded = parallel.shard_model(nnx.clone(model), mesh)
        t = jax.device_put(tokens, parallel.shardings(mesh).batch(tokens.shape))
        logits, out, params, metrics, hlo_forward, hlo_step = run(sharded, t, train_batch)
        print(json.dumps({
            "case": case,
            "logits": rel(logits, ref_logits),
            "tokens_equal": out == ref_out,
            "params": max(rel(params[n], ref_params[n]) for n in ref_params),
            "metrics": {k: abs(metrics[k] - ref_metrics[k]) / max(abs(ref_metrics[k]), 1e-30)
                        for k in ref_metrics if np.isfinite(ref_metrics[k])},
            "forward": hlo_forward, "step": hlo_step,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
