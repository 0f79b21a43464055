"""Quantized weights: DeepSeek's block-scaled FP8 kept as released, and weight-only int8.

`blocks`: the scheme, numpy quantize, in-step dequantize, `Blocked` (quantized experts for the
dispatch). `apply`: which model weights are quantized, putting a scheme on a model, sizes
(`weight_bytes`, `bytes_per_parameter`). Import `mla_jax.quant.apply` explicitly: it imports the
model's modules, which themselves import `blocks`.
"""

from mla_jax.quant.blocks import (  # noqa: F401
    FP8_BLOCK_128, INT8_PER_CHANNEL, Blocked, Quantized, ScaleInv, Scheme, dequantize, quantize,
)
