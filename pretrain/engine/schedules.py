"""Schedules: pure functions of the step (STYLE.md habit 8), unit-tested and logged.

The training loop asks :meth:`LRSchedule.lr` for every step and writes the value into the
optimizer's parameter groups itself, so DeepSpeed's own scheduler is never used and a resumed
run gets the same learning rate as an uninterrupted one without any scheduler state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal


def warmup_cosine(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``floor`` at step
    ``total``; ``floor`` after that.

    Step s of the warm-up (0-based) gets ``peak * (s + 1) / (warmup + 1)`` so the first step is
    not wasted at zero (nanoGPT's ``get_lr``); the decay starts at ``peak`` at step ``warmup``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def warmup_exponential(step: int, peak: float, warmup: int, total: int, floor: float) -> float:
    """The warm-up of :func:`warmup_cosine`, then ``peak * (floor / peak) ** progress``: a
    geometric decay reaching ``floor`` at step ``total`` (VideoPose3D's per-epoch factor, spread
    over steps); ``floor`` after that."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= total or peak == 0:
        return floor
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor / peak) ** progress


def exponential_decay(step: int, start: float, decay: float, floor: float) -> float:
    """``max(start * decay**step, floor)`` (e.g. a Gumbel-softmax temperature, wav2vec2)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return max(start * decay**step, floor)


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Learning rate per optimizer step: linear warm-up, then a decay to a floor."""

    decay: Literal["cosine", "exponential", "constant"] = "cosine"
    """After the warm-up: cosine to the floor, geometric to the floor, or the peak throughout."""
    warmup_steps: int = 0
    """Steps of linear warm-up."""
    decay_steps: int | None = None
    """Step at which the cosine reaches the floor; None: the run's ``max_steps``."""
    min_lr_ratio: float = 0.1
    """Floor as a fraction of the peak learning rate (the optimizer's ``lr``)."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            raise ValueError(
                f"decay_steps ({self.decay_steps}) must be >= warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr(self, step: int, peak: float, max_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) for a run of ``max_steps``."""
        total = self.decay_steps if self.decay_steps is not None else max_steps
        total, floor = max(total, self.warmup_steps), peak * self.min_lr_ratio
        if self.decay == "constant":
            return warmup_cosine(step, peak, self.warmup_steps, total, peak)
        if self.decay == "exponential" and self.min_lr_ratio > 0:
            return warmup_exponential(step, peak, self.warmup_steps, total, floor)
        return warmup_cosine(step, peak, self.warmup_steps, total, floor)
