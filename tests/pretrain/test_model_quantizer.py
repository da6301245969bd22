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
        ({"logit_init": "xavier"}, "logit_init"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"QuantizerConfig.{field}"):
        QuantizerConfig(**kw)


def test_perplexity_gradient_is_finite_where_a_probability_is_exactly_zero():
    """A sharpening codebook underflows probabilities to 0; log 0's gradient made every step
    of a full run non-finite (step 49 of the ablation's quantizer variant)."""
    from pretrain.model.quantizer import _perplexity

    logits = torch.tensor([[200.0, 0.0, -200.0], [0.0, 0.0, 0.0]], requires_grad=True)
    marginal = logits.softmax(-1)
    assert (marginal == 0).any()
    perplexity = _perplexity(marginal)
    perplexity.backward()
    assert math.isclose(perplexity.item(), 1.0 + 3.0, rel_tol=1e-5)
    assert torch.isfinite(logits.grad).all()


def test_a_collapsed_codebook_is_no_free_solution_of_the_contrastive_task():
    """Every target the same code: with wav2vec 2.0's rule (identical distractors dropped) the
    contrastive loss is ~0, so collapse pays; for codes the distractors stay and it costs
    log(1 + K)."""
    from pretrain.objectives import ContrastiveConfig, NegativeConfig, contrastive_loss

    g = torch.Generator().manual_seed(0)
    B, V, T, P = 2, 1, 12, 8
    context = torch.randn(B, V, T, P, generator=g)
    code = torch.randn(P, generator=g)
    targets = code.expand(B, V, T, P).clone()
    context = context * 0.01 + code  # the context predicts the one code perfectly
    mask = torch.zeros(B, V, T, dtype=torch.bool)
    mask[:, :, ::3] = True
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="uniform", num=3))  # 4 masked per row
    frames, m = contrastive_loss(context, targets, mask, cfg, generator=g)
    codes, mq = contrastive_loss(context, targets, mask, cfg, generator=g, quantized=True)
    assert mq["negatives_per_anchor"] == 3 and m["negatives_per_anchor"] == 0
    assert float(frames) < 1e-3
    assert math.isclose(float(codes), math.log(1 + 3), rel_tol=1e-3)


def test_unit_logit_init_gives_unit_variance_logits_and_soft_early_assignments():
    """wav2vec 2.0's unit-normal projection on layer-normed latents of width D gives logits of
    standard deviation ~sqrt(D), a one-hot Gumbel softmax from step 1; ``unit`` gives ~1."""
    D, cfg = 128, QuantizerConfig(enabled=True, groups=2, entries=320, dim=64)
    x = torch.nn.functional.layer_norm(torch.randn(4096, D), (D,))
    stds, peak = {}, {}
    for init in ("wav2vec2", "unit"):
        torch.manual_seed(0)
        q = GumbelProductQuantizer(D, QuantizerConfig(**{**vars(cfg), "logit_init": init}))
        with torch.no_grad():
            logits = q.logits(x)
        stds[init] = logits.std().item()
        # each frame's largest soft assignment at the starting temperature 2
        peak[init] = (logits.view(-1, 2, 320) / 2.0).softmax(-1).amax(-1).mean().item()
    assert 9 < stds["wav2vec2"] < 13 and 0.8 < stds["unit"] < 1.2
    assert peak["wav2vec2"] > 0.5 and peak["unit"] < 0.02  # near one-hot vs spread
