"""`posebert finetune pose`: a 3D pose regression head on a pretrained encoder.

Two ways to train the head, each beside the same head on a random-init encoder of the same
architecture: ``probe`` (the encoder frozen; a linear head on its L2-normalised per-frame
features, the ones retrieval searches, computed once and cached: pass retrieval's cache folder
to reuse them) and ``full`` (encoder and head trained together). A label fraction keeps the
labels of a seeded share of the train windows (:func:`finetune.clips.labelled_subset`: the 1%
set lies inside the 10% set, inside 100%). Every frame and view of the held-out split is
scored with :func:`finetune.evaluation.metrics.score_sequences` (each window of each view one
sequence), per action and overall; a mean-pose row is the floor any head must beat. Every
trained row is saved under OUT/heads/ and loads back with :func:`load_head`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data_shards.camera import camera_root_relative
from data_shards.configtools import to_dict
from data_shards.manifest import Manifest, find_splits
from data_shards.skeleton import NUM_JOINTS
from data_shards.transforms import Resize
from finetune.clips import labelled_subset, read_split
from finetune.evaluation.cache import embed_split_cached
from finetune.evaluation.embed import Embeddings, EncoderEmbedder, embed_split, random_init_like
from finetune.evaluation.metrics import score_sequences
from finetune.heads.pose.config import PoseConfig
from finetune.heads.pose.model import MM_PER_UNIT, PosePredictor, PoseRegressor, save_head
from finetune.heads.pose.report import write_outputs
from finetune.heads.pose.train import fit_full, fit_probe, load_windows, probe_arrays
from finetune.report.samples import write_samples


class SplitLabels(NamedTuple):
    keys: list[str]
    """Every sample key, in reading order."""
    mean_pose: np.ndarray | None
    """(J, 3) mean root-relative camera-frame pose of every frame and view, mm (None if empty)."""


def scan_split(split_dir: str | os.PathLike) -> SplitLabels:
    """One pass over a split's labels (no frames decoded): its keys and its mean pose."""
    keys: list[str] = []
    total, count = np.zeros((NUM_JOINTS, 3)), 0
    for batch in read_split(split_dir, batch_size=64):
        keys += batch["keys"]
        cam = camera_root_relative(batch["pose3d"].numpy(), batch["Rt"].numpy())
        total += cam.reshape(-1, NUM_JOINTS, 3).sum(0)
        count += cam.reshape(-1, NUM_JOINTS, 3).shape[0]
    return SplitLabels(keys, total / count if count else None)


