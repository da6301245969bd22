"""Training Pose-GPT through the one fine-tuning loop.

Random windows of train clips, rotated about the vertical (Z) axis and mirrored; loss =
next-frame MPJPE (+ a small velocity term), with parallel scheduled sampling (Bengio et al.,
NeurIPS 2015; Duckworth et al., 2019): a pass on ground-truth inputs (no grad) predicts every
next frame, a share :func:`~finetune.heads.future.config.sampling_share` of the inputs after
the seed is replaced by those predictions, and a second pass trains on the mix.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from finetune.clips import Clip
from finetune.evaluation.metrics import mpjpe
from finetune.heads.future.config import FutureConfig, sampling_share
from finetune.heads.future.model import PoseGPT, augment, feature_pose_mm, pose_features
from finetune.loop import Part, Trainer


def random_windows(clips: list[Clip], length: int, count: int, gen: torch.Generator
                   ) -> torch.Tensor:  # fmt: skip
    """(count, length, J, 3) mm: windows drawn uniformly among all starts of all clips."""
    starts = [(c, s) for c, clip in enumerate(clips) for s in range(len(clip.poses) - length + 1)]
    pick = torch.randint(len(starts), (count,), generator=gen).tolist()
    return torch.stack([
        torch.from_numpy(clips[starts[i][0]].poses[starts[i][1] : starts[i][1] + length])
        for i in pick
    ])  # fmt: skip


def scheduled_inputs(model: nn.Module, x: torch.Tensor, share: float, seed_frames: int,
                     gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Parallel scheduled sampling: each input after the seed is replaced, with probability
    ``share``, by the model's prediction of it from the ground truth before it."""
    if share <= 0:
        return x
    with torch.no_grad():
        pred, _ = model(x[:, :-1])  # pred[:, t] predicts frame t + 1
    swap = torch.rand(x.shape[:2], generator=gen) < share  # (B, T)
    swap[:, :seed_frames] = False
    mixed = x.clone()
    mixed[:, 1:] = torch.where(swap[:, 1:, None].to(x.device), pred, x[:, 1:])
    return mixed


def next_frame_loss(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                    velocity_weight: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, next-frame MPJPE in mm) of predicting target[:, 1:] from inputs[:, :-1]."""
    pred, _ = model(inputs[:, :-1])
    true = target[:, 1:]
    pose = mpjpe(feature_pose_mm(pred), feature_pose_mm(true)) / 1000.0
    velocity = (pred[..., -3:] - true[..., -3:]).norm(dim=-1).mean()
    return pose + velocity_weight * velocity, pose.detach() * 1000.0


def train(model: PoseGPT, clips: list[Clip], cfg: FutureConfig, fps: float,
          progress: bool = True, log_dir: str | os.PathLike | None = None) -> list[dict]:
    """Train in place; returns the record of every step (``mpjpe_mm``: next-frame MPJPE on the
    sampled inputs, ``share``: the scheduled-sampling share)."""
    trainer = Trainer("future", log_dir, progress, log_every=1)
    length = model.max_frames
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + trainer.accelerator.process_index)
    prepared = trainer.prepare(model)

    def step(i: int) -> dict:
        windows = random_windows(clips, length, cfg.batch_size, gen)
        x = augment(pose_features(windows, fps).float(), gen, cfg.mirror).to(trainer.device)
        share = sampling_share(i, cfg)
        inputs = scheduled_inputs(prepared, x, share, cfg.seed_frames, gen)
        loss, mpjpe_mm = next_frame_loss(prepared, inputs, x, cfg.velocity_weight)
        return {"loss": loss, "mpjpe_mm": mpjpe_mm, "share": share}

    return trainer.fit(step, Part(prepared.parameters(), cfg.optim), cfg.steps)
