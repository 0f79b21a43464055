"""`mla-jax plan`: per-device bytes equal a hand count from the config's dimensions; V3 in bf16
does not fit one 8×H200 node, by a stated amount; the compiler agrees with the count.

Hand counts read the preset JSON files (DeepSeek's own config.json fields) and the presets' rule as
`mla_jax.parallel.rules` states it: `expert=E` splits the routed experts and the batch (with its
cache) E ways; `tensor=T` splits the heads (q_proj / q_b_proj / kv_b_proj / o_proj), the MLP and
expert hidden dims and the output vocabulary T ways; the latent cache, shared by all heads, splits
only with the batch; everything else is held whole by every device.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from mla_jax.cli import main
from mla_jax.errors import UsageError
from mla_jax.parallel import plan as pl

PRESETS = pathlib.Path(__file__).resolve().parents[2] / "mla_jax" / "presets"
# Device memory as CUDA reports it (the GPU target descriptions' device_memory_size)
H100_BYTES = 84_942_979_072  # H100 SXM 80GB: 79.1 GiB
H200_BYTES = 143_771 * 2**20  # H200 SXM: 140.4 GiB
GIB = 2**30


def preset(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


def hand_count(c: dict, expert: int = 1, tensor: int = 1) -> int:
    """bf16 weight bytes one device holds, from config.json's fields (+ float32 router biases)."""
    d, v, n_layers, n = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"]
    nope, rope, vh, lat = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    ql, e, f = c["q_lora_rank"], c["n_routed_experts"], c["moe_intermediate_size"]
    dense = c["first_k_dense_replace"]
    moe = n_layers - dense
    # attention, per layer: held whole, and split over heads
    q_whole = d * ql + ql if ql else 0  # q_a_proj, q_a_layernorm
    attn_whole = q_whole + d * (lat + rope) + lat + 2 * d  # kv_a_proj_with_mqa, kv_a_layernorm, 2 norms
    attn_heads = (ql or d) * n * (nope + rope) + lat * n * (nope + vh) + n * vh * d  # q_b/q_proj, kv_b, o_proj
    whole = v * d + d + n_layers * attn_whole + moe * e * d  # embed, final norm, attention, router gate
    by_tensor = (v * d  # lm_head over the vocabulary
                 + n_layers * attn_heads + dense * 3 * d * c["intermediate_size"]  # heads, dense MLP hidden
                 + moe * 3 * d * f * c["n_shared_experts"])  # shared experts' hidden
    routed = moe * 3 * e * d * f  # [E, D, F] x3: experts over `expert`, hidden F over `tensor`
    bias = moe * e * 4 if c["topk_method"] == "noaux_tc" else 0  # e_score_correction_bias, float32
    return 2 * (whole + by_tensor // tensor + routed // (expert * tensor)) + bias


def cache_hand_count(c: dict, batch: int, context: int, page: int = 64) -> int:
    """bf16 latent rows (kv_lora_rank + rope dim) per layer and token, + int32 block table and lengths."""
    rows = c["num_hidden_layers"] * batch * context * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
    return 2 * rows + 4 * batch * (context // page) + 4 * batch


def test_v2_lite_on_one_h100_is_the_hand_count():
    p = pl.plan("deepseek-v2-lite", "h100x1", batch=32, context=4096, compile=False)
    c = preset("deepseek-v2-lite")
    assert p.mesh == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    assert p.weights == hand_count(c) == 2 * 15_706_484_224  # V2-Lite's 15.7B parameters
    assert p.cache == cache_hand_count(c, 32, 4096)
    assert p.device_memory == H100_BYTES
    assert p.fits


def test_v3_bf16_on_8_h200_is_the_hand_count_and_does_not_fit():
    p = pl.plan("deepseek-v3", "h200x8", batch=32, context=4096, mesh="expert=8", compile=False)
    c = preset("deepseek-v3")
    assert p.weights == hand_count(c, expert=8)
    assert p.cache == cache_hand_count(c, 32 // 8, 4096)
    missing = hand_count(c, expert=8) + cache_hand_count(c, 32 // 8, 4096) - H200_BYTES
    assert missing > 40 * GIB
    assert not p.fits and p.margin == -missing
    assert f"does NOT fit: {missing / GIB:.2f} GiB more per device needed" in pl.format_plan(p)


def test_no_split_of_8_h200s_holds_v3_in_bf16():
    p = pl.plan("deepseek-v3", "h200x8", batch=32, context=4096, compile=False)
    _, config = pl.load_config("deepseek-v3")
    peaks = [pl.count_plan(config, p.cluster, pl.WEIGHT_FORMATS["bf16"], axes, batch=32, context=4096).peak
             for axes in pl.candidate_meshes(p.cluster, 32)]
    assert len(peaks) > 10 and min(peaks) > H200_BYTES
    assert p.mesh_proposed and p.peak == min(peaks)  # then the proposal is the fewest bytes per device


def test_the_proposal_is_the_least_communication_that_fits():
    assert pl.plan("deepseek-v2-lite", "h100x8", batch=32, context=4096, compile=False).mesh == \
        {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}  # V2-Lite fits whole: data parallel
    p = pl.plan("deepseek-v3", "2xh200x8", batch=32, context=4096, compile=False)
    assert p.mesh == {"data": 1, "fsdp": 1, "expert": 16, "tensor": 1} and p.fits
    assert p.weights == hand_count(preset("deepseek-v3"), expert=16)


def test_a_forced_mesh_splits_the_cache_by_batch():
    c = preset("deepseek-v3")
    p = pl.plan("deepseek-v3", "2xh200x8", batch=32, context=4096, mesh="data=2,tensor=8", compile=False)
    assert p.weights == hand_count(c, tensor=8)
    assert p.cache == cache_hand_count(c, 16, 4096)


def test_full_fine_tuning_holds_float32_masters_and_two_adam_moments():
    p = pl.plan("deepseek-v2-lite", "h100x1", batch=4, train_seq_len=1024, compile=False).train
    params = hand_count(preset("deepseek-v2-lite")) // 2
    assert p.weights == 4 * params
    # mu and nu; int32 step counters of Adam, the schedule and the trainer; the PRNG key (2 x uint32)
    assert p.optimizer == 2 * 4 * params + 3 * 4 + 8


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(UsageError, match=r"--gpus 'a100x8'.*h100x1, h200x8, 2xh200x8"):
        pl.plan("deepseek-v3", "a100x8", compile=False)
    with pytest.raises(UsageError, match=r"--mesh tensor=4 has 4 devices; --gpus h200x8 has 8"):
        pl.plan("deepseek-v3", "h200x8", mesh="tensor=4", compile=False)
    with pytest.raises(UsageError, match=r"--mesh 'model=8': unknown axis 'model'"):
        pl.plan("deepseek-v3", "h200x8", mesh="model=8", compile=False)
    with pytest.raises(UsageError, match=r"--mesh expert=8 splits the batch 8 ways; --batch 4 does not divide"):
        pl.plan("deepseek-v3", "h200x8", mesh="expert=8", batch=4, compile=False)
    with pytest.raises(UsageError, match=r"--weights 'fp4': expected one of \['bf16', 'f32', 'fp8', 'int8'\]"):
        pl.plan("deepseek-v3", "h200x8", weights="fp4", compile=False)
    with pytest.raises(UsageError, match=r"--weights fp8: the train step planned is full fine-tuning"):
        pl.plan("deepseek-v3", "h200x8", weights="fp8", train_seq_len=4096, compile=False)
    with pytest.raises(UsageError, match=r"remat='bogus'; expected one of"):
        pl.plan("deepseek-v2-lite", "h100x1", train_seq_len=64, remat="bogus", compile=False)
    with pytest.raises(UsageError, match=r"no such config file"):
        pl.plan("/nonexistent/config.json", "h200x8", compile=False)


def test_the_command_prints_each_line_per_device(capsys):
    assert main(["plan", "deepseek-v3", "--gpus", "h200x8", "--mesh", "expert=8", "--no-compile"]) == 0
    out = capsys.readouterr().out
    c = preset("deepseek-v3")
    assert re.search(r"^mesh expert=8$", out, flags=re.M)
    assert re.search(rf"weights +{hand_count(c, expert=8) / GIB:.2f} GiB", out)
    assert re.search(rf"cache +{cache_hand_count(c, 4, 4096) / GIB:.2f} GiB", out)
    assert "does NOT fit" in out


def test_the_command_refuses_train_without_a_sequence_length(capsys):
    assert main(["plan", "deepseek-v2-lite", "--gpus", "h100x1", "--train", "--no-compile"]) == 1
    assert "--train needs --seq-len N" in capsys.readouterr().err


HLO = """\
%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%p), index=1
  %all-reduce-start = bf16[4,8]{1,0} all-reduce-start(%x), channel_id=1, to_apply=%add
  %all-reduce-done = bf16[4,8]{1,0} all-reduce-done(%all-reduce-start)
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %all-reduce-done)
}

ENTRY %main (a: bf16[4,8]) -> bf16[16,8] {
  %w = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"61"}}
  %ag = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%a), channel_id=2, dimensions={0}
  ROOT %agd = bf16[16,8]{1,0} all-gather-done(%ag)
}
"""


def test_collectives_count_once_per_loop_trip():
    assert pl.collectives(HLO) == {"all-reduce": {"count": 61, "bytes": 61 * 4 * 8 * 2},
                                   "all-gather": {"count": 1, "bytes": 16 * 8 * 2}}


def _cuda_plugin() -> bool:
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


needs_plugin = pytest.mark.skipif(not _cuda_plugin(), reason="needs the CUDA compile-only plugin (extra gpu-compile)")


SMALL_INPUTS = lambda batch: batch * 4 + batch + 8 + 4  # noqa: E731  tokens int32, done bool, key, stop [1] int32


@needs_plugin
def test_compiled_on_two_h100s_the_compiler_takes_the_counted_bytes_and_reduces_over_heads(tmp_path):
    c = {**preset("deepseek-v3"), "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
         "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
         "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2}
    (tmp_path / "config.json").write_text(json.dumps(c))
    p = pl.plan(str(tmp_path), "h100x2", batch=4, context=128, mesh="tensor=2")
    # XLA's arguments per device: the counted weights and cache + the small per-step inputs.
    assert p.arguments == hand_count(c, tensor=2) + cache_hand_count(c, 4, 128) + SMALL_INPUTS(4)
    assert p.aliased == cache_hand_count(c, 4, 128)  # the cache is donated: updated in place
    assert p.temporaries > 0 and p.fits
    # o_proj's heads are split over `tensor`: every layer sums its partial outputs across devices.
    reductions = sum(p.collectives.get(op, {}).get("count", 0) for op in ("all-reduce", "reduce-scatter"))
    assert reductions >= c["num_hidden_layers"]


@pytest.mark.slow
@needs_plugin
def test_compiled_v2_lite_on_one_h100_takes_the_counted_arguments_and_fits():
    p = pl.plan("deepseek-v2-lite", "h100x1", batch=32, context=4096)
    c = preset("deepseek-v2-lite")
    assert p.arguments == hand_count(c) + cache_hand_count(c, 32, 4096) + SMALL_INPUTS(32)
    assert p.aliased == cache_hand_count(c, 32, 4096)
    assert 0 < p.temporaries < 2 * GIB and p.fits
    assert p.collectives == {}  # one device


@pytest.mark.slow
@needs_plugin
def test_compiled_v3_bf16_on_8_h200_does_not_fit_and_reduces_over_heads_every_layer():
    p = pl.plan("deepseek-v3", "h200x8", batch=32, context=4096, mesh="tensor=8")
    c = preset("deepseek-v3")
    counted = hand_count(c, tensor=8) + cache_hand_count(c, 32, 4096)
    assert p.arguments == counted + SMALL_INPUTS(32)
    assert not p.fits and p.margin <= H200_BYTES - counted
    # o_proj's heads are split over `tensor`: every layer sums its partial outputs across devices.
    reductions = sum(p.collectives.get(op, {}).get("count", 0) for op in ("all-reduce", "reduce-scatter"))
    assert reductions >= c["num_hidden_layers"]
