"""`posebert finetune future`: Pose-GPT, a small GPT-2 that forecasts 3D poses frame by frame.

Protocol. Every clip of the evaluation splits is cut into windows of ``seed_frames`` observed
frames followed by the future; the model sees the seed only and feeds its own outputs back
(autoregressive, no ground truth after the seed: :func:`forecast` never receives it). The error
at horizon h ms is the MPJPE (protocol 1, mm) of the root-relative world pose at the frame
``round(h * fps / 1000)`` steps after the last seed frame (80 ms = 4 frames at 50 fps; where
h * fps / 1000 is not whole, the rounded frame's own time is recorded beside h). A window too
short for a horizon is left out of that horizon only, so every cell carries its count ``n``.
Baselines (Martinez et al., CVPR 2017): zero-velocity repeats the last seed pose;
constant-velocity extrapolates its last step.

Model. Per frame, the root-relative joints in metres and the root velocity in m/s (so the model
sees the body travel) -> linear -> ``transformers.GPT2Model`` over ``inputs_embeds`` (causal,
learned absolute positions) -> linear: the change to the next frame's features (a residual, zero
at initialisation, so an untrained model is the zero-velocity baseline).

Training: random windows of train clips, rotated about the vertical (Z) axis and mirrored;
loss = next-frame MPJPE (+ a small velocity term), with parallel scheduled sampling (Bengio et
al., NeurIPS 2015; Duckworth et al., 2019): a pass on ground-truth inputs (no grad) predicts
every next frame, a share :func:`sampling_share` of the inputs after the seed is replaced by
those predictions, and a second pass trains on the mix.

Clips are rebuilt from their overlapping windows (:func:`stitch_windows`); the synthetic
renders draw a body-height factor per window that scales the whole world pose
(data_shards/synth.py), so each window is rescaled onto the run so far.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_shards.manifest import Manifest, atomic_write_bytes, atomic_write_text, find_splits
from data_shards.read import ReaderConfig, ShardReader
from data_shards.skeleton import NUM_JOINTS, ROOT, flip_permutation
from data_shards.stages import ReaderError
from finetune.report import md_table, pyplot, save_figure

HORIZONS_MS = (80, 160, 320, 400, 560, 1000)
METHODS = ("pose-gpt", "zero-velocity", "constant-velocity")
FEATURES = NUM_JOINTS * 3 + 3  # root-relative joints (m) + root velocity (m/s)
STITCH_TOLERANCE_MM = 1.0  # overlapping windows must agree this well after rescaling
WEIGHTS, CONFIG = "future_model.safetensors", "future_model.json"


@dataclasses.dataclass
class FutureConfig:
    """Pose-GPT training and the forecasting protocol; validated when built."""

    seed_frames: int = 10
    """Observed frames before the forecast (10 = 200 ms at 50 fps)."""
    horizons_ms: tuple[int, ...] = HORIZONS_MS
    """Reported horizons, ms after the last seed frame; the longest sets the forecast length."""
    layers: int = 2
    """GPT-2 blocks."""
    heads: int = 4
    """Attention heads per block."""
    width: int = 64
    """GPT-2 hidden size (a multiple of ``heads``); 64 keeps the default run near a minute
    on two CPU cores."""
    steps: int = 600
    """Optimiser steps."""
    batch_size: int = 32
    """Training windows per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10%)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    sampling_max: float = 0.5
    """Share of inputs after the seed replaced by the model's predictions at the end of the ramp."""
    sampling_ramp: tuple[float, float] = (0.2, 0.8)
    """Fractions of ``steps`` where the scheduled-sampling share starts and stops rising."""
    velocity_weight: float = 0.1
    """Weight of the root-velocity error (m/s) beside the pose error (m) in the loss."""
    mirror: bool = True
    """Left/right mirroring augmentation (with the joint swap)."""
    seed: int = 0
    """Seed of initialisation, batches, augmentation and sampling."""
    train_split: str = "train"
    """Split the model is trained on."""
    eval_splits: tuple[str, ...] = ("val", "test")
    """Held-out splits, reported one by one and pooled."""
    eval_stride: int = 10
    """Frames between the starts of consecutive evaluation windows of a clip."""

    def __post_init__(self) -> None:
        self.horizons_ms = tuple(int(h) for h in self.horizons_ms)
        self.eval_splits = tuple(self.eval_splits)
        self.sampling_ramp = tuple(float(f) for f in self.sampling_ramp)
        positive = ("seed_frames", "layers", "heads", "width", "steps", "batch_size",
                    "eval_stride")  # fmt: skip
        checks = {name: getattr(self, name) >= 1 for name in positive}
        checks.update(
            seed_frames=self.seed_frames >= 2,  # constant velocity needs two frames
            horizons_ms=bool(self.horizons_ms) and min(self.horizons_ms) > 0,
            width=self.width >= 1 and self.width % max(self.heads, 1) == 0,
            lr=self.lr > 0,
            warmup_steps=self.warmup_steps >= 0,
            weight_decay=self.weight_decay >= 0,
            sampling_max=0 <= self.sampling_max <= 1,
            sampling_ramp=len(self.sampling_ramp) == 2
            and 0 <= self.sampling_ramp[0] <= self.sampling_ramp[1] <= 1,
            velocity_weight=self.velocity_weight >= 0,
            seed=self.seed >= 0,
            eval_splits=bool(self.eval_splits) and self.train_split not in self.eval_splits,
        )
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"FutureConfig.{name}: invalid value {getattr(self, name)!r}")

    @classmethod
    def quick(cls, **overrides) -> FutureConfig:
        """A few-second run for tests and smoke checks."""
        return cls(**{"steps": 30, "width": 32, "batch_size": 16, "warmup_steps": 5, **overrides})


