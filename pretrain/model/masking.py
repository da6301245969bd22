"""Span masking of frames (wav2vec2, Baevski et al. 2020), as a pure seeded function.

Convention, here and everywhere a mask is a bool tensor: **True = masked** (the frame is hidden
from the encoder and is a prediction target).

wav2vec2 draws span starts and lets spans overlap, so its ``mask_time_prob`` is not the share
of masked frames. Here spans never overlap (they may touch), so the expected share is ``prob``
itself, up to the ``min_masks`` floor and the ``T // span`` ceiling on the span count.
"""

from __future__ import annotations

import dataclasses

import torch

from pretrain.model.rng import as_generator, uniform


@dataclasses.dataclass
class MaskConfig:
    """How many frames are masked, and in which runs."""

    prob: float = 0.3
    """Expected share of masked frames in a sequence."""
    span: int = 4
    """Frames per masked span: neighbouring frames are near copies at 50 fps, so masking runs
    rather than single frames keeps the task from being interpolation (GUIDE 6)."""
    min_masks: int = 1
    """At least this many spans per sequence (``min_masks * span`` must fit in T)."""
    same_across_views: bool = False
    """Hide the same instants in every view of a sample (one draw per sample) instead of one
    independent draw per view."""

    def __post_init__(self) -> None:
        checks = {
            "prob": 0.0 <= self.prob <= 1.0,
            "span": self.span >= 1,
            "min_masks": self.min_masks >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"MaskConfig.{name}: invalid value {getattr(self, name)!r}")


def span_mask(
    shape: tuple[int, int],
    cfg: MaskConfig,
    generator: torch.Generator | int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool mask (S, T), True = masked: per row, ``n`` non-overlapping spans of ``cfg.span``
    frames placed uniformly at random, ``n = floor(prob * T / span + u)``, u ~ U[0, 1)
    (so E[n] * span / T = prob), clipped to [min_masks, T // span].

    Pure: the result depends only on the arguments and the generator's state (an int seed
    means a fresh CPU generator with that seed).
    """
    S, T = shape
    span = cfg.span
    if span > T or cfg.min_masks * span > T:
        raise ValueError(
            f"span masking: {cfg.min_masks} span(s) of {span} frames do not fit in {T} frames"
        )
    g = as_generator(generator)
    count = torch.floor(cfg.prob * T / span + uniform((S,), g)).long()  # (S,)
    count = count.clamp(min=cfg.min_masks, max=T // span)
    # Collapse every span to one slot: n spans + (T - n * span) free frames = `slots` positions;
    # choosing n distinct slots uniformly places n non-overlapping spans uniformly.
    slots = T - count * (span - 1)  # (S,) >= count since count * span <= T
    scores = uniform((S, T), g)
    scores = scores.masked_fill(torch.arange(T, device=g.device) >= slots[:, None], -1.0)
    n_max = int(count.max()) if S else 0
    chosen = scores.topk(n_max, dim=1).indices  # (S, n_max), best first
    keep = torch.arange(n_max, device=g.device) < count[:, None]  # (S, n_max)
    chosen = chosen.masked_fill(~keep, T).sort(dim=1).values  # kept slots first, ascending
    starts = chosen + torch.arange(n_max, device=g.device) * (span - 1)  # re-expand the spans
    frames = starts[..., None] + torch.arange(span, device=g.device)  # (S, n_max, span)
    frames = frames.masked_fill(~keep[..., None], T)  # dropped spans land in a spare column
    mask = torch.zeros(S, T + 1, dtype=torch.bool, device=g.device)
    mask.scatter_(1, frames.reshape(S, -1), True)
    mask = mask[:, :T]
    return mask if device is None else mask.to(device)
