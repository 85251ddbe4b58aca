"""The vision tower (`transformer.visual`): ViT + one cross-attention resampler, SPEC section 3.

Module and parameter names follow the checkpoint, so `state_dict` keys load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisualConfig

LN_EPS = 1e-6


def resize_position_grid(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A [L, C] table on a sqrt(L) grid, bicubic-resized (in float32) to a sqrt(tokens) grid."""
    src, dst = int(table.shape[0] ** 0.5), int(tokens ** 0.5)
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class VisualAttention(nn.Module):
    """Self-attention whose fused projection is laid out per head: [tokens, heads, (q|k|v) * head_dim]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, self.heads, 3 * (width // self.heads)).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisualBlock(nn.Module):
    def __init__(self, config: VisualConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=LN_EPS)
        self.attn = VisualAttention(config.width, config.heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=LN_EPS)
        self.mlp = VisualMLP(config.width, config.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Module):
    def __init__(self, config: VisualConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(config) for _ in range(config.layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ResamplerAttention(nn.Module):
    """nn.MultiheadAttention's parameters ([q; k; v] stacked), computed with SDPA, batch-first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        n, dim = key.shape[0], query.shape[-1]

        def heads(t):  # [n, L, dim] -> [n, heads, L, head_dim]
            return t.view(t.shape[0], t.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        q = heads(F.linear(query, w_q, b_q)).expand(n, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, heads(F.linear(key, w_k, b_k)), heads(F.linear(value, w_v, b_v)))
        return self.out_proj(out.transpose(1, 2).reshape(n, -1, dim))


class Resampler(nn.Module):
    """256 learned queries cross-attend to the ViT tokens: [n, tokens, width] -> [n, 256, output_dim]."""

    def __init__(self, config: VisualConfig):
        super().__init__()
        dim = config.output_dim
        self.query = nn.Parameter(torch.empty(config.n_queries, dim))
        self.pos_embed = nn.Parameter(torch.empty(config.n_queries, dim), requires_grad=False)
        # The original uses an identity when the ViT is as wide as the LLM.
        self.kv_proj = nn.Linear(config.width, dim, bias=False) if config.width != dim else nn.Identity()
        self.attn = ResamplerAttention(dim, dim // 128)
        self.ln_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos_kv = resize_position_grid(self.pos_embed, x.shape[1])
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0)
        return self.attn(q, kv + pos_kv, kv)


class VisionTower(nn.Module):
    """Pixels [n, 3, S, S] (already normalized) -> image embeddings [n, 256, output_dim]."""

    def __init__(self, config: VisualConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(config.n_queries, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=LN_EPS)
        self.transformer = VisualTransformer(config)
        self.attn_pool = Resampler(config)
        self.ln_post = nn.LayerNorm(config.output_dim, eps=LN_EPS)
        self.proj = nn.Parameter(torch.empty(config.output_dim, config.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [n, grid*grid, width]
        x = x + resize_position_grid(self.positional_embedding, x.shape[1])
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(self.attn_pool(x)) @ self.proj
