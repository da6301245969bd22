"""`posebert shards {synth,video,h36m,detect,verify,stats,preview}`: build, check, describe
shards."""

from __future__ import annotations

import argparse
import os
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(n) for n in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.8,1.25, got {text!r}") from None


def _add_writer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output root; splits go to OUT/<split>/")
    p.add_argument("--shard-samples", type=_positive_int, default=64, help="samples per shard")
    p.add_argument("--shard-mb", type=_positive_int, default=256, help="MB per shard at most")
    p.add_argument("--jpeg-quality", type=_positive_int, default=90)
    p.add_argument("--overwrite", action="store_true", help="replace existing splits")


def _add_window_flags(p: argparse.ArgumentParser, fps: float | None) -> None:
    p.add_argument("--frames", type=_positive_int, default=16, help="T: frames per window")
    p.add_argument(
        "--stride",
        type=_positive_int,
        default=None,
        help="window stride (default: T/2 for synth, T otherwise)",
    )
    p.add_argument("--size", type=_positive_int, default=128, help="square frame size in px")
    p.add_argument("--fps", type=_positive_float, default=fps, help="resample to this frame rate")


def _configs(args: argparse.Namespace, source):
    """(source config, writer config): the flags, then ``--set source.FIELD=...`` /
    ``--set writer.FIELD=...`` on top (``--set help`` lists every field)."""
    import dataclasses

    from data_shards.configtools import resolve
    from data_shards.write import WriterConfig  # webdataset imports torch: keep --help fast

    writer = WriterConfig(max_samples=args.shard_samples, max_bytes=args.shard_mb * 1024**2,
                          jpeg_quality=args.jpeg_quality, overwrite=args.overwrite)  # fmt: skip
    parts = {"source": source, "writer": writer}
    job = dataclasses.make_dataclass(
        "ShardJob", [(k, type(v), dataclasses.field(default=v)) for k, v in parts.items()],
        frozen=True)  # fmt: skip
    done = resolve(job(), args.overrides, f"shards {args.command}")
    return done.source, done.writer


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field: source.FIELD (the renderer or reader config) or "
                   "writer.FIELD; --set help lists them")  # fmt: skip


