"""`posebert predict VIDEO... --out DIR (--lifter DIR [--row R] | --videopose3d FILE)`."""

from __future__ import annotations

import argparse
import sys


def register(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("predict", help="3D poses of the person in ordinary videos: arrays, "
                          "a summary and a video with 2D and 3D skeletons")  # fmt: skip
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (anything PyAV reads)")
    p.add_argument("--out", required=True,
                   help="output folder: <stem>.npz, <stem>.json and <stem>.mp4 per video")
    p.add_argument("--lifter", default=None, metavar="DIR",
                   help="a `posebert finetune lift` output folder (its saved rows)")
    p.add_argument("--row", default="rf27", help="the row of --lifter to use (default rf27)")
    p.add_argument("--videopose3d", default=None, metavar="FILE",
                   help="a VideoPose3D checkpoint (pretrained_h36m_*.bin) instead of --lifter")
    p.add_argument("--no-video", action="store_true", help="skip the output video")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. detector.min_torso=0.3 or render.max_side=960 "
                   "(--set help lists them)")  # fmt: skip
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    import dataclasses

    from data_shards.configtools import resolve
    from data_shards.extras import require
    from finetune.predict.lifters import load_lifter
    from finetune.predict.run import PredictConfig, predict_videos

    config = resolve(PredictConfig(), args.overrides, "predict")
    require("video")  # the 2D detector
    if args.no_video:
        config = dataclasses.replace(config, render=dataclasses.replace(config.render,
                                                                        enabled=False))
    lifter = load_lifter(args.lifter, args.row, args.videopose3d)
    _, failed = predict_videos(args.videos, args.out, lifter, config,
                               progress=sys.stderr.isatty(),
                               report=lambda video, s: _report(video, s, args.out))  # fmt: skip
    if failed and len(args.videos) > 1:
        print(f"posebert predict: {len(failed)} of {len(args.videos)} videos failed (named "
              f"above){'; the others were written' if len(failed) < len(args.videos) else ''}",
              file=sys.stderr)  # fmt: skip
    if failed:
        return 2
    return 0


def _report(video: str, s: dict, out: str) -> None:
    """One line per video written (stdout), and a warning for what the caller should know."""
    from pathlib import Path

    note = ""
    if s["detected_frames"] == 0:
        note = "; nobody found: no 3D"
        print(f"posebert predict: warning: {video}: no person found in any of its "
              f"{s['frames']} frames", file=sys.stderr)  # fmt: skip
    if s["stopped_early"]:
        note += "; stopped early"
        print(f"posebert predict: warning: {video}: {s['stopped_early']}; the {s['frames']} "
              "frames before it were used", file=sys.stderr)  # fmt: skip
    truth = s.get("truth") or {}
    if truth.get("mpjpe") is not None:
        floor = (truth["mean_pose"] or {}).get("mpjpe")
        note += (f"; vs truth MPJPE {truth['mpjpe']:.1f} mm, P-MPJPE {truth['p_mpjpe']:.1f} mm"
                 + (f" (mean pose {floor:.1f} mm)" if floor is not None else ""))
    kinds = "npz,json" + (",mp4" if s["rendered"] else "")
    print(f"{video}: {s['frames']} frames, person in {s['detected_frames']} "
          f"({s['detection_rate']:.1%}), {s['seconds']['total']:.1f} s "
          f"({s['frames_per_second']:.1f} frames/s){note} -> "
          f"{Path(out) / Path(video).stem}.{{{kinds}}}", flush=True)
