"""`posebert predict VIDEO... --out DIR`: 3D poses of the person in ordinary videos.

Per video: decode and follow the person (:mod:`finetune.predict.track`: BlazePose, tracking),
lift each run of consecutive detected frames to 3D (:mod:`finetune.predict.lifters`: a saved
``finetune lift`` row on the person crops it was trained on, or a VideoPose3D checkpoint), and
write, in DIR:

- ``<stem>.npz``: ``joints_3d`` (N, 17, 3) float32 mm, root-relative (pelvis at 0), in the
  camera's axes (x right, y down, z away from the camera); ``joints_2d`` (N, 17, 2) float32
  pixels of the video (x right, y down, pixel centres at +0.5); ``confidence`` (N, 17);
  ``detected`` (N,) bool; ``frame_index`` (N,) int64 (decoding order); ``timestamps`` (N,)
  float64 s (the stream's pts); ``joint_names``; ``fps`` (the stream's average rate);
  ``image_size`` (W, H); ``units``, ``frame`` (what the axes are) and ``lifter`` (JSON). A frame
  where nobody was found has NaN joints, confidence 0 and ``detected`` False: nothing is made
  up for it.
- ``<stem>.json``: frames, frames with the person, detection rate, runs lifted, fps and whether
  the frame rate varies, where decoding stopped early, the lifter, seconds per part (decode,
  detect, lift, render) and in all; with ``<video>.truth.npz`` beside the video (what
  ``posebert shards render-video`` writes), the errors against it (:func:`score_truth`).
- ``<stem>.mp4``: the video with its 2D skeleton beside the 3D pose (:mod:`.render`).

Each file is written under a temporary name and renamed when complete (the JSON last), so a
killed or failed run never leaves a file that looks finished; another video of the same command
keeps what it wrote. A video where nobody is found in any frame still gets its three files
(detection rate 0, no 3D) and a warning: that is an answer about the video, not a failure.
A stream cut or damaged part-way keeps the frames decoded before the damage (``stopped_early``
in the summary, and a warning); a variable-frame-rate video keeps its stream's timestamps, in
the arrays and in the output video (``variable_frame_rate`` in the summary). A video that
cannot be read (not a video, no video stream, no decodable frame) fails with one line naming
it; the other videos go on, and the command exits 2.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_shards.detect import DetectConfig
from data_shards.manifest import fsync_path
from data_shards.skeleton import JOINT_NAMES, root_relative
from data_shards.video import VideoError
from finetune.predict.lifters import RowLifter, VideoPose3DLifter, lift_runs, runs
from finetune.predict.render import RenderConfig, VideoOut, compose
from finetune.predict.track import Track, frames_at, scaled_size, track_video

FRAME = "camera axes: x right, y down, z away from the camera; root-relative (pelvis at 0)"
UNITS = {"joints_3d": "mm", "joints_2d": "video pixels", "timestamps": "s", "fps": "1/s"}


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What ``posebert predict`` does to each video (``--set help`` lists every field)."""

    detector: DetectConfig = DetectConfig()
    """Finding and following the person (``data_shards.detect``); its crop ``margin`` and
    ``smoothing`` do not apply here: the lifter's crop rule does."""
    render: RenderConfig = RenderConfig()
    """The output video."""
    score_truth: bool = True
    """Score against ``<video>.truth.npz`` when it lies beside the video."""


def output_paths(out: Path, stem: str) -> dict[str, Path]:
    return {s: out / f"{stem}.{s}" for s in ("mp4", "npz", "json")}


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.part{os.getpid()}{path.suffix}")


