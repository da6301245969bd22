"""3D skeleton figures of the report: predictions beside ground truth, and forecast strips.

Both draw :mod:`finetune.report.samples` arrays with the bones of :mod:`data_shards.skeleton`,
in millimetres, on axes of equal scale (a stretched axis would make a bent knee look straight).
Poses in camera coordinates (OpenCV: y down, z forward) are turned upright for display; world
poses are Z up already. Ground truth is drawn in black, the prediction in red.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_shards.skeleton import BONES
from finetune.evaluation.metrics import mpjpe
from finetune.report.writer import pyplot

TRUE_COLOUR, PRED_COLOUR, SEED_COLOUR = "black", "tab:red", "tab:blue"
VIEWS = {"camera view": (5.0, -90.0), "side view": (5.0, 0.0)}
"""Viewpoints (elevation, azimuth in degrees) of the display frame (x right, y depth, z up):
-90 looks along +y, i.e. from the camera; 0 looks from the subject's side."""
MAX_POSES, MAX_FORECASTS, MAX_COLUMNS = 4, 3, 7


def camera_to_display(pose: np.ndarray) -> np.ndarray:
    """(..., 3) OpenCV camera coordinates (x right, y down, z forward) -> display coordinates
    (x right, y depth, z up)."""
    return np.stack([pose[..., 0], pose[..., 2], -pose[..., 1]], axis=-1)


def _limits(*poses: np.ndarray) -> float:
    """Half-width of a cube around the origin holding every finite joint (root-relative)."""
    values = np.concatenate([np.abs(p[np.isfinite(p)]).ravel() for p in poses])
    return float(values.max()) * 1.05 if values.size else 1.0


def draw_pose(ax, pose: np.ndarray, colour: str, width: float = 1.6) -> None:
    """Bones of one (17, 3) display-frame pose on a 3D axes; NaN joints are left out."""
    for parent, child in BONES:
        seg = pose[[parent, child]]
        if np.isfinite(seg).all():
            ax.plot(seg[:, 0], seg[:, 1], seg[:, 2], color=colour, linewidth=width)


def _frame(ax, half: float, title: str) -> None:
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_zlim(-half, half)
    ax.set_box_aspect((1, 1, 1), zoom=1.45)
    ax.set_axis_off()  # the stick figure alone; equal limits keep panels comparable
    ax.set_title(title, fontsize=8, pad=0)


def pose_figure(samples: dict, limit: int = MAX_POSES):
    """Up to ``limit`` pose samples as columns, each from the two :data:`VIEWS` (rows):
    ground truth (black) beside the prediction (red), with the sample's MPJPE."""
    true = camera_to_display(samples["true"][:limit])
    pred = camera_to_display(samples["pred"][:limit])
    n = len(true)
    if n == 0:
        raise ValueError("no pose samples to draw")
    half = _limits(true, pred)
    plt = pyplot()
    fig = plt.figure(figsize=(2.6 * n, 5.4))
    for i in range(n):
        error = float(mpjpe(pred[i], true[i]))
        for r, (view, (elev, azim)) in enumerate(VIEWS.items()):
            ax = fig.add_subplot(2, n, r * n + i + 1, projection="3d")
            draw_pose(ax, true[i], TRUE_COLOUR)
            draw_pose(ax, pred[i], PRED_COLOUR)
            ax.view_init(elev=elev, azim=azim)
            title = f"{samples['action'][i]}: MPJPE {error:.0f} mm\n{view}" if r == 0 else view
            _frame(ax, half, title)
    fig.suptitle(f"{samples.get('label', 'pose head')}: ground truth (black), prediction (red)",
                 fontsize=9)  # fmt: skip
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.02, hspace=0.12)
    return fig


def strip_columns(horizon: int, fps: float, horizons_ms: Sequence[float] = (),
                  limit: int = MAX_COLUMNS) -> list[int]:  # fmt: skip
    """Frame indices of ``true``/``pred`` shown in a forecast strip: the frames of the
    evaluation's horizons (``horizons_ms``) that the samples reach, else frames evenly spaced
    over the horizon ending on its last one."""
    frames = sorted({round(ms * fps / 1000) - 1 for ms in horizons_ms} & set(range(horizon)))
    if frames:
        return frames[-limit:]
    count = min(horizon, limit)
    return sorted({int(round(x)) for x in np.linspace(horizon / count - 1, horizon - 1, count)})


def forecast_figure(samples: dict, horizons_ms: Sequence[float] = (), limit: int = MAX_FORECASTS):
    """One strip per sample (rows, up to ``limit``): the first and last seed frames (blue),
    then forecast (red) over truth (black) at the evaluation's horizons (or frames spread over
    the horizon), each titled with its time after the seed and the error there."""
    seed, true, pred = (samples[k][:limit] for k in ("seed", "true", "pred"))
    n, H = true.shape[:2]
    if n == 0:
        raise ValueError("no forecast samples to draw")
    columns = strip_columns(H, samples["fps"], horizons_ms)
    seeds = sorted({0, seed.shape[1] - 1})
    width = len(seeds) + len(columns)
    half = _limits(seed, true, pred)
    plt = pyplot()
    fig = plt.figure(figsize=(1.7 * width, 1.9 * n + 0.5))
    for i in range(n):
        name = f"{samples['action'][i]}: " if "action" in samples else ""
        for c, s in enumerate(seeds):
            ax = fig.add_subplot(n, width, i * width + c + 1, projection="3d")
            draw_pose(ax, seed[i, s], SEED_COLOUR)
            ms = (s - seed.shape[1] + 1) * 1000 / samples["fps"]  # 0: the last seed frame
            _frame(ax, half, f"{name}seed {ms:.0f} ms" if c == 0 else f"seed {ms:.0f} ms")
            ax.view_init(elev=10, azim=-60)
        for c, h in enumerate(columns, len(seeds)):
            ax = fig.add_subplot(n, width, i * width + c + 1, projection="3d")
            draw_pose(ax, true[i, h], TRUE_COLOUR)
            draw_pose(ax, pred[i, h], PRED_COLOUR)
            error = float(mpjpe(pred[i, h], true[i, h]))
            ms = (h + 1) * 1000 / samples["fps"]
            _frame(ax, half, f"+{ms:.0f} ms: {error:.0f} mm")
            ax.view_init(elev=10, azim=-60)
    label = samples.get("label", "forecast")
    fig.suptitle(f"{label}: seed (blue), then truth (black) and forecast (red)", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (1.9 * n + 0.5),
                        wspace=0.02, hspace=0.15)  # fmt: skip
    return fig
