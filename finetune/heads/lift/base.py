"""What every lifting method provides, and the registry of methods.

A method module (``finetune/heads/lift/<name>.py``) defines ``METHOD = LiftMethod(...)``:

- ``config``: a dataclass subclassing :class:`LiftConfig` whose defaults are the method's
  recipe; validated in ``__post_init__`` (one-line ``ValueError`` naming the field);
- ``rows``: the method's ablation, row name -> config overrides (the rows of docs/results.md);
- ``fit(data, config, progress) -> Fitted``: trains on ``data.train`` (labels as the config
  allows: an unsupervised method never reads ``pose3d`` of train), seeded by ``config.seed``.

The runner (:mod:`finetune.heads.lift.run`) scores every :class:`Fitted` the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from finetune.heads.lift.data import Sequence, corrupt_2d

METHOD_NAMES = ("tcn", "vaegan", "cyclic", "selfcorrect", "hrnet")


@dataclasses.dataclass
class LiftConfig:
    """Fields every method has. Subclasses add theirs and call ``super().__post_init__()``."""

    seed: int = 0
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 256
    lr: float = 1e-3
    noise_px: float = 0.0
    """Gaussian noise on the input 2D keypoints (pixels of the 128 px crop), train and eval."""
    drop_prob: float = 0.0
    """Share of input joints dropped (moved to the frame's centre), train and eval."""
    labels: float = 1.0
    """Share of the train clips whose 3D poses a supervised loss may read (by clip, seeded)."""

    def __post_init__(self) -> None:
        checks = {
            "seed": self.seed >= 0, "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0, "noise_px": self.noise_px >= 0,
            "drop_prob": 0 <= self.drop_prob < 1, "labels": 0 <= self.labels <= 1,
        }  # fmt: skip
        check_fields(self, checks)


def check_fields(config: object, checks: dict[str, bool], why: dict[str, str] | None = None
                 ) -> None:  # fmt: skip
    """One-line ``ValueError`` naming the first field whose check is False (with ``why[name]``
    appended when given)."""
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{type(config).__name__}.{name}: invalid value "
                             f"{getattr(config, name)!r}{(why or {}).get(name, '')}")  # fmt: skip


@dataclasses.dataclass
class LiftData:
    """What ``fit`` gets: sequences per split (train and the held-out ones) and where they
    came from (the image head reads frames from ``shards``)."""

    shards: Path
    splits: dict[str, list[Sequence]]

    @property
    def train(self) -> list[Sequence]:
        return self.splits["train"]


class Fitted(Protocol):
    losses: list[dict[str, float]]
    """Per logged step: each loss term (floats), and ``step``."""

    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, (N, J, 3) root-relative 3D in that camera's coordinates, mm."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (saved as safetensors beside the results)."""


@dataclasses.dataclass
class LiftMethod:
    name: str
    config: type
    rows: dict[str, dict]
    fit: Callable[[LiftData, LiftConfig, bool], Fitted]
    describe: str = ""
    figure: Callable[[Fitted, list[Sequence], Path], Path] | None = None
    """Optional picture of a fitted row over every sequence (e.g. a latent space), written by
    the runner as OUT/rows/<row>.png."""


def get_method(name: str) -> LiftMethod:
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown lifting method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"finetune.heads.lift.{name}").METHOD


def labelled_clips(sequences: list[Sequence], fraction: float, seed: int) -> set[str]:
    """The clips whose 3D a supervised loss may read: a seeded share of the distinct clips
    (at least one when ``fraction`` > 0), nested (a smaller share is a subset of a larger)."""
    clips = sorted({s.clip for s in sequences})
    if fraction <= 0:
        return set()
    order = np.random.default_rng(seed).permutation(len(clips))
    count = max(1, round(fraction * len(clips)))
    return {clips[i] for i in order[:count]}


def model_inputs(sequences: list[Sequence], config: LiftConfig, split: str
                 ) -> list[np.ndarray]:  # fmt: skip
    """Per sequence, the 2D keypoints a method sees (pixels): the shards' projections with the
    config's detector noise, seeded per split so every method sees the same corrupted input."""
    if config.noise_px == 0 and config.drop_prob == 0:
        return [s.pose2d for s in sequences]
    salt = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    rng = np.random.default_rng([config.seed, salt])
    return [corrupt_2d(s.pose2d, config.noise_px, config.drop_prob, rng) for s in sequences]
