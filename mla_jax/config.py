"""The one model config: DeepSeek's own field names, frozen, validated, built from a hub config.json.

`Config.from_hf` reads what DeepSeek publishes (V2, V2-Lite, V3, R1, V3.1: legacy `rope_scaling` +
`rope_theta`) and what transformers 5 writes (`rope_parameters`). Every field that changes the maths
is honoured; a field we cannot honour, or one we do not know, is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "yarn")

# Keys that carry no maths for inference or that other parts of the project read from the raw
# config.json (quantization_config: the converter). Anything outside these and the dataclass
# fields is refused, so that a new switch in a future release is never silently ignored.
_BOOKKEEPING_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "chunk_size_feed_forward", "dtype", "torch_dtype",
    "id2label", "label2id", "is_encoder_decoder", "model_type", "output_attentions",
    "output_hidden_states", "problem_type", "return_dict", "transformers_version", "use_cache",
    "initializer_range", "pretraining_tp", "output_router_logits", "router_aux_loss_coef",
    "aux_loss_alpha", "seq_aux", "ep_size", "quantization_config", "head_dim", "qk_head_dim",
    "rope_scaling", "rope_theta", "rope_parameters", "num_key_value_heads",
    "partial_rotary_factor", "attention_dropout", "_attn_implementation_autoset",
    "num_mtp_layers", "num_local_experts", "num_experts", "tokenizer_class",
    "use_sliding_window", "sliding_window", "max_window_layers",
})


class ConfigError(ValueError):
    """A config.json that this model cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling (`rope_scaling` / `rope_parameters` in the hub config).

    `type` "default" means plain RoPE; "linear" divides the frequencies by `factor`; "yarn" blends
    interpolated and extrapolated frequencies (YaRN) and rescales the attention logits.
    """

    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """DeepSeek-V2/V3 architecture. Field names follow DeepSeek's `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # mla
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    # moe
    moe_intermediate_size: int
    n_routed_experts: int | None
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    n_group: int
    topk_group: int
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    # rope / yarn
    rope_theta: float
    rope_scaling: RopeScaling
    rope_interleave: bool
    max_position_embeddings: int
    # the rest
    rms_norm_eps: float
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the gated feed-forward's activation (mla_jax/ops/activations.py)
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        _validate(self)

    # ---------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached latent row: kv_lora_rank + qk_rope_head_dim (576 for V2/V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th layer."""
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under scaled RoPE."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs.type != "default" and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> dict[str, int]:
        """Bytes cached per token over all layers: MLA's latent vs standard multi-head attention."""
        n, layers = self.num_attention_heads, self.num_hidden_layers
        mha = n * (self.qk_nope_head_dim + self.qk_rope_head_dim) + n * self.v_head_dim
        return {
            "mla": layers * self.latent_dim * dtype_bytes,
            "mha": layers * mha * dtype_bytes,
        }

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "Config":
        """Build from a hub `config.json` (a path to it, to its directory, or the parsed dict)."""
        source = "config dict"
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no config.json found")
            try:
                with open(path) as f:
                    raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {_json_type(raw)}")
        try:
            return cls(**_fields_from_hf(raw))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as e:
            # A value of a kind no check above foresaw: still the config's fault, said as such.
            raise ConfigError(f"{source}: a field has a value of the wrong kind ({type(e).__name__}: {e})") from e

    @classmethod
    def preset(cls, name: str) -> "Config":
        """A packaged preset: 'deepseek-v2-lite', 'deepseek-v2', 'deepseek-v3'."""
        here = os.path.join(os.path.dirname(__file__), "presets")
        path = os.path.join(here, f"{name}.json")
        if not os.path.exists(path):
            names = sorted(p[:-5] for p in os.listdir(here) if p.endswith(".json"))
            raise ConfigError(f"unknown preset {name!r}; expected one of {names}")
        return cls.from_hf(path)

    def to_hf(self) -> dict[str, Any]:
        """The hub-style config.json dict (legacy `rope_scaling` form, read by every release)."""
        d = dataclasses.asdict(self)
        rs = d.pop("rope_scaling")
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch], **d}
        out["num_key_value_heads"] = self.num_attention_heads
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        if rs["type"] != "default":
            out["rope_scaling"] = {k: v for k, v in rs.items() if v is not None}
        else:
            out["rope_scaling"] = None
        return out

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


# Defaults where a hub config omits a field, per model type (those of transformers' config
# classes and DeepSeek's configuration_deepseek.py; V3 always routes noaux_tc over sigmoid scores).
_DEFAULTS = {
    "deepseek_v2": dict(
        q_lora_rank=1536, n_shared_experts=None, first_k_dense_replace=0, moe_layer_freq=1,
        topk_method="greedy", n_group=None, topk_group=None, scoring_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, rope_interleave=True,
    ),
    "deepseek_v3": dict(
        q_lora_rank=1536, n_shared_experts=None, first_k_dense_replace=3, moe_layer_freq=1,
        topk_method="noaux_tc", n_group=None, topk_group=None, scoring_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
    ),
}
_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