# ----------------------------------------------------------------------------- schedules


def sampling_share(step: int, cfg: FutureConfig) -> float:
    """Share of post-seed inputs taken from the model's own predictions at ``step``: 0, then a
    linear ramp over ``sampling_ramp`` (fractions of the run) up to ``sampling_max``."""
    start, end = (f * cfg.steps for f in cfg.sampling_ramp)
    if step <= start:
        return 0.0
    if step >= end:
        return cfg.sampling_max
    return cfg.sampling_max * (step - start) / (end - start)


def learning_rate(step: int, cfg: FutureConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def horizon_frames(horizons_ms: tuple[int, ...], fps: float) -> tuple[int, ...]:
    """Horizons in frames after the last seed frame, rounded to the nearest frame."""
    frames = tuple(round(h * fps / 1000) for h in horizons_ms)
    if min(frames) < 1:
        raise ValueError(f"horizon {min(horizons_ms)} ms is under one frame at {fps:g} fps")
    return frames


# ----------------------------------------------------------------------------- data


class Clip(NamedTuple):
    """A contiguous run of one clip's frames: (N, J, 3) world mm, Z up."""

    split: str
    name: str
    first_frame: int
    poses: np.ndarray


def stitch_windows(windows: list[tuple[list[int], np.ndarray]], name: str = "clip"
                   ) -> list[tuple[int, np.ndarray]]:  # fmt: skip
    """Overlapping windows (frame indices, (T, J, 3) poses) of one clip -> contiguous runs
    (first frame, (N, J, 3)). Each window is rescaled onto the run by the least-squares factor
    over their common frames (1 when the windows agree); a gap, or windows that still disagree,
    start a new run."""
    pieces = []
    for frames, poses in windows:  # a window with a gap in its frames becomes several pieces
        cut = np.flatnonzero(np.diff(frames) != 1) + 1
        for idx in np.split(np.arange(len(frames)), cut):
            pieces.append((int(frames[idx[0]]), np.asarray(poses[idx], dtype=np.float64)))
    runs: list[tuple[int, list[np.ndarray]]] = []
    for first, poses in sorted(pieces, key=lambda p: p[0]):
        if runs:
            start, parts = runs[-1]
            end = start + sum(len(p) for p in parts)
            overlap = min(end, first + len(poses)) - first
            if overlap > 0:
                old = np.concatenate(parts)[first - start : first - start + overlap]
                new = poses[:overlap]
                scale = float((old * new).sum() / max((new * new).sum(), 1e-12))
                gap = np.linalg.norm(old - scale * new, axis=-1).mean()
                if gap <= STITCH_TOLERANCE_MM:
                    parts.append(scale * poses[overlap:])
                    continue
            elif first == end:
                parts.append(poses)
                continue
        runs.append((first, [poses]))
    return [(start, np.concatenate(parts).astype(np.float32)) for start, parts in runs]


def read_clips(split_dir: str | os.PathLike, split: str) -> list[Clip]:
    """Every clip of a split, rebuilt from its windows (pose3d only: no image is decoded)."""
    if Manifest.load(split_dir).samples == 0:
        raise ValueError(f"split {split!r} ({split_dir}) is empty")
    config = ReaderConfig(str(split_dir), batch_size=16, shuffle=False, drop_last=False,
                          frames="off", masks=False, float_dtype="float64",
                          error_budget=0)  # fmt: skip
    windows: dict[tuple[str, str], dict[str, tuple]] = {}
    try:
        for batch in ShardReader(config, rank=0, world_size=1):
            if "pose3d" not in batch:
                raise ValueError(f"split {split!r}: samples carry no pose3d")
            for key, meta, poses in zip(batch["keys"], batch["meta"], batch["pose3d"].numpy(),
                                        strict=True):  # fmt: skip
                windows.setdefault((meta.subject, meta.clip), {})[key] = (meta.frames, poses)
    except ReaderError as e:  # a wrong joint count lands here, named by the reader
        raise ValueError(f"split {split!r}: {e}") from None
    clips, shared = [], Counter(clip for _, clip in windows)
    for (subject, clip), by_key in sorted(windows.items()):
        name = f"{subject}/{clip}" if shared[clip] > 1 else clip  # the same clip, two subjects
        for first, poses in stitch_windows(list(by_key.values()), name):
            clips.append(Clip(split, name, first, poses))
    return clips


def pose_features(poses: torch.Tensor, fps: float) -> torch.Tensor:
    """(..., T, J, 3) world mm -> (..., T, F) model features: root-relative joints (m) and
    root velocity (m/s; the first frame repeats the second's)."""
    metres = poses / 1000.0
    root = metres[..., ROOT, :]  # (..., T, 3)
    velocity = torch.diff(root, dim=-2) * fps
    velocity = torch.cat([velocity[..., :1, :], velocity], dim=-2)
    relative = metres - metres[..., ROOT : ROOT + 1, :]
    return torch.cat([relative.flatten(-2), velocity], dim=-1)


def feature_pose_mm(features: torch.Tensor) -> torch.Tensor:
    """(..., F) features -> (..., J, 3) root-relative pose in mm."""
    return features[..., : NUM_JOINTS * 3].unflatten(-1, (NUM_JOINTS, 3)) * 1000.0


def augment(x: torch.Tensor, gen: torch.Generator, mirror: bool) -> torch.Tensor:
    """Random rotation about Z (and mirroring x -> -x with the left/right joint swap) of a batch
    of features (B, T, F): every joint and the velocity are 3-vectors in the world frame."""
    B = x.shape[0]
    v = x.unflatten(-1, (NUM_JOINTS + 1, 3))  # (B, T, J+1, 3)
    angle = torch.rand(B, generator=gen) * 2 * math.pi
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros(B), torch.ones(B)
    R = torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).view(B, 1, 3, 3)
    v = v @ R.transpose(-1, -2)
    if mirror:
        flip = torch.rand(B, generator=gen) < 0.5
        perm = torch.cat([torch.from_numpy(flip_permutation()), torch.tensor([NUM_JOINTS])])
        mirrored = v[:, :, perm] * torch.tensor([-1.0, 1.0, 1.0])
        v = torch.where(flip.view(B, 1, 1, 1), mirrored, v)
    return v.flatten(-2)