def score(pred: np.ndarray, emb: Embeddings, frames_per_window: int) -> dict:
    """Errors (mm) of predictions (N, J, 3) for the rows of ``emb`` (ordered sample, view,
    frame: every run of ``frames_per_window`` rows is one window of one view, a sequence)."""
    target = emb.pose3d.astype(np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {pred.shape} do not match targets {target.shape}")
    T = frames_per_window
    if len(pred) % T:
        raise ValueError(f"{len(pred)} rows are not whole windows of {T} frames")
    seqs = len(pred) // T
    return score_sequences(list(pred.astype(np.float64).reshape(seqs, T, *pred.shape[1:])),
                           list(target.reshape(seqs, T, *target.shape[1:])),
                           list(emb.actions[::T]))  # fmt: skip


@dataclasses.dataclass
class _Context:
    config: PoseConfig
    splits: dict[str, Path]
    out: Path
    cache: Path
    transforms: tuple
    size: int | None
    progress: bool
    T: int


def run_pose(encoder_dir: str | os.PathLike, shards: str | os.PathLike,
             out_dir: str | os.PathLike, config: PoseConfig, progress: bool = True,
             cache_dir: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Train and score every (encoder, mode, label fraction) row and a mean-pose row; write
    ``OUT/pose.json``, ``pose.md``, ``pose.png`` and the rows under ``OUT/heads``; return the
    JSON content."""
    splits = find_splits(shards)
    for name in ("train", config.eval_split):
        if name not in splits:
            raise ValueError(f"{shards}: no {name!r} split (have {', '.join(splits) or 'none'})")
    out = Path(out_dir)
    pretrained = EncoderEmbedder.from_dir(encoder_dir)
    size = next((t.size for t in pretrained.transforms if isinstance(t, Resize)), None)
    train_labels = scan_split(splits["train"])
    if not train_labels.keys:
        raise ValueError(f"{splits['train']}: the split is empty")
    eval_manifest = Manifest.load(splits[config.eval_split])
    ctx = _Context(config, splits, out, Path(cache_dir) if cache_dir else out / "cache",
                   pretrained.transforms, size, progress, eval_manifest.frames)  # fmt: skip
    labelled = {f: labelled_subset(train_labels.keys, f, config.seed)
                for f in config.label_fractions}  # fmt: skip
    encoders = {"pretrained": pretrained.model,
                "random-init": random_init_like(pretrained.model, config.seed)}  # fmt: skip
    rows, curves, eval_emb, best = [], {}, None, None
    for name, encoder in encoders.items():
        fingerprint = pretrained.fingerprint if name == "pretrained" else None
        for mode in config.modes:
            train_fn = _probe_rows if mode == "probe" else _full_rows
            for row, curve, held, pred in train_fn(ctx, name, encoder, fingerprint, labelled):
                rows.append(row)
                curves[_label(row)] = curve
                eval_emb = held  # the held-out rows' poses and labels, for the mean-pose row
                if best is None or row["all"]["mpjpe"] < best[0]["all"]["mpjpe"]:
                    best = (row, pred, held)
    write_samples(out, "pose", **_samples(*best))
    pred = np.broadcast_to(train_labels.mean_pose, eval_emb.pose3d.shape)
    rows.append(_row("mean pose", "-", 1.0, len(train_labels.keys), 0,
                     score(pred, eval_emb, ctx.T), 0.0))  # fmt: skip
    protocol = {
        "joints": NUM_JOINTS, "units": "mm", "mpjve_units": "mm per frame step",
        "pose": "root-relative, camera coordinates of each view",
        "train": "train", "eval": config.eval_split, "train_windows": len(train_labels.keys),
        "eval_views": eval_manifest.views, "frames_per_window": ctx.T, "fps": eval_manifest.fps,
        "encoder_input_size": size, "config": to_dict(config),
    }  # fmt: skip
    return write_outputs(out, {"protocol": protocol, "rows": rows}, curves)


def _probe_rows(ctx: _Context, name: str, encoder, fingerprint, labelled: dict):
    """The probe's rows: the features retrieval searches (one cache serves both)."""
    embedder = EncoderEmbedder(encoder, fingerprint=fingerprint, transforms=ctx.transforms)
    train, _ = embed_split_cached(embedder, ctx.splits["train"], ctx.cache,
                                  ctx.config.batch_size, progress=ctx.progress)  # fmt: skip
    held, _ = embed_split_cached(embedder, ctx.splits[ctx.config.eval_split], ctx.cache,
                                 ctx.config.batch_size, progress=ctx.progress)  # fmt: skip
    for fraction, keys in labelled.items():
        t0 = time.perf_counter()
        label = f"{name} probe {fraction:.0%}"
        x, y = probe_arrays(*(a[np.isin(train.keys, sorted(keys))]
                              for a in (train.vectors, train.pose3d)))  # fmt: skip
        head, history = fit_probe(x, y, ctx.config.probe, ctx.config.seed, label,
                                  _log_dir(ctx, label), ctx.progress)  # fmt: skip
        with torch.no_grad():
            pred = head(torch.from_numpy(held.vectors)).numpy() * MM_PER_UNIT
        row = _row(name, "probe", fraction, len(keys), ctx.config.probe.steps,
                   score(pred, held, ctx.T), time.perf_counter() - t0)  # fmt: skip
        _save(ctx, PoseRegressor(encoder, head, normalize=True), row)
        yield row, history, held, pred


def _full_rows(ctx: _Context, name: str, encoder, fingerprint, labelled: dict):
    for fraction, keys in labelled.items():
        t0 = time.perf_counter()
        label = f"{name} full {fraction:.0%}"
        windows = load_windows(ctx.splits["train"], keys, ctx.size, ctx.config.full.max_memory_gb,
                               ctx.config.batch_size)  # fmt: skip
        start = type(encoder)(encoder.cfg)
        start.load_state_dict(encoder.state_dict())
        model, history = fit_full(start, windows, ctx.config.full, ctx.config.seed, label,
                                  _log_dir(ctx, label), ctx.progress)  # fmt: skip
        del windows
        predictor = PosePredictor(model, ctx.transforms)
        pred_emb = embed_split(predictor, ctx.splits[ctx.config.eval_split],
                               ctx.config.batch_size, normalize=False,
                               progress=ctx.progress)  # fmt: skip
        pred = pred_emb.vectors.reshape(-1, NUM_JOINTS, 3)
        row = _row(name, "full", fraction, len(keys), ctx.config.full.steps,
                   score(pred, pred_emb, ctx.T), time.perf_counter() - t0)  # fmt: skip
        _save(ctx, model, row)
        yield row, history, pred_emb, pred


def _samples(row: dict, pred: np.ndarray, emb: Embeddings, count: int = 8) -> dict:
    """A few held-out frames of the best row, evenly spaced, for ``posebert report``."""
    pick = np.linspace(0, len(pred) - 1, min(count, len(pred))).round().astype(int)
    return {"pred": pred[pick], "true": emb.pose3d[pick], "action": emb.actions[pick],
            "label": _label(row)}  # fmt: skip


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label.replace("%", "pct")).strip("-")


def _log_dir(ctx: _Context, label: str) -> Path:
    return ctx.out / "logs" / _slug(label)


def _save(ctx: _Context, model: PoseRegressor, row: dict) -> None:
    meta = {"row": {k: row[k] for k in ("encoder", "mode", "labels", "labelled_windows")},
            "input_size": ctx.size}  # fmt: skip
    row["weights"] = str(save_head(ctx.out / "heads" / _slug(_label(row)), model, meta).name)


def _row(encoder: str, mode: str, fraction: float, windows: int, steps: int, scores: dict,
         seconds: float) -> dict:  # fmt: skip
    return {"encoder": encoder, "mode": mode, "labels": fraction, "labelled_windows": windows,
            "steps": steps, **scores, "seconds": round(seconds, 1)}  # fmt: skip


def _label(row: dict) -> str:
    return f"{row['encoder']} {row['mode']} {row['labels']:.0%}"
