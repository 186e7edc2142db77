"""Latents <-> transformer tokens, and the 4-axis (t, h, w, l) position ids of text, image and references."""

import torch

REFERENCE_T_SCALE = 10  # reference k gets t = 10 + 10k


def pack(latents):
    """(B, C, h, w) -> (B, h·w, C), row-major."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens, height, width):
    """(B, h·w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def image_ids(height, width, t=0):
    """(h·w, 4) ids (t, row, col, 0) for a latent grid."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.tensor([0]))


def text_ids(length):
    """(L, 4) ids (0, 0, 0, position)."""
    return torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(length))


def pack_references(latents):
    """Reference latents [(1 or B, C, h_k, w_k), ...] -> tokens (B, Σ h_k·w_k, C) and ids (Σ, 4), t = 10, 20, ..."""
    tokens = torch.cat([pack(latent) for latent in latents], dim=1)
    ids = torch.cat([image_ids(*latent.shape[-2:], t=REFERENCE_T_SCALE * (k + 1)) for k, latent in enumerate(latents)])
    return tokens, ids
