"""Next-token cross-entropy in float32 with a target mask.

Returns the masked sum and the count separately, so that gradient accumulation can divide by the
token count of the whole batch (every target weighs the same, however the batch is split).

Dimensions: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B,T,V], targets [B,T] int, mask [B,T] bool -> (sum of -log p(target) over mask, count)."""
    if logits.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape}, targets {targets.shape} and mask {mask.shape} "
                         "must agree on [B,T]")
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)
