"""`posebert finetune pose`: a 3D pose regression head on a pretrained encoder.

The head predicts the 17 joints of every frame, root-relative in the camera coordinates of the
frame's view (what one image determines). Two ways to train it, each beside
the same head on a random-init encoder of the same architecture:

- ``probe``: the encoder frozen; a linear head on its per-frame features (the L2-normalised
  features retrieval searches, standardised with the labelled rows' statistics), computed once
  and cached (pass retrieval's cache folder to reuse its embeddings);
- ``full``: encoder and head trained together.

Both train with accelerate (CPU, one GPU, or several processes under ``accelerate launch``).
A label fraction keeps the labels of a seeded share of the train windows only; the 1% set lies
inside the 10% set, inside 100%, so rows differ by the labels alone. Evaluation on every frame
and view of a held-out split: MPJPE, P-MPJPE and N-MPJPE per frame, MPJVE along each window
(mm per frame step), per action and overall; a mean-pose row is the floor any head must beat.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_shards.camera import camera_root_relative
from data_shards.manifest import Manifest, atomic_write_text, find_splits
from data_shards.read import ReaderConfig, ShardReader
from data_shards.skeleton import NUM_JOINTS
from data_shards.transforms import Resize
from finetune.evaluation import metrics
from finetune.evaluation.embed import (
    Embeddings,
    EncoderEmbedder,
    embed_split,
    embed_split_cached,
    random_init_like,
)
from finetune.report import md_table, pyplot, save_figure
from pretrain.engine.schedules import LRSchedule

MODES = ("probe", "full")
METRICS = ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve")
MM_PER_UNIT = 1000.0  # the head predicts metres; errors are reported in mm


@dataclasses.dataclass
class PoseConfig:
    """What ``posebert finetune pose`` trains and how."""

    modes: tuple[str, ...] = MODES
    """``probe`` (frozen encoder, linear head) and/or ``full`` (everything trained)."""
    label_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    """Shares of the train windows whose labels are used (each in (0, 1])."""
    eval_split: str = "val"
    """Held-out split the heads are scored on."""
    seed: int = 0
    """Seeds the label subsets, the random-init encoder, head init and batch order."""
    batch_size: int = 8
    """Windows per batch when embedding or predicting a split."""
    probe_steps: int = 600
    probe_lr: float = 3e-3
    probe_batch: int = 1024
    """Frames per probe step."""
    probe_weight_decay: float = 1e-4
    full_steps: int = 100
    full_lr: float = 3e-4
    """Encoder learning rate; the head's is ten times higher."""
    full_windows: int = 4
    """Windows per full fine-tuning step."""
    full_views: int = 2
    """Views drawn per window per step (all of them when larger than the split's V)."""
    full_frames: int = 8
    """Consecutive frames cropped per window per step (all of them when larger than T)."""
    warmup_steps: int = 10
    max_memory_gb: float = 8.0
    """Bound on the labelled windows held in memory for full fine-tuning."""

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        self.label_fractions = tuple(float(f) for f in self.label_fractions)
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"PoseConfig.modes: choose from {', '.join(MODES)}, got {self.modes}")
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"PoseConfig.label_fractions must lie in (0, 1], "
                             f"got {self.label_fractions}")  # fmt: skip
        positive = ("batch_size", "probe_steps", "probe_batch", "full_steps", "full_windows",
                    "full_views", "full_frames")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PoseConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("probe_lr", "full_lr", "max_memory_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PoseConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.seed < 0 or self.warmup_steps < 0 or self.probe_weight_decay < 0:
            raise ValueError("PoseConfig: seed, warmup_steps and probe_weight_decay must be >= 0")


# ------------------------------------------------------------------------------------ labels


def labelled_keys(keys: list[str], fraction: float, seed: int) -> set[str]:
    """The windows whose labels a run may use: a prefix of one seeded permutation of the sorted
    keys, at least one window, so smaller fractions are subsets of larger ones."""
    order = sorted(set(keys))
    if not order:
        raise ValueError("no train windows to take labels from")
    perm = np.random.default_rng(seed).permutation(len(order))
    count = max(1, round(fraction * len(order)))
    return {order[i] for i in perm[:count]}


class SplitLabels(NamedTuple):
    keys: list[str]
    """Every sample key, in reading order."""
    mean_pose: np.ndarray | None
    """(J, 3) mean root-relative camera-frame pose of every frame and view, mm (None if empty)."""


def scan_split(split_dir: str | os.PathLike) -> SplitLabels:
    """One pass over a split's labels (no frames decoded): its keys and its mean pose."""
    config = ReaderConfig(str(split_dir), batch_size=64, shuffle=False, drop_last=False,
                          frames="off", masks=False)  # fmt: skip
    keys: dict[str, None] = {}  # ordered set: padded repeats at the end are dropped
    total, count = np.zeros((NUM_JOINTS, 3)), 0
    for batch in ShardReader(config, rank=0, world_size=1):
        keep = [b for b, k in enumerate(batch["keys"]) if k not in keys]
        keys.update((batch["keys"][b], None) for b in keep)
        if keep:
            cam = camera_root_relative(batch["pose3d"][keep].numpy(), batch["Rt"][keep].numpy())
            total += cam.reshape(-1, NUM_JOINTS, 3).sum(0)
            count += cam.reshape(-1, NUM_JOINTS, 3).shape[0]
    return SplitLabels(list(keys), total / count if count else None)


# ------------------------------------------------------------------------------------- model


class PoseHead(nn.Module):
    """Standardise features with fixed statistics, then one linear map to J x 3 (metres)."""

    def __init__(self, dim: int, joints: int = NUM_JOINTS):
        super().__init__()
        self.joints = joints
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, joints * 3)

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """features (N, D) and targets (N, J, 3) of the rows the head will be trained on: the
        features are standardised with their statistics and the head starts as the mean-pose
        predictor (zero weights, bias = mean target), so training moves away from that floor."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))
        self.linear.weight.zero_()
        self.linear.bias.copy_(targets.mean(0).flatten())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.mean) / self.std
        return self.linear(x).unflatten(-1, (self.joints, 3))  # (..., J, 3)


class PoseRegressor(nn.Module):
    """A PoseBERT encoder (contextualised per-frame features) and a :class:`PoseHead`."""

    def __init__(self, encoder: nn.Module, head: PoseHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.encoder.embed(frames, masks))  # (B, V, T, J, 3) metres


@dataclasses.dataclass
class _PosePredictor:
    """A trained regressor as a frame embedder: predictions flattened to (B, V, T, J * 3) mm,
    so :func:`finetune.evaluation.embed.embed_split` gathers them with the poses and labels."""

    model: PoseRegressor
    transforms: tuple = ()
    fingerprint: str = "pose-predictor"

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        masks = None if masks is None else masks.to(device)
        pred = self.model.eval()(frames.to(device), masks)
        return (pred * MM_PER_UNIT).flatten(-2).float().cpu()


# ----------------------------------------------------------------------------------- scoring


def score(pred: np.ndarray, emb: Embeddings, frames_per_window: int) -> dict:
    """Errors (mm) of predictions (N, J, 3) for the rows of ``emb``: overall and per action.

    Rows come ordered sample, view, frame (:func:`finetune.evaluation.embed.embed_split`), so
    every run of ``frames_per_window`` rows is one window of one view: the sequences MPJVE is
    computed on.
    """
    target = emb.pose3d.astype(np.float64)
    pred = pred.astype(np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {pred.shape} do not match targets {target.shape}")
    T = frames_per_window
    if len(pred) % T:
        raise ValueError(f"{len(pred)} rows are not whole windows of {T} frames")
    per_row = {name: getattr(metrics, name)(pred, target, reduce="none")
               for name in ("mpjpe", "p_mpjpe", "n_mpjpe")}  # fmt: skip
    seq_p = pred.reshape(-1, T, *pred.shape[1:])  # (S*V, T, J, 3)
    seq_t = target.reshape(seq_p.shape)
    per_seq = metrics.mpjve(seq_p, seq_t, reduce="none").mean(-1)  # (S*V,)
    seq_actions = emb.actions[::T]

    def summary(rows: np.ndarray, seqs: np.ndarray) -> dict:
        out = {name: float(v[rows].mean()) for name, v in per_row.items()}
        out["mpjve"] = float(per_seq[seqs].mean())
        out["frames"] = int(rows.sum())
        return out

    every = np.ones(len(pred), bool)
    result = {"all": summary(every, np.ones(len(per_seq), bool)), "per_action": {}}
    for action in sorted(set(emb.actions)):
        result["per_action"][action] = summary(emb.actions == action, seq_actions == action)
    return result


# ---------------------------------------------------------------------------------- training


def _accelerator():
    from accelerate import Accelerator

    return Accelerator()


def _lr_lambda(config: PoseConfig, steps: int):
    schedule = LRSchedule(warmup_steps=min(config.warmup_steps, steps // 2))
    return lambda step: schedule.lr(step, 1.0, steps)


def fit_probe(features: torch.Tensor, targets: torch.Tensor, config: PoseConfig,
              progress: bool = False) -> tuple[PoseHead, list[float]]:  # fmt: skip
    """A linear head on frozen features (N, D) -> targets (N, J, 3) metres; returns it and the
    loss (MPJPE, metres) per step."""
    acc = _accelerator()
    torch.manual_seed(config.seed)
    head = PoseHead(features.shape[1], targets.shape[1])
    head.set_statistics(features, targets)
    opt = torch.optim.AdamW(head.parameters(), lr=config.probe_lr,
                            weight_decay=config.probe_weight_decay)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, config.probe_steps))
    head, opt = acc.prepare(head, opt)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in tqdm(range(config.probe_steps), desc="probe", disable=not progress, leave=False):
        rows = torch.randint(len(features), (min(config.probe_batch, len(features)),),
                             generator=gen)  # fmt: skip
        x, y = features[rows].to(acc.device), targets[rows].to(acc.device)
        loss = torch.linalg.vector_norm(head(x) - y, dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return acc.unwrap_model(head).cpu().eval(), losses


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
        b = pick[:, None, None]
        idx = (b, vs[:, :, None], ts[:, None, :])  # broadcast to (B, v, t)
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
            f"max_memory_gb={max_memory_gb}; use fewer labels or raise the bound"
        )
    config = ReaderConfig(str(split_dir), batch_size=batch_size, shuffle=False, drop_last=False,
                          transforms=(Resize(size),) if size else ())  # fmt: skip
    frames, masks, targets, seen = [], [], [], set()
    for batch in ShardReader(config, rank=0, world_size=1):
        keep = [b for b, k in enumerate(batch["keys"]) if k in keys and k not in seen]
        seen.update(batch["keys"][b] for b in keep)
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


def fit_full(encoder: nn.Module, windows: Windows, config: PoseConfig,
             progress: bool = False) -> tuple[PoseRegressor, list[float]]:  # fmt: skip
    """Encoder + head trained end to end on labelled windows; returns the regressor (eval mode,
    CPU) and the loss (MPJPE, metres) per step."""
    acc = _accelerator()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    head = PoseHead(encoder.cfg.encoder.width, windows.targets.shape[-2])
    draw = (config.full_windows, config.full_views, config.full_frames)
    with torch.no_grad():  # head statistics from the initial features of a few batches
        batches = [windows.batch(*draw, gen) for _ in range(2)]
        feats = [encoder.eval().embed(f, m).flatten(0, 2) for f, m, _ in batches]
        head.set_statistics(torch.cat(feats), windows.targets.flatten(0, 2))
    model = PoseRegressor(encoder, head).train()
    opt = torch.optim.AdamW([
        {"params": encoder.parameters(), "lr": config.full_lr},
        {"params": head.parameters(), "lr": 10 * config.full_lr},
    ], weight_decay=1e-4)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, config.full_steps))
    model, opt = acc.prepare(model, opt)
    losses = []
    for _ in tqdm(range(config.full_steps), desc="fine-tune", disable=not progress, leave=False):
        f, m, y = windows.batch(*draw, gen)
        m = None if m is None else m.to(acc.device)
        pred = model(f.to(acc.device), m)
        loss = torch.linalg.vector_norm(pred - y.to(acc.device), dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return acc.unwrap_model(model).cpu().eval(), losses


# --------------------------------------------------------------------------------------- run


def run_pose(encoder_dir: str | os.PathLike, shards: str | os.PathLike,
             out_dir: str | os.PathLike, config: PoseConfig, progress: bool = True,
             cache_dir: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Train and score every (encoder, mode, label fraction) row and a mean-pose row; write
    ``OUT/pose.json``, ``OUT/pose.md`` and ``OUT/pose.png``; return the JSON content."""
    splits = find_splits(shards)
    for name in ("train", config.eval_split):
        if name not in splits:
            raise ValueError(f"{shards}: no {name!r} split (have {', '.join(splits) or 'none'})")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    pretrained = EncoderEmbedder.from_dir(encoder_dir)
    encoders = {"pretrained": pretrained.model,
                "random-init": random_init_like(pretrained.model, config.seed)}  # fmt: skip
    size = next((t.size for t in pretrained.transforms if isinstance(t, Resize)), None)
    train_labels = scan_split(splits["train"])
    train_keys = train_labels.keys
    if not train_keys:
        raise ValueError(f"{splits['train']}: the split is empty")
    eval_manifest = Manifest.load(splits[config.eval_split])
    T = eval_manifest.frames
    labelled = {f: labelled_keys(train_keys, f, config.seed) for f in config.label_fractions}
    rows: list[dict] = []
    curves: dict[str, list[float]] = {}
    eval_emb = None
    for name, encoder in encoders.items():
        embedder = EncoderEmbedder(encoder, transforms=pretrained.transforms)
        if name == "pretrained":
            embedder.fingerprint = pretrained.fingerprint
        if "probe" in config.modes:
            # the features retrieval searches (L2-normalised): one cache serves both
            train, _ = embed_split_cached(embedder, splits["train"], cache, config.batch_size,
                                          progress=progress)  # fmt: skip
            held, _ = embed_split_cached(embedder, splits[config.eval_split], cache,
                                         config.batch_size, progress=progress)  # fmt: skip
            eval_emb = held
            for fraction, keys in labelled.items():
                t0 = time.perf_counter()
                rows_l = np.isin(train.keys, sorted(keys))
                x = torch.from_numpy(train.vectors[rows_l])
                y = torch.from_numpy(train.pose3d[rows_l] / MM_PER_UNIT).float()
                head, losses = fit_probe(x, y, config, progress)
                with torch.no_grad():
                    pred = head(torch.from_numpy(held.vectors)).numpy() * MM_PER_UNIT
                rows.append(_row(name, "probe", fraction, len(keys), config.probe_steps,
                                 score(pred, held, T), time.perf_counter() - t0))  # fmt: skip
                curves[_label(rows[-1])] = losses
        if "full" in config.modes:
            for fraction, keys in labelled.items():
                t0 = time.perf_counter()
                windows = load_windows(splits["train"], keys, size, config.max_memory_gb,
                                       config.batch_size)  # fmt: skip
                start = type(encoder)(encoder.cfg)
                start.load_state_dict(encoder.state_dict())
                model, losses = fit_full(start, windows, config, progress)
                del windows
                predictor = _PosePredictor(model, pretrained.transforms)
                pred_emb = embed_split(predictor, splits[config.eval_split], config.batch_size,
                                       normalize=False, progress=progress)  # fmt: skip
                eval_emb = pred_emb
                pred = pred_emb.vectors.reshape(-1, NUM_JOINTS, 3)
                rows.append(_row(name, "full", fraction, len(keys), config.full_steps,
                                 score(pred, pred_emb, T), time.perf_counter() - t0))  # fmt: skip
                curves[_label(rows[-1])] = losses
    pred = np.broadcast_to(train_labels.mean_pose, eval_emb.pose3d.shape)
    rows.append(_row("mean pose", "-", 1.0, len(train_keys), 0, score(pred, eval_emb, T), 0.0))
    result = {
        "protocol": {
            "joints": NUM_JOINTS, "units": "mm", "mpjve_units": "mm per frame step",
            "pose": "root-relative, camera coordinates of each view",
            "train": "train", "eval": config.eval_split, "train_windows": len(train_keys),
            "eval_views": eval_manifest.views, "frames_per_window": T, "fps": eval_manifest.fps,
            "encoder_input_size": size, "config": dataclasses.asdict(config),
        },
        "rows": rows,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pose.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "pose.md", markdown_table(result))
    plot(result, curves, out / "pose.png")
    return result