def random_windows(clips: list[Clip], length: int, count: int, gen: torch.Generator
                   ) -> torch.Tensor:  # fmt: skip
    """(count, length, J, 3) mm: windows drawn uniformly among all starts of all clips."""
    starts = [(c, s) for c, clip in enumerate(clips) for s in range(len(clip.poses) - length + 1)]
    pick = torch.randint(len(starts), (count,), generator=gen).tolist()
    return torch.stack([
        torch.from_numpy(clips[starts[i][0]].poses[starts[i][1] : starts[i][1] + length])
        for i in pick
    ])  # fmt: skip


# ----------------------------------------------------------------------------- model


class PoseGPT(nn.Module):
    """features (B, T, F) -> next-frame features (B, T, F), causal over T.

    Each frame is embedded with its joints' velocity (the step from the frame before, in m/s)
    so that continuing the motion is a per-frame linear map; the attention learns the rest.
    """

    def __init__(self, cfg: FutureConfig, max_frames: int, fps: float):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        self.max_frames, self.fps = max_frames, fps
        gpt = GPT2Config(n_layer=cfg.layers, n_head=cfg.heads, n_embd=cfg.width,
                         n_positions=max_frames, vocab_size=1, bos_token_id=None,
                         eos_token_id=None, embd_pdrop=0.0, resid_pdrop=0.0,
                         attn_pdrop=0.0)  # fmt: skip
        self.embed = nn.Linear(FEATURES + NUM_JOINTS * 3, cfg.width)
        self.gpt = GPT2Model(gpt)
        self.head = nn.Linear(cfg.width, FEATURES)
        nn.init.zeros_(self.head.weight)  # start as the zero-velocity baseline
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, past=None, prev: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, object]:  # fmt: skip
        """Next-frame features for every input frame, and the key/value cache to continue;
        ``prev`` (B, 1, F) is the frame before ``x[:, 0]`` (None: the sequence starts here)."""
        before = torch.cat([x[:, :1] if prev is None else prev, x[:, :-1]], dim=1)
        joints = NUM_JOINTS * 3
        velocity = (x[..., :joints] - before[..., :joints]) * self.fps  # (B, T, J*3) m/s
        h = self.embed(torch.cat([x, velocity], dim=-1))  # (B, T, D)
        out = self.gpt(inputs_embeds=h, past_key_values=past, use_cache=True)
        return x + self.head(out.last_hidden_state), out.past_key_values


