"""NVFP4 weights as ComfyUI stores them (`comfy_quant` format "nvfp4"): e2m1 codes two per byte (even element in the
high nibble), one float8_e4m3fn scale per 16 elements in cuBLAS's blocked layout, and a float32 global scale.
W = e2m1 · (global · block). Emulated: the weights stay packed and are dequantized when the layer runs."""

import torch

from .dequant import lookup
from .linear import DequantizingLinear

GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def unswizzle(block_scale, rows, cols):
    """cuBLAS's blocked scale layout (128x4 tiles stored as 32x16) back to the (rows, cols) matrix."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    if block_scale.numel() != row_tiles * 128 * col_tiles * 4:
        raise ValueError(f"nvfp4 block scales hold {block_scale.numel()} values; a {rows}x{cols} grid needs "
                         f"{row_tiles * 128 * col_tiles * 4} in the blocked layout")
    tiles = block_scale.reshape(row_tiles, col_tiles, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def dequantize_nvfp4(packed, block_scale, global_scale, dtype=torch.float32):
    """Packed (rows, cols/2) uint8 -> (rows, cols) `dtype`, in the same order of operations as ComfyUI's kernels."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(rows, cols // GROUP, GROUP)
    scale = global_scale.to(dtype) * unswizzle(block_scale.view(torch.float8_e4m3fn), rows, cols // GROUP).to(dtype)
    return (lookup(E2M1, codes).to(dtype) * scale.unsqueeze(-1)).reshape(rows, cols)


class Nvfp4Linear(DequantizingLinear):
    """nn.Linear (no bias) over an NVFP4 weight. `pre_quant_scale` (ModelOpt AWQ smoothing) multiplies the input,
    so the layer's effective weight, which `dequantized()` returns, is W · diag(pre_quant_scale)."""

    def __init__(self, weight, block_scale, global_scale, shape, pre_quant_scale=None, compute_dtype=torch.bfloat16):
        super().__init__(*reversed(shape), compute_dtype)
        rows, cols = weight.shape[0], weight.shape[1] * 2
        if weight.dtype != torch.uint8 or rows < shape[0] or cols < shape[1] or rows % GROUP or cols % GROUP:
            raise ValueError(f"nvfp4 weight of {weight.dtype} {tuple(weight.shape)} "
                             f"cannot hold a {tuple(shape)} matrix")
        unswizzle(block_scale, rows, cols // GROUP)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", block_scale)
        self.register_buffer("weight_scale_2", global_scale.float().reshape(()))
        self.register_buffer("pre_quant_scale", pre_quant_scale)

    def storage(self):
        return "nvfp4"

    def dequantized(self, dtype=None):
        weight = dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2)
        weight = weight[: self.out_features, : self.in_features]
        if self.pre_quant_scale is not None:
            weight = weight * self.pre_quant_scale.float()
        return weight.to(dtype or self.compute_dtype)
