"""fp8 weights with a per-tensor scale (BFL fp8 klein, ComfyUI's float8 formats): W = q · scale."""

import logging

import torch

from .linear import DequantizingLinear

log = logging.getLogger("klein_nodes")

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def native_fp8(device):
    """torch._scaled_mm runs fp8 natively on NVIDIA SM >= 8.9."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_problem(weight, scale=None, input_scale=None):
    """Why an fp8 layer cannot be made of these tensors, or None. Reads shapes and dtypes only (meta tensors do)."""
    if weight.ndim != 2 or 0 in weight.shape:
        return f"the fp8 weight has shape {tuple(weight.shape)}, not a non-empty matrix"
    for role, tensor in (("weight_scale", scale), ("input_scale", input_scale)):
        if tensor is not None and (tensor.numel() != 1 or not tensor.dtype.is_floating_point):
            return (f"its {role} is {str(tensor.dtype).removeprefix('torch.')} of shape {tuple(tensor.shape)}; an fp8 "
                    "layer takes one float scale per tensor")
    return None


def scale_problem(**scales):
    """Which of the named scalar scales ({role: tensor or None}) is not finite, or None (reads the values)."""
    for role, tensor in scales.items():
        if tensor is not None and not tensor.is_meta and not torch.isfinite(tensor.float()).all():
            return f"its {role} is {tensor.float().reshape(-1)[0].item()}, not a finite number"
    return None


class Fp8Linear(DequantizingLinear):
    """nn.Linear (no bias) with an fp8 weight and a scalar scale. With `input_scale` the activations are quantized
    with it (static, as the checkpoint was calibrated), otherwise per call from their absolute maximum. Raises
    ValueError for tensors that cannot form such a layer (see fp8_problem)."""

    def __init__(self, weight, scale, input_scale=None, compute_dtype=torch.bfloat16):
        problem = fp8_problem(weight, scale, input_scale) or scale_problem(weight_scale=scale, input_scale=input_scale)
        if problem:
            raise ValueError(problem)
        super().__init__(weight.shape[1], weight.shape[0], compute_dtype)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.float().reshape(()))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))

    def dequantized(self, dtype=None):
        return (self.weight.float() * self.weight_scale).to(dtype or self.compute_dtype)

    native = True  # set to False for good when the fp8 matmul fails on this GPU / torch

    def forward_base(self, x):
        if Fp8Linear.native and native_fp8(x.device) and x.shape[-1] % 16 == 0 and self.out_features % 16 == 0:
            try:
                return self.scaled_mm(x.to(self.compute_dtype))
            except RuntimeError as e:
                log.warning("fp8 matmul (torch._scaled_mm) failed (%s); dequantizing fp8 weights instead", e)
                Fp8Linear.native = False
        return super().forward_base(x)

    def scaled_mm(self, x):
        rows = x.reshape(-1, x.shape[-1])
        fp8_max = FP8_MAX[torch.float8_e4m3fn]
        scale = (self.input_scale if self.input_scale is not None
                 else (rows.abs().amax().float() / fp8_max).clamp_min(1e-12))
        quantized = (rows / scale.to(rows.dtype)).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        weight = (self.weight if self.weight.dtype == torch.float8_e4m3fn
                  else self.weight.float().to(torch.float8_e4m3fn))
        out = torch._scaled_mm(quantized, weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=self.compute_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)
