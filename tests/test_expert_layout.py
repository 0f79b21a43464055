"""The CPU decode layout of the routed experts (`with_expert_layout`): one array per expert, same output.

Which models get it: float32 experts in a run of one MoE layer. The greedy-generation tests
(tests/test_generate_api.py, whose model has such a run) decode with it.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.moe import Experts, MoE, with_expert_layout

CONFIG = Config.preset("deepseek-v2-lite").replace(
    num_hidden_layers=2, vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    max_position_embeddings=64)


def layouts(model):
    return [e.by_expert for _, e in nnx.iter_graph(model) if isinstance(e, Experts)]


def test_moe_split_per_expert_gives_the_same_output():
    moe = MoE(CONFIG, rngs=nnx.Rngs(0))
    view = with_expert_layout(moe)
    [split] = layouts(view)
    assert len(split) == 3 and len(split[0]) == CONFIG.n_routed_experts
    np.testing.assert_array_equal(split[2][5][...], moe.experts.down_proj[...][5])
    assert layouts(moe) == [None]  # the module itself is left as it was
    x = jax.random.normal(jax.random.key(1), (3, 5, CONFIG.hidden_size))
    run = nnx.jit(lambda m, x: m(x)[0])
    np.testing.assert_allclose(run(view, x), run(moe, x), rtol=1e-6, atol=1e-6)


def test_only_float32_runs_of_one_moe_layer_are_split():
    """L > 1: the scan would copy every expert's layer slice each step; bf16: converted per expert anyway."""

    def split(config, dtype=jnp.float32):  # shapes only: nothing is allocated
        return layouts(nnx.eval_shape(lambda: with_expert_layout(Transformer(config, param_dtype=dtype,
                                                                             rngs=nnx.Rngs(0)))))

    [one] = split(CONFIG)
    assert one is not None and one[0][0].shape == (1, CONFIG.hidden_size, CONFIG.moe_intermediate_size)
    assert split(CONFIG.replace(num_hidden_layers=3)) == [None]
    assert split(CONFIG, jnp.bfloat16) == [None]
