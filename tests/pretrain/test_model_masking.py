"""Span masking: share near prob, spans, minimum count, determinism (True = masked)."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.masking import MaskConfig, span_mask


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1D bool tensor."""
    runs, current = [], 0
    for value in row.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@pytest.mark.parametrize("prob, span, T", [(0.3, 4, 64), (0.3, 1, 50), (0.5, 5, 40), (0.1, 3, 90)])
def test_masked_share_near_prob(prob, span, T):
    mask = span_mask((4000, T), MaskConfig(prob=prob, span=span, min_masks=0), 0)
    assert mask.dtype == torch.bool and mask.shape == (4000, T)
    assert abs(mask.float().mean().item() - prob) < 0.01
    # Every sequence gets its own draw.
    assert len({tuple(r.tolist()) for r in mask[:50]}) > 40


def test_spans_do_not_overlap_and_cover_whole_spans():
    cfg = MaskConfig(prob=0.4, span=4, min_masks=0)
    mask = span_mask((500, 48), cfg, 3)
    for row in mask:
        assert all(run % cfg.span == 0 for run in _runs(row))  # runs are whole spans
    # Spans land everywhere, borders included.
    assert mask.any(0).all()


def test_min_masks_and_max_spans():
    mask = span_mask((300, 20), MaskConfig(prob=0.0, span=3, min_masks=2), 1)
    assert (mask.sum(1) == 6).all()  # prob 0: exactly the minimum
    full = span_mask((10, 20), MaskConfig(prob=1.0, span=3, min_masks=0), 1)
    assert (full.sum(1) == 18).all()  # at most T // span spans
    assert not span_mask((10, 20), MaskConfig(prob=0.0, min_masks=0), 1).any()


def test_same_seed_same_mask_and_generator_state():
    cfg = MaskConfig()
    torch.testing.assert_close(span_mask((8, 32), cfg, 7), span_mask((8, 32), cfg, 7))
    assert not torch.equal(span_mask((8, 32), cfg, 7), span_mask((8, 32), cfg, 8))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first = span_mask((8, 32), cfg, g1)
    torch.testing.assert_close(first, span_mask((8, 32), cfg, g2))
    assert not torch.equal(span_mask((8, 32), cfg, g1), first)  # the generator moved on
    torch.testing.assert_close(span_mask((8, 32), cfg, 5), first)  # int seed == fresh generator
    state = torch.random.get_rng_state()
    span_mask((8, 32), cfg, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched


def test_spans_that_do_not_fit_are_an_error():
    with pytest.raises(ValueError, match="do not fit in 3 frames"):
        span_mask((2, 3), MaskConfig(span=4), 0)
    with pytest.raises(ValueError, match="do not fit"):
        span_mask((2, 8), MaskConfig(span=3, min_masks=3), 0)


@pytest.mark.parametrize("kw", [{"prob": 1.5}, {"span": 0}, {"min_masks": -1}])
def test_config_validation(kw):
    with pytest.raises(ValueError, match=f"MaskConfig.{next(iter(kw))}"):
        MaskConfig(**kw)
