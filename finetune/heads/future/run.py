"""`posebert finetune future`: Pose-GPT forecasts held-out clips; errors per horizon beside the
zero- and constant-velocity baselines.

Protocol. Every clip of the evaluation splits is cut into windows of ``seed_frames`` observed
frames followed by the future; the model sees the seed only and feeds its own outputs back
(autoregressive, no ground truth after the seed: :func:`~finetune.heads.future.model.forecast`
never receives it). The error at horizon h ms is the MPJPE (protocol 1, mm) of the
root-relative world pose at the frame ``round(h * fps / 1000)`` steps after the last seed frame
(80 ms = 4 frames at 50 fps; where h * fps / 1000 is not whole, the rounded frame's own time is
recorded beside h). A window too short for a horizon is left out of that horizon only, so
every cell carries its count ``n``. Baselines (Martinez et al., CVPR 2017): zero-velocity
repeats the last seed pose; constant-velocity extrapolates its last step. Clips come from
:func:`finetune.clips.read_motion` (windows rescaled onto each other).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data_shards.augment import source_clip
from data_shards.configtools import to_dict
from data_shards.manifest import Manifest, find_splits
from data_shards.skeleton import NUM_JOINTS, ROOT
from finetune.clips import Clip, read_motion
from finetune.evaluation.metrics import mpjpe
from finetune.heads.future.config import FutureConfig, horizon_frames
from finetune.heads.future.model import (
    PoseGPT,
    feature_pose_mm,
    forecast,
    pose_features,
    save_model,
)
from finetune.heads.future.train import train
from finetune.report import command_line, md_table, pyplot, write_stage
from finetune.report.samples import write_samples

METHODS = ("pose-gpt", "zero-velocity", "constant-velocity")


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
                err = mpjpe(predictions[m][keep, h - 1], true[keep]) if keep.any() else None
                rows[m][g][str(ms)] = None if err is None else round(float(err), 2)
    return {"rows": rows, "n": n}


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
    train_clips = [c for c in read_motion(splits[config.train_split], config.train_split)
                   if len(c.poses) >= length]  # fmt: skip
    if not train_clips:
        raise ValueError(
            f"split {config.train_split!r}: no clip has the {length} frames a "
            f"training window needs (seed {config.seed_frames} + {max(frames)})"
        )
    eval_clips = [c for name in config.eval_splits for c in read_motion(splits[name], name)]
    count = config.select_clips
    sources = {source_clip(c.name) for c in train_clips}
    if count and len(sources) - count < 2:
        print(f"finetune future: only {len(sources)} train clips long enough; none held out "
              "to choose the model (the last step, the full transformer share)", file=sys.stderr)
        count = 0
    train_clips, select_clips = hold_out(train_clips, count)
    torch.manual_seed(config.seed)
    model = PoseGPT(config, max_frames=length, fps=fps)
    start = time.perf_counter()
    out = Path(out_dir)
    score = None
    if select_clips:
        def score(m: PoseGPT) -> float:  # the worst horizon's error relative to zero velocity
            rows = evaluate(m, select_clips, config, fps)["rows"]
            pairs = zip(rows["pose-gpt"]["all"].values(), rows["zero-velocity"]["all"].values(),
                        strict=True)  # fmt: skip
            return max(e / z for e, z in pairs if e is not None and z)
    history, chosen = train(model, train_clips, config, fps, progress,
                            log_dir=out / "logs" / "future", score=score)  # fmt: skip
    losses = [r["mpjpe_mm"] for r in history]
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
            "selection_clips": [c.name for c in select_clips],
            "selected": chosen | {"metric": "the largest ratio over the horizons of the "
                                  "MPJPE to zero velocity's, on the selection clips (train "
                                  "split, held out of training)"},
            "damping": _mean_share(model.damping), "reversion": _mean_share(model.reversion),
        },
        "config": to_dict(config),
        "command": command_line(),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, config, fps, out)
    write_samples(out, "future", **forecast_samples(model, eval_clips, config, fps))
    return write_stage(out, "future", result, markdown_table(result),
                       {"future": plot(result, losses)})  # fmt: skip


def hold_out(clips: list[Clip], count: int) -> tuple[list[Clip], list[Clip]]:
    """(training clips, ``count`` clips held out to choose the model), the held-out ones evenly
    spaced in name order; at least two clips stay for training. Augmented copies of a clip
    (``walk~mirror``, ``walk~x0.8``: ``shards synth --mirror/--speeds``) go with it: a held-out
    clip's copies are not trained on, and copies are never held out themselves."""
    if count == 0:
        return clips, []
    sources = sorted({source_clip(c.name) for c in clips})
    if len(sources) - count < 2:
        raise ValueError(f"select_clips={count} leaves fewer than 2 of the {len(sources)} "
                         "train clips for training (set select_clips=0)")  # fmt: skip
    picks = np.linspace(0, len(sources) - 1, count + 2)[1:-1].round().astype(int).tolist()
    held = {sources[i] for i in picks}
    return ([c for c in clips if source_clip(c.name) not in held],
            sorted((c for c in clips if c.name in held), key=lambda c: c.name))  # fmt: skip


def _mean_share(logits: torch.Tensor | None) -> float | None:
    """The mean of a learned share (its logits) over the joint coordinates."""
    return None if logits is None else round(float(torch.sigmoid(logits.detach()).mean()), 4)


def forecast_samples(model: PoseGPT, clips: list[Clip], cfg: FutureConfig, fps: float,
                     count: int = 4) -> dict:  # fmt: skip
    """A few held-out windows long enough for every horizon, evenly spaced, with Pose-GPT's
    forecast: the arrays ``posebert report`` draws as strips."""
    frames = horizon_frames(cfg.horizons_ms, fps)
    windows, _ = eval_windows(clips, cfg.seed_frames, frames, cfg.eval_stride)
    full = windows[np.isfinite(windows).all(axis=(1, 2, 3))]
    if not len(full):  # no clip covers the longest horizon: the first windows, as they are
        full = np.nan_to_num(windows[:count])
    pick = full[np.linspace(0, len(full) - 1, min(count, len(full))).round().astype(int)]
    relative = pick - pick[:, :, ROOT : ROOT + 1]
    pred = forecast_windows(model, pick, cfg.seed_frames, max(frames), fps)
    return {"seed": relative[:, : cfg.seed_frames], "true": relative[:, cfg.seed_frames :],
            "pred": pred, "fps": fps, "label": "pose-gpt"}  # fmt: skip


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


def plot(result: dict, losses: list[float]):
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
    return fig
