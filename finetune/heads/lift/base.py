"""What every lifting method provides, and the registry of methods.

A method module (``finetune/heads/lift/<name>.py``) defines ``METHOD = LiftMethod(...)``:

- ``config``: a frozen dataclass subclassing :class:`LiftConfig` whose defaults are the
  method's recipe (its optimiser and learning-rate schedule in the nested ``optim``);
  validated in ``__post_init__`` (one-line ``ValueError`` naming the field);
- ``rows``: the method's ablation, row name -> config overrides (the rows of docs/results.md);
- ``fit(data, config, log) -> Fitted``: trains on ``data.train`` (labels as the config allows:
  an unsupervised method never reads ``pose3d`` of train), seeded by ``config.seed``, every
  optimisation through :class:`finetune.loop.Trainer` (``log.trainer(config)``); the model
  keeps only its loss and its batches;
- ``restore(config, state_dict) -> Fitted``: the fitted model(s) rebuilt from a saved row;
- ``read(config)``: the keyword arguments of :func:`finetune.clips.read_sequences` the method
  needs beyond the labels (the image head: the frames at its input size).

A keypoint method reads its 2D input only through :func:`model_inputs`, which honours
``config.input`` (the shards' projections or the detector's keypoints) and the detector-imitation
noise; 2D labels a loss reconstructs (the cyclic decoder's target, the image head's heatmaps)
stay the shards' annotated 2D. ``reads_2d=False`` marks a method whose input is the frames.

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
import torch.nn.functional as F

from finetune.clips import Sequence, labelled_subset
from finetune.evaluation.metrics import mpjpe
from finetune.heads.lift.data import INPUTS, corrupt_2d, input_2d
from finetune.loop import DEVICES, OptimConfig, Trainer, resolve_device
from pretrain.engine.schedules import LRSchedule

METHOD_NAMES = ("tcn", "vaegan", "cyclic", "selfcorrect", "hrnet")

COSINE = LRSchedule(min_lr_ratio=0.05)
"""Cosine decay from the peak to 5% of it over the run, no warm-up (the per-frame lifters)."""


@dataclasses.dataclass(frozen=True)
class LiftConfig:
    """Fields every method has. Subclasses add theirs and call ``super().__post_init__()``."""

    seed: int = 0
    """Seeds the weights, the batches, the detector noise and the labelled clips."""
    steps: int = 2000
    """Optimiser steps."""
    batch_size: int = 256
    """Samples per step (frames or windows; the method says which)."""
    optim: OptimConfig = OptimConfig(kind="adam", lr=1e-3, schedule=COSINE)
    """Adam, cosine decay to 5% of the learning rate (:class:`finetune.loop.OptimConfig`)."""
    input: str = "gt"
    """The 2D input, train and held-out: ``gt`` (the shards' projections) or ``detected`` (the
    shards' det2d from ``posebert shards detect``, lost frames interpolated:
    :func:`finetune.heads.lift.data.fill_lost`); ``--input`` of the command."""
    min_confidence: float = 0.0
    """With ``input=detected``: a found frame whose mean joint confidence is below this is
    treated as lost too (filled from its neighbours); 0: only frames where nobody was found."""
    noise_px: float = 0.0
    """Gaussian noise on the input 2D keypoints (pixels of the 128 px crop), train and eval."""
    drop_prob: float = 0.0
    """Share of input joints dropped (moved to the frame's centre), train and eval."""
    labels: float = 1.0
    """Share of the train clips whose 3D poses a supervised loss may read (by clip, seeded)."""
    log_every: int = 25
    """Steps between logged records (OUT/rows/<row>/metrics.jsonl and the loss curves)."""
    device: str = "auto"
    """Where the row trains and predicts, as for the pose head (:class:`finetune.loop.Trainer`):
    ``auto`` (accelerate's choice: the local GPU when torch sees one, else the CPU), ``cpu`` or
    ``cuda`` (refused in one line on a machine without CUDA). How, not what: a saved row counts
    as done whatever device trained it."""

    def __post_init__(self) -> None:
        checks = {
            "seed": self.seed >= 0, "steps": self.steps >= 1, "batch_size": self.batch_size >= 1,
            "optim": isinstance(self.optim, OptimConfig), "noise_px": self.noise_px >= 0,
            "drop_prob": 0 <= self.drop_prob < 1, "labels": 0 <= self.labels <= 1,
            "log_every": self.log_every >= 1, "input": self.input in INPUTS,
            "min_confidence": 0 <= self.min_confidence <= 1, "device": self.device in DEVICES,
        }  # fmt: skip
        check_fields(self, checks, {"input": f" (choose from {', '.join(INPUTS)})",
                                    "device": f" (choose from {', '.join(DEVICES)})"})  # fmt: skip


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
    """What ``fit`` gets: sequences per split (train and the held-out ones) and the shard root
    they were read from."""

    shards: Path
    splits: dict[str, list[Sequence]]

    @property
    def train(self) -> list[Sequence]:
        return self.splits["train"]


@dataclasses.dataclass(frozen=True)
class FitLog:
    """Where a fit reports: the name its progress bars and errors carry (the runner's: method
    and row), the row's log folder (None: no files) and whether to draw progress bars."""

    name: str = "lift"
    log_dir: Path | None = None
    progress: bool = False

    def trainer(self, config: LiftConfig, part: str = "") -> Trainer:
        """The loop of one optimisation of the fit, logging every ``config.log_every`` steps
        to LOG_DIR (metrics.jsonl + tensorboard); a second optimisation of the same fit names
        its ``part`` and logs to LOG_DIR/<part>."""
        log_dir = self.log_dir / part if self.log_dir is not None and part else self.log_dir
        name = f"{self.name} ({part})" if part else self.name
        return Trainer(name, log_dir, self.progress, log_every=config.log_every,
                       device=config.device)  # fmt: skip


QUIET = FitLog()
"""A fit that writes no log files and draws no progress bar (tests, notebooks)."""


class Fitted(Protocol):
    losses: list[dict[str, float]]
    """The records of :meth:`finetune.loop.Trainer.fit`: per logged step ``step``, each loss
    term, ``lr`` and ``time_s`` (empty for a row restored from disk)."""

    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, (N, J, 3) root-relative 3D in that camera's coordinates, mm."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (saved as safetensors beside the results)."""


class FittedModule:
    """A fitted row that is one module: the weights are its ``state_dict``; a subclass adds
    ``predict`` (on the module's device: the one it trained on, or ``config.device`` when
    restored)."""

    def __init__(self, model: torch.nn.Module, config: LiftConfig, losses: list[dict]) -> None:
        self.model, self.config, self.losses = model.eval(), config, losses

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters are (its inputs go there)."""
    return next(module.parameters()).device


def restore_module(fitted: type[FittedModule], build: Callable[[LiftConfig], torch.nn.Module]
                   ) -> Callable[[LiftConfig, dict[str, torch.Tensor]], FittedModule]:  # fmt: skip
    """The ``restore`` of a one-module method: ``build(config)``, load the saved weights."""

    def restore(config: LiftConfig, state_dict: dict[str, torch.Tensor]) -> FittedModule:
        model = build(config)
        model.load_state_dict(state_dict)
        return fitted(model.to(resolve_device(config.device)), config, [])

    return restore


@dataclasses.dataclass
class LiftMethod:
    name: str
    config: type
    rows: dict[str, dict]
    fit: Callable[[LiftData, LiftConfig, FitLog], Fitted]
    restore: Callable[[LiftConfig, dict[str, torch.Tensor]], Fitted]
    """The fitted model(s) rebuilt from a row's config and its saved ``state_dict()``."""
    describe: str = ""
    figure: Callable[[Fitted, list[Sequence], Path], Path] | None = None
    """Optional picture of a fitted row over every sequence (e.g. a latent space), written by
    the runner as OUT/rows/<row>.png."""
    read: Callable[[LiftConfig], dict] = lambda config: {}
    """Keyword arguments of :func:`finetune.clips.read_sequences` a row's config needs."""
    reads_2d: bool = True
    """Whether the method's input is 2D keypoints (``input`` picks them); False for a method
    that reads the frames (the image head), which ``input`` does not change."""


def get_method(name: str) -> LiftMethod:
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown lifting method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    return importlib.import_module(f"finetune.heads.lift.{name}").METHOD


def labelled_clips(sequences: list[Sequence], fraction: float, seed: int) -> set[str]:
    """The clips whose 3D a supervised loss may read: :func:`finetune.clips.labelled_subset`
    of the distinct clips (a seeded share, at least one when ``fraction`` > 0, nested)."""
    return labelled_subset({s.clip for s in sequences}, fraction, seed)


def model_inputs(sequences: list[Sequence], config: LiftConfig, split: str
                 ) -> list[np.ndarray]:  # fmt: skip
    """Per sequence, the 2D keypoints a method sees (pixels): the shards' projections or the
    detector's keypoints (``config.input``), with the config's detector-imitation noise, seeded
    per split so every method sees the same corrupted input."""
    clean = [input_2d(s, config.input, config.min_confidence) for s in sequences]
    if config.noise_px == 0 and config.drop_prob == 0:
        return clean
    salt = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    rng = np.random.default_rng([config.seed, salt])
    return [corrupt_2d(px, config.noise_px, config.drop_prob, rng) for px in clean]


def joint_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:  # fmt: skip
    """The training form of MPJPE (:func:`finetune.evaluation.metrics.mpjpe` per pose, in the
    inputs' units), averaged over the poses whose ``mask`` is 1 (all when None; 0 when none
    is). 2D keypoints (..., J, 2) are measured as points of the z = 0 plane."""
    if pred.shape[-1] == 2:
        pred, target = F.pad(pred, (0, 1)), F.pad(target, (0, 1))
    per_pose = mpjpe(pred, target, reduce="none")  # (B,)
    if mask is None:
        return per_pose.mean()
    return (per_pose * mask).sum() / mask.sum().clamp(min=1)
