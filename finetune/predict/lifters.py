"""The 2D -> 3D step of ``posebert predict``: a trained lifter and the 2D it expects.

Two kinds of lifter:

- a row that ``posebert finetune lift`` saved (``--lifter OUT --row rf27``), rebuilt by
  :func:`finetune.heads.lift.run.load_row`. It was trained on 2D in the person crops of its
  shards: square boxes around the 17 joints grown by the shards' ``crop_margin`` on every
  side, resized to ``size`` pixels (:func:`data_shards.camera.person_box`, what ``shards
  synth`` renders). The video's 2D go through the same rule, with the detected joints in place
  of the projected ones, frame by frame. The crop settings are read from the manifest of the
  shards the row was trained on (named in OUT/lift.json); when those are gone, the
  ``shards synth`` defaults. The row's simulated detector (``noise_px``, ``drop_prob``) is
  switched off: real detections carry their own noise.
- a VideoPose3D checkpoint (``--videopose3d FILE``, :func:`finetune.load_videopose3d`): the
  published models take the whole frame's 2D, screen-normalised (VideoPose3D's
  ``normalize_screen_coordinates``, what its in-the-wild inference does), with test-time
  horizontal flips as in the paper.

Each lifts one run of consecutive detected frames at a time (N, 17, 2) video pixels -> (N, 17, 3)
root-relative millimetres in the camera's axes (x right, y down, z forward).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path

import numpy as np
import torch

from data_shards.camera import crop_intrinsics, person_box
from data_shards.skeleton import ROOT, flip_permutation
from data_shards.synth import SynthConfig
from data_shards.video import transform_points

DEFAULT_CROP = (SynthConfig.size, SynthConfig.crop_margin)
"""(size, margin) of the ``shards synth`` crops: the lifter's crop when its shards are gone."""


