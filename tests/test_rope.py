"""Rotary frequencies and YaRN factors equal transformers' for every scaling variant."""

import numpy as np
import pytest

from hf_models import TINY_CONFIGS, hf_config
from mla_jax import Config
from mla_jax.rope import apply_rope, inv_frequencies

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_frequencies_attention_factor_and_softmax_scale_match_transformers(name, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_config(name)
    hf.save_pretrained(tmp_path)
    ours = Config.from_hf(tmp_path)
    inv_freq, factor = inv_frequencies(ours)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        base = hf.rope_parameters["rope_theta"]
        dim = hf.qk_rope_head_dim
        ref_freq, ref_factor = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim), 1.0
    else:
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[rope_type](hf)
        ref_freq = ref_freq.numpy()
    np.testing.assert_allclose(inv_freq, ref_freq, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-6)

    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    assert ours.softmax_scale == pytest.approx(yarn_apply_mscale(hf.rope_parameters, ours.qk_head_dim ** -0.5), rel=1e-7)


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_preserves_norm_and_relative_position(interleave):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(1, 1, 8)).astype(np.float32), rng.normal(size=(1, 1, 8)).astype(np.float32)
    freqs = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)

    def rot(x, pos):
        ang = pos * freqs
        return np.asarray(apply_rope(x, np.sin(ang)[None, None], np.cos(ang)[None, None], interleave=interleave))

    assert np.linalg.norm(rot(q, 5.0)) == pytest.approx(np.linalg.norm(q), rel=1e-5)
    # the score depends only on the distance between positions
    assert np.sum(rot(q, 7.0) * rot(k, 3.0)) == pytest.approx(np.sum(rot(q, 14.0) * rot(k, 10.0)), rel=1e-4)
