"""Pose-GPT's config, recipes and the schedules that are pure functions of the step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from data_shards.untrusted import brief
from finetune.loop import OptimConfig
from pretrain.engine.schedules import LRSchedule
from pretrain.model.encoder import MAX_PARAMETERS

HORIZONS_MS = (80, 160, 320, 400, 560, 1000)
MAX_FRAMES = 4096
"""Most positions a Pose-GPT holds (seed plus the longest horizon; 80 s at 50 fps): its
position table and a forecast's key/value cache grow with them."""
_BOUNDS = {"seed_frames": " (2..1024)", "horizons_ms": " (each 1..60000)",
           "layers": " (1..64)", "heads": " (1..128, dividing width)",
           "width": " (1..8192, a multiple of heads)", "batch_size": " (1..4096)",
           "rollout_frames": f" (1..{MAX_FRAMES})"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FutureConfig:
    """Pose-GPT training and the forecasting protocol; validated when built."""

    seed_frames: int = 10
    """Observed frames before the forecast (10 = 200 ms at 50 fps; 2 to 1024)."""
    horizons_ms: tuple[int, ...] = HORIZONS_MS
    """Reported horizons, ms after the last seed frame (each 1 to 60,000); the longest sets
    the forecast length (with the seed, at most :data:`MAX_FRAMES` frames at the data's
    frame rate)."""
    layers: int = 2
    """GPT-2 blocks (at most 64)."""
    heads: int = 4
    """Attention heads per block (at most 128)."""
    width: int = 64
    """GPT-2 hidden size (a multiple of ``heads``, at most 8192; ``12 * layers * width**2``,
    the blocks' weights, at most :data:`pretrain.model.encoder.MAX_PARAMETERS`); 64 keeps
    the default run near a minute on two CPU cores."""
    steps: int = 600
    """Optimiser steps."""
    batch_size: int = 32
    """Training windows per step (at most 4096)."""
    optim: OptimConfig = OptimConfig(kind="adamw", lr=2e-3, weight_decay=0.01, clip_norm=1.0,
                                     schedule=LRSchedule(warmup_steps=50))  # fmt: skip
    """AdamW, linear warm-up, then cosine decay to 10%."""
    sampling_max: float = 0.5
    """Share of inputs after the seed replaced by the model's predictions at the end of the ramp."""
    sampling_ramp: tuple[float, float] = (0.2, 0.8)
    """Fractions of ``steps`` where the scheduled-sampling share starts and stops rising."""
    velocity_weight: float = 0.1
    """Weight of the root-velocity error (m/s) beside the pose error (m) in the loss."""
    mirror: bool = True
    """Left/right mirroring augmentation (with the joint swap)."""
    speed: tuple[float, float] = (0.8, 1.25)
    """Playback-speed augmentation: each training window is resampled at a speed drawn
    log-uniformly from this range ((1, 1): off)."""
    damping: float = 0.7
    """Initial share of its last step that each joint coordinate continues (learned, one per
    coordinate, in (0, 1); 0: off, the model starts as zero velocity)."""
    reversion: float = 0.01
    """Initial share of the way back to the mean of the seed poses taken per frame (learned,
    one per coordinate, in (0, 1); 0: off): long forecasts settle near the observed poses
    instead of drifting."""
    rollout_weight: float = 0.0
    """Weight of the rollout loss: the MPJPE of an autoregressive forecast of
    ``rollout_frames`` frames from each window's seed, the model fed its own outputs (0: off)."""
    rollout_frames: int = 12
    """Frames rolled out by the rollout loss (at most the longest horizon, and
    :data:`MAX_FRAMES`)."""
    rollout_every: int = 1
    """Steps between rollout losses (a rollout costs one forward pass per frame)."""
    select_clips: int = 2
    """Train clips held out of training to choose the step kept and the transformer's share
    (lowest worst-horizon ratio of the forecast error to zero velocity's on them; evenly
    spaced in name order; 0: off, the last step with the full share). The evaluation splits
    are never used to choose."""
    select_every: int = 50
    """Steps between those choices (step 0, the damped baseline, is always a candidate)."""
    residual_shares: tuple[float, ...] = (0.0, 0.5, 1.0)
    """Shares of the transformer's output tried at each choice (0: the damped baseline with
    the shares learned so far)."""
    seed: int = 0
    """Seed of initialisation, batches, augmentation and sampling."""
    train_split: str = "train"
    """Split the model is trained on."""
    eval_splits: tuple[str, ...] = ("val", "test")
    """Held-out splits, reported one by one and pooled."""
    eval_stride: int = 10
    """Frames between the starts of consecutive evaluation windows of a clip."""

    def __post_init__(self) -> None:
        positive = ("seed_frames", "layers", "heads", "width", "steps", "batch_size",
                    "eval_stride")  # fmt: skip
        checks = {name: getattr(self, name) >= 1 for name in positive}
        checks.update(
            seed_frames=2 <= self.seed_frames <= 1024,  # constant velocity needs two frames
            horizons_ms=bool(self.horizons_ms)
            and 0 < min(self.horizons_ms)
            and max(self.horizons_ms) <= 60_000,
            layers=1 <= self.layers <= 64,
            heads=1 <= self.heads <= 128,
            width=1 <= self.width <= 8192 and self.width % max(self.heads, 1) == 0,
            batch_size=1 <= self.batch_size <= 4096,
            sampling_max=0 <= self.sampling_max <= 1,
            sampling_ramp=len(self.sampling_ramp) == 2
            and 0 <= self.sampling_ramp[0] <= self.sampling_ramp[1] <= 1,
            velocity_weight=self.velocity_weight >= 0,
            speed=len(self.speed) == 2 and 0 < self.speed[0] <= self.speed[1],
            damping=0 <= self.damping < 1,
            reversion=0 <= self.reversion < 1,
            rollout_weight=self.rollout_weight >= 0,
            rollout_frames=1 <= self.rollout_frames <= MAX_FRAMES,
            rollout_every=self.rollout_every >= 1,
            select_clips=self.select_clips >= 0,
            select_every=self.select_every >= 1,
            residual_shares=bool(self.residual_shares)
            and all(0 <= r <= 1 for r in self.residual_shares),
            seed=self.seed >= 0,
            eval_splits=bool(self.eval_splits) and self.train_split not in self.eval_splits,
        )
        for name, ok in checks.items():
            if not ok:
                value, bounds = brief(getattr(self, name)), _BOUNDS.get(name, "")
                raise ValueError(f"FutureConfig.{name}: invalid value {value}{bounds}")
        weights = 12 * self.layers * self.width**2
        if weights > MAX_PARAMETERS:
            raise ValueError(f"FutureConfig.layers: {self.layers} blocks of width {self.width} "
                             f"hold {weights:,} weights, more than the {MAX_PARAMETERS:,} "
                             "allowed")  # fmt: skip


def default() -> FutureConfig:
    """600 steps of a 2-layer, 64-wide GPT-2: about a minute on two CPU cores."""
    return FutureConfig()


def quick() -> FutureConfig:
    """A few seconds: ``posebert demo --quick`` and smoke runs."""
    optim = dataclasses.replace(FutureConfig.optim, schedule=LRSchedule(warmup_steps=5))
    return FutureConfig(steps=30, width=32, batch_size=16, optim=optim, select_every=10)


RECIPES: dict[str, Callable[[], FutureConfig]] = {f.__name__: f for f in (default, quick)}


def sampling_share(step: int, cfg: FutureConfig) -> float:
    """Share of post-seed inputs taken from the model's own predictions at ``step``: 0, then a
    linear ramp over ``sampling_ramp`` (fractions of the run) up to ``sampling_max``."""
    start, end = (f * cfg.steps for f in cfg.sampling_ramp)
    if step <= start:
        return 0.0
    if step >= end:
        return cfg.sampling_max
    return cfg.sampling_max * (step - start) / (end - start)


def horizon_frames(horizons_ms: tuple[int, ...], fps: float) -> tuple[int, ...]:
    """Horizons in frames after the last seed frame, rounded to the nearest frame."""
    frames = tuple(round(h * fps / 1000) for h in horizons_ms)
    if min(frames) < 1:
        raise ValueError(f"horizon {min(horizons_ms)} ms is under one frame at {fps:g} fps")
    return frames
