"""MLA (multi-head latent attention) decode over a paged latent cache."""

from pallas_kernels.mla_decode.api import choose_implementation
from pallas_kernels.mla_decode.api import kernel_config
from pallas_kernels.mla_decode.api import mla_decode
from pallas_kernels.mla_decode.config import Config
from pallas_kernels.mla_decode.reference import mla_decode_reference

__all__ = [
    "Config",
    "choose_implementation",
    "kernel_config",
    "mla_decode",
    "mla_decode_reference",
]
