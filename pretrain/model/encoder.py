"""BERT-style transformer encoder over the frames of one view, with relative positions only.

Masked frames are replaced by a learned mask embedding (wav2vec2); padded frames are zeroed and
never attended to, so a sequence's outputs do not depend on how much padding surrounds it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.positional import (
    ConvPositionalEmbedding,
    RelativePositionEmbedding,
    Rotary,
    apply_rotary,
    disentangled_bias,
)

Positional = Literal["conv", "relative", "rotary"]
POSITIONAL = ("conv", "relative", "rotary")


MAX_PARAMETERS = 2**31
"""Most weights the transformer layers may hold (8 GiB in fp32; BERT-large has 0.3 billion):
a config read from a file cannot make the process allocate without bound."""
_BOUNDS = {"width": " (1..8192)", "depth": " (1..128)", "heads": " (1..128, dividing width)",
           "ffn_mult": " (1..16)", "conv_kernel": " (1..1024)",
           "max_relative": " (1..4096)"}  # fmt: skip


@dataclasses.dataclass
class EncoderConfig:
    """Shape of the sequence encoder and where its position information comes from."""

    width: int = 768
    """D: width of the latents and of every layer (at most 8192)."""
    depth: int = 12
    """Number of transformer layers (at most 128)."""
    heads: int = 12
    """Attention heads per layer (must divide ``width``; at most 128)."""
    ffn_mult: int = 4
    """Feed-forward hidden width = ``ffn_mult * width`` (``ffn_mult`` at most 16). Together,
    ``depth * (4 + 2 * ffn_mult) * width**2`` (the layers' weights) may not exceed
    :data:`MAX_PARAMETERS`."""
    dropout: float = 0.1
    """Dropout on the input, after attention and in the feed-forward block."""
    attention_dropout: float = 0.1
    """Dropout on the attention weights."""
    positional: Positional = "conv"
    """'conv' (wav2vec2 convolutional embedding, default), 'relative' (DeBERTa disentangled
    attention) or 'rotary' (RoFormer). There is no absolute position table (issue 3)."""
    conv_kernel: int = 31
    """Kernel of the convolutional embedding, in frames (at most 1024). wav2vec2 uses 128 at
    50 Hz; our clips are tens of frames, and a kernel much longer than a clip only adds
    parameters."""
    conv_groups: int = 16
    """Groups of the convolutional embedding (must divide ``width``; wav2vec2: 16)."""
    max_relative: int = 64
    """k of the 'relative' kind: distances are clipped to [-k, k - 1] (2k embeddings; k at
    most 4096)."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies (RoFormer)."""
    pre_norm: bool = True
    """Layer norm before each block plus a final one (stable without a long warm-up; wav2vec2
    large's "stable layer norm"); False: BERT's post-norm, with a norm after the input."""
    norm_eps: float = 1e-5
    """Epsilon of every layer norm."""

    def __post_init__(self) -> None:
        checks = {
            "width": 1 <= self.width <= 8192,
            "depth": 1 <= self.depth <= 128,
            "heads": 1 <= self.heads <= 128 and self.width % self.heads == 0,
            "ffn_mult": 1 <= self.ffn_mult <= 16,
            "dropout": 0.0 <= self.dropout < 1.0,
            "attention_dropout": 0.0 <= self.attention_dropout < 1.0,
            "positional": self.positional in POSITIONAL,
            "conv_kernel": 1 <= self.conv_kernel <= 1024,
            "conv_groups": self.conv_groups >= 1 and self.width % self.conv_groups == 0,
            "max_relative": 1 <= self.max_relative <= 4096,
            "rotary_base": self.rotary_base > 1.0,
            "norm_eps": self.norm_eps > 0,
        }
        if self.positional == "rotary" and checks["heads"]:
            checks["heads"] = (self.width // self.heads) % 2 == 0  # rotary pairs channels
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"EncoderConfig.{name}: invalid value {getattr(self, name)!r}"
                                 f"{_BOUNDS.get(name, '')}")  # fmt: skip
        weights = self.depth * (4 + 2 * self.ffn_mult) * self.width**2
        if weights > MAX_PARAMETERS:
            raise ValueError(f"EncoderConfig.depth: {self.depth} layers of width {self.width} "
                             f"(ffn_mult {self.ffn_mult}) hold {weights:,} weights, more than "
                             f"the {MAX_PARAMETERS:,} allowed")  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class Attention(nn.Module):
    """Multi-head self-attention with optional DeBERTa relative terms or rotary positions;
    the product itself is ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    when there is no additive mask)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.dropout = cfg.attention_dropout

    def forward(
        self,
        x: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        relative: tuple[torch.Tensor, torch.Tensor] | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (S, T, D); key_bias (S, 1, 1, T) additive (padding); relative = (table (2k, D),
        index (T, T)); rotary = (cos, sin) (T, d). Returns (S, T, D)."""
        S, T, D = x.shape
        H, d = self.heads, self.head_dim
        q, k, v = self.qkv(x).view(S, T, 3, H, d).permute(2, 0, 3, 1, 4)  # 3 x (S, H, T, d)
        scale = 1.0 / math.sqrt(d)
        bias = key_bias
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if relative is not None:
            table, index = relative
            # DeBERTa-v2 shares the content projections with the position table. Through the
            # module call, not its weight: sharded engines (ZeRO-3) gather weights per call.
            pos = self.qkv(table).view(-1, 3, H, d)  # (2k, 3, H, d); the value part is unused
            pos_q, pos_k = pos[:, 0].transpose(0, 1), pos[:, 1].transpose(0, 1)  # (H, 2k, d)
            scale = 1.0 / math.sqrt(3 * d)  # three terms (DeBERTa eq. 4)
            rel = disentangled_bias(q, k, pos_q, pos_k, index) * scale  # (S, H, T, T)
            bias = rel if bias is None else rel + bias
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=scale
        )  # (S, H, T, d)
        return self.out(y.transpose(1, 2).reshape(S, T, D))


