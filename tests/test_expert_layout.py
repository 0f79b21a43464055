"""The CPU decode layout of the routed experts (`with_expert_layout`): one array per expert, same logits.

Which models get it: float32 experts in a run of one MoE layer. The greedy-generation tests
(tests/test_generate*.py, tests/test_parity.py) decode with it wherever their models qualify.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.moe import Experts, with_expert_layout

CONFIG = Config.preset("deepseek-v2-lite").replace(
    num_hidden_layers=2, vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    max_position_embeddings=64)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 61, (3, 9)), jnp.int32)


def layouts(model):
    return [e.by_expert for _, e in nnx.iter_graph(model) if isinstance(e, Experts)]


def test_one_moe_layer_is_split_per_expert_and_gives_the_same_logits():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    view = with_expert_layout(model)
    [split] = layouts(view)
    gate = model.stacks[1].mlp.experts.gate_proj[...]  # [L=1, E, D, F]
    assert len(split) == 3 and len(split[0]) == CONFIG.n_routed_experts
    np.testing.assert_array_equal(split[0][5][...], gate[:, 5])
    assert layouts(model) == [None]  # the model itself is left as it was
    np.testing.assert_allclose(view(TOKENS), model(TOKENS), rtol=1e-6, atol=1e-6)


def test_scanned_runs_and_bfloat16_experts_keep_the_stack():
    """L > 1: the scan would copy every expert's layer slice each step; bf16: converted per expert anyway."""
    deeper = Transformer(CONFIG.replace(num_hidden_layers=3), rngs=nnx.Rngs(0))
    assert layouts(with_expert_layout(deeper)) == [None]
    bf16 = Transformer(CONFIG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert layouts(with_expert_layout(bf16)) == [None]
