"""Layers are scanned, not unrolled: one stacked module per run of same-kind layers, one loop each.

The runs follow DeepSeek's layer rule; the scanned model computes what running its layers one by
one computes; checkpoint paths (one per layer) and model paths (stacked) translate both ways; and
the compiled decode step holds a loop over the layers, the same program at any depth, for the CPU
and (when the CUDA plugin is installed) for an H100 compiled without a GPU.
"""

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.generate import lower_decode_step
from mla_jax.model import LayerRun, checkpoint_paths, layer_runs, model_path
from mla_jax.rope import sin_cos
from mla_jax.weights import abstract_model, model_variables

CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=4, vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=4, kv_lora_rank=32, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=2, max_position_embeddings=128)


def test_deepseek_v3_is_two_runs_dense_then_moe():
    assert layer_runs(Config.preset("deepseek-v3")) == (LayerRun(0, 3, False), LayerRun(3, 58, True))


def test_interleaved_layers_form_one_run_per_change_of_kind():
    config = CONFIG.replace(num_hidden_layers=7, first_k_dense_replace=1, moe_layer_freq=2)
    kinds = [config.is_moe_layer(i) for i in range(7)]  # F F T F T F T
    runs = layer_runs(config)
    assert runs == (LayerRun(0, 2, False), LayerRun(2, 1, True), LayerRun(3, 1, False), LayerRun(4, 1, True),
                    LayerRun(5, 1, False), LayerRun(6, 1, True))
    assert [r.moe for r in runs for _ in range(r.count)] == kinds


def test_a_model_without_experts_is_one_dense_run():
    assert layer_runs(CONFIG.replace(n_routed_experts=None)) == (LayerRun(0, 4, False),)


def test_every_layer_has_one_checkpoint_path_that_maps_back():
    model = abstract_model(CONFIG)
    seen = []
    for path, var in model_variables(model):
        for ckpt, index in checkpoint_paths(CONFIG, path):
            assert model_path(CONFIG, ckpt) == (path, index)
            if index is not None:
                assert ckpt[0] == "layers" and var.shape[0] == len(checkpoint_paths(CONFIG, path))
            seen.append(ckpt)
    layers = {p[1] for p in seen if p[0] == "layers"}
    assert layers == set(range(CONFIG.num_hidden_layers)) and len(seen) == len(set(seen))


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))  # 2 dense layers, then 2 MoE layers


@pytest.fixture(scope="module")
def scanned(model):
    """(tokens, logits, router stats) of the scanned model."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9)))
    logits, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(model, tokens)
    return tokens, logits, aux


def unrolled(model, tokens):
    """The same layers applied one by one from Python, each sliced out of its stack: the reference."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    sin, cos = sin_cos(model.config, positions)
    h, loads = model.embed(tokens), []
    for stack, run in zip(model.stacks, layer_runs(model.config)):
        graphdef, state = nnx.split(stack)
        for j in range(run.count):
            layer = nnx.merge(graphdef, jax.tree.map(lambda x: x[j], state))
            h, _, aux = layer(run.first + j, h, sin, cos, lambda i, mla, x, s, c, carry: (mla(x, s, c, None), carry), None)
            if aux is not None:
                loads.append(aux["load"])
    return model.logits(h), jnp.stack(loads)


def test_scanned_layers_compute_what_the_layers_one_by_one_compute(model, scanned):
    tokens, logits, aux = scanned
    ref_logits, ref_loads = nnx.jit(unrolled)(model, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["load"]), np.asarray(ref_loads))


def test_router_stats_are_stacked_per_moe_layer(scanned):
    _, _, aux = scanned
    moe_layers = sum(CONFIG.is_moe_layer(i) for i in range(CONFIG.num_hidden_layers))
    k, e = CONFIG.num_experts_per_tok, CONFIG.n_routed_experts
    assert aux["scores"].shape == (moe_layers, 18, e) and aux["experts"].shape == (moe_layers, 18, k)
    assert aux["load"].shape == (moe_layers, e) and np.all(np.asarray(aux["load"]).sum(axis=1) == 18 * k)


# ------------------------------------------------------------------------ the compiled program
def _cuda_plugin() -> bool:
    """The compile-only CUDA plugin (GPU_AOT.md) is installed."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def _gpu_target():
    for parent in pathlib.Path(__file__).resolve().parents:
        path = parent / "shared" / "gpu_targets" / "h100_sxm.txtpb"
        if path.is_file():
            return path
    return None


def _device(target: str):
    if target == "cpu":
        return jax.devices("cpu")[0]
    from jax.experimental import topologies

    try:
        import nvidia.cuda_nvcc as nvcc  # ptxas for the GPU compiler
        os.environ["PATH"] = f"{list(nvcc.__path__)[0]}/bin:{os.environ['PATH']}"
    except ImportError:
        pass
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=_gpu_target().read_text())
    return topo.devices[0]


def _compiled_hlo(layers: int, device) -> str:
    config = CONFIG.replace(num_hidden_layers=layers)
    step = lower_decode_step(abstract_model(config, jnp.bfloat16), 2, 64, page_size=16, device=device)
    return step.compile().as_text()


def _trip_counts(hlo: str) -> list[int]:
    return sorted(int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo))


def _count(hlo: str, op: str) -> int:
    return hlo.count(f" {op}(")


@pytest.mark.parametrize("target", [
    "cpu",
    pytest.param("h100", marks=pytest.mark.skipif(not (_cuda_plugin() and _gpu_target()),
                                                  reason="needs the CUDA plugin and shared/gpu_targets")),
])
def test_decode_step_loops_over_layers_and_does_not_grow_with_depth(target):
    device = _device(target)
    shallow, deep = _compiled_hlo(5, device), _compiled_hlo(13, device)
    # 2 dense layers, then 11 MoE layers: one loop per run, the run's length as its trip count.
    assert 11 in _trip_counts(deep) and 2 in _trip_counts(deep), _trip_counts(deep)
    assert 3 in _trip_counts(shallow)
    # The loop bodies are the same program: no op is repeated per layer.
    for op in ("dot", "while", "custom-call", "fusion"):
        assert _count(deep, op) == _count(shallow, op), op
