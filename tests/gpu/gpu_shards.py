"""What the GPU tests share: their markers and tiny schema-valid splits made in the test (no
renderer: the lent GPU machines have no pybullet)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_sample

from data_shards.write import write_split

NEEDS_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]
"""``pytestmark`` of every file here: deselected by default (``-m gpu`` runs them) and skipped
cleanly where torch sees no GPU (CI never has one)."""
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
"""With ``pytest.mark.multigpu`` on the tests that need a GPU per rank."""
SPLITS = {"train": 12, "val": 4, "test": 4}
"""Samples per split; each sample is its own clip (so lifting reads one run per camera)."""


def write_splits(root: Path, size: int = 40, views: int = 2, frames: int = 8) -> Path:
    """train / val / test splits of random but schema-valid samples at ``size`` px."""
    for split, count in SPLITS.items():
        samples = [make_sample(key=f"{split}{i:02d}", seed=100 * len(split) + i, views=views,
                               frames=frames, size=(size, size),
                               action=("walk", "run")[i % 2], clip=f"{split}{i:02d}")
                   for i in range(count)]  # fmt: skip
        write_split(root, split, samples, {}, {})
    return root
