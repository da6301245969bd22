"""Colour augmentation drawn independently per view and per window (training only).

Views of one instant are positives of each other; when they share clothing colour and
lighting, the contrastive task can be solved from colour alone, and the features learn
appearance instead of pose. Drawing brightness, contrast, saturation, a per-channel colour cast
and (optionally) a channel permutation independently for every (window, view), and keeping them
fixed over the window's frames (so motion is untouched), removes that shortcut.

Frames stay uint8 (B, V, T, 3, H, W): the backbone normalises them as before. A pure function
of the frames and the generator (the run's per-step generator), so runs stay reproducible.
"""

from __future__ import annotations

import dataclasses

import torch

from pretrain.model.rng import uniform


@dataclasses.dataclass(frozen=True)
class ColorAugmentConfig:
    """Strength of each jitter (0 turns it off); all off by default."""

    brightness: float = 0.0
    """Multiply by a factor in [1 - b, 1 + b]."""
    contrast: float = 0.0
    """Blend with the frame's mean grey by a factor in [1 - c, 1 + c]."""
    saturation: float = 0.0
    """Blend with the frame's grey image by a factor in [1 - s, 1 + s]."""
    color_cast: float = 0.0
    """Multiply each channel by its own factor in [1 - k, 1 + k]."""
    channel_shuffle: float = 0.0
    """Probability of permuting the RGB channels (clothing colours swap outright)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 0 <= value <= 1:
                raise ValueError(f"ColorAugmentConfig.{f.name} must lie in [0, 1], got {value}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self))


_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
_GREY = torch.tensor([0.299, 0.587, 0.114])


def color_augment(frames: torch.Tensor, cfg: ColorAugmentConfig,
                  generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """uint8 frames (B, V, T, 3, H, W) -> the same shape and dtype, jittered per (B, V)."""
    if not cfg.enabled:
        return frames
    B, V = frames.shape[:2]
    device = frames.device

    def factor(strength: float, channels: int = 1) -> torch.Tensor:  # (B, V, 1, C, 1, 1)
        u = uniform((B, V, channels), generator, device)
        return (1 + strength * (2 * u - 1)).view(B, V, 1, channels, 1, 1)

    x = frames.float()  # (B, V, T, 3, H, W)
    grey_w = _GREY.to(device).view(1, 1, 1, 3, 1, 1)
    if cfg.channel_shuffle > 0:
        shuffle = uniform((B, V), generator, device) < cfg.channel_shuffle
        pick = (uniform((B, V), generator, device) * len(_PERMUTATIONS)).long()
        perm = torch.where(shuffle[..., None], _PERMUTATIONS.to(device)[pick],
                           torch.arange(3, device=device))  # (B, V, 3)  # fmt: skip
        index = perm.view(B, V, 1, 3, 1, 1).expand_as(x)
        x = torch.gather(x, 3, index)
    if cfg.brightness > 0:
        x = x * factor(cfg.brightness)
    if cfg.color_cast > 0:
        x = x * factor(cfg.color_cast, 3)
    if cfg.saturation > 0:
        grey = (x * grey_w).sum(3, keepdim=True)  # (B, V, T, 1, H, W)
        x = grey + factor(cfg.saturation) * (x - grey)
    if cfg.contrast > 0:
        mean = (x * grey_w).sum(3, keepdim=True).mean(dim=(-2, -1), keepdim=True)
        x = mean + factor(cfg.contrast) * (x - mean)
    return x.round_().clamp_(0, 255).to(torch.uint8)
