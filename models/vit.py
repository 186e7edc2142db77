"""Vision Transformer image classifier in Hugging Face's `ViTForImageClassification` layout (module names match its
state dict under `vit.`), for image safety classifiers such as Falconsai/nsfw_image_detection."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTParams:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_labels: int = 2
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True


class Embeddings(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, (p.image_size // p.patch_size) ** 2 + 1, p.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(p.channels, p.hidden_size, p.patch_size, stride=p.patch_size)

    def forward(self, pixels):
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(len(pixels), -1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embeddings


class SelfAttention(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.heads = p.num_heads
        self.query, self.key, self.value = (nn.Linear(p.hidden_size, p.hidden_size, bias=p.qkv_bias) for _ in range(3))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (f(x).view(batch, length, self.heads, -1).transpose(1, 2) for f in (self.query, self.key, self.value))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)


class Layer(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.attention = nn.Module()
        self.attention.attention = SelfAttention(p)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(p.hidden_size, p.hidden_size)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(p.hidden_size, p.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(p.intermediate_size, p.hidden_size)
        self.layernorm_before = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)

    def forward(self, x):
        x = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViT(nn.Module):
    """pixels (B, 3, size, size), normalised as the model's preprocessor says -> logits (B, num_labels)."""

    def __init__(self, p: ViTParams):
        super().__init__()
        self.params = p
        self.vit = nn.Module()
        self.vit.embeddings = Embeddings(p)
        self.vit.encoder = nn.Module()
        self.vit.encoder.layer = nn.ModuleList(Layer(p) for _ in range(p.num_layers))
        self.vit.layernorm = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.classifier = nn.Linear(p.hidden_size, p.num_labels)

    def forward(self, pixels):
        x = self.vit.embeddings(pixels.to(self.classifier.weight.dtype))
        for layer in self.vit.encoder.layer:
            x = layer(x)
        return self.classifier(self.vit.layernorm(x)[:, 0])
