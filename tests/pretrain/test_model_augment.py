"""Colour augmentation: per (window, view), fixed over the window's frames, seeded, off by
default (the golden debug_cpu curve does not move)."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import ColorAugmentConfig, PoseBERT, color_augment
from pretrain.recipes import debug_cpu

STRONG = ColorAugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, color_cast=0.3,
                            channel_shuffle=0.5)  # fmt: skip


def _frames(B=3, V=4, T=5, H=8, W=8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(40, 200, (B, 1, 1, 3, H, W), generator=g)
    return base.expand(B, V, T, 3, H, W).clone().to(torch.uint8)  # every view, frame alike


def test_views_differ_frames_of_a_view_do_not():
    x = _frames()
    y = color_augment(x, STRONG, torch.Generator().manual_seed(1))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert (y == y[:, :, :1]).all()  # the same jitter over a window's frames: motion untouched
    for b in range(x.shape[0]):
        means = y[b, :, 0].float().mean(dim=(-2, -1))  # (V, 3) colour of each view
        assert torch.cdist(means, means).triu(1).max() > 10  # views drawn independently


def test_seeded_and_off_by_default():
    x = _frames()
    a = color_augment(x, STRONG, torch.Generator().manual_seed(5))
    b = color_augment(x, STRONG, torch.Generator().manual_seed(5))
    c = color_augment(x, STRONG, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert color_augment(x, ColorAugmentConfig(), g) is x
    assert torch.equal(g.get_state(), state)  # off: nothing drawn


def test_channel_shuffle_permutes_and_brightness_scales():
    x = torch.zeros(64, 1, 1, 3, 2, 2, dtype=torch.uint8)
    x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2] = 10, 100, 200
    y = color_augment(x, ColorAugmentConfig(channel_shuffle=1.0), torch.Generator().manual_seed(0))
    got = y[:, 0, 0, :, 0, 0]  # (64, 3)
    assert (got.sort(dim=1).values == torch.tensor([10, 100, 200], dtype=torch.uint8)).all()
    assert len({tuple(r.tolist()) for r in got}) > 3  # several permutations drawn
    z = color_augment(x, ColorAugmentConfig(brightness=0.5), torch.Generator().manual_seed(0))
    ratio = z[:, 0, 0, 2, 0, 0].float() / 200
    assert ((ratio >= 0.49) & (ratio <= 1.28)).all() and ratio.std() > 0.05  # 200 * 1.5 clips


def test_model_applies_it_in_training_only():
    cfg = debug_cpu().model
    import dataclasses

    model = PoseBERT(dataclasses.replace(cfg, augment=STRONG))
    frames = torch.randint(0, 255, (2, 2, 4, 3, 32, 32), dtype=torch.uint8)
    batch = {"frames": frames}
    torch.manual_seed(0)
    model.train()
    a = model(batch, generator=3).latents
    model.eval()
    plain = PoseBERT(cfg)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(model(batch, generator=3).latents, plain(batch, generator=3).latents)
    model.train()
    assert not torch.allclose(a, plain.train()(batch, generator=3).latents)


def test_bad_strength_is_one_clear_error():
    with pytest.raises(ValueError, match="brightness must lie in"):
        ColorAugmentConfig(brightness=1.5)
