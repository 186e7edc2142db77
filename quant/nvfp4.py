"""NVFP4 weights as ComfyUI stores them (`comfy_quant` format "nvfp4"): e2m1 codes two per byte (even element in the
high nibble), one float8_e4m3fn scale per 16 elements in cuBLAS's blocked layout, and a float32 global scale.
W = e2m1 · (global · block). Emulated: the weights stay packed and are dequantized when the layer runs."""

import torch

from .dequant import constant, lookup
from .fp8 import scale_problem
from .linear import DequantizingLinear

GROUP = 16
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def unswizzle(block_scale, rows, cols):
    """cuBLAS's blocked scale layout (128x4 tiles stored as 32x16) back to the (rows, cols) matrix."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    if block_scale.numel() != blocked_scales(rows, cols):
        raise ValueError(f"nvfp4 block scales hold {block_scale.numel()} values; a {rows}x{cols} grid needs "
                         f"{blocked_scales(rows, cols)} in the blocked layout")
    tiles = block_scale.reshape(row_tiles, col_tiles, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def dequantize_nvfp4(packed, block_scale, global_scale, dtype=torch.float32):
    """Packed (rows, cols/2) uint8 -> (rows, cols) `dtype`, in the same order of operations as ComfyUI's kernels."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(rows, cols // GROUP, GROUP)
    scale = global_scale.to(dtype) * unswizzle(block_scale.view(torch.float8_e4m3fn), rows, cols // GROUP).to(dtype)
    return (lookup(E2M1, codes).to(dtype) * scale.unsqueeze(-1)).reshape(rows, cols)


def blocked_scales(rows, groups):
    """How many block scales cuBLAS's blocked layout holds for a rows x groups grid (whole 128x4 tiles)."""
    return -(-rows // 128) * 128 * -(-groups // 4) * 4


def nvfp4_problem(weight, block_scale, global_scale, shape, pre_quant_scale=None):
    """Why an nvfp4 layer of logical `shape` (out, in) cannot be made of these tensors, or None. Reads shapes and
    dtypes only (meta tensors do)."""
    name = lambda t: f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"  # noqa: E731
    if weight.dtype != torch.uint8 or weight.ndim != 2 or len(shape) != 2 or 0 in shape:
        return f"nvfp4 weight of {name(weight)} cannot hold a {tuple(shape)} matrix"
    rows, cols = weight.shape[0], weight.shape[1] * 2
    if rows < shape[0] or cols < shape[1] or rows % GROUP or cols % GROUP:
        return f"nvfp4 weight of {name(weight)} cannot hold a {tuple(shape)} matrix"
    if block_scale.dtype.itemsize != 1:
        return f"nvfp4 block scales are {name(block_scale)}, not float8_e4m3fn (or its bytes as uint8)"
    if block_scale.numel() != blocked_scales(rows, cols // GROUP):
        return (f"nvfp4 block scales hold {block_scale.numel()} values; a {rows}x{cols // GROUP} grid needs "
                f"{blocked_scales(rows, cols // GROUP)} in the blocked layout")
    if global_scale.numel() != 1 or not global_scale.dtype.is_floating_point:
        return f"its weight_scale_2 is {name(global_scale)}; nvfp4 takes one float global scale per tensor"
    if pre_quant_scale is not None and (pre_quant_scale.numel() != shape[1]
                                        or not pre_quant_scale.dtype.is_floating_point):
        return (f"its pre_quant_scale is {name(pre_quant_scale)}; it needs one float per input feature "
                f"({shape[1]})")
    return None


class Nvfp4Linear(DequantizingLinear):
    """nn.Linear (no bias) over an NVFP4 weight. `pre_quant_scale` (ModelOpt AWQ smoothing) multiplies the input,
    so the layer's effective weight, which `dequantized()` returns, is W · diag(pre_quant_scale). Raises ValueError
    for tensors that cannot form such a layer (see nvfp4_problem)."""

    def __init__(self, weight, block_scale, global_scale, shape, pre_quant_scale=None, compute_dtype=torch.bfloat16):
        problem = (nvfp4_problem(weight, block_scale, global_scale, shape, pre_quant_scale)
                   or scale_problem(weight_scale_2=global_scale))
        if problem:
            raise ValueError(problem)
        super().__init__(*reversed(shape), compute_dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", block_scale)
        self.register_buffer("weight_scale_2", global_scale.float().reshape(()))
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.reshape(-1))

    def storage(self):
        return "nvfp4"

    def prepare_device(self, device):
        """Called before a sampling loop on `device`: the e2m1 table made there once, not copied per forward."""
        constant(E2M1, torch.float32, device)

    def dequantized(self, dtype=None):
        weight = dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2)
        weight = weight[: self.out_features, : self.in_features]
        if self.pre_quant_scale is not None:
            weight = weight * self.pre_quant_scale.float()
        return weight.to(dtype or self.compute_dtype)
