"""Prediction samples a head leaves for ``posebert report`` to draw: the contract.

A head writes a handful of its held-out predictions beside its ``<stage>.json`` with
:func:`write_samples`; the report reads them back with :func:`read_samples` and draws them
(:mod:`finetune.report.skeletons`). The file is ``OUT/<stage>-samples.npz``, written atomically
and without pickle (strings are fixed-width unicode arrays), so a report never loads code from
a run folder. A few samples are enough (the report draws at most the first 4 poses and 3
forecasts); pick them reproducibly (e.g. evenly spaced over the evaluation split).

Stage ``pose`` (3D pose regression, one row of ``pose.json``):

- ``pred``: (N, 17, 3) float, mm, the head's prediction;
- ``true``: (N, 17, 3) float, mm, the ground truth of the same frames;
  both root-relative in the camera coordinates of the frame's view (OpenCV axes: x right,
  y down, z forward; :mod:`data_shards.camera`), joints in :mod:`data_shards.skeleton` order;
- ``action``: (N,) str, the action of each frame;
- ``label``: str, which row of ``pose.json`` predicted them (e.g. ``pretrained full 100%``).

Stage ``future`` (forecasting, Pose-GPT):

- ``seed``: (N, S, 17, 3) float, mm, the S seed frames the model saw;
- ``true``: (N, H, 17, 3) float, mm, the H frames that followed;
- ``pred``: (N, H, 17, 3) float, mm, the forecast of those H frames;
  all root-relative world coordinates (Z up, :mod:`data_shards.camera`), 17 joints;
- ``fps``: float, frames per second (frame h of ``true`` is (h + 1) / fps seconds after the
  last seed frame).

Optional for ``future``: ``action`` (N,) str and ``label`` str, shown as titles. Other arrays
are kept and ignored by the report.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from data_shards.manifest import atomic_write_bytes
from data_shards.skeleton import NUM_JOINTS

POSE_SHAPE = (NUM_JOINTS, 3)
STAGES = ("pose", "future")
STRINGS = ("action", "label")
"""Fields stored as unicode arrays (read back as str arrays; ``label`` as one str)."""


def samples_path(out_dir: str | os.PathLike, stage: str) -> Path:
    return Path(out_dir) / f"{stage}-samples.npz"


def _poses(arrays: dict, name: str, ndim: int, stage: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{stage} samples need {name!r} (have {', '.join(sorted(arrays))})")
    a = np.asarray(arrays[name])
    if a.ndim != ndim or a.shape[-2:] != POSE_SHAPE or not np.issubdtype(a.dtype, np.number):
        want = "(N, 17, 3)" if ndim == 3 else "(N, T, 17, 3)"
        raise ValueError(f"{stage} samples: {name!r} must be {want} numbers, got "
                         f"{a.shape} {a.dtype}")  # fmt: skip
    return a.astype(np.float32)


def _check(stage: str, arrays: dict) -> dict[str, np.ndarray]:
    """The arrays of the contract, validated (one-line ``ValueError``), as stored."""
    if stage not in STAGES:
        raise ValueError(f"unknown samples stage {stage!r}; expected one of {STAGES}")
    out = {k: np.asarray(v) for k, v in arrays.items()}
    if stage == "pose":
        out["pred"], out["true"] = (_poses(arrays, k, 3, stage) for k in ("pred", "true"))
        if out["pred"].shape != out["true"].shape:
            raise ValueError(f"pose samples: pred {out['pred'].shape} != true "
                             f"{out['true'].shape}")  # fmt: skip
        for name in ("action", "label"):
            if name not in arrays:
                raise ValueError(f"pose samples need {name!r}")
    else:
        out["seed"], out["true"], out["pred"] = (_poses(arrays, k, 4, stage)
                                                 for k in ("seed", "true", "pred"))  # fmt: skip
        if out["pred"].shape != out["true"].shape or len(out["seed"]) != len(out["true"]):
            raise ValueError(f"future samples: seed {out['seed'].shape}, true "
                             f"{out['true'].shape} and pred {out['pred'].shape} disagree")
        if "fps" not in arrays or not float(np.asarray(arrays["fps"])) > 0:
            raise ValueError("future samples need 'fps' > 0")
        out["fps"] = np.asarray(float(np.asarray(arrays["fps"])))
    n = len(out["true"])
    for name in STRINGS:
        if name in out:
            out[name] = np.asarray(out[name]).astype(str)
    if "action" in out and out["action"].shape != (n,):
        raise ValueError(f"{stage} samples: 'action' must be ({n},), got {out['action'].shape}")
    if "label" in out and out["label"].ndim != 0:
        raise ValueError(f"{stage} samples: 'label' must be one string")
    return out


def write_samples(out_dir: str | os.PathLike, stage: str, **arrays) -> Path:
    """Validate ``arrays`` against the contract of ``stage`` (module docstring) and write
    ``OUT/<stage>-samples.npz`` atomically; returns its path."""
    checked = _check(stage, arrays)
    buf = io.BytesIO()
    np.savez_compressed(buf, **checked)
    path = samples_path(out_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_samples(out_dir: str | os.PathLike, stage: str) -> dict | None:
    """The samples of ``stage`` in ``out_dir`` (arrays; ``label`` as str, ``fps`` as float),
    None when the stage wrote none; one-line ``ValueError`` when the file breaks the
    contract or is not an npz (never unpickled)."""
    path = samples_path(out_dir, stage)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a samples file ({e})") from None
    try:
        out: dict = _check(stage, arrays)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if "label" in out:
        out["label"] = str(out["label"])
    if "fps" in out:
        out["fps"] = float(out["fps"])
    return out
