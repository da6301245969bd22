"""PoseBERT: wav2vec2-style pretraining on video frames, cut into named stages.

encode_frames -> mask -> encode_sequence -> project. Each view is one sequence of T frames; the
objective (pretrain/objectives) compares the context of a masked frame with its target.
All randomness (masks, Gumbel noise) comes from the generator passed to ``forward``; only
dropout uses the global RNG, whose state the engine saves.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pretrain.model.augment import ColorAugmentConfig, color_augment
from pretrain.model.backbone import BackboneConfig, FrameEncoder
from pretrain.model.encoder import Encoder, EncoderConfig
from pretrain.model.masking import MaskConfig, span_mask
from pretrain.model.quantizer import GumbelProductQuantizer, QuantizerConfig, gumbel_temperature
from pretrain.model.rng import as_generator


@dataclasses.dataclass
class PoseBERTConfig:
    """The whole model: nested component configs plus the projection heads."""

    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Frame encoder (timm backbone, weights, channels-last, background mask)."""
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    """Sequence encoder; its ``width`` is D, the width of the latents."""
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    """Span masking of the frames."""
    quantizer: QuantizerConfig = dataclasses.field(default_factory=QuantizerConfig)
    """Optional product quantizer of the targets."""
    proj_dim: int = 256
    """P: width of the context and target vectors the contrastive loss compares (at most
    8192)."""
    feature_dropout: float = 0.1
    """Dropout on the latents fed to the sequence encoder (not on the targets; wav2vec2)."""
    augment: ColorAugmentConfig = dataclasses.field(default_factory=ColorAugmentConfig)
    """Colour jitter drawn per view and per window in training (off by default)."""

    def __post_init__(self) -> None:
        kinds = {
            "backbone": BackboneConfig,
            "encoder": EncoderConfig,
            "mask": MaskConfig,
            "quantizer": QuantizerConfig,
            "augment": ColorAugmentConfig,
        }
        for name, kind in kinds.items():
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"PoseBERTConfig.{name}: expected a {kind.__name__}")
        checks = {"proj_dim": 1 <= self.proj_dim <= 8192,
                  "feature_dropout": 0 <= self.feature_dropout < 1}  # fmt: skip
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PoseBERTConfig.{name}: invalid value {getattr(self, name)!r}")


@dataclasses.dataclass
class PoseBERTOutput:
    """What one forward pass gives the objective."""

    context: torch.Tensor
    """(B, V, T, P) encoder output projected: the prediction at every frame."""
    targets: torch.Tensor
    """(B, V, T, P) unmasked latents (or their quantized codes) projected."""
    latents: torch.Tensor
    """(B, V, T, D) frame latents before masking (for the cosine negative sampler)."""
    mask: torch.Tensor
    """(B, V, T) bool, True = masked."""
    quantizer_stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Detached scalars of the quantizer (see QuantizerOutput.stats); empty when it is off."""
    diversity_loss: torch.Tensor | None = None
    """The quantizer's diversity loss (with gradient); None when it is off."""


