"""The MoE layer compiled for an H100 from this CPU-only process (bench/gpu_compile.py, ../shared/GPU_AOT.md).

Runs when the CUDA plugin is installed and the GPU target descriptions are found; nothing executes,
the checks read the compiler's memory analysis and optimized HLO. Compiling tokamax's kernels takes
minutes on the 2-core machine (905 s for the 256-token forward under a load average of 22), so those
tests are marked slow; the check that the dense-dot detector fires runs by default.
"""

import importlib.util
import os

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason="needs the CUDA plugin (jax-cuda12-plugin) to compile for a GPU")

gpu_compile = pytest.importorskip("bench.gpu_compile")
if not os.path.isdir(gpu_compile.TARGETS):
    pytest.skip(f"GPU target descriptions not found at {gpu_compile.TARGETS}", allow_module_level=True)

GiB = 2**30


@pytest.fixture(scope="module")
def h100():
    return gpu_compile.gpu_device("h100_sxm")


@pytest.mark.slow
def test_v3_moe_layer_for_h100_uses_grouped_kernels_not_a_dense_dot(h100):
    """V3 widths (7168 hidden, 256 experts of 2048): tokamax's Mosaic GPU kernels, and no dot
    contracting over all experts anywhere in the optimized program."""
    config = gpu_compile.v3_moe_config()
    compiled, _ = gpu_compile.compile_moe_layer(config, 256, h100, backward=False)
    hlo = compiled.as_text()
    assert "mosaic_gpu" in hlo
    assert gpu_compile.dots_spanning_experts(hlo, config) == []


def test_the_dense_dot_check_catches_ragged_dot(h100):
    """The check can fail: jax.lax.ragged_dot (jax 0.10) is one dot over experts x model dim."""
    config = gpu_compile.v3_moe_config().replace(n_routed_experts=16, n_group=4, topk_group=2)
    compiled, _ = gpu_compile.compile_moe_layer(config, 64, h100, backward=False, implementation="ragged_dot")
    spanning = gpu_compile.dots_spanning_experts(compiled.as_text(), config)
    assert spanning, "ragged_dot's dense decomposition was not flagged"


@pytest.mark.slow
@pytest.mark.parametrize("backward, budget", [(False, 4 * GiB), (True, 16 * GiB)])
def test_v3_moe_layer_on_32k_tokens_fits_its_temporary_budget(h100, backward, budget):
    config = gpu_compile.v3_moe_config()
    compiled, _ = gpu_compile.compile_moe_layer(config, 32768, h100, backward=backward)
    assert compiled.memory_analysis().temp_size_in_bytes <= budget
    assert gpu_compile.dots_spanning_experts(compiled.as_text(), config) == []
