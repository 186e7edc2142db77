"""Quantized weight formats: dequantization kernels, the quantized Linear and the quantizer."""

from . import convert
from .dequant import BLOCK_SIZES, dequantize

__all__ = ["BLOCK_SIZES", "convert", "dequantize"]