def _row(encoder: str, mode: str, fraction: float, windows: int, steps: int, scores: dict,
         seconds: float) -> dict:  # fmt: skip
    return {"encoder": encoder, "mode": mode, "labels": fraction, "labelled_windows": windows,
            "steps": steps, **scores, "seconds": round(seconds, 1)}  # fmt: skip


def _label(row: dict) -> str:
    return f"{row['encoder']} {row['mode']} {row['labels']:.0%}"


def markdown_table(result: dict) -> str:
    """Overall errors per row, then MPJPE per action."""
    rows = result["rows"]
    head = ["encoder", "head", "labels", "windows", "MPJPE", "P-MPJPE", "N-MPJPE", "MPJVE"]
    lines = md_table(head, [[r["encoder"], r["mode"], f"{r['labels']:.0%}",
                             str(r["labelled_windows"])]
                            + [f"{r['all'][m]:.1f}" for m in METRICS] for r in rows])  # fmt: skip
    actions = sorted(rows[0]["per_action"])
    lines += ["", "MPJPE (mm) per action:", ""]
    lines += md_table(["encoder", "head", "labels", *actions],
                      [[r["encoder"], r["mode"], f"{r['labels']:.0%}"]
                       + [f"{r['per_action'][a]['mpjpe']:.1f}" for a in actions]
                       for r in rows])  # fmt: skip
    p = result["protocol"]
    lines.append(f"\n{p['eval']} split, {p['eval_views']} views x {p['frames_per_window']} "
                 f"frames per window; {p['pose']}, {p['units']}; MPJVE in "
                 f"{p['mpjve_units']} at {p['fps']:g} fps.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, curves: dict[str, list[float]], path: Path) -> None:
    """MPJPE against the label fraction per (encoder, head), and the training losses."""
    fig, (ax, ax_loss) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in result["rows"]:
        if r["mode"] in MODES:
            lines.setdefault((r["encoder"], r["mode"]), []).append((r["labels"], r["all"]["mpjpe"]))
    for (encoder, mode), pts in lines.items():
        pts.sort()
        style = "-" if encoder == "pretrained" else "--"
        marker = "o" if mode == "probe" else "s"
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, marker=marker,
                label=f"{encoder}, {mode}")  # fmt: skip
    mean_row = next((r for r in result["rows"] if r["encoder"] == "mean pose"), None)
    if mean_row:
        ax.axhline(mean_row["all"]["mpjpe"], color="grey", lw=1, label="mean pose")
    ax.set_xscale("log")
    ticks = sorted({r["labels"] * 100 for r in result["rows"] if r["mode"] in MODES})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("train windows with labels (%)")
    ax.set_ylabel(f"MPJPE on {result['protocol']['eval']} (mm)")
    ax.set_title("3D pose regression head")
    ax.legend(fontsize=8)
    for name, losses in curves.items():
        ax_loss.plot(np.asarray(losses) * MM_PER_UNIT, lw=0.8, label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training MPJPE (mm)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