class PoseBERT(nn.Module):
    """Frames -> per-frame context and target vectors, in four named stages."""

    def __init__(self, cfg: PoseBERTConfig):
        super().__init__()
        self.cfg = cfg
        D, P = cfg.encoder.width, cfg.proj_dim
        self.backbone = FrameEncoder(cfg.backbone)
        self.feature_proj = nn.Linear(self.backbone.num_features, D)
        self.feature_norm = nn.LayerNorm(D, eps=cfg.encoder.norm_eps)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.encoder = Encoder(cfg.encoder)
        self.context_proj = nn.Linear(D, P)
        self.quantizer = None
        if cfg.quantizer.enabled:
            self.quantizer = GumbelProductQuantizer(D, cfg.quantizer)
        self.target_proj = nn.Linear(cfg.quantizer.dim if self.quantizer else D, P)

    def encode_frames(
        self, frames: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 frames (B, V, T, 3, H, W), foreground masks (B, V, T, H, W) bool (needed only
        with the background mask) -> latents (B, V, T, D): backbone, projection, layer norm."""
        if frames.ndim != 6:
            raise ValueError(f"frames must be (B, V, T, 3, H, W), got {tuple(frames.shape)}")
        B, V, T = frames.shape[:3]
        flat_masks = None
        if self.cfg.backbone.background_mask:
            if masks is None:
                raise ValueError("background_mask is on but the batch has no 'masks'")
            flat_masks = masks.flatten(0, 2)  # (B*V*T, H, W)
        features = self.backbone(frames.flatten(0, 2), flat_masks)  # (B*V*T, F)
        latents = self.feature_norm(self.feature_proj(features))  # (B*V*T, D)
        return latents.view(B, V, T, -1)  # (B, V, T, D)

    def mask(self, latents: torch.Tensor, generator: torch.Generator | int) -> torch.Tensor:
        """Span mask (B, V, T) bool, True = masked, for latents (B, V, T, D); one draw per view,
        or per sample with ``mask.same_across_views``."""
        B, V, T, _ = latents.shape
        if self.cfg.mask.same_across_views:
            mask = span_mask((B, T), self.cfg.mask, generator, latents.device)  # (B, T)
            return mask[:, None].expand(B, V, T).contiguous()
        return span_mask((B * V, T), self.cfg.mask, generator, latents.device).view(B, V, T)

    def encode_sequence(
        self, latents: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """latents (B, V, T, D), mask (B, V, T) True = masked -> hidden (B, V, T, D); each
        view is one sequence of T frames."""
        B, V, T, D = latents.shape
        x = self.feature_dropout(latents).reshape(B * V, T, D)  # (B*V, T, D)
        flat_mask = None if mask is None else mask.reshape(B * V, T)
        return self.encoder(x, flat_mask).view(B, V, T, D)

    def project(
        self,
        hidden: torch.Tensor,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """hidden, latents (B, V, T, D) -> (context (B, V, T, P), targets (B, V, T, P),
        quantizer stats, diversity loss or None). With the quantizer, the targets are its
        codes projected; ``generator`` and ``step`` (temperature) matter only then."""
        context = self.context_proj(hidden)  # (B, V, T, P)
        if self.quantizer is None:
            return context, self.target_proj(latents), {}, None
        temperature = gumbel_temperature(step, self.cfg.quantizer)
        q = self.quantizer(latents, temperature, generator)  # quantized (B, V, T, dim)
        return context, self.target_proj(q.quantized), q.stats, q.diversity_loss

    def forward(
        self, batch: dict, generator: torch.Generator | int, step: int = 0
    ) -> PoseBERTOutput:
        """A reader batch (``frames`` (B, V, T, 3, H, W) uint8, optional ``masks``
        (B, V, T, H, W) bool) -> :class:`PoseBERTOutput`. ``generator`` draws the colour
        augmentation (training, when configured), the mask and the Gumbel noise; ``step`` sets
        the Gumbel temperature."""
        generator = as_generator(generator)  # an int seed: one generator for every draw
        frames = batch["frames"]
        if self.training and self.cfg.augment.enabled:  # no draw at all when it is off
            frames = color_augment(frames, self.cfg.augment, generator)
        latents = self.encode_frames(frames, batch.get("masks"))  # (B, V, T, D)
        mask = self.mask(latents, generator)  # (B, V, T)
        hidden = self.encode_sequence(latents, mask)  # (B, V, T, D)
        context, targets, stats, diversity = self.project(hidden, latents, generator, step)
        return PoseBERTOutput(context, targets, latents, mask, stats, diversity)

    def embed(self, frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Unmasked per-frame embeddings (B, V, T, D) for retrieval and fine-tuning (eval mode
        for deterministic features; wrap in torch.no_grad() when no gradient is wanted)."""
        return self.encode_sequence(self.encode_frames(frames, masks))
