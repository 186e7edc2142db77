"""Quantized weight formats: dequantization kernels, the quantized Linear and the quantizer."""

from .dequant import BLOCK_SIZES, dequantize

__all__ = ["BLOCK_SIZES", "dequantize"]
