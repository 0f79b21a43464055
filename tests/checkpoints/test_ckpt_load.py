"""`mla_jax.load` / `mla_jax.save`: weights restored straight into place, sharded on a mesh.

Models here are built by our own Transformer (no torch): `save` then `load` must give back the same
weights in the same layout `convert` writes; with a 4-device mesh every device must hold only its
shard of the sharded weights.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import store
from mla_jax.config import Config
from mla_jax.parallel import make_mesh
from mla_jax.weights import load, model_variables, save, slot
from mla_jax.model import Transformer

TINY = dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=2, topk_group=1,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = Transformer(Config.from_hf(TINY), rngs=nnx.Rngs(3))
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save(model, path)
    return model, path


def _weights(model):
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in model_variables(model)}


def test_public_load_and_save_are_the_package_functions(saved):
    """`mla_jax.load` / `mla_jax.save` stay functions whichever module was imported first."""
    _, path = saved
    assert mla_jax.load is load and mla_jax.save is save
    assert isinstance(mla_jax.load(path, dtype=jnp.float32), Transformer)


def test_save_then_load_gives_back_every_weight(saved):
    model, path = saved
    original, restored = _weights(model), _weights(load(path, dtype=jnp.float32))
    assert original.keys() == restored.keys() and all(np.array_equal(original[k], restored[k]) for k in original)


def test_save_writes_the_converter_layout(saved):
    _, path = saved
    layout = store.read_layout(path)
    assert (layout["format"], layout["dtype"], sorted(os.listdir(path))) == (
        store.FORMAT, "float32", [store.CONFIG_FILE, store.LAYOUT_FILE, store.STATE_DIR])


def test_save_stores_one_entry_per_layer_as_the_converter_does(saved):
    """The model stacks its layers; the checkpoint keeps the hub's per-layer layout."""
    model, path = saved
    stored = store.stored_variables(store.read_layout(path))
    assert {p[1] for p in stored if p[0] == "layers"} == set(range(model.config.num_hidden_layers))
    assert not [p for p in stored if p[0] == "stacks"]
    assert stored[("layers", 1, "mlp", "gate")][0] == tuple(model.stacks[1].mlp.gate.shape[1:])


def test_saved_config_round_trips(saved):
    model, path = saved
    assert Config.from_hf(path) == model.config


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_load_casts_to_the_requested_dtype(saved, dtype):
    _, path = saved
    model = load(path, dtype=dtype)
    assert model.stacks[1].mlp.experts.gate_proj.get_value().dtype == dtype


def test_router_bias_stays_float32(saved):
    _, path = saved
    model = load(path, dtype=jnp.bfloat16)
    assert model.stacks[1].mlp.e_score_correction_bias.get_value().dtype == jnp.float32


def _mesh():
    return make_mesh("expert=2,tensor=2", devices=jax.devices()[:4])


# checkpoint path -> the shape each of the 4 devices holds of that layer (E=8 experts over expert=2,
# N=4 heads and F=16 expert hidden over tensor=2); the stacked variable holding it is split the same
# way, whole along its layer axis
SHARDS = {
    "routed_experts_over_E_and_F": (("layers", 1, "mlp", "experts", "gate_proj"), (4, 32, 8)),
    "q_b_proj_over_heads": (("layers", 0, "self_attn", "q_b_proj", "kernel"), (24, 2, 12)),
    "kv_b_proj_over_heads": (("layers", 1, "self_attn", "kv_b_proj", "kernel"), (16, 2, 16)),
    "o_proj_over_heads": (("layers", 0, "self_attn", "o_proj", "kernel"), (2, 8, 32)),
    "norm_replicated": (("norm", "weight"), (32,)),
}


@pytest.mark.parametrize("case", sorted(SHARDS))
def test_each_device_holds_only_its_shard(saved, case):
    _, path = saved
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py sets them)")
    var_path, shard_shape = SHARDS[case]
    model = load(path, dtype=jnp.float32, mesh=_mesh())
    where = slot(model, var_path)
    array = where.variable.get_value()
    if where.index is not None:
        shard_shape = (array.shape[0], *shard_shape)
    assert sorted({s.device.id for s in array.addressable_shards}) == [0, 1, 2, 3] and all(
        s.data.shape == shard_shape for s in array.addressable_shards)


def test_sharded_model_computes_the_same_logits(saved):
    model, path = saved
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py sets them)")
    tokens = jnp.arange(10)[None] % 64
    sharded = load(path, dtype=jnp.float32, mesh=_mesh())
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(model(tokens)), rtol=1e-5, atol=1e-5)


def test_save_refuses_existing_destination(saved):
    model, path = saved
    with pytest.raises(store.CheckpointError, match="already exists; pass --overwrite"):
        save(model, path)


def test_save_copies_tokenizer(saved, tmp_path):
    model, _ = saved
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    save(model, tmp_path / "ckpt", tokenizer_from=tmp_path / "tok")
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()


def test_incomplete_directory_is_refused(saved, tmp_path):
    """A directory without config.json (e.g. an interrupted copy) is never loaded."""
    _, path = saved
    os.makedirs(tmp_path / "partial")
    os.symlink(path / store.STATE_DIR, tmp_path / "partial" / store.STATE_DIR)
    with pytest.raises(store.CheckpointError, match="not a complete mla-jax checkpoint"):
        load(tmp_path / "partial")


def test_config_that_disagrees_with_stored_shapes_is_refused(saved, tmp_path):
    _, path = saved
    copy = tmp_path / "copy"
    os.makedirs(copy)
    for name in (store.LAYOUT_FILE, store.STATE_DIR):
        os.symlink(path / name, copy / name)
    config = json.loads((path / store.CONFIG_FILE).read_text())
    (copy / store.CONFIG_FILE).write_text(json.dumps({**config, "hidden_size": 40}))
    with pytest.raises(store.CheckpointError, match=r"embed_tokens is stored with shape \(64, 32\), but config\.json implies \(64, 40\)"):
        load(copy)


def test_save_from_a_mesh_loads_back_whole(saved, tmp_path):
    """One process saving a model split over 4 devices writes every shard (here in 1 KiB chunks):
    loaded onto one device, every weight equals the original."""
    model, path = saved
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices (tests/conftest.py sets them)")
    sharded = load(path, dtype=jnp.float32, mesh=_mesh())
    back = load(save(sharded, tmp_path / "from_mesh", chunk_bytes=1 << 10), dtype=jnp.float32)
    original, restored = _weights(model), _weights(back)
    assert original.keys() == restored.keys() and all(np.array_equal(original[k], restored[k]) for k in original)