@torch.no_grad()
def forecast(model: PoseGPT, seed: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive forecast: seed features (B, S, F) -> the next ``horizon`` frames
    (B, horizon, F). After the seed only the model's own outputs are fed back (cached keys
    and values: one new frame per step)."""
    if seed.shape[1] + horizon - 1 > model.max_frames:
        raise ValueError(f"seed {seed.shape[1]} + horizon {horizon} exceed the model's "
                         f"{model.max_frames} positions")  # fmt: skip
    pred, past = model(seed)
    frames, prev = [pred[:, -1:]], seed[:, -1:]
    for _ in range(horizon - 1):
        pred, past = model(frames[-1], past, prev)
        prev = frames[-1]
        frames.append(pred)
    return torch.cat(frames, dim=1)


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
    pose = (feature_pose_mm(pred) - feature_pose_mm(true)).norm(dim=-1).mean() / 1000.0
    velocity = (pred[..., -3:] - true[..., -3:]).norm(dim=-1).mean()
    return pose + velocity_weight * velocity, pose.detach() * 1000.0


def train(model: PoseGPT, clips: list[Clip], cfg: FutureConfig, fps: float,
          progress: bool = True) -> list[float]:  # fmt: skip
    """Train with accelerate; returns the next-frame MPJPE (mm, sampled inputs) of every step."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    length = model.max_frames
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="future: train", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        windows = random_windows(clips, length, cfg.batch_size, gen)
        x = augment(pose_features(windows, fps).float(), gen, cfg.mirror).to(accelerator.device)
        inputs = scheduled_inputs(model, x, sampling_share(step, cfg), cfg.seed_frames, gen)
        loss, mpjpe_mm = next_frame_loss(model, inputs, x, cfg.velocity_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(mpjpe_mm))
        if step % 10 == 0:
            bar.set_postfix(mpjpe_mm=f"{losses[-1]:.1f}", share=f"{sampling_share(step, cfg):.2f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- evaluation


def zero_velocity(seed: np.ndarray, horizon: int) -> np.ndarray:
    """(..., S, J, 3) -> (..., horizon, J, 3): the last seed pose, repeated."""
    return np.repeat(seed[..., -1:, :, :], horizon, axis=-3)


def constant_velocity(seed: np.ndarray, horizon: int) -> np.ndarray:
    """(..., S, J, 3) -> (..., horizon, J, 3): the last seed step, extrapolated."""
    step = seed[..., -1:, :, :] - seed[..., -2:-1, :, :]
    k = np.arange(1, horizon + 1).reshape(horizon, 1, 1)
    return seed[..., -1:, :, :] + k * step


def eval_windows(clips: list[Clip], seed_frames: int, frames: tuple[int, ...], stride: int
                 ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """Windows of seed + max(frames) frames (N, L, J, 3) mm, NaN where a clip ends early, and
    the split of each; a window is kept when its clip allows at least the shortest horizon."""
    length, shortest = seed_frames + max(frames), seed_frames + min(frames)
    out, splits = [], []
    for clip in clips:
        for s in range(0, len(clip.poses) - shortest + 1, stride):
            w = np.full((length, NUM_JOINTS, 3), np.nan, dtype=np.float32)
            part = clip.poses[s : s + length]
            w[: len(part)] = part
            out.append(w)
            splits.append(clip.split)
    if not out:
        longest = max((len(c.poses) for c in clips), default=0)
        raise ValueError(
            f"no evaluation clip has the {shortest} frames the shortest horizon "
            f"needs (seed {seed_frames} + {min(frames)}; longest clip {longest})"
        )
    return np.stack(out), splits


def forecast_windows(model: PoseGPT, windows: np.ndarray, seed_frames: int, horizon: int,
                     fps: float, batch: int = 256) -> np.ndarray:  # fmt: skip
    """Pose-GPT forecasts (N, horizon, J, 3) root-relative mm of windows (N, L, J, 3) mm,
    from their first ``seed_frames`` frames only."""
    device = next(model.parameters()).device
    seed = pose_features(torch.from_numpy(windows[:, :seed_frames]).double(), fps).float()
    out = [feature_pose_mm(forecast(model, seed[i : i + batch].to(device), horizon)).cpu()
           for i in range(0, len(seed), batch)]  # fmt: skip
    return torch.cat(out).numpy()


def evaluate(model: PoseGPT, clips: list[Clip], cfg: FutureConfig, fps: float) -> dict:
    """rows[method][split or 'all'][horizon ms] = MPJPE mm (None without a window), and
    n[split or 'all'][horizon ms] = windows behind it."""
    frames = horizon_frames(cfg.horizons_ms, fps)
    windows, splits = eval_windows(clips, cfg.seed_frames, frames, cfg.eval_stride)
    relative = windows - windows[:, :, ROOT : ROOT + 1]  # (N, L, J, 3)
    seed, future = relative[:, : cfg.seed_frames], relative[:, cfg.seed_frames :]
    H = max(frames)
    predictions = {
        "pose-gpt": forecast_windows(model, windows, cfg.seed_frames, H, fps),
        "zero-velocity": zero_velocity(seed, H),
        "constant-velocity": constant_velocity(seed, H),
    }
    groups = {"all": np.ones(len(splits), bool)}
    groups.update({s: np.array(splits) == s for s in cfg.eval_splits})
    rows: dict = {m: {g: {} for g in groups} for m in METHODS}
    n: dict = {g: {} for g in groups}
    for ms, h in zip(cfg.horizons_ms, frames, strict=True):
        true = future[:, h - 1]  # (N, J, 3)
        ok = np.isfinite(true).all(axis=(-1, -2))
        for g, member in groups.items():
            keep = ok & member
            n[g][str(ms)] = int(keep.sum())
            for m in METHODS:
                err = np.linalg.norm(predictions[m][keep, h - 1] - true[keep], axis=-1)
                rows[m][g][str(ms)] = round(float(err.mean()), 2) if keep.any() else None
    return {"rows": rows, "n": n}


# ----------------------------------------------------------------------------- the run


def run_future(shards: str | os.PathLike, out_dir: str | os.PathLike, config: FutureConfig,
               progress: bool = True) -> dict:  # fmt: skip
    """Train Pose-GPT on ``config.train_split``, forecast every window of the evaluation splits;
    write ``OUT/future.json``, ``future.md``, ``future.png`` and the model
    (``future_model.safetensors`` + ``future_model.json``); return the JSON content."""
    splits = find_splits(shards)
    for name in (config.train_split, *config.eval_splits):
        if name not in splits:
            raise ValueError(f"{shards}: no {name!r} split (have {', '.join(splits)})")
    fps = float(Manifest.load(splits[config.train_split]).fps)
    for name in config.eval_splits:
        if Manifest.load(splits[name]).fps != fps:
            raise ValueError(f"split {name!r} is not at the {fps:g} fps of the train split")
    frames = horizon_frames(config.horizons_ms, fps)
    length = config.seed_frames + max(frames)
    train_clips = [c for c in read_clips(splits[config.train_split], config.train_split)
                   if len(c.poses) >= length]  # fmt: skip
    if not train_clips:
        raise ValueError(
            f"split {config.train_split!r}: no clip has the {length} frames a "
            f"training window needs (seed {config.seed_frames} + {max(frames)})"
        )
    eval_clips = [c for name in config.eval_splits for c in read_clips(splits[name], name)]
    torch.manual_seed(config.seed)
    model = PoseGPT(config, max_frames=length, fps=fps)
    start = time.perf_counter()
    losses = train(model, train_clips, config, fps, progress)
    seconds = time.perf_counter() - start
    result = evaluate(model, eval_clips, config, fps)
    result = {
        "protocol": {
            "fps": fps, "seed_frames": config.seed_frames,
            "horizons_ms": list(config.horizons_ms), "horizons_frames": list(frames),
            "horizons_ms_actual": [round(f * 1000 / fps, 3) for f in frames],
            "units": "mm", "metric": "MPJPE (protocol 1) at the horizon frame",
            "pose": "root-relative, world coordinates", "joints": NUM_JOINTS,
            "train_split": config.train_split, "eval_splits": list(config.eval_splits),
            "eval_stride": config.eval_stride, "n": result["n"],
            "clips": {c.name: len(c.poses) for c in eval_clips},
            "ground_truth_after_seed": "never fed (autoregressive)",
        },
        "rows": result["rows"],
        "training": {
            "steps": config.steps, "seconds": round(seconds, 1), "train_clips": len(train_clips),
            "loss": "next-frame MPJPE mm (scheduled-sampling inputs)",
            "loss_first10": round(float(np.mean(losses[:10])), 2),
            "loss_last10": round(float(np.mean(losses[-10:])), 2),
        },
        "config": dataclasses.asdict(config),
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, config, fps, out)
    text = json.dumps(result, indent=1) + "\n"
    result = json.loads(text)  # what the file holds: lists, not tuples
    atomic_write_text(out / "future.json", text)
    atomic_write_text(out / "future.md", markdown_table(result))
    plot_png(result, losses, out / "future.png")
    return result


def save_model(model: PoseGPT, config: FutureConfig, fps: float, out: Path) -> None:
    """Weights as safetensors and the config needed to rebuild :class:`PoseGPT`."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, save(state))
    meta = {"config": dataclasses.asdict(config), "max_frames": model.max_frames, "fps": fps,
            "features": "root-relative joints (m, 17 x 3) + root velocity (m/s)",
            "output": "next-frame features (residual)"}  # fmt: skip
    atomic_write_text(out / CONFIG, json.dumps(meta, indent=1) + "\n")


def load_model(out: str | os.PathLike) -> PoseGPT:
    """The model :func:`save_model` wrote to ``out``."""
    from safetensors.torch import load_file

    meta = json.loads((Path(out) / CONFIG).read_text())
    model = PoseGPT(FutureConfig(**meta["config"]), meta["max_frames"], meta["fps"])
    model.load_state_dict(load_file(Path(out) / WEIGHTS))
    return model.eval()


def markdown_table(result: dict) -> str:
    """Rows: methods (pooled over the evaluation splits); columns: horizons in ms; then n."""
    p = result["protocol"]
    hs = [str(h) for h in p["horizons_ms"]]
    rows = [[m] + ["-" if errors["all"][h] is None else f"{errors['all'][h]:.1f}" for h in hs]
            for m, errors in result["rows"].items()]  # fmt: skip
    rows.append(["n (windows)"] + [str(p["n"]["all"][h]) for h in hs])
    lines = md_table(["method"] + [f"{h} ms" for h in hs], rows)
    lines.append(f"\nMPJPE (mm) at each horizon, {p['pose']}; seed {p['seed_frames']} frames at "
                 f"{p['fps']:g} fps; splits {', '.join(p['eval_splits'])} pooled "
                 f"(per split in future.json).")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_png(result: dict, losses: list[float], path: Path) -> None:
    """Error vs horizon (one line per method) and the training curve."""
    hs = [str(h) for h in result["protocol"]["horizons_ms"]]
    fig, (ax, bx) = pyplot().subplots(1, 2, figsize=(10, 4))
    for m, by_group in result["rows"].items():
        pts = [(int(h), by_group["all"][h]) for h in hs if by_group["all"][h] is not None]
        ax.plot(*zip(*pts, strict=True), marker="o", label=m)
    ax.set(xlabel="horizon (ms)", ylabel="MPJPE (mm)", title="forecast error")
    ax.legend()
    bx.plot(losses, lw=0.8)
    bx.set(xlabel="step", ylabel="next-frame MPJPE (mm)", title="training", yscale="log")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