def register(stages: argparse._SubParsersAction) -> None:
    shards = stages.add_parser("shards", help="build, verify and describe shard sets")
    cmds = shards.add_subparsers(dest="command", required=True, parser_class=type(shards))

    p = cmds.add_parser("synth", help="render the embedded DeepMimic motion into shards")
    _add_writer_flags(p)
    _add_window_flags(p, fps=50.0)
    p.add_argument("--clips", type=_names, default=None, help="comma-separated (all 15)")
    p.add_argument("--views", type=_positive_int, default=4, help="cameras around the subject")
    p.add_argument("--appearances", type=_positive_int, default=1, help="renders per window")
    p.add_argument("--appearances-per-sample", type=_positive_int, default=1,
                   help="appearances of the same instants inside a sample, as extra views "
                   "(positives across appearance)")  # fmt: skip
    p.add_argument("--mirror", action="store_true",
                   help="train split: add a mirrored copy of every clip (CLIP~mirror: the motion "
                   "reflected, left and right swapped; val/test stay as they are)")  # fmt: skip
    p.add_argument("--speeds", type=_numbers, default=(), metavar="S,S,...",
                   help="train split: add a time-warped copy of every clip per playback speed, "
                   "e.g. 0.8,1.25 (CLIP~x0.8: 1/0.8 as many frames)")  # fmt: skip
    p.add_argument("--val-clips", type=_names, default=None, help="held-out validation clips")
    p.add_argument("--test-clips", type=_names, default=None, help="held-out test clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1)
    _add_set(p)
    p.set_defaults(handler=cmd_synth)

    p = cmds.add_parser("video", help="ingest ordinary video files (V=1, no 3D labels)")
    p.add_argument("files", nargs="+", help="video files (anything PyAV decodes)")
    _add_writer_flags(p)
    _add_window_flags(p, fps=None)
    p.add_argument("--keypoints", default=None, help="2D keypoints: a file, or a dir of STEM.npy")
    p.add_argument("--action", default="unlabeled", help="action label of these videos")
    p.add_argument("--split", default="train", help="split name to write")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of FILES held out")
    p.add_argument("--detect", action="store_true",
                   help="find and track the person: person-centred crops and the detector's 2D "
                   "keypoints (needs mediapipe; a --keypoints file still wins)")  # fmt: skip
    _add_set(p)
    p.set_defaults(handler=cmd_video)

    p = cmds.add_parser("render-video", help="an embedded clip as an ordinary video (H.264, "
                        "photo background) with its ground truth beside it")  # fmt: skip
    p.add_argument("clip", help="clip name, e.g. dance_b (held out by default)")
    p.add_argument("--out", required=True, help="video file to write (.mp4); OUT.truth.npz beside")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the video: size, fps, azimuth_deg, distance_mm, hfov_deg, "
                   "seed, max_frames (--set help lists them)")  # fmt: skip
    p.set_defaults(handler=cmd_render_video)

    p = cmds.add_parser("h36m", help="ingest Human3.6M (VideoPose3D-style .npz + frames)")
    p.add_argument("--npz3d", required=True, help="data_3d_h36m.npz")
    p.add_argument("--npz2d", default=None, help="data_2d_h36m_<detector>.npz")
    p.add_argument("--frames-dir", default=None, help="FRAMES/<subject>/<action>.<camera>/")
    p.add_argument("--cameras", default=None, help="camera calibration JSON")
    _add_writer_flags(p)
    _add_window_flags(p, fps=None)
    _add_set(p)
    p.set_defaults(handler=cmd_h36m)

    p = cmds.add_parser("detect", help="run the 2D detector over the frames of each split and "
                        "keep its keypoints beside the ground truth (det2d)")  # fmt: skip
    p.add_argument("root", help="shard root (or one split directory)")
    p.add_argument("--splits", type=_names, default=None,
                   help="comma-separated splits to detect on (default: every split)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="detector processes, whole tracked sequences each (1)")
    p.add_argument("--overwrite", action="store_true",
                   help="detect again on splits that already carry det2d")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the detector: min_detection, min_tracking, min_torso, "
                   "min_side ... (--set help lists them)")  # fmt: skip
    p.set_defaults(handler=cmd_detect)

    p = cmds.add_parser("verify", help="check every shard against its manifest")
    p.add_argument("root", help="shard root (or one split directory)")
    p.add_argument("--no-decode", action="store_true", help="checksums only")
    p.set_defaults(handler=cmd_verify)

    p = cmds.add_parser("preview", help="PNG contact sheet: frames, 2D skeletons, mask edges")
    p.add_argument("root", help="shard root (or one split directory)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default=None, help="split to show (default: the first)")
    p.add_argument("--samples", type=_positive_int, default=4, help="rows (one per sample)")
    p.set_defaults(handler=cmd_preview)

    p = cmds.add_parser("stats", help="counts per split and action")
    p.add_argument("root", help="shard root (or one split directory)")
    p.set_defaults(handler=cmd_stats)


def cmd_synth(args: argparse.Namespace) -> int:
    from data_shards import mocap, synth
    from data_shards.extras import require

    table = synth.split_table(args.val_clips, args.test_clips)
    if args.clips is not None:
        unknown = sorted(set(args.clips) - set(mocap.CLIP_NAMES))
        if unknown:
            raise ValueError(f"unknown clips {unknown}; choose from {', '.join(mocap.CLIP_NAMES)}")
        table = {s: tuple(c for c in clips if c in args.clips) for s, clips in table.items()}
        table = {s: clips for s, clips in table.items() if clips}
    config, writer = _configs(args, synth.SynthConfig(
        views=args.views, frames=args.frames, stride=args.stride, size=args.size, fps=args.fps,
        seed=args.seed, appearances_per_window=args.appearances,
        appearances_per_sample=args.appearances_per_sample, jpeg_quality=args.jpeg_quality,
        mirror=args.mirror, speeds=args.speeds))
    require("render")  # after the usage errors and `--set help`
    manifests = synth.build_splits(args.out, config, writer, splits=table, workers=args.workers,
                                   progress=sys.stderr.isatty())  # fmt: skip
    _report(manifests)
    return 0


def _report(manifests: dict) -> None:
    from data_shards.augment import summary

    for split, m in manifests.items():
        print(f"{split}: {m.samples} windows in {len(m.shards)} shards")
        if line := summary(m):
            print(line)


def cmd_video(args: argparse.Namespace) -> int:
    from data_shards.extras import require
    from data_shards.video import VideoConfig, ingest_videos

    config, writer = _configs(args, VideoConfig(
        size=(args.size, args.size), frames=args.frames, stride=args.stride, fps=args.fps,
        keypoints=args.keypoints, action=args.action, detect=args.detect))
    if config.detect:
        require("video")  # the 2D detector
    manifests = ingest_videos(args.files, args.out, config, writer, split=args.split,
                              val_fraction=args.val_fraction,
                              progress=sys.stderr.isatty())  # fmt: skip
    _report(manifests)
    return 0


def cmd_render_video(args: argparse.Namespace) -> int:
    from data_shards.clipvideo import ClipVideoConfig, render_clip_video, truth_path
    from data_shards.configtools import resolve
    from data_shards.extras import require

    config = resolve(ClipVideoConfig(), args.overrides, "shards render-video")
    require("render")
    truth = render_clip_video(args.out, args.clip, config, progress=sys.stderr.isatty())
    print(f"wrote {args.out} ({len(truth['joints_3d'])} frames at {config.fps:g} fps) and "
          f"{truth_path(args.out)}")
    return 0


def cmd_h36m(args: argparse.Namespace) -> int:
    from data_shards.h36m import H36MConfig, ingest_h36m

    config, writer = _configs(args, H36MConfig(
        size=(args.size, args.size), frames=args.frames, stride=args.stride, fps=args.fps))
    manifests = ingest_h36m(args.npz3d, args.npz2d, args.frames_dir, args.cameras, args.out,
                            config, writer, progress=sys.stderr.isatty())  # fmt: skip
    _report(manifests)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from data_shards.configtools import resolve
    from data_shards.detect import DetectConfig
    from data_shards.detect_shards import detect_shards
    from data_shards.extras import require

    config = resolve(DetectConfig(), args.overrides, "shards detect")
    require("video")
    done = detect_shards(args.root, args.splits, config, workers=args.workers,
                         overwrite=args.overwrite, progress=sys.stderr.isatty())  # fmt: skip
    for split, d in done.items():
        if d is None:
            print(f"{split}: carries det2d already, skipped (--overwrite detects again)")
        else:
            print(f"{split}: person found in {d['found']} of {d['frames']} frames "
                  f"({d['rate']:.1%}), {d['seconds']:g} s ({d['frames_per_s']:g} frames/s, "
                  f"{d['workers']} worker(s))")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from data_shards.verify import verify

    problems = verify(args.root, decode=not args.no_decode, progress=sys.stderr.isatty())
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.root}", file=sys.stderr)
        return 1
    print(f"verify: {args.root} OK")
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from data_shards.preview import write_preview

    print(f"wrote {write_preview(args.root, args.out, args.split, args.samples)}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from data_shards.verify import stats_table

    print(stats_table(args.root))
    return 0
