"""Gumbel product quantizer: shapes, hard codes, statistics bounds, temperature schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model.quantizer import GumbelProductQuantizer, QuantizerConfig, gumbel_temperature

CFG = QuantizerConfig(enabled=True, groups=2, entries=8, dim=12)
GV = CFG.groups * CFG.entries


def _quantizer(train: bool = True) -> GumbelProductQuantizer:
    torch.manual_seed(0)
    q = GumbelProductQuantizer(16, CFG)
    return q.train(train)


def test_shapes_and_hard_codes():
    q = _quantizer()
    x = torch.randn(2, 3, 5, 16)
    out = q(x, 1.0, torch.Generator().manual_seed(0))
    assert out.quantized.shape == (2, 3, 5, 12)
    assert out.codes.shape == (2, 3, 5, 2) and out.codes.dtype == torch.int64
    # Hard forward: each group's slice is exactly the picked codebook entry.
    half = CFG.dim // CFG.groups
    for g in range(CFG.groups):
        picked = q.codebook[g][out.codes[..., g]]
        torch.testing.assert_close(out.quantized[..., g * half : (g + 1) * half], picked)


def test_statistics_bounds():
    q = _quantizer()
    for scale in (0.0, 1.0, 100.0):  # uniform logits, ordinary, near one-hot
        out = q(torch.randn(64, 16) * scale, 2.0, torch.Generator().manual_seed(1))
        s = out.stats
        assert CFG.groups - 1e-4 <= s["perplexity"] <= GV + 1e-4
        assert 1 <= s["code_perplexity"] <= GV + 1e-4
        assert 0 <= out.diversity_loss <= 1
        assert 0 < s["usage"] <= 1
        assert s["dead_codes"] == round(GV * (1 - s["usage"].item()))
    with torch.no_grad():
        q.logits.weight.zero_()
    uniform = q(torch.randn(64, 16), 2.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(uniform.stats["perplexity"], torch.tensor(float(GV)))
    assert uniform.diversity_loss.abs() < 1e-5  # all entries equally likely: no penalty


def test_gradients_straight_through_and_diversity():
    q = _quantizer()
    x = torch.randn(32, 16, requires_grad=True)
    out = q(x, 2.0, torch.Generator().manual_seed(0))
    (out.quantized.square().sum() + out.diversity_loss).backward()
    assert q.logits.weight.grad.abs().sum() > 0  # through the soft assignment
    assert q.codebook.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_noise_from_the_generator_and_eval_argmax():
    q = _quantizer()
    x = torch.randn(40, 16)
    a = q(x, 2.0, torch.Generator().manual_seed(3)).codes
    b = q(x, 2.0, torch.Generator().manual_seed(3)).codes
    c = q(x, 2.0, torch.Generator().manual_seed(4)).codes
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="Generator"):
        q(x, 2.0)
    q.eval()
    codes = q(x, 2.0).codes
    torch.testing.assert_close(codes, q.logits(x).view(40, 2, 8).argmax(-1))


def test_valid_selects_the_frames_of_the_statistics():
    q = _quantizer(train=False)
    x = torch.randn(10, 16)
    x[5:] = x[0]  # half the frames are copies: fewer codes in use
    valid = torch.zeros(10, dtype=torch.bool)
    valid[5:] = True
    stats = q(x, 1.0, valid=valid).stats
    assert stats["code_perplexity"] == pytest.approx(CFG.groups)


def test_temperature_schedule():
    cfg = QuantizerConfig(temperature=(2.0, 0.5, 0.999995))
    assert gumbel_temperature(0, cfg) == 2.0
    assert gumbel_temperature(1000, cfg) == pytest.approx(2.0 * 0.999995**1000)
    assert gumbel_temperature(10**7, cfg) == 0.5  # floored at the end value
    crossing = math.log(0.25) / math.log(0.999995)  # where start * decay**step hits the end
    assert gumbel_temperature(int(crossing) - 1, cfg) > 0.5
    assert gumbel_temperature(int(crossing) + 1, cfg) == 0.5
    steps = [gumbel_temperature(s, cfg) for s in range(0, 400_000, 10_000)]
    assert steps == sorted(steps, reverse=True)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"groups": 0}, "groups"),
        ({"entries": 1}, "entries"),
        ({"dim": 7}, "dim"),
        ({"temperature": (0.5, 2.0, 0.9)}, "temperature"),
        ({"temperature": (2.0, 0.5)}, "temperature"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"QuantizerConfig.{field}"):
        QuantizerConfig(**kw)
