"""Shared by the training tests: a tiny V3 config and model (no torch needed), hand-made batches."""

import functools

import jax
import numpy as np
from flax import nnx

from mla_jax.config import Config
from mla_jax.model import Transformer

# Two layers (dense, then MoE with 8 experts, noaux_tc over 2 groups): small enough to compile fast.
TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=2, topk_group=1, bos_token_id=0, eos_token_id=1,
)


def batch(seed: int, rows: int = 4, t: int = 12, micro: int = 1, vocab: int = 64) -> dict:
    """[micro, rows/micro, t] random tokens; row r ends with r padding tokens, so rows weigh differently."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(rows, t)).astype(np.int32)
    segment_ids = np.ones((rows, t), np.int32)
    for r in range(rows):
        segment_ids[r, t - r:] = 0
    mask = segment_ids.astype(bool)
    mask[:, -1] = False
    mask[:, :-1] &= segment_ids[:, 1:] != 0
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t))
    full = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": mask,
            "segment_ids": segment_ids, "positions": np.where(segment_ids != 0, positions, 0).astype(np.int32)}
    return {k: v.reshape(micro, rows // micro, t) for k, v in full.items()}


@functools.lru_cache(maxsize=None)
def tiny_model(dtype: str = "float32") -> Transformer:
    """One TINY_V3 model per dtype for the whole session (building one eagerly takes seconds).

    Shared: tests must not modify it (Trainer copies what it trains). The bfloat16 model is the
    float32 one with its parameters cast; the router bias stays float32, as in any loaded model.
    """
    model = Transformer(Config.from_hf(TINY_V3), rngs=nnx.Rngs(0))
    if dtype == "float32":
        return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), params), rest)