@dataclasses.dataclass(frozen=True)
class CropRule:
    """The person crop a lifter was trained on."""

    size: int
    """Side of the square crop, pixels."""
    margin: float
    """Margin around the joints' extent, fraction of it, on every side."""
    source: str
    """Where the rule was read (a manifest, or the defaults)."""

    def boxes(self, joints: np.ndarray) -> np.ndarray:
        """(N, 17, 2) video pixels -> (N, 4) crop boxes (x0, y0, x1, y1)."""
        return np.array([person_box(j, self.margin) for j in joints])

    def to_crop(self, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 17, 2) video pixels -> (crop pixels (N, 17, 2), crop intrinsics (N, 3, 3) of a
        unit camera: what a lifter's ``Sequence`` carries)."""
        size = (self.size, self.size)
        boxes = self.boxes(joints)
        px = np.stack([transform_points(j, b, size) for j, b in zip(joints, boxes, strict=True)])
        K = np.stack([crop_intrinsics(np.eye(3), b, size) for b in boxes])
        return px, K


class RowLifter:
    """A row saved by ``posebert finetune lift``."""

    def __init__(self, out_dir: str | os.PathLike, row: str) -> None:
        from finetune.heads.lift.run import load_row

        self.out_dir, self.row = Path(out_dir), row
        self.fitted = load_row(out_dir, row)  # ValueError naming the file when missing
        saved = json.loads((self.out_dir / "rows" / f"{_slug(row)}.json").read_text())
        self.method = saved["method"]
        if self.method == "hrnet":
            raise ValueError(f"{out_dir}: row {row!r} is the HRNet image head, which reads "
                             "frames, not 2D; choose a 2D lifter (tcn, vaegan, cyclic, "
                             "selfcorrect)")  # fmt: skip
        config = getattr(self.fitted, "config", None)
        if dataclasses.is_dataclass(config):  # real detections: no imitation noise on top
            self.fitted.config = dataclasses.replace(config, noise_px=0.0, drop_prob=0.0)
        self.shards = training_shards(self.out_dir, row)
        self.crop = crop_rule(self.shards)

    def describe(self) -> dict:
        return {"kind": "lift row", "method": self.method, "row": self.row,
                "dir": str(self.out_dir), "shards": None if self.shards is None
                else str(self.shards), "input": "person crop",
                "crop": dataclasses.asdict(self.crop)}  # fmt: skip

    @torch.no_grad()
    def lift(self, joints: np.ndarray, confidence: np.ndarray, size: tuple[int, int],
             fps: float) -> np.ndarray:  # fmt: skip
        """(N, 17, 2) video pixels and (N, 17) confidences of one run -> (N, 17, 3)
        root-relative mm. The crop's 2D go in as ``pose2d`` and, with the confidences, as
        ``det2d`` (what a row trained on detections reads)."""
        from finetune.clips import Sequence

        px, K = self.crop.to_crop(joints)
        det2d = np.concatenate([px, confidence[..., None]], -1).astype(np.float32)
        seq = Sequence(split="predict", clip="video", action="unlabeled", camera="video",
                       first_frame=0, fps=fps, image_size=(self.crop.size, self.crop.size),
                       pose2d=px.astype(np.float32), pose3d=np.full(det2d.shape, np.nan,
                                                                    np.float32),
                       K=K.astype(np.float32), det2d=det2d)  # fmt: skip
        return np.asarray(self.fitted.predict("predict", [seq])[0], np.float64)


class VideoPose3DLifter:
    """A VideoPose3D checkpoint (the published ``pretrained_h36m_*.bin`` or one of its kind)."""

    def __init__(self, path: str | os.PathLike, flip: bool = True) -> None:
        from finetune import load_videopose3d

        self.path, self.flip = Path(path), flip
        self.model = load_videopose3d(path)  # ValueError naming the file when unusable

    def describe(self) -> dict:
        return {"kind": "videopose3d", "file": str(self.path), "input": "whole frame",
                "receptive_field": self.model.receptive_field, "flip": self.flip}

    @torch.no_grad()
    def lift(self, joints: np.ndarray, confidence: np.ndarray, size: tuple[int, int],
             fps: float) -> np.ndarray:  # fmt: skip
        """(N, 17, 2) video pixels of one run -> (N, 17, 3) root-relative mm (the published
        models take no confidences)."""
        from finetune.heads.lift.data import normalize_2d
        from finetune.heads.lift.videopose3d import pad_sequence

        x = pad_sequence(normalize_2d(joints.astype(np.float32), size),
                         self.model.receptive_field)  # fmt: skip
        x = torch.from_numpy(x)[None]  # (1, N + rf - 1, J, 2)
        y = self.model(x)[0]  # (N, J, 3) metres
        if self.flip:
            perm = torch.from_numpy(flip_permutation())
            back = self.model(x[..., perm, :] * x.new_tensor([-1.0, 1.0]))[0]
            y = (y + back[:, perm] * y.new_tensor([-1.0, 1.0, 1.0])) / 2
        y = y - y[:, ROOT : ROOT + 1]
        return y.double().numpy() * 1000.0


def _slug(row: str) -> str:
    from finetune.heads.lift.run import _slug as slug

    return slug(row)


def training_shards(out_dir: Path, row: str) -> Path | None:
    """The shard root a saved row was trained on: ``--shards`` of its command in OUT/lift.json
    (None when the file or the row is not there)."""
    try:
        command = json.loads((out_dir / "lift.json").read_text())["rows"][row]["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    args = shlex.split(command)
    return Path(args[args.index("--shards") + 1]) if "--shards" in args[:-1] else None


def crop_rule(shards: Path | None) -> CropRule:
    """The crop of ``shards`` (its train manifest: image size and the generator's margin), or
    the ``shards synth`` defaults when it cannot be read."""
    from data_shards.manifest import Manifest

    try:
        manifest = Manifest.load(shards / "train")
        margin = manifest.generator["config"]["crop_margin"]
        W, H = manifest.image_size
    except (OSError, ValueError, KeyError, TypeError):
        return CropRule(*DEFAULT_CROP, source="shards synth defaults (no manifest found)")
    if W != H:
        raise ValueError(f"{shards}: crops of {W}x{H}; predict makes square person crops")
    return CropRule(int(W), float(margin), source=str(shards / "train" / "manifest.json"))


def load_lifter(lifter_dir: str | None, row: str, videopose3d: str | None
                ) -> RowLifter | VideoPose3DLifter:  # fmt: skip
    """The lifter the command names (exactly one of ``lifter_dir`` and ``videopose3d``)."""
    if (lifter_dir is None) == (videopose3d is None):
        raise ValueError("give one lifter: --lifter DIR (a finetune lift output) or "
                         "--videopose3d FILE")  # fmt: skip
    if videopose3d is not None:
        return VideoPose3DLifter(videopose3d)
    return RowLifter(lifter_dir, row)


def lift_runs(lifter: RowLifter | VideoPose3DLifter, joints: np.ndarray, confidence: np.ndarray,
              detected: np.ndarray, size: tuple[int, int], fps: float) -> np.ndarray:  # fmt: skip
    """(N, 17, 2) video pixels, (N, 17) confidences and (N,) found -> (N, 17, 3) root-relative
    mm, each run of consecutive detected frames lifted as one sequence; NaN where nobody was
    found."""
    out = np.full((*joints.shape[:2], 3), np.nan)
    for a, b in runs(detected):
        out[a:b] = lifter.lift(joints[a:b], confidence[a:b], size, fps)
    return out


def runs(detected: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], detected.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
