"""Quantized weight formats: the GGML block layouts and their dequantization kernels (torch, Triton), the
quantizer's block encoders, and the layers that keep weights packed (GGUF, fp8, nvfp4)."""

from .dequant import BLOCK_SIZES, dequantize

__all__ = ["BLOCK_SIZES", "dequantize"]