def _remove_stale_parts(paths: dict[str, Path]) -> None:
    """Delete the temporary files a killed run left for these outputs (their writer is gone)."""
    for path in paths.values():
        for part in path.parent.glob(f".{path.name}.part*"):
            pid = part.name.removeprefix(f".{path.name}.part").split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                part.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def predict_video(video: str | os.PathLike, out_dir: str | os.PathLike,
                  lifter: RowLifter | VideoPose3DLifter, config: PredictConfig,
                  progress: bool = False, mean_pose: np.ndarray | None = None) -> dict:  # fmt: skip
    """Track, lift and write one video's outputs (see the module docstring); returns the
    summary (the JSON). ``mean_pose`` (17, 3) mm: the floor beside the truth's errors."""
    video, out = Path(video), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out, video.stem)
    _remove_stale_parts(paths)
    parts = {k: _part(p) for k, p in paths.items()}
    t0 = time.perf_counter()
    bar = tqdm(desc=f"{video.name}: detect", unit="frame", disable=not progress, leave=False)
    try:
        track = track_video(video, config.detector, bar.update)
        t1 = time.perf_counter()
        joints_3d = lift_runs(lifter, track.joints_2d, track.confidence, track.detected,
                              track.size, track.fps)  # fmt: skip
        seconds = {"decode": track.seconds["decode"], "detect": track.seconds["detect"],
                   "lift": time.perf_counter() - t1, "render": 0.0}  # fmt: skip
        if config.render.enabled:
            bar.reset(total=track.frames)
            bar.set_description(f"{video.name}: render")
            render_s, decode_s = _render(track, joints_3d, parts["mp4"], config.render,
                                         bar.update)  # fmt: skip
            seconds["render"], seconds["decode"] = render_s, seconds["decode"] + decode_s
        summary = _summary(track, lifter, seconds, time.perf_counter() - t0)
        summary["rendered"] = config.render.enabled
        truth = video.with_name(video.name + ".truth.npz")
        if config.score_truth and truth.is_file():
            try:
                summary["truth"] = score_truth(joints_3d, track, truth, mean_pose)
            except (ValueError, OSError, KeyError) as e:  # the prediction stands without it
                summary["truth"] = {"truth": str(truth), "error": str(e), "mpjpe": None}
        parts["npz"].write_bytes(_arrays(track, joints_3d, lifter))
        parts["json"].write_text(json.dumps(summary, indent=1) + "\n")
        _finish(parts, paths)
    finally:
        bar.close()
        for p in parts.values():
            p.unlink(missing_ok=True)
    return summary


def _finish(parts: dict[str, Path], paths: dict[str, Path]) -> None:
    """Make the written parts durable, then rename them into place, the JSON last (its
    presence says the video is done)."""
    kinds = [k for k in ("mp4", "npz", "json") if parts[k].exists()]
    for kind in kinds:
        fsync_path(parts[kind])
    for kind in kinds:
        os.replace(parts[kind], paths[kind])
    fsync_path(paths["json"].parent)


def _render(track: Track, joints_3d: np.ndarray, path: Path, config: RenderConfig,
            progress) -> tuple[float, float]:  # fmt: skip
    """Write the output video; returns (seconds drawing + encoding, seconds decoding)."""
    size = scaled_size(track.size, config.max_side)
    s = np.array([size[0] / track.size[0], size[1] / track.size[1]])
    timer, t0 = {"decode": 0.0}, time.perf_counter()
    start = track.timestamps[0]
    with VideoOut(path, (size[0] + size[1], size[1]), track.fps, config) as out:
        for i, image in enumerate(frames_at(track.path, size, track.frames, timer)):
            found = bool(track.detected[i])
            caption = f"{i}  {track.timestamps[i]:.2f} s" + ("" if found else "  no person")
            out.write(compose(image, track.joints_2d[i] * s if found else None,
                              track.confidence[i], joints_3d[i] if found else None, caption,
                              config), track.timestamps[i] - start)  # fmt: skip
            progress(1)
    return time.perf_counter() - t0 - timer["decode"], timer["decode"]


def _summary(track: Track, lifter, seconds: dict, total: float) -> dict:
    found = int(track.detected.sum())
    return {
        "video": str(track.path), "frames": track.frames, "detected_frames": found,
        "detection_rate": round(found / track.frames, 4), "runs": len(runs(track.detected)),
        "image_size": list(track.size), "fps": round(track.fps, 4),
        "variable_frame_rate": track.variable_rate,
        "duration_s": round(float(track.timestamps[-1] - track.timestamps[0]), 3),
        "declared_frames": track.declared_frames, "stopped_early": track.stopped,
        "lifter": lifter.describe(), "units": UNITS, "frame": FRAME,
        "seconds": {k: round(v, 2) for k, v in seconds.items()} | {"total": round(total, 2)},
        "frames_per_second": round(track.frames / total, 2) if total > 0 else None,
    }  # fmt: skip


