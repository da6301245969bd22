"""PoseBERT end to end on a small batch shaped like the reader's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from data_shards.skeleton import NUM_JOINTS
from pretrain.model import (
    BackboneConfig,
    EncoderConfig,
    MaskConfig,
    PoseBERT,
    PoseBERTConfig,
    PoseBERTOutput,
    QuantizerConfig,
)

TINY = "test_resnet"  # timm's own CI model: 0.4 M parameters
B, V, T, H, W = 2, 2, 6, 32, 32
D, P = 32, 16


def _batch(seed: int = 0) -> dict:
    """What data_shards.read yields (collate): uint8 frames, bool masks, poses, cameras."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, V, T, H, W, dtype=torch.bool)
    masks[..., 8:24, 12:20] = True
    return {
        "frames": torch.randint(0, 256, (B, V, T, 3, H, W), generator=g, dtype=torch.uint8),
        "masks": masks,
        "pose3d": torch.randn(B, T, NUM_JOINTS, 3, generator=g) * 500,
        "pose2d": torch.rand(B, V, T, NUM_JOINTS, 2, generator=g) * W,
        "K": torch.eye(3).expand(B, V, T, 3, 3).clone(),
        "Rt": torch.eye(3, 4).expand(B, V, 3, 4).clone(),
    }


def _config(**kw) -> PoseBERTConfig:
    parts = {
        "backbone": BackboneConfig(name=TINY),
        "encoder": EncoderConfig(width=D, depth=2, heads=4, conv_kernel=5, conv_groups=4),
        "mask": MaskConfig(prob=0.3, span=2),
        "proj_dim": P,
    }
    return PoseBERTConfig(**{**parts, **kw})


def _model(**kw) -> PoseBERT:
    torch.manual_seed(0)
    return PoseBERT(_config(**kw))


def test_forward_shapes():
    out = _model()(_batch(), torch.Generator().manual_seed(0))
    assert isinstance(out, PoseBERTOutput)
    assert out.context.shape == out.targets.shape == (B, V, T, P)
    assert out.latents.shape == (B, V, T, D)
    assert out.mask.shape == (B, V, T) and out.mask.dtype == torch.bool
    assert out.mask.any(-1).all()  # min_masks: every view has a masked frame
    assert out.quantizer_stats == {} and out.diversity_loss is None
    assert torch.isfinite(out.context).all() and torch.isfinite(out.targets).all()


def test_gradients_reach_the_backbone():
    model = _model()
    out = model(_batch(), torch.Generator().manual_seed(0))
    sim = torch.cosine_similarity(out.context, out.targets.detach(), dim=-1)  # (B, V, T)
    (1 - sim[out.mask]).mean().backward()
    first_conv = next(p for n, p in model.backbone.named_parameters() if "conv" in n)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert model.encoder.mask_embedding.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)


def test_quantizer_targets_and_stats():
    model = _model(quantizer=QuantizerConfig(enabled=True, groups=2, entries=8, dim=16))
    out = model(_batch(), torch.Generator().manual_seed(0), step=1000)
    assert out.targets.shape == (B, V, T, P)
    assert set(out.quantizer_stats) >= {"perplexity", "usage", "dead_codes", "temperature"}
    assert out.quantizer_stats["temperature"] == pytest.approx(2.0 * 0.999995**1000)
    assert 0 <= out.diversity_loss <= 1
    (out.targets.sum() + out.diversity_loss).backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0


def test_generator_makes_masks_reproducible():
    model = _model().eval()  # no dropout: the generator is the only randomness
    a = model(_batch(), torch.Generator().manual_seed(7))
    b = model(_batch(), torch.Generator().manual_seed(7))
    c = model(_batch(), 8)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    torch.testing.assert_close(a.context, b.context)


def test_stages_compose_to_forward():
    model = _model().eval()
    batch = _batch()
    out = model(batch, 3)
    latents = model.encode_frames(batch["frames"])
    mask = model.mask(latents, torch.Generator().manual_seed(3))
    context, targets, _, _ = model.project(model.encode_sequence(latents, mask), latents)
    torch.testing.assert_close(mask, out.mask)
    torch.testing.assert_close(context, out.context)
    torch.testing.assert_close(targets, out.targets)
    assert model.embed(batch["frames"]).shape == (B, V, T, D)


def test_same_mask_across_views():
    model = _model(mask=MaskConfig(prob=0.3, span=2, same_across_views=True))
    out = model(_batch(), 0)
    assert torch.equal(out.mask[:, 0], out.mask[:, 1])


def test_background_mask_needs_masks():
    model = _model(backbone=BackboneConfig(name=TINY, background_mask=True))
    batch = _batch()
    assert model(batch, 0).context.shape == (B, V, T, P)
    del batch["masks"]
    with pytest.raises(ValueError, match="no 'masks'"):
        model(batch, 0)


def test_config_validation():
    with pytest.raises(ValueError, match="PoseBERTConfig.encoder"):
        PoseBERTConfig(encoder={"width": 8})
    with pytest.raises(ValueError, match="PoseBERTConfig.proj_dim"):
        PoseBERTConfig(proj_dim=0)
    assert dataclasses.asdict(PoseBERTConfig())["encoder"]["positional"] == "conv"
