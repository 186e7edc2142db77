"""Quantized weight formats: dequantization kernels, the quantized Linear and the quantizer."""
