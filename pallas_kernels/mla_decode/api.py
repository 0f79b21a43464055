"""Public entry point: validation and the one place that picks an implementation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _interpret
from pallas_kernels.mla_decode import config as config_lib
from pallas_kernels.mla_decode import mosaic_gpu
from pallas_kernels.mla_decode.reference import mla_decode_reference

IMPLEMENTATIONS = (None, "xla", "mosaic_gpu")
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn),)
REFERENCE_DTYPES = KERNEL_DTYPES + (jnp.dtype(jnp.float32),)
MAX_S_Q = 4


def _validate(q, pages, block_table, seq_lens, page_scales, softmax_scale, v_dim):
  if q.ndim != 4:
    raise ValueError(
        f"{q.shape=} must be [batch, s_q, heads, dim] (4-D), got {q.ndim}-D")
  batch, s_q, heads, dim = q.shape
  if not 1 <= s_q <= MAX_S_Q:
    raise ValueError(f"{q.shape=}: s_q={s_q} must be in [1, {MAX_S_Q}]")
  if heads < 1:
    raise ValueError(f"{q.shape=}: heads must be >= 1")
  if pages.ndim != 3 or pages.shape[2] != dim:
    raise ValueError(
        f"{pages.shape=} must be [num_pages, page_size, {dim}] (dim from "
        f"{q.shape=})")
  if pages.shape[0] < 1 or pages.shape[1] < 1:
    raise ValueError(f"{pages.shape=} must have at least one page of one token")
  if block_table.ndim != 2 or block_table.shape[0] != batch:
    raise ValueError(f"{block_table.shape=} must be [{batch}, max_pages] (batch "
                     f"from {q.shape=})")
  if not jnp.issubdtype(block_table.dtype, jnp.integer):
    raise ValueError(f"{block_table.dtype=} must be an integer type (int32)")
  if seq_lens.shape != (batch,):
    raise ValueError(f"{seq_lens.shape=} must be ({batch},) (batch from {q.shape=})")
  if not jnp.issubdtype(seq_lens.dtype, jnp.integer):
    raise ValueError(f"{seq_lens.dtype=} must be an integer type (int32)")
  if not 0 < v_dim <= dim:
    raise ValueError(f"{v_dim=} must be in [1, {dim}] (dim from {q.shape=})")
  q_dtype, p_dtype = jnp.dtype(q.dtype), jnp.dtype(pages.dtype)
  if q_dtype not in REFERENCE_DTYPES:
    raise ValueError(f"{q.dtype=} must be one of bfloat16, float16, float32")
  if p_dtype in FP8_DTYPES:
    if page_scales is None:
      raise ValueError(
          f"{pages.dtype=} is FP8: page_scales [num_pages, page_size] float32 "
          "is required (value = fp8 * scale per token)")
    if page_scales.shape != pages.shape[:2]:
      raise ValueError(
          f"{page_scales.shape=} must be {pages.shape[:2]} (from {pages.shape=})")
    if jnp.dtype(page_scales.dtype) != jnp.dtype(jnp.float32):
      raise ValueError(f"{page_scales.dtype=} must be float32")
    if q_dtype == jnp.dtype(jnp.float32):
      pass  # reference only; checked at selection
  else:
    if page_scales is not None:
      raise ValueError(
          f"page_scales is only for float8_e4m3fn pages, got {pages.dtype=}")
    if p_dtype != q_dtype:
      raise ValueError(
          f"{pages.dtype=} must equal {q.dtype=} (or be float8_e4m3fn with "
          "page_scales)")
  if not isinstance(softmax_scale, (int, float)):
    raise ValueError(f"softmax_scale must be a Python float, got {softmax_scale!r}")


def choose_implementation(implementation, *, q_dtype, pages_dtype, dim, v_dim,
                          page_size, interpret: bool) -> str:
  """Resolves `implementation` (None = automatic) to "xla" or "mosaic_gpu".

  Automatic: the Mosaic GPU kernel on an sm90+ GPU (or whenever
  `interpret=True`) for bf16/f16 queries with a bf16/f16/FP8 cache and shapes
  the kernel tiles; the XLA reference everywhere else (CPU, float32, odd dims).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{implementation=} must be one of {IMPLEMENTATIONS}")
  if implementation == "xla":  # the reference takes any dim; the kernel's tiling checks may raise
    return "xla"
  q_dtype, pages_dtype = jnp.dtype(q_dtype), jnp.dtype(pages_dtype)
  reason = None
  if q_dtype not in KERNEL_DTYPES:
    reason = f"q.dtype={q_dtype} (kernel takes bfloat16/float16)"
  elif pages_dtype in FP8_DTYPES and q_dtype != jnp.dtype(jnp.bfloat16):
    reason = "FP8 pages need bfloat16 queries in the kernel"
  else:
    fp8 = pages_dtype in FP8_DTYPES
    block_kv = mosaic_gpu.FP8_BLOCK_KV if fp8 else _default_block_kv(page_size)
    reason = mosaic_gpu.unsupported_reason(
        dim=dim, v_dim=v_dim, page_size=page_size, block_kv=block_kv or page_size,
        itemsize=2, fp8=fp8)
  if implementation == "mosaic_gpu":
    if reason is not None:
      raise ValueError(f"implementation='mosaic_gpu' cannot run: {reason}")
    return "mosaic_gpu"
  if implementation == "xla":
    return "xla"
  if reason is None and (interpret or _interpret.has_sm90_gpu()):
    return "mosaic_gpu"
  return "xla"


