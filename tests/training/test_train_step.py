"""The train step: exact accumulation, float32 masters under bfloat16 weights, decay mask, LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax.training.config import TrainConfig
from mla_jax.training.optim import decays
from mla_jax.training.step import Trainer
from train_helpers import batch, tiny_model

@pytest.fixture(scope="module")
def model32():
    return tiny_model()


def _rel(a: dict, b: dict) -> float:
    num = sum(float(jnp.sum((a[k] - b[k]) ** 2)) for k in a)
    return (num / sum(float(jnp.sum(b[k] ** 2)) for k in b)) ** 0.5


def test_accumulated_gradient_equals_the_whole_batch_gradient(model32):
    # Rows carry 11, 10, 9, 8 targets: a mean per micro batch would weigh them wrongly.
    trainer = Trainer(model32, TrainConfig(param_dtype="float32", seq_aux_alpha=0.01))
    state = trainer.init_state()
    whole, _ = trainer.gradients(state, batch(0, micro=1))
    split, _ = trainer.gradients(state, batch(0, micro=2))
    assert _rel(split, whole) < 1e-6


@pytest.fixture(scope="module")
def bf16_run():
    model = tiny_model("bfloat16")
    # lr 1e-6 moves a weight of ~0.02 by far less than bfloat16's spacing there (~1e-4).
    trainer = Trainer(model, TrainConfig(param_dtype="bfloat16", lr=1e-6, warmup_steps=0, steps=3, weight_decay=0.0))
    state = trainer.init_state()
    before = jax.device_get(state["params"])
    for s in range(3):
        state, _ = trainer.train_step(state, batch(s))
    return trainer, before, state


def test_masters_accumulate_updates_below_bfloat16_resolution(bf16_run):
    trainer, before, state = bf16_run
    name = "stacks.0.self_attn.q_b_proj.kernel"
    master = np.asarray(state["params"][name])
    lost_in_bf16 = master.astype(jnp.bfloat16) == before[name].astype(jnp.bfloat16)
    moved = master != before[name]
    assert np.mean(moved & lost_in_bf16) > 0.5


def test_optimizer_state_and_masters_are_float32_weights_bfloat16(bf16_run):
    trainer, _, state = bf16_run
    float_leaves = [x for x in jax.tree.leaves((state["params"], state["opt"])) if jnp.issubdtype(x.dtype, jnp.floating)]
    weights = nnx.state(trainer.model(state), nnx.Param)
    assert ({x.dtype for x in float_leaves}, {x.dtype for x in jax.tree.leaves(weights)}) == (
        {jnp.dtype("float32")}, {jnp.dtype("bfloat16")})


@pytest.mark.parametrize("name,decay", [
    ("embed_tokens", True),
    ("stacks.0.self_attn.q_a_proj.kernel", True),
    ("stacks.1.mlp.experts.gate_proj", True),
    ("stacks.1.mlp.gate", True),
    ("stacks.0.self_attn.q_a_proj.kernel.lora_a", True),
    ("stacks.0.input_layernorm.weight", False),
    ("stacks.0.self_attn.kv_a_layernorm.weight", False),
    ("norm.weight", False),
    ("stacks.0.self_attn.q_a_proj.bias", False),
    ("stacks.0.mlp.down_proj.bias", False),
])
def test_weight_decay_skips_norms_and_biases(name, decay):
    assert decays(name) is decay


@pytest.fixture(scope="module")
def lora_run(model32):
    trainer = Trainer(model32, TrainConfig(param_dtype="float32", lora_rank=4, lr=1e-2, warmup_steps=0, steps=2))
    state = trainer.init_state()
    start = jax.device_get(nnx.state(trainer.model(state), nnx.Param))
    for s in range(2):
        state, _ = trainer.train_step(state, batch(s))
    return trainer, start, state


def test_lora_starts_from_the_base_model_exactly(lora_run, model32):
    _, start, _ = lora_run
    base = jax.device_get(nnx.state(model32, nnx.Param))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), start, base))


def _is_attention_projection(path) -> bool:
    return "self_attn" in path and path[-1] == "kernel"


@pytest.mark.parametrize("group,changed", [
    ("attention projections", True),  # q_a/q_b, kv_a, kv_b, o: every one adapted
    ("everything else", False),  # experts, router, shared experts, dense MLPs, norms, embeddings
])
def test_lora_changes_only_attention_projections(lora_run, group, changed):
    trainer, start, state = lora_run
    before = dict(nnx.to_flat_state(start))
    after = dict(nnx.to_flat_state(jax.device_get(nnx.state(trainer.model(state), nnx.Param))))
    paths = [p for p in before if _is_attention_projection(p) == (group == "attention projections")]
    differs = {p: not np.array_equal(before[p][...], after[p][...]) for p in paths}
    assert paths and all(d is changed for d in differs.values()), differs
