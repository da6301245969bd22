"""Relative position information for the sequence encoder; there is no absolute table.

transformers 5 accepts ``BertConfig(position_embedding_type="relative_key_query")`` and silently
ignores it (GUIDE section 3), so the three kinds are written here:

- ``conv``: wav2vec2's convolutional positional embedding (Baevski et al. 2020), a grouped 1D
  convolution over time added to the latents. Zero padding makes it translation-equivariant.
- ``relative``: DeBERTa's disentangled attention (He et al. 2021): content-to-position and
  position-to-content terms from relative position embeddings clipped at a maximum distance.
- ``rotary``: RoFormer's rotary embedding (Su et al. 2021): queries and keys rotated by an angle
  proportional to their position, so their dot product depends only on the distance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvPositionalEmbedding(nn.Module):
    """(S, T, D) -> (S, T, D): ``x + gelu(conv1d(x))`` with 'same' zero padding."""

    def __init__(self, width: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel, groups=groups)
        # An even kernel pads one more frame on the right (wav2vec2 drops the extra frame).
        self.pad = ((kernel - 1) // 2, kernel // 2)
        # wav2vec2's initialisation: variance 4 / (kernel * input width).
        nn.init.normal_(self.conv.weight, 0.0, 2.0 * math.sqrt(1.0 / (kernel * width)))
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x.transpose(1, 2), self.pad)  # (S, D, T + kernel - 1)
        y = F.gelu(self.conv(y))  # (S, D, T)
        return x + y.transpose(1, 2)  # (S, T, D)


class RelativePositionEmbedding(nn.Module):
    """DeBERTa's shared table of 2k relative position embeddings (k = ``max_relative``).

    ``forward(T)`` returns the layer-normed table (2k, D) and the bucket of every
    (query i, key j) pair, ``clip(i - j, -k, k - 1) + k``, as a (T, T) index.
    """

    def __init__(self, width: int, max_relative: int, eps: float = 1e-5):
        super().__init__()
        self.max_relative = max_relative
        self.table = nn.Parameter(torch.empty(2 * max_relative, width))
        nn.init.normal_(self.table, 0.0, 0.02)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.max_relative
        pos = torch.arange(T, device=self.table.device)
        index = (pos[:, None] - pos[None, :]).clamp(-k, k - 1) + k  # (T, T)
        return self.norm(self.table), index


def disentangled_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """DeBERTa's relative terms of the attention scores, unscaled.

    q, k (S, H, T, d) content queries/keys; pos_q, pos_k (H, 2k, d) the relative table through
    the query/key projections; index (T, T) = bucket of (i, j). Returns (S, H, T, T):
    ``q_i . pos_k[idx(i, j)] + k_j . pos_q[idx(j, i)]`` (content-to-position + position-to-content).
    """
    S, H, T, _ = q.shape
    idx = index.expand(S, H, T, T)
    c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, idx)  # (S, H, T_i, T_j)
    p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, idx)  # (S, H, T_j, T_i)
    return c2p + p2c.transpose(-1, -2)


class Rotary(nn.Module):
    """RoFormer rotary embedding: ``forward(T)`` -> cos, sin (T, d) for :func:`apply_rotary`."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head width, got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def forward(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed each call in float32 (no buffer a bf16 engine would round).
        half = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        inv_freq = self.base ** (-half / self.head_dim)  # (d / 2,)
        angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # (T, d)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, d) queries or keys by their positions (rotate-half pairing)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