class Layer(nn.Module):
    """Attention + feed-forward, each in a residual branch (pre- or post-norm)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.width, cfg.ffn_mult * cfg.width),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_mult * cfg.width, cfg.width),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, **positions: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.norm1(x), **positions))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attention(x, **positions)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """latents (S, T, D), mask (S, T) True = masked, padding (S, T) True = pad -> (S, T, D)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        # wav2vec2 initialises its mask embedding uniformly in [0, 1).
        self.mask_embedding = nn.Parameter(torch.empty(cfg.width).uniform_())
        self.conv = self.relative = self.rotary = None
        if cfg.positional == "conv":
            self.conv = ConvPositionalEmbedding(cfg.width, cfg.conv_kernel, cfg.conv_groups)
        elif cfg.positional == "relative":
            self.relative = RelativePositionEmbedding(cfg.width, cfg.max_relative, cfg.norm_eps)
        else:
            self.rotary = Rotary(cfg.head_dim, cfg.rotary_base)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)  # final (pre) or input (post)
        for module in self.layers.modules():
            if isinstance(module, nn.Linear):  # BERT's initialisation
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        latents: torch.Tensor,
        mask: torch.Tensor | None = None,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        S, T, D = latents.shape
        for name, m in (("mask", mask), ("padding", padding)):
            if m is not None and (tuple(m.shape) != (S, T) or m.dtype != torch.bool):
                raise ValueError(f"{name} must be bool (S, T) = {(S, T)}, got {m.dtype} {m.shape}")
        x = latents  # (S, T, D)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        key_bias = None
        if padding is not None:
            # Zeroed, so the convolution sees padding exactly like its own zero border.
            x = x.masked_fill(padding[..., None], 0.0)
            key_bias = torch.zeros(S, 1, 1, T, dtype=x.dtype, device=x.device)
            # The dtype's minimum, not -inf: an all-padding row stays finite (uniform weights).
            key_bias = key_bias.masked_fill(padding[:, None, None, :], torch.finfo(x.dtype).min)
        if self.conv is not None:
            x = self.conv(x)
        if not self.cfg.pre_norm:
            x = self.norm(x)
        x = self.dropout(x)
        positions = {
            "key_bias": key_bias,
            "relative": None if self.relative is None else self.relative(T),
            "rotary": None if self.rotary is None else self.rotary(T, x.device),
        }
        for layer in self.layers:
            x = layer(x, **positions)
        return self.norm(x) if self.cfg.pre_norm else x