def _fields_from_hf(raw: dict[str, Any]) -> dict[str, Any]:
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in raw if k not in names and k not in _BOOKKEEPING_KEYS)
    if unknown:
        raise ConfigError(
            f"unsupported config field(s) {unknown}: this model does not know what they change, "
            "so it refuses to guess"
        )
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ConfigError(f"required field(s) {missing} missing")
    from mla_jax.ops.activations import ACTIVATIONS

    act = raw.get("hidden_act")
    if act is not None and (not isinstance(act, str) or act not in ACTIVATIONS):
        raise ConfigError(f"hidden_act={act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    kv_heads = raw.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != raw["num_attention_heads"]:
        raise ConfigError(
            f"num_key_value_heads={kv_heads} must equal num_attention_heads="
            f"{raw['num_attention_heads']}: MLA shares one latent across all heads"
        )
    if raw.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConfigError(f"partial_rotary_factor={raw['partial_rotary_factor']} is not supported; expected 1.0")
    if raw.get("attention_dropout") not in (None, 0, 0.0):
        raise ConfigError(f"attention_dropout={raw['attention_dropout']} is not supported; expected 0.0")

    defaults = _DEFAULTS[model_type]
    out: dict[str, Any] = {"model_type": model_type}
    for k in names - {"model_type", "rope_scaling", "rope_theta"}:
        if k in raw and raw[k] is not None:
            out[k] = raw[k]
        elif k in defaults:
            out[k] = defaults[k]
        elif k in raw and k not in _BOOL_FIELDS:  # explicit null (a boolean's null: its default)
            out[k] = None
    # explicit nulls that mean "absent" for these
    if "q_lora_rank" in raw:
        out["q_lora_rank"] = raw["q_lora_rank"]
    out["n_routed_experts"] = raw.get("n_routed_experts")
    out["n_shared_experts"] = out.get("n_shared_experts") or 0
    out["n_group"] = out.get("n_group") or 1
    out["topk_group"] = out.get("topk_group") or 1
    out.setdefault("moe_intermediate_size", raw.get("moe_intermediate_size") or raw["intermediate_size"])
    out.setdefault("num_experts_per_tok", raw.get("num_experts_per_tok") or 0)
    out.setdefault("max_position_embeddings", raw.get("max_position_embeddings") or 2048)
    out.setdefault("rms_norm_eps", 1e-6)
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = tuple(out["eos_token_id"])
    out["rope_theta"], out["rope_scaling"] = _rope_from_hf(raw)
    return out


def _rope_from_hf(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Legacy (`rope_theta` + `rope_scaling`) and transformers-5 (`rope_parameters`) forms."""
    for key in ("rope_scaling", "rope_parameters"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{key}={raw[key]!r}; expected a JSON object such as {{\"rope_type\": \"yarn\", "
                              f"\"factor\": 40, ...}} or null, found {_json_type(raw[key])}")
    params = raw.get("rope_parameters")
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    scaling = dict(raw.get("rope_scaling") or {})
    merged: dict[str, Any] = {**scaling, **(params or {})}
    theta = merged.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    if not _is_real(theta) or not 0 < theta < math.inf:
        raise ConfigError(f"rope_theta={theta!r}; expected a positive number, found {_json_type(theta)}")
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if merged.pop("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ConfigError("rope partial_rotary_factor != 1.0 is not supported")
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    known = {f.name for f in dataclasses.fields(RopeScaling)} - {"type"}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unsupported rope_scaling field(s) {unknown}")
    if rope_type == "default":
        return float(theta), RopeScaling()
    factor = merged.get("factor")
    orig = merged.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    if factor is None:
        if rope_type != "yarn" or not orig:
            raise ConfigError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
        factor = raw["max_position_embeddings"] / orig
    for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if merged.get(key) is not None and not _is_real(merged[key]):
            raise ConfigError(f"rope_scaling.{key}={merged[key]!r}; expected a number, found {_json_type(merged[key])}")
    if not _is_real(factor):
        raise ConfigError(f"rope_scaling.factor={factor!r}; expected a number")
    if orig is not None and (not _is_int(orig) or orig <= 0):
        raise ConfigError(f"original_max_position_embeddings={orig!r}; expected a positive integer")
    if merged.get("truncate") is not None and not isinstance(merged["truncate"], bool):
        raise ConfigError(f"rope_scaling.truncate={merged['truncate']!r}; expected a JSON boolean, "
                          f"found {_json_type(merged['truncate'])}")
    rs = RopeScaling(
        type=rope_type,
        factor=float(factor),
        original_max_position_embeddings=int(orig) if orig else None,
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=None if merged.get("mscale") is None else float(merged["mscale"]),
        mscale_all_dim=None if merged.get("mscale_all_dim") is None else float(merged["mscale_all_dim"]),
        attention_factor=None if merged.get("attention_factor") is None else float(merged["attention_factor"]),
        truncate=True if merged.get("truncate") is None else merged["truncate"],
    )
    return float(theta), rs


_BOOL_FIELDS = ("norm_topk_prob", "rope_interleave", "attention_bias", "mlp_bias", "tie_word_embeddings")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
                  "moe_layer_freq", "n_group", "topk_group", "max_position_embeddings")
_NON_NEGATIVE_INTS = ("n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "num_nextn_predict_layers")
_POSITIVE_REALS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _json_type(v) -> str:
    """What a JSON value is, in JSON's words ("a string", "a boolean", ...)."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (tuple, "a list"), (dict, "an object")):
        if isinstance(v, kind):
            return name
    return "null" if v is None else type(v).__name__


def _check_types(c: Config) -> None:
    """JSON types, before any arithmetic: "false" is a string (truthy in Python), true is not a count."""
    for name in _BOOL_FIELDS:
        v = getattr(c, name)
        if not isinstance(v, bool):
            raise ConfigError(f"{name}={v!r}; expected a JSON boolean (true or false), found {_json_type(v)}")
    for name in _POSITIVE_INTS:
        v = getattr(c, name)
        if not _is_int(v) or v <= 0:
            raise ConfigError(f"{name}={v!r}; expected a positive integer, found {_json_type(v)}")
    for name in _NON_NEGATIVE_INTS:
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(f"{name}={v!r}; expected an integer >= 0, found {_json_type(v)}")
    for name in ("q_lora_rank", "n_routed_experts"):
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v <= 0):
            raise ConfigError(f"{name}={v!r}; expected a positive integer or null, found {_json_type(v)}")
    for name in _POSITIVE_REALS:
        v = getattr(c, name)
        if not _is_real(v) or not 0 < v < math.inf:
            raise ConfigError(f"{name}={v!r}; expected a finite number > 0, found {_json_type(v)}")
    for name in ("model_type", "topk_method", "scoring_func"):
        v = getattr(c, name)
        if not isinstance(v, str):
            raise ConfigError(f"{name}={v!r}; expected a string, found {_json_type(v)}")
    for name in ("bos_token_id", "pad_token_id"):
        v = getattr(c, name)
        if v is not None and (not _is_int(v) or v < 0):
            raise ConfigError(f"{name}={v!r}; expected a token id (an integer >= 0) or null, found {_json_type(v)}")
    eos = c.eos_token_id
    if eos is not None and not all(_is_int(t) and t >= 0 for t in (eos if isinstance(eos, tuple) else (eos,))):
        raise ConfigError(f"eos_token_id={eos!r}; expected a token id, a list of them, or null")
    if not isinstance(c.rope_scaling, RopeScaling):
        raise ConfigError(f"rope_scaling={c.rope_scaling!r}; expected a RopeScaling")


def _validate(c: Config) -> None:
    def bad(msg: str):
        raise ConfigError(msg)

    _check_types(c)
    if c.model_type not in MODEL_TYPES:
        bad(f"model_type={c.model_type!r}; expected one of {MODEL_TYPES}")
    if c.qk_rope_head_dim % 2:
        bad(f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (rotary pairs)")
    if c.topk_method not in TOPK_METHODS:
        bad(f"topk_method={c.topk_method!r}; expected one of {TOPK_METHODS}")
    if c.scoring_func not in SCORING_FUNCS:
        bad(f"scoring_func={c.scoring_func!r}; expected one of {SCORING_FUNCS}")
    if c.rope_scaling.type not in ROPE_TYPES:
        bad(f"rope_scaling.type={c.rope_scaling.type!r}; expected one of {ROPE_TYPES}")
    if c.n_routed_experts is not None:
        e = c.n_routed_experts
        if not isinstance(e, int) or e <= 0:
            bad(f"n_routed_experts={e!r}; expected a positive integer or null")
        if not 0 < c.num_experts_per_tok <= e:
            bad(f"num_experts_per_tok={c.num_experts_per_tok} must be in [1, n_routed_experts={e}]")
        if e % c.n_group:
            bad(f"n_routed_experts={e} is not divisible by n_group={c.n_group}")
        if c.topk_group > c.n_group:
            bad(f"topk_group={c.topk_group} exceeds n_group={c.n_group}")
        if c.topk_method == "noaux_tc" and e // c.n_group < 2:
            bad(f"noaux_tc scores each group by its top-2 experts; n_routed_experts/n_group={e // c.n_group} < 2")
        if c.topk_method != "greedy" and c.topk_group * (e // c.n_group) < c.num_experts_per_tok:
            bad(
                f"topk_group={c.topk_group} groups of {e // c.n_group} experts cannot supply "
                f"num_experts_per_tok={c.num_experts_per_tok} experts"
            )
    if c.mlp_bias and c.model_type != "deepseek_v2":
        bad("mlp_bias=true exists only for deepseek_v2; DeepSeek-V3's MLPs have no bias")
    if c.first_k_dense_replace < 0:
        bad(f"first_k_dense_replace={c.first_k_dense_replace}; expected >= 0")
    if c.num_nextn_predict_layers < 0:
        bad(f"num_nextn_predict_layers={c.num_nextn_predict_layers}; expected >= 0")
    if c.rope_scaling.type != "default" and c.rope_scaling.factor <= 0:
        bad(f"rope_scaling.factor={c.rope_scaling.factor}; expected > 0")
