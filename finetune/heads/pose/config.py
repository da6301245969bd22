"""What ``posebert finetune pose`` trains and how: one frozen config, recipes as functions.

``posebert finetune pose --recipe NAME --set key=value`` (``--set help`` lists every field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from finetune.loop import OptimConfig
from pretrain.engine.schedules import LRSchedule

MODES = ("probe", "full")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The linear probe: a head on the frozen encoder's per-frame features."""

    steps: int = 600
    """Optimiser steps."""
    batch: int = 1024
    """Frames per step."""
    optim: OptimConfig = OptimConfig(kind="adamw", lr=3e-3, weight_decay=1e-4,
                                     schedule=LRSchedule(warmup_steps=10))  # fmt: skip
    """AdamW with a warm-up, cosine to 10%."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps}, {self.batch}")


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning: the encoder and the head trained together on labelled windows."""

    steps: int = 100
    """Optimiser steps."""
    windows: int = 4
    """Windows per step."""
    views: int = 2
    """Views drawn per window per step (all of them when larger than the split's V)."""
    frames: int = 8
    """Consecutive frames cropped per window per step (all of them when larger than T)."""
    optim: OptimConfig = OptimConfig(kind="adamw", lr=3e-4, weight_decay=1e-4, clip_norm=1.0,
                                     schedule=LRSchedule(warmup_steps=10))  # fmt: skip
    """The encoder's optimiser (the head's rate is ``head_lr_scale`` times higher)."""
    head_lr_scale: float = 10.0
    """The head's learning rate over the encoder's: the head starts from scratch."""
    max_memory_gb: float = 8.0
    """Bound on the labelled windows held in memory."""

    def __post_init__(self) -> None:
        for name in ("steps", "windows", "views", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.head_lr_scale > 0 and self.max_memory_gb > 0):
            raise ValueError("head_lr_scale and max_memory_gb must be > 0")


@dataclasses.dataclass(frozen=True)
class PoseConfig:
    """The 3D pose regression head: which rows to train and how they are scored."""

    modes: tuple[str, ...] = MODES
    """``probe`` (frozen encoder, linear head) and/or ``full`` (everything trained)."""
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    """Shares of the train windows whose labels are used (each in (0, 1]; nested subsets)."""
    eval_split: str = "val"
    """Held-out split the heads are scored on."""
    seed: int = 0
    """Seeds the label subsets, the random-init encoder, head init and batch order."""
    batch_size: int = 8
    """Windows per batch when embedding or predicting a split."""
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    full: FullConfig = dataclasses.field(default_factory=FullConfig)

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"PoseConfig.modes: choose from {', '.join(MODES)}, got {self.modes}")
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"PoseConfig.label_fractions must lie in (0, 1], "
                             f"got {self.label_fractions}")  # fmt: skip
        if self.seed < 0 or self.batch_size < 1:
            raise ValueError("PoseConfig: seed must be >= 0 and batch_size >= 1")


def default() -> PoseConfig:
    """Probe 600 steps and full fine-tuning 100 steps at 1%, 10% and 100% labels."""
    return PoseConfig()


def demo() -> PoseConfig:
    """``posebert demo``: 10% and 100% labels."""
    return dataclasses.replace(default(), label_fractions=(0.1, 1.0))


def quick() -> PoseConfig:
    """``posebert demo --quick``: a few seconds per row, for smoke runs."""
    cfg = demo()
    full = dataclasses.replace(cfg.full, steps=5, optim=dataclasses.replace(
        cfg.full.optim, schedule=LRSchedule(warmup_steps=2)))  # fmt: skip
    return dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, steps=100), full=full)


RECIPES: dict[str, Callable[[], PoseConfig]] = {f.__name__: f for f in (default, demo, quick)}
