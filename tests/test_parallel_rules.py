"""The logical-axis table and its presets: which dimension of which array each mesh axis splits.

Meshes here are abstract (no devices needed); running on a mesh is tested in test_parallel_mesh.py.
"""

import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from mla_jax import Config
from mla_jax.cache import PagedCache
from mla_jax.parallel import PRESETS, param_axes, parse_mesh
from mla_jax.parallel.rules import cache_sharding, spec
from mla_jax.weights import abstract_model, model_variables

CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=3, vocab_size=96, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=4, kv_lora_rank=32, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=128)


def mesh(**axes):
    return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Explicit,) * len(axes))


def specs(m):
    model = abstract_model(CONFIG)
    out = {}
    for path, var in model_variables(model):
        name = ".".join(map(str, path))
        out[name] = spec(m, param_axes(name, len(var.shape)), tuple(var.shape))
    return out


def test_every_large_weight_has_logical_axes():
    model = abstract_model(CONFIG)
    for path, var in model_variables(model):
        name = ".".join(map(str, path))
        axes = param_axes(name, len(var.shape))
        if len(var.shape) >= 3 or name in ("embed_tokens", "lm_head.kernel"):  # every matrix of the model
            assert any(a not in (None, "layers") for a in axes), name


def test_data_parallel_replicates_every_weight():
    assert all(all(d is None for d in v) for v in specs(mesh(data=4)).values())


def test_fsdp_splits_the_model_dim_of_weights_never_the_layer_axis():
    s = specs(mesh(fsdp=4))
    assert s["stacks.1.mlp.experts.gate_proj"] == P(None, None, "fsdp", None)  # [L,E,D,F]
    assert s["stacks.0.self_attn.o_proj.kernel"] == P(None, None, None, "fsdp")  # [L,N,Hv,D]
    assert s["lm_head.kernel"] == P("fsdp", None)
    assert s["embed_tokens"] == P(None, "fsdp")


def test_tensor_parallel_splits_heads_and_hidden():
    s = specs(mesh(tensor=4))
    assert s["stacks.0.self_attn.q_b_proj.kernel"] == P(None, None, "tensor", None)  # [L,Q,N,H]
    assert s["stacks.0.self_attn.kv_b_proj.kernel"] == P(None, None, "tensor", None)
    assert s["stacks.0.self_attn.o_proj.kernel"] == P(None, "tensor", None, None)
    assert s["stacks.0.mlp.gate_proj.kernel"] == P(None, None, "tensor")
    assert s["stacks.1.mlp.experts.down_proj"] == P(None, None, "tensor", None)
    assert s["stacks.0.self_attn.kv_a_proj_with_mqa.kernel"] == P(None, None, None)  # the latent: whole


def test_expert_parallel_splits_experts_only():
    s = specs(mesh(expert=4))
    assert s["stacks.1.mlp.experts.up_proj"] == P(None, "expert", None, None)
    assert all(v == P(*[None] * len(v)) for k, v in s.items() if "experts." not in k or "shared" in k)


def test_a_combination_splits_each_dimension_by_its_presets():
    s = specs(mesh(data=2, fsdp=2, expert=2, tensor=2))
    assert s["stacks.1.mlp.experts.gate_proj"] == P(None, "expert", "fsdp", "tensor")
    b = spec(mesh(data=2, fsdp=2, expert=2, tensor=2), ("batch", None), (8, 5))
    assert b == P(("data", "fsdp", "expert"), None)


def test_a_split_that_does_not_divide_is_dropped():
    assert spec(mesh(tensor=4), ("heads",), (6,)) == P(None)
    assert spec(mesh(data=2, expert=4), ("batch",), (2,)) == P(None)


def test_checkpoint_names_get_the_same_axes_without_the_layer_axis():
    assert param_axes("layers.4.mlp.experts.gate_proj", 3) == ("experts", "embed", "expert_hidden")
    assert param_axes("stacks.1.mlp.experts.gate_proj", 4) == ("layers", "experts", "embed", "expert_hidden")


def test_cache_pages_split_like_the_batch_and_not_by_heads():
    import jax, jax.numpy as jnp
    sds = jax.ShapeDtypeStruct
    cache = PagedCache(sds((3, 16, 4, 40), jnp.bfloat16), None, sds((4, 4), jnp.int32), sds((4,), jnp.int32))
    s = cache_sharding(mesh(data=2, tensor=2), cache)
    assert s.pages.spec == P(None, "data", None, None) and s.block_table.spec == P("data", None)
    with pytest.raises(ValueError, match="15 pages do not split"):
        cache_sharding(mesh(data=2), cache._replace(pages=sds((3, 15, 4, 40), jnp.bfloat16)))


def test_mesh_text():
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "tensor": 4}
    assert parse_mesh("fsdp") == {"fsdp": -1}
    for bad, msg in (("model=2", "unknown axis 'model'"), ("data=2,data=2", "given twice"), ("data=0", "positive"),
                     ("data:2", "is not axis=size"), ("", "expected axis=size")):
        with pytest.raises(ValueError, match=msg):
            parse_mesh(bad)
    assert set(PRESETS) == {"data", "fsdp", "tensor", "expert"}