def _default_block_kv(page_size: int) -> int | None:
  for b in (64, 32):
    if page_size % b == 0 or b % page_size == 0:
      return b
  return None


def kernel_config(q, pages, block_table, *, v_dim: int, interpret: bool,
                  num_splits: int | None = None) -> config_lib.Config:
  """The heuristic `Config` the kernel would use for these arrays."""
  batch, s_q, heads, dim = q.shape
  _, page_size, _ = pages.shape
  fp8 = jnp.dtype(pages.dtype) in FP8_DTYPES
  num_sms = config_lib.H100_SMS
  if not interpret:
    try:
      num_sms = jax.devices()[0].core_count or num_sms
    except (AttributeError, RuntimeError):
      pass
  return config_lib.default_config(
      batch=batch, s_q=s_q, heads=heads, dim=dim, v_dim=v_dim,
      page_size=page_size, max_pages=block_table.shape[1],
      itemsize=jnp.dtype(pages.dtype).itemsize, num_sms=num_sms,
      interpret=interpret, fp8=fp8, num_splits=num_splits)


@functools.partial(
    jax.jit,
    static_argnames=("softmax_scale", "causal", "v_dim", "implementation",
                     "interpret", "config"))
def _mla_decode_jit(q, pages, block_table, seq_lens, page_scales, *,
                    softmax_scale, causal, v_dim, implementation, interpret,
                    config):
  if implementation == "xla":
    return mla_decode_reference(
        q, pages, block_table, seq_lens, softmax_scale=softmax_scale,
        causal=causal, v_dim=v_dim, page_scales=page_scales)
  return mosaic_gpu.mla_decode_mosaic_gpu(
      q, pages, block_table, seq_lens, softmax_scale=softmax_scale,
      causal=causal, v_dim=v_dim, config=config, interpret=interpret,
      page_scales=page_scales)


def mla_decode(q, pages, block_table, seq_lens, *, softmax_scale: float,
               causal: bool = True, v_dim: int = 512, page_scales=None,
               implementation: str | None = None, interpret: bool = False,
               config: config_lib.Config | None = None,
               num_splits: int | None = None):
  """Multi-head latent attention decode over a paged latent cache.

  Args:
    q: `[batch, s_q, heads, dim]` queries (absorbed: dim = kv_lora_rank +
      rope dim, 576 for DeepSeek-V2/V3), s_q in 1..4 new tokens per sequence.
    pages: `[num_pages, page_size, dim]` latent cache, one head shared by all
      query heads; its first `v_dim` columns are the values.  Same dtype as q,
      or float8_e4m3fn together with `page_scales`.
    block_table: `[batch, max_pages]` int32 page ids, any order.
    seq_lens: `[batch]` int32 cache lengths including the s_q new tokens.
    softmax_scale: multiplier of q.k before the softmax.
    causal: query i of s_q sees keys up to seq_len - s_q + i (else all).
    v_dim: value width (the first v_dim cache columns).
    page_scales: `[num_pages, page_size]` float32 per-token FP8 scales.
    implementation: None (automatic), "xla" (reference) or "mosaic_gpu".
    interpret: run the Mosaic GPU kernel in GPU interpret mode (any machine).
    config: kernel tiling override (`Config`); default from the heuristic.
    num_splits: split-KV factor override (ignored when `config` is given).

  Returns:
    (out `[batch, s_q, heads, v_dim]` in q.dtype, lse `[batch, s_q, heads]`
    float32 natural-log sum-exp; rows that see no key give 0 and -inf).
  """
  _validate(q, pages, block_table, seq_lens, page_scales, softmax_scale, v_dim)
  impl = choose_implementation(
      implementation, q_dtype=q.dtype, pages_dtype=pages.dtype, dim=q.shape[3],
      v_dim=v_dim, page_size=pages.shape[1], interpret=interpret)
  if impl == "mosaic_gpu":
    if config is None:
      config = kernel_config(q, pages, block_table, v_dim=v_dim,
                             interpret=interpret, num_splits=num_splits)
    reason = mosaic_gpu.unsupported_reason(
        dim=q.shape[3], v_dim=v_dim, page_size=pages.shape[1],
        block_kv=config.block_kv, itemsize=2,
        fp8=jnp.dtype(pages.dtype) in FP8_DTYPES)
    if reason is not None:
      raise ValueError(f"{config=} cannot run: {reason}")
  else:
    config = None
    interpret = False
  return _mla_decode_jit(
      q, pages, block_table, seq_lens, page_scales,
      softmax_scale=float(softmax_scale), causal=bool(causal), v_dim=int(v_dim),
      implementation=impl, interpret=bool(interpret), config=config)
