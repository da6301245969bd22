"""A pretraining run's config: the component configs nested in one typed tree.

Each part is owned by its component (model, objective, engine, loop); this module only adds
the data section and the run-level fields. Batch size and precision have one source of truth:
``engine.micro_batch_per_rank`` is the reader's batch size, ``engine.precision`` the model's.
Recipes (pretrain/recipes.py) return full configs; the CLI applies ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import torch

from data_shards.configtools import from_dict, to_dict
from data_shards.read import ReaderConfig
from data_shards.transforms import Resize, SelectViews, TemporalCrop
from pretrain.engine.deepspeed_config import EngineConfig
from pretrain.engine.loop import TrainConfig
from pretrain.model import PoseBERTConfig
from pretrain.objectives import ContrastiveConfig

MAX_IMAGE_SIZE = 1024
"""Largest frame side in pixels (``data.size``, an exported encoder's ``input.size``): ResNet
inputs are 224 px; 1024 px already costs 20x their memory per frame."""
LIMITS = {"num_workers": 256, "shuffle_buffer": 100_000, "views": 64, "frames": 4096,
          "size": MAX_IMAGE_SIZE}  # fmt: skip
"""Upper bounds of the :class:`DataConfig` fields that allocate (processes, buffered samples,
frames per sample, pixels): a typo such as ``size=100000`` is one line at start, not a
MemoryError in a loader worker."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which shards the run reads and how each sample is cut down before batching."""

    train: str = "runs/demo/shards/train"
    """Split directory (or several, comma-separated) of the training shards."""
    num_workers: int = 2
    """Loader worker processes per rank (at most 256)."""
    shuffle_buffer: int = 64
    """Samples in each worker's shuffle buffer (at most 100,000; each holds its frames)."""
    error_budget: int = 10
    """Bad samples or shards tolerated per rank and epoch before the run stops."""
    views: int | None = None
    """Keep this many of the V views per sample, drawn at random (None: all; at most 64)."""
    frames: int | None = None
    """Keep this many consecutive frames of the T per sample (None: all; at most 4096)."""
    size: int | None = None
    """Resize frames to size x size (labels and intrinsics follow exactly); None: as stored;
    at most :data:`MAX_IMAGE_SIZE` (1024)."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """Where JPEG frames are decoded. 'cpu': in the loader workers (PIL). 'gpu': the workers
    check each frame's header (format, size) and hand over the bytes; the training process
    decodes each batch on its GPU (nvJPEG, one batched call) and resizes it to ``size`` as the
    workers would have (:mod:`data_shards.device_decode`). Needs CUDA: refused at start on a
    machine without it."""

    def __post_init__(self) -> None:
        if self.decode not in ("cpu", "gpu"):
            raise ValueError(f"decode: {self.decode!r} is not one of ['cpu', 'gpu']")
        if not self.train.strip():
            raise ValueError("train: a split directory is required")
        if self.num_workers < 0 or self.shuffle_buffer < 1 or self.error_budget < 0:
            raise ValueError("num_workers >= 0, shuffle_buffer >= 1 and error_budget >= 0")
        for name in ("views", "frames", "size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None, got {value}")
        for name, most in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > most:
                raise ValueError(f"{name}: {value} is more than the {most:,} allowed")

    def reader_config(self, batch_size: int, seed: int) -> ReaderConfig:
        transforms = []
        if self.views:
            transforms.append(SelectViews(self.views))
        if self.frames:
            transforms.append(TemporalCrop(self.frames))
        if self.size:
            transforms.append(Resize(self.size))
        return ReaderConfig(
            tuple(s.strip() for s in self.train.split(",") if s.strip()),
            batch_size=batch_size,
            seed=seed,
            shuffle_buffer=self.shuffle_buffer,
            num_workers=self.num_workers,
            error_budget=self.error_budget,
            transforms=tuple(transforms),
            frames="jpeg" if self.decode == "gpu" else "decode",
        )

    def check_device(self, cuda: bool | None = None) -> None:
        """At start (not when the config is built: a login node without GPUs prints and submits
        GPU configs): ValueError unless this machine can decode where ``decode`` says.
        ``cuda``: whether CUDA is available (default: ask torch)."""
        cuda = torch.cuda.is_available() if cuda is None else cuda
        if self.decode == "gpu" and not cuda:
            raise ValueError("data.decode=gpu needs a CUDA device; this machine has none")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a pretraining run needs; saved with every checkpoint."""

    recipe: str = "custom"
    """Name of the recipe this config came from (informational)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: PoseBERTConfig = dataclasses.field(default_factory=PoseBERTConfig)
    objective: ContrastiveConfig = dataclasses.field(default_factory=ContrastiveConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """The loop; ``train.seed`` is the run's one seed (data order, masks, negatives, init)."""

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return from_dict(cls, json.loads(text))