def _arrays(track: Track, joints_3d: np.ndarray, lifter) -> bytes:
    """The ``.npz`` of one video (the module docstring lists its arrays)."""
    buf = io.BytesIO()
    np.savez(buf, joints_3d=joints_3d.astype(np.float32),
             joints_2d=track.joints_2d.astype(np.float32),
             confidence=track.confidence.astype(np.float32), detected=track.detected,
             frame_index=np.arange(track.frames, dtype=np.int64), timestamps=track.timestamps,
             joint_names=np.array(JOINT_NAMES), fps=np.float64(track.fps),
             image_size=np.array(track.size), units=np.str_(json.dumps(UNITS)),
             frame=np.str_(FRAME), lifter=np.str_(json.dumps(lifter.describe())))  # fmt: skip
    return buf.getvalue()


def score_truth(joints_3d: np.ndarray, track: Track, truth_path: Path,
                mean_pose: np.ndarray | None = None) -> dict:  # fmt: skip
    """Errors of the 3D (and the detector's 2D) against a ground-truth file (``joints_3d``
    (N, 17, 3) mm camera coordinates, ``joints_2d`` (N, 17, 2) video pixels): MPJPE and
    P-MPJPE (mm, root-relative, camera axes) over the frames where the person was found, and
    the same of ``mean_pose`` (the floor: the mean train pose, as the pose head's row)."""
    from finetune.evaluation.metrics import mpjpe, p_mpjpe

    with np.load(truth_path, allow_pickle=False) as f:
        target, target_2d = f["joints_3d"].astype(np.float64), f["joints_2d"]
    if len(target) < track.frames:
        raise VideoError(truth_path, f"{len(target)} frames of truth, the video has "
                                     f"{track.frames}")  # fmt: skip
    found = track.detected
    scored = {"truth": str(truth_path), "frames_scored": int(found.sum()),
              "detection_rate": round(float(found.mean()), 4),
              "protocol": "mm, 17 joints, root-relative, camera axes; frames with the person "
                          "found"}  # fmt: skip
    if not found.any():
        return scored | {"mpjpe": None, "p_mpjpe": None, "mean_pose": None}
    target = root_relative(target[: track.frames][found])
    pred = joints_3d[found]
    scored |= {"mpjpe": float(mpjpe(pred, target)), "p_mpjpe": float(p_mpjpe(pred, target))}
    error_2d = np.linalg.norm(track.joints_2d[found] - target_2d[: track.frames][found], axis=-1)
    scored["detector_2d_px"] = {"median": float(np.median(error_2d)),
                                "mean": float(error_2d.mean())}  # fmt: skip
    scored["mean_pose"] = None
    if mean_pose is not None:
        floor = np.broadcast_to(mean_pose, target.shape)
        scored["mean_pose"] = {"mpjpe": float(mpjpe(floor, target)),
                               "p_mpjpe": float(p_mpjpe(floor, target))}  # fmt: skip
    return scored


def mean_train_pose(lifter: RowLifter | VideoPose3DLifter) -> np.ndarray | None:
    """The mean root-relative camera pose of the lifter's train split (the pose head's
    mean-pose row), or None when the lifter does not name readable shards."""
    shards = getattr(lifter, "shards", None)
    if shards is None or not (shards / "train" / "manifest.json").is_file():
        return None
    from finetune.heads.pose.run import scan_split

    return scan_split(shards / "train").mean_pose


def predict_videos(videos: list[str], out_dir: str | os.PathLike,
                   lifter: RowLifter | VideoPose3DLifter, config: PredictConfig,
                   progress: bool = False, report: Callable[[str, dict], None] | None = None
                   ) -> tuple[dict[str, dict], dict[str, str]]:  # fmt: skip
    """Every video in turn; returns ({video: summary}, {video: one-line error}), calling
    ``report(video, summary)`` as each one is written. A video that fails (its error printed
    at once, one line) leaves nothing that looks finished and does not stop the others."""
    stems: dict[str, str] = {}
    for v in videos:
        other = stems.setdefault(Path(v).stem, v)
        if other != v:
            raise ValueError(f"{v}: same output name {Path(v).stem!r} as {other}; rename one")
    mean_pose = None
    if config.score_truth and any(Path(f"{v}.truth.npz").is_file() for v in videos):
        mean_pose = mean_train_pose(lifter)
    done, failed = {}, {}
    for v in videos:
        try:
            done[v] = predict_video(v, out_dir, lifter, config, progress, mean_pose)
        except (ValueError, OSError) as e:
            failed[v] = str(e) if isinstance(e, VideoError) else f"{v}: {e}"
            print(f"posebert predict: error: {failed[v]}", file=sys.stderr, flush=True)
            continue
        if report is not None:
            report(v, done[v])
    return done, failed
