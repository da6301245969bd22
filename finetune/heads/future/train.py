"""Training Pose-GPT through the one fine-tuning loop.

Random windows of train clips, played back at a random speed, rotated about the vertical (Z)
axis and mirrored; loss = next-frame MPJPE (+ a small velocity term), with parallel scheduled
sampling (Bengio et al., NeurIPS 2015; Duckworth et al., 2019): a pass on ground-truth inputs
(no grad) predicts every next frame, a share :func:`~finetune.heads.future.config.
sampling_share` of the inputs after the seed is replaced by those predictions, and a second
pass trains on the mix; optionally (``rollout_weight``) the MPJPE of a differentiable
autoregressive rollout from the seed. Every ``select_every`` steps the forecast on train clips
held out of training chooses the step and the transformer's share the model ends with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from finetune.clips import Clip
from finetune.evaluation.metrics import mpjpe
from finetune.heads.future.config import FutureConfig, sampling_share
from finetune.heads.future.model import (
    PoseGPT,
    augment,
    feature_pose_mm,
    pose_features,
    rollout,
)
from finetune.loop import Part, Trainer


def random_windows(clips: list[Clip], length: int, count: int, gen: torch.Generator,
                   speed: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:  # fmt: skip
    """(count, length, J, 3) mm: windows drawn uniformly among all starts of all clips, each
    played back at a speed drawn log-uniformly from ``speed`` (linear interpolation between
    frames; a window that its clip is too short for at that speed plays at normal speed)."""
    starts = [(c, s) for c, clip in enumerate(clips) for s in range(len(clip.poses) - length + 1)]
    pick = torch.randint(len(starts), (count,), generator=gen).tolist()
    lo, hi = math.log(speed[0]), math.log(speed[1])
    rates = torch.exp(lo + (hi - lo) * torch.rand(count, generator=gen)).tolist()
    out = []
    for i, rate in zip(pick, rates, strict=True):
        poses, first = clips[starts[i][0]].poses, starts[i][1]
        if first + rate * (length - 1) > len(poses) - 1:
            rate = 1.0
        at = first + rate * np.arange(length)  # fractional frame positions
        below = np.minimum(np.floor(at).astype(int), len(poses) - 1)
        above = np.minimum(below + 1, len(poses) - 1)
        w = (at - below)[:, None, None]
        out.append(torch.from_numpy((1 - w) * poses[below] + w * poses[above]))
    return torch.stack(out)


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


def rollout_loss(model: nn.Module, x: torch.Tensor, seed_frames: int, frames: int
                 ) -> torch.Tensor:  # fmt: skip
    """MPJPE (m) of the autoregressive forecast of ``frames`` frames after the seed, the model
    fed only its own outputs: what the evaluation asks of it, trained directly."""
    pred = rollout(model, x[:, :seed_frames], frames)
    true = x[:, seed_frames : seed_frames + frames]
    return mpjpe(feature_pose_mm(pred), feature_pose_mm(true)) / 1000.0


def train(model: PoseGPT, clips: list[Clip], cfg: FutureConfig, fps: float,
          progress: bool = True, log_dir: str | os.PathLike | None = None,
          score: Callable[[PoseGPT], float] | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Train in place; returns the record of every step (``mpjpe_mm``: next-frame MPJPE on the
    sampled inputs, ``share``: the scheduled-sampling share) and the choice made: with
    ``score`` (the forecast error on clips held out of ``clips``, lower is better), every
    ``select_every`` steps each of ``residual_shares`` is scored and the model ends as the best
    (step, share) seen; without it, as the last step with the full share."""
    trainer = Trainer("future", log_dir, progress, log_every=1)
    length = model.max_frames
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + trainer.accelerator.process_index)
    prepared = trainer.prepare(model)
    best: dict = {"step": cfg.steps, "residual_share": 1.0, "score": None}
    state: dict = {}

    def choose(i: int) -> None:
        with torch.no_grad():
            for r in cfg.residual_shares:
                model.residual.fill_(r)
                error = score(model)
                if best["score"] is None or error < best["score"]:
                    best.update(step=i, residual_share=r, score=round(error, 4))
                    state.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            model.residual.fill_(1.0)

    def step(i: int) -> dict:
        if score is not None and i % cfg.select_every == 0:
            choose(i)  # the weights before step i's update
        windows = random_windows(clips, length, cfg.batch_size, gen, cfg.speed)
        x = augment(pose_features(windows, fps).float(), gen, cfg.mirror).to(trainer.device)
        share = sampling_share(i, cfg)
        inputs = scheduled_inputs(prepared, x, share, cfg.seed_frames, gen)
        loss, mpjpe_mm = next_frame_loss(prepared, inputs, x, cfg.velocity_weight)
        record = {"loss": loss, "mpjpe_mm": mpjpe_mm, "share": share}
        if cfg.rollout_weight > 0 and i % cfg.rollout_every == 0:
            frames = min(cfg.rollout_frames, length - cfg.seed_frames)
            record["rollout_m"] = rollout_loss(prepared, x, cfg.seed_frames, frames)
            record["loss"] = loss + cfg.rollout_weight * record["rollout_m"]
        return record

    history = trainer.fit(step, Part(prepared.parameters(), cfg.optim), cfg.steps)
    if score is not None:
        choose(cfg.steps)
        model.load_state_dict(state)
    return history, best
