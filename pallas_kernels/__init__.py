"""Pallas kernels: arrays in, arrays out (no model configs here)."""

from pallas_kernels.mla_decode import mla_decode

__all__ = ["mla_decode"]
