"""Config.from_hf: every hub form is read, every maths field honoured, the unknown refused."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mla_jax import Config, ConfigError, Transformer
from mla_jax.layers import param_count

# Published totals (without the MTP module): V2-Lite 15.7B, V2 236B, V3 671B.
PUBLISHED = {"deepseek-v2-lite": 15.7e9, "deepseek-v2": 236e9, "deepseek-v3": 671e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_presets_match_published_parameter_counts(name):
    config = Config.preset(name)
    abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    count = param_count(nnx.state(abstract, nnx.Param))
    print(f"{name}: {count / 1e9:.2f}B parameters (published {PUBLISHED[name] / 1e9:g}B)")
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01


def test_v3_preset_reads_deepseek_fields():
    c = Config.preset("deepseek-v3")
    assert (c.topk_method, c.scoring_func, c.n_group, c.topk_group, c.num_experts_per_tok) == ("noaux_tc", "sigmoid", 8, 4, 8)
    assert c.rope_scaling.type == "yarn" and c.rope_scaling.factor == 40 and c.latent_dim == 576
    assert [c.is_moe_layer(i) for i in range(4)] == [False, False, False, True]


def test_v2_lite_has_no_query_compression():
    assert Config.preset("deepseek-v2-lite").q_lora_rank is None


def test_legacy_rope_scaling_and_transformers5_rope_parameters_agree():
    legacy = Config.preset("deepseek-v2").to_hf()
    modern = copy.deepcopy(legacy)
    scaling = modern.pop("rope_scaling")
    modern["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": modern.pop("rope_theta"), **scaling}
    assert Config.from_hf(legacy) == Config.from_hf(modern)


def test_softmax_scale_has_yarn_correction():
    c = Config.preset("deepseek-v3")  # mscale_all_dim = 1, factor 40
    m = 0.1 * jnp.log(40.0) + 1.0
    assert c.softmax_scale == pytest.approx(float(m * m) / (192 ** 0.5))


def test_round_trip_through_hub_dict():
    c = Config.preset("deepseek-v3")
    assert Config.from_hf(c.to_hf()) == c


def test_cache_bytes_per_token_from_config():
    c = Config.preset("deepseek-v3")
    assert c.kv_cache_bytes_per_token(2) == {
        "mla": 61 * (512 + 64) * 2,
        "mha": 61 * (128 * (128 + 64) + 128 * 128) * 2,
    }


def _v3(**changes):
    d = Config.preset("deepseek-v3").to_hf()
    d.update(changes)
    return d


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "llama"}, "model_type='llama' is not supported"),
    ({"some_new_switch": True}, r"unsupported config field\(s\) \['some_new_switch'\]"),
    ({"hidden_act": "gelu_10"}, r"hidden_act='gelu_10' is not supported; expected one of \['gelu', "),
    ({"hidden_act": ["silu"]}, r"hidden_act=\['silu'\] is not supported"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 must equal num_attention_heads=128"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "low_freq_factor": 1}}, r"unsupported rope_scaling field\(s\) \['low_freq_factor'\]"),
    ({"topk_method": "random"}, "topk_method='random'"),
    ({"scoring_func": "relu"}, "scoring_func='relu'"),
    ({"n_group": 7}, "not divisible by n_group=7"),
    ({"topk_group": 9}, "topk_group=9 exceeds n_group=8"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok=300"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim=63 must be even"),
    ({"mlp_bias": True}, "mlp_bias=true exists only for deepseek_v2"),
    ({"hidden_size": None}, r"required field\(s\) \['hidden_size'\] missing"),
])
def test_fields_it_cannot_honour_are_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_hf(_v3(**changes))


def test_error_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_v3(model_type="gpt2")))
    with pytest.raises(ConfigError, match=str(path)):
        Config.from_hf(tmp_path)


def test_config_is_frozen_and_hashable_for_jit():
    c = Config.preset("deepseek-v2-lite")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1  # type: ignore[misc]
    assert hash(c) == hash(Config.preset("deepseek-v2-lite"))


def test_replace_keeps_validation():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        Config.preset("deepseek-v2-lite").replace(num_experts_per_tok=65)


@pytest.mark.parametrize("name", ["v2_lite_like", "v3_like_noaux_tc_yarn", "v3_no_interleave_no_q_lora"])
def test_reads_what_transformers_writes(name, tmp_path):
    pytest.importorskip("transformers")
    from hf_models import hf_config

    hf = hf_config(name)
    hf.save_pretrained(tmp_path)
    c = Config.from_hf(tmp_path)
    assert (c.q_lora_rank, c.kv_lora_rank, c.n_routed_experts, c.rope_interleave) == (
        hf.q_lora_rank, hf.kv_lora_rank, hf.n_routed_experts, getattr(hf, "rope_interleave", True))
    assert c.rope_scaling.type == hf.rope_parameters["rope_type"]


def test_jit_static_config():
    c = Config.preset("deepseek-v2-lite")
    f = jax.jit(lambda x, c: x * c.softmax_scale, static_argnums=1)
    assert float(f(jnp.float32(1.0), c)) == pytest.approx(c.softmax_scale)


# What a hand-edited or third-party config.json gets wrong: JSON types. Each is refused with the
# field's name, what was expected and what was found (and, from a file, the file's path).
WRONG_TYPES = {
    "string boolean": ({"norm_topk_prob": "false"},
                       "norm_topk_prob='false'; expected a JSON boolean (true or false), found a string"),
    "string tie_word_embeddings": ({"tie_word_embeddings": "false"},
                                   "tie_word_embeddings='false'; expected a JSON boolean (true or false), found a string"),
    "boolean count": ({"vocab_size": True}, "vocab_size=True; expected a positive integer, found a boolean"),
    "float count": ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5; expected a positive integer, found a number"),
    "negative eps": ({"rms_norm_eps": -1}, "rms_norm_eps=-1; expected a finite number > 0, found an integer"),
    "string eps": ({"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6'; expected a finite number > 0, found a string"),
    "rope_scaling as a string": ({"rope_scaling": "yarn"}, "rope_scaling='yarn'; expected a JSON object"),
    "rope_parameters as a string": ({"rope_parameters": "yarn"}, "rope_parameters='yarn'; expected a JSON object"),
    "string rope factor": ({"rope_scaling": {"type": "yarn", "factor": "40"}},
                           "rope_scaling.factor='40'; expected a number, found a string"),
    "string token id": ({"eos_token_id": "1"}, "eos_token_id='1'; expected a token id"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_json_types_are_config_errors_naming_field_and_file(tmp_path, case):
    changes, message = WRONG_TYPES[case]
    (tmp_path / "config.json").write_text(json.dumps(_v3(**changes)))
    with pytest.raises(ConfigError) as e:
        Config.from_hf(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: {message}")


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: expected a JSON object, found a list"):
        Config.from_hf(tmp_path)


def test_null_means_absent_as_hub_configs_write_it():
    # V2-Lite writes q_lora_rank: null and leaves n_group / topk_group null; booleans may be null too.
    c = Config.from_hf(_v3(q_lora_rank=None, n_group=None, topk_group=None, norm_topk_prob=None,
                           attention_bias=None, topk_method="greedy"))
    assert (c.q_lora_rank, c.n_group, c.topk_group, c.norm_topk_prob, c.attention_bias) == (None, 1, 1, True, False)


def test_every_shipped_config_still_loads():
    import glob
    import os

    from checkpoints.make_tiny import SHIPPED
    from hf_models import TINY_CONFIGS, _BASE

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__import__("mla_jax").__file__), "presets", "*.json")))
    loaded = [Config.from_hf(p) for p in [*paths, SHIPPED]]
    dicts = [{"model_type": t, **_BASE, **o} for t, o in TINY_CONFIGS.values()]
    loaded += [Config.from_hf(d) for d in dicts]
    assert len(loaded) == len(paths) + 1 + len(TINY_CONFIGS) and len(paths) == 3
