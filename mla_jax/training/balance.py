"""DeepSeek's MoE load-balancing rules, as pure functions of the router statistics.

* V3 auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): after each step, every expert's
  `e_score_correction_bias` moves by γ towards balance, b_i <- b_i + γ·sign(mean_load - load_i): an
  under-loaded expert is raised, an over-loaded one lowered, outside the gradient.
* V3 sequence-wise balance loss (eq. 17-20), per sequence of T real tokens:
  f_i = E/(K·T)·#{t: i in top-K(t)}, s'_{i,t} = s_{i,t}/Σ_j s_{j,t}, P_i = (1/T)·Σ_t s'_{i,t},
  L = α·Σ_i f_i·P_i. A "sequence" is a packed row (the context the model sees), as in DeepSeek's
  training; the loss is averaged over rows.
* V2 expert-level balance loss (DeepSeek-V2 §2.2.3): the same f_i·P_i over all T' real tokens of the
  batch, L = α1·Σ_i f_i·P_i. For softmax scores s' = s.
Padding tokens (segment id 0) count nowhere. f is a count, so only P (the scores) carries gradient.

Dimensions: B batch, T length, E routed experts, K experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chosen(experts: jax.Array, n_experts: int, token_mask: jax.Array) -> jax.Array:
    """experts [B,T,K] -> [B,T,E] float32: 1 where a real token chose expert e, else 0."""
    one_hot = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)
    return jnp.einsum("BTKE,BT->BTE", one_hot, token_mask.astype(jnp.float32))


def normalised_scores(scores: jax.Array) -> jax.Array:
    """s' = s / Σ_j s_j per token ([..., E]); identity for softmax scores."""
    scores = scores.astype(jnp.float32)
    return scores / jnp.sum(scores, axis=-1, keepdims=True)


def sequence_balance_loss(scores: jax.Array, experts: jax.Array, token_mask: jax.Array, alpha: float) -> jax.Array:
    """V3's loss per sequence: scores [B,T,E], experts [B,T,K], token_mask [B,T] -> [B] (0 for empty rows)."""
    e, k = scores.shape[-1], experts.shape[-1]
    mask = token_mask.astype(jnp.float32)
    length = jnp.sum(mask, axis=1)  # [B]
    safe = jnp.maximum(length, 1.0)
    f = e / (k * safe[:, None]) * jnp.sum(chosen(experts, e, token_mask), axis=1)  # [B,E]
    p = jnp.einsum("BTE,BT->BE", normalised_scores(scores), mask) / safe[:, None]
    return alpha * jnp.einsum("BE,BE->B", jax.lax.stop_gradient(f), p)


def expert_balance_loss(scores: jax.Array, experts: jax.Array, token_mask: jax.Array, alpha: float) -> jax.Array:
    """V2's expert-level loss over all real tokens of the batch: scores [B,T,E], experts [B,T,K] -> scalar."""
    e, k = scores.shape[-1], experts.shape[-1]
    mask = token_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    f = e / (k * count) * jnp.sum(chosen(experts, e, token_mask), axis=(0, 1))  # [E]
    p = jnp.einsum("BTE,BT->E", normalised_scores(scores), mask) / count
    return alpha * jnp.einsum("E,E->", jax.lax.stop_gradient(f), p)


def expert_load(experts: jax.Array, n_experts: int, token_mask: jax.Array) -> jax.Array:
    """Real tokens routed to each expert: experts [B,T,K] -> [E] float32."""
    return jnp.sum(chosen(experts, n_experts, token_mask), axis=(0, 1))


def update_bias(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
    """V3's sign rule: bias [E], load [E] -> bias + γ·sign(mean(load) - load), in float32."""
    load = load.astype(jnp.float32)
    return (bias.astype(jnp.float32) + gamma * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


def max_over_mean(load: jax.Array) -> jax.Array:
    """Imbalance of a load vector [E]: max/mean (1 = perfectly balanced, E = one expert takes all)."""
    return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)
