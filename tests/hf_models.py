"""Tiny random DeepSeek models built with transformers, saved the way the hub stores them.

`TINY_CONFIGS` names configs that together exercise every config switch; `save_tiny(name, dir)`
builds one with transformers (torch, CPU), gives the router bias non-zero values, and writes
`save_pretrained` output (per-expert safetensors, config.json). Tests import torch only through here.
"""

from __future__ import annotations

import copy
import os

import numpy as np

_BASE = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=40, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=512, initializer_range=0.15,
    rms_norm_eps=1e-6,
)
_YARN_V2 = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
_YARN_V3 = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# name -> (model_type, overrides). Together: q_lora on/off, greedy / group_limited_greedy / noaux_tc,
# softmax / sigmoid, norm_topk_prob on/off, routed scaling, YaRN (mscale equal / unequal / absent /
# attention_factor), linear and plain RoPE, rope_interleave off, attention_bias, mlp_bias, tied
# embeddings, first_k_dense_replace 0/1/2, shared experts 0/1/2, top-1 routing, hidden_act silu / gelu
# (transformers' own test configs) / gelu_pytorch_tanh.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "v2_lite_like": ("deepseek_v2", dict(
        q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, topk_method="greedy", rope_scaling=_YARN_V2)),
    "v2_like_group_limited_yarn": ("deepseek_v2", dict(
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
        rope_scaling={**_YARN_V2, "factor": 40.0})),
    "v2_bias_tied_plain_rope": ("deepseek_v2", dict(
        n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=0,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, rope_theta=500.0,
        routed_scaling_factor=0.5, hidden_act="gelu")),
    "v2_yarn_no_mscale_all_dim": ("deepseek_v2", dict(
        q_lora_rank=None, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=1,
        first_k_dense_replace=2, rope_scaling={"type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 32})),
    "v3_like_noaux_tc_yarn": ("deepseek_v3", dict(
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rope_scaling=_YARN_V3)),
    "v3_unequal_mscale": ("deepseek_v3", dict(
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=2,
        n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
        num_hidden_layers=4, rope_scaling={**_YARN_V3, "mscale": 1.2, "mscale_all_dim": 0.8,
                                           "beta_fast": 16, "beta_slow": 2})),
    "v3_no_interleave_no_q_lora": ("deepseek_v3", dict(
        q_lora_rank=None, rope_interleave=False, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=0, n_group=1, topk_group=1,
        rope_scaling={"type": "linear", "factor": 2.0})),
    "v3_top1_attention_factor": ("deepseek_v3", dict(
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=1, first_k_dense_replace=1,
        n_group=4, topk_group=4, norm_topk_prob=True, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
        rope_scaling={**_YARN_V3, "attention_factor": 0.9})),
}


def hf_config(name: str):
    from transformers import DeepseekV2Config, DeepseekV3Config

    model_type, overrides = TINY_CONFIGS[name]
    kwargs = {**copy.deepcopy(_BASE), **copy.deepcopy(overrides)}
    cls = DeepseekV3Config if model_type == "deepseek_v3" else DeepseekV2Config
    return cls(**kwargs)


def build(name: str, seed: int = 0):
    """A transformers model of the named tiny config in float32 eval mode, router bias non-zero."""
    import torch
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = hf_config(name)
    cls = DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():
        for module_name, buf in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model


def save_tiny(name: str, directory: str | os.PathLike, seed: int = 0, **save_kwargs):
    """Builds and save_pretrained's the named model; returns the torch model."""
    model = build(name, seed)
    model.save_pretrained(os.fspath(directory), **save_kwargs)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
