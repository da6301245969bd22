"""`posebert predict` throughput: the detector alone, and the whole command on a 10 s video.

Measured in the same run, side by side, on one 640x360 H.264 video of the embedded motion
(rendered clips joined to ``--seconds`` at ``--fps``):

- the detector (BlazePose, tracking mode, as ``predict`` runs it) on the decoded frames held in
  memory: frames per wall second and per CPU second ("per core");
- ``predict`` end to end (decode, detect, lift, draw and encode the output video) and without
  the output video (``--no-video``), with the time of each part from the command's summary.

The lifter is ``--lifter DIR`` (a ``finetune lift`` output, row rf27) when given, else a
VideoPose3D-shaped TCN with random weights of the demo row's size (rf27, 128 channels): the
weights do not change the time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_predict.py [--lifter DIR]

Prints a markdown table for docs/benchmarks.md and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from data_shards.clipvideo import ClipVideoConfig, render_clip_video
from data_shards.detect import DetectConfig, PersonCrops
from finetune.predict.lifters import RowLifter, VideoPose3DLifter
from finetune.predict.run import PredictConfig, predict_video

CLIPS = ("dance_b", "getup_faceup", "dance_a", "walk", "kick", "punch")


def cpu_seconds() -> float:
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def make_video(path: Path, seconds: float, fps: float) -> list[np.ndarray]:
    """Rendered clips joined into one H.264 video of ``seconds`` at ``fps``; its frames."""
    frames: list[np.ndarray] = []
    for clip in CLIPS:
        part = path.with_name(f"{clip}.mp4")
        render_clip_video(part, clip, ClipVideoConfig(size=(640, 360), fps=fps))
        with av.open(str(part)) as c:
            frames += [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        if len(frames) >= seconds * fps:
            break
    frames = frames[: round(seconds * fps)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return frames


def bench_detector(frames: list[np.ndarray]) -> dict:
    with PersonCrops(DetectConfig()) as people:
        people(frames[0])  # the first call builds the graph
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for image in frames:
            people(image)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return dict(frames=len(frames), found=people.found - 1, frames_per_s=len(frames) / wall,
                frames_per_cpu_s=len(frames) / cpu)  # fmt: skip


def bench_predict(video: Path, out: Path, lifter, render: bool) -> dict:
    config = PredictConfig()
    if not render:
        from dataclasses import replace

        config = replace(config, render=replace(config.render, enabled=False))
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    s = predict_video(video, out, lifter, config)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return dict(frames=s["frames"], found=s["detected_frames"], frames_per_s=s["frames"] / wall,
                frames_per_cpu_s=s["frames"] / cpu, parts=s["seconds"])  # fmt: skip


def random_lifter(tmp: Path) -> VideoPose3DLifter:
    from finetune.heads.lift.videopose3d import TCNShape, TemporalModel

    model = TemporalModel(TCNShape(filter_widths=(3, 3, 3), channels=128))
    torch.save({"model_pos": model.state_dict()}, tmp / "random_rf27.bin")
    return VideoPose3DLifter(tmp / "random_rf27.bin")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lifter", default=None, help="a finetune lift output (row rf27)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=30.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        video = tmp / "video.mp4"
        frames = make_video(video, args.seconds, args.fps)
        lifter = RowLifter(args.lifter, "rf27") if args.lifter else random_lifter(tmp)
        rows = {"detector": bench_detector(frames),
                "predict": bench_predict(video, tmp / "out", lifter, render=True),
                "predict --no-video": bench_predict(video, tmp / "out2", lifter, render=False)}
    print(f"{len(frames)} frames, 640x360, {args.fps:g} fps; lifter: "
          f"{json.dumps(lifter.describe())}")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), PyAV {av.__version__}")
    print("\n| what | frames/s (wall) | frames/s per core | decode s | detect s | lift s | "
          "render s | total s |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        parts = r.get("parts", {})
        cells = [f"{parts[k]:.2f}" if k in parts else "-"
                 for k in ("decode", "detect", "lift", "render", "total")]  # fmt: skip
        print(f"| {name} | {r['frames_per_s']:.1f} | {r['frames_per_cpu_s']:.1f} | "
              + " | ".join(cells) + " |")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
