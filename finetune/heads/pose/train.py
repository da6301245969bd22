"""Training the pose head through the one fine-tuning loop: the linear probe on frozen
features, and full fine-tuning of the encoder with the head on labelled windows in memory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_shards.camera import camera_root_relative
from data_shards.manifest import Manifest
from finetune.clips import read_split
from finetune.heads.pose.config import FullConfig, ProbeConfig
from finetune.heads.pose.model import MM_PER_UNIT, PoseHead, PoseRegressor
from finetune.loop import Part, Trainer


def mpjpe_m(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: MPJPE (protocol 1) in metres, differentiable."""
    from finetune.evaluation.metrics import mpjpe

    return mpjpe(pred, target)


def fit_probe(features: torch.Tensor, targets: torch.Tensor, config: ProbeConfig, seed: int,
              name: str = "probe", log_dir: str | os.PathLike | None = None,
              progress: bool = False) -> tuple[PoseHead, list[dict]]:  # fmt: skip
    """A linear head on frozen features (N, D) -> targets (N, J, 3) metres; returns it (eval
    mode, CPU) and the logged records (``loss``: MPJPE in metres)."""
    trainer = Trainer(name, log_dir, progress, log_every=1)
    torch.manual_seed(seed)
    head = PoseHead(features.shape[1], targets.shape[1])
    head.set_statistics(features, targets)
    head = trainer.prepare(head)
    gen = torch.Generator().manual_seed(seed)
    size = min(config.batch, len(features))

    def step(i: int) -> dict:
        rows = torch.randint(len(features), (size,), generator=gen)
        x, y = features[rows].to(trainer.device), targets[rows].to(trainer.device)
        return {"loss": mpjpe_m(head(x), y)}

    history = trainer.fit(step, Part(head.parameters(), config.optim), config.steps)
    return trainer.unwrap(head).cpu().eval(), history


@dataclasses.dataclass
class Windows:
    """Labelled train windows held in memory, at the encoder's input size."""

    frames: torch.Tensor
    """(S, V, T, 3, H, W) uint8."""
    masks: torch.Tensor | None
    """(S, V, T, H, W) bool, or None when the split has no masks."""
    targets: torch.Tensor
    """(S, V, T, J, 3) metres, root-relative in each view's camera coordinates."""

    def batch(self, windows: int, views: int, frames: int, gen: torch.Generator):
        """``windows`` random windows, ``views`` random views and ``frames`` consecutive random
        frames of each: frames (B, v, t, 3, H, W), masks, targets (B, v, t, J, 3)."""
        S, V, T = self.frames.shape[:3]
        views, frames = min(views, V), min(frames, T)
        pick = torch.randint(S, (windows,), generator=gen)
        vs = torch.stack([torch.randperm(V, generator=gen)[:views] for _ in range(windows)])
        t0 = torch.randint(T - frames + 1, (windows,), generator=gen)
        ts = t0[:, None] + torch.arange(frames)  # (B, t)
        idx = (pick[:, None, None], vs[:, :, None], ts[:, None, :])  # broadcast to (B, v, t)
        masks = None if self.masks is None else self.masks[idx]
        return self.frames[idx], masks, self.targets[idx]


def load_windows(split_dir: str | os.PathLike, keys: set[str], size: int | None,
                 max_memory_gb: float, batch_size: int = 8) -> Windows:  # fmt: skip
    """The windows of ``keys`` decoded (and resized to ``size``) into memory; refuses, before
    reading, when they would take more than ``max_memory_gb``."""
    manifest = Manifest.load(split_dir)
    side = size or max(manifest.image_size)
    need = len(keys) * manifest.views * manifest.frames * side * side * 4 / 2**30
    if need > max_memory_gb:
        raise ValueError(
            f"{len(keys)} labelled windows need {need:.1f} GB in memory, more than "
            f"full.max_memory_gb={max_memory_gb}; use fewer labels or raise the bound"
        )
    frames, masks, targets = [], [], []
    for batch in read_split(split_dir, frames=True, masks=True, size=size, batch_size=batch_size):
        keep = [b for b, k in enumerate(batch["keys"]) if k in keys]
        if not keep:
            continue
        frames.append(batch["frames"][keep])
        if "masks" in batch:
            masks.append(batch["masks"][keep])
        cam = camera_root_relative(batch["pose3d"][keep].numpy(), batch["Rt"][keep].numpy())
        targets.append(torch.from_numpy(cam / MM_PER_UNIT).float())  # (B, V, T, J, 3)
    if not frames:
        raise ValueError(f"{split_dir}: none of the {len(keys)} labelled windows was found")
    return Windows(torch.cat(frames), torch.cat(masks) if masks else None, torch.cat(targets))


def fit_full(encoder: nn.Module, windows: Windows, config: FullConfig, seed: int,
             name: str = "full", log_dir: str | Path | None = None,
             progress: bool = False) -> tuple[PoseRegressor, list[dict]]:  # fmt: skip
    """Encoder + head trained end to end on labelled windows; returns the regressor (eval mode,
    CPU) and the logged records (``loss``: MPJPE in metres)."""
    trainer = Trainer(name, log_dir, progress, log_every=1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = PoseHead(encoder.cfg.encoder.width, windows.targets.shape[-2])
    draw = (config.windows, config.views, config.frames)
    with torch.no_grad():  # head statistics from the initial features of a few batches
        batches = [windows.batch(*draw, gen) for _ in range(2)]
        feats = [encoder.eval().embed(f, m).flatten(0, 2) for f, m, _ in batches]
        head.set_statistics(torch.cat(feats), windows.targets.flatten(0, 2))
    model = trainer.prepare(PoseRegressor(encoder, head))
    groups = [{"params": list(encoder.parameters())},
              {"params": list(head.parameters()), "lr_scale": config.head_lr_scale}]  # fmt: skip

    def step(i: int) -> dict:
        f, m, y = windows.batch(*draw, gen)
        m = None if m is None else m.to(trainer.device)
        return {"loss": mpjpe_m(model(f.to(trainer.device), m), y.to(trainer.device))}

    history = trainer.fit(step, Part(groups, config.optim), config.steps)
    return trainer.unwrap(model).cpu().eval(), history


def probe_arrays(vectors: np.ndarray, pose3d_mm: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features and metre targets of the labelled rows, as the probe trains on them."""
    return torch.from_numpy(vectors), torch.from_numpy(pose3d_mm / MM_PER_UNIT).float()
