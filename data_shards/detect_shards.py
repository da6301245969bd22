"""`posebert shards detect`: the 2D detector's keypoints beside the ground truth (``det2d``).

Each split of a shard root that carries frames is rewritten with the ``det2d`` member
(:mod:`data_shards.schema`): BlazePose (:class:`data_shards.detect.Detector`, which upscales the
small crops to ``min_side`` itself) runs over the rendered frames and its 17 joints (x, y in the
frame's pixels, a confidence) are kept next to the ground-truth ``pose2d``; a frame where nobody
was found gets :data:`data_shards.detect.MISSED`.

What is detected: a window of T frames is a slice of a longer sequence, and overlapping windows
hold the same frames. The detector tracks one person through a *stream*: per (subject, clip,
camera, appearance index) and contiguous run of frame indices, in frame order, each frame's
image taken from the first sample in manifest order that holds it (the window
:func:`finetune.clips.read_sequences` takes that frame's labels from). The tracker is reset
between streams. Every window holding a frame gets that one detection, so overlapping windows
agree. The synthetic renders draw a new appearance and body height per window, so two windows'
pixels of the same instant differ; the person crop absorbs the height (the ground-truth 2D of
the same frame differs by 0.6 px median, 2.1 px at most between windows of the demo shards), so
the shared detection is as close to each window's person as to the one it was made on.

Work and atomicity: pass 1 reads the split's frames (encoded; one per stream frame) and detects
stream by stream (``workers`` processes, each with its own detector); pass 2 streams the samples
again, adds ``det2d`` and writes a new split through :class:`data_shards.write.SplitWriter`,
which builds it in a hidden temporary folder and swaps it in only once its manifest is on disk.
A failure in either pass leaves the old split as it was. JPEG frames are copied byte for byte.
The manifest's ``has`` gains ``det2d`` and ``generator["detect"]`` records the detector, its
settings, the frames found and the time taken (:func:`detection_summary` reads it back for
``shards stats``). A split that already carries ``det2d`` is skipped unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from data_shards.detect import MISSED, DetectConfig, Detector
from data_shards.manifest import Manifest, find_splits
from data_shards.schema import Meta, Sample, decode_jpeg, decode_sample, frame_member
from data_shards.tario import iter_tar_samples

DETECTOR = "BlazePose full (mediapipe 0.10.14 solutions.pose), tracking"

StreamKey = tuple[str, str, str, int, int]
"""(subject, clip, camera, appearance index, first frame) of one tracked stream."""


def _raw_samples(split_dir: Path, manifest: Manifest) -> Iterator[dict[str, bytes]]:
    """Every sample of the split, in manifest order, as raw members."""
    for shard in manifest.shards:
        yield from iter_tar_samples(split_dir / shard.name)


def _sequence_of(meta: Meta, v: int) -> tuple[str, str, str, int]:
    view = meta.views[v]
    return (meta.subject, meta.clip, view.camera, view.appearance)


def collect_streams(split_dir: Path, manifest: Manifest) -> dict[StreamKey, list[bytes]]:
    """Pass 1: per stream (contiguous frames of one sequence), the encoded frames in frame
    order, each from the first sample in manifest order that holds it."""
    frames: dict[tuple[str, str, str, int], dict[int, bytes]] = {}
    for raw in _raw_samples(split_dir, manifest):
        meta = Meta.from_json(str(raw["__key__"]), raw["meta.json"])
        for v in range(meta.num_views):
            run = frames.setdefault(_sequence_of(meta, v), {})
            for t, f in enumerate(meta.frames):
                if int(f) not in run:
                    run[int(f)] = raw[frame_member(v, t)]
    streams = {}
    for seq, by_frame in sorted(frames.items()):
        order = np.array(sorted(by_frame))
        for part in np.split(order, np.flatnonzero(np.diff(order) != 1) + 1):
            streams[(*seq, int(part[0]))] = [by_frame[int(f)] for f in part]
    return streams


@contextlib.contextmanager
def native_stderr_off():
    """Native writes to file descriptor 2 go to /dev/null inside the block. MediaPipe's TFLite
    prints two warnings ("Feedback manager requires a model with a single signature ...") each
    time its graph restarts, which is every tracked stream, and announces its CPU delegate
    when it builds a model; Python's own stderr is flushed
    first and is back before anything else is printed."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def detect_stream(detector: Detector, jpegs: list[bytes]) -> np.ndarray:
    """(N, 17, 3) float32 det2d of one stream's frames, tracked from a fresh start."""
    out = np.repeat(MISSED[None], len(jpegs), axis=0)
    with native_stderr_off():  # the graph restarts, and builds a model when first needed
        detector.reset()
        for i, jpg in enumerate(jpegs):
            found = detector(decode_jpeg(jpg))
            if found is not None:
                out[i] = found.as_det2d()
    return out


_DETECTOR: Detector | None = None  # this worker process's detector


def _init_worker(config: DetectConfig) -> None:
    global _DETECTOR
    # a worker's errors reach the parent as exceptions; its native log lines are only noise
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _DETECTOR = Detector(config, tracking=True)


def _work(jpegs: list[bytes]) -> np.ndarray:
    assert _DETECTOR is not None, "worker not initialised"
    return detect_stream(_DETECTOR, jpegs)


def detect_streams(streams: dict[StreamKey, list[bytes]], config: DetectConfig, workers: int,
                   bar) -> dict[StreamKey, np.ndarray]:  # fmt: skip
    """Every stream's det2d; ``workers`` > 1: a process pool (spawned, as the renderer's: a
    parent's threads are not copied mid-state), one detector per process, whole streams per
    task, so tracking and the result do not depend on the number of workers."""
    out = {}
    if workers <= 1 or len(streams) <= 1:
        with native_stderr_off():
            detector = Detector(config, tracking=True)
        try:
            for key, jpegs in streams.items():
                out[key] = detect_stream(detector, jpegs)
                bar.update(len(jpegs))
        finally:
            with native_stderr_off():
                detector.close()
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(streams)), ctx, initializer=_init_worker,
                             initargs=(config,)) as pool:  # fmt: skip
        # longest first, so the last task is a short one
        order = sorted(streams, key=lambda k: -len(streams[k]))
        futures = {pool.submit(_work, streams[key]): key for key in order}
        for done in as_completed(futures):
            key = futures[done]
            out[key] = done.result()
            bar.update(len(streams[key]))
    return out


def _lookup(detections: dict[StreamKey, np.ndarray]) -> dict[tuple, np.ndarray]:
    """(subject, clip, camera, appearance, frame) -> (17, 3) det2d."""
    table = {}
    for (*seq, first), dets in detections.items():
        for i, det in enumerate(dets):
            table[(*seq, first + i)] = det
    return table


def with_det2d(sample: Sample, table: dict[tuple, np.ndarray]) -> Sample:
    """The sample with its ``det2d`` (V, T, 17, 3) from the per-frame detections."""
    m = sample.meta
    sample.det2d = np.stack([np.stack([table[(*_sequence_of(m, v), int(f))] for f in m.frames])
                             for v in range(m.num_views)]).astype(np.float32)  # fmt: skip
    m.has = {**m.has, "det2d": True}
    return sample


def detect_split(split_dir: str | os.PathLike, config: DetectConfig | None = None,
                 workers: int = 1, overwrite: bool = False, progress: bool = True
                 ) -> dict | None:  # fmt: skip
    """Detect over one split and rewrite it with ``det2d`` (see the module docstring); returns
    the summary recorded in the manifest, or None when the split already carries ``det2d``
    and not ``overwrite``. One-line ``ValueError`` for a split without frames."""
    from tqdm import tqdm

    from data_shards import __version__
    from data_shards.write import SplitWriter, WriterConfig  # webdataset imports torch

    split_dir = Path(split_dir)
    config = config or DetectConfig()
    manifest = Manifest.load(split_dir)
    if not manifest.has.get("frames"):
        raise ValueError(f"split {split_dir.name!r} ({split_dir}) has no frames to detect on")
    if manifest.has.get("det2d") and not overwrite:
        return None
    t0 = time.perf_counter()
    streams = collect_streams(split_dir, manifest)
    total = sum(len(j) for j in streams.values())
    with tqdm(total=total, desc=f"detect {split_dir.name}", unit="frame",
              disable=not progress) as bar:  # fmt: skip
        detections = detect_streams(streams, config, workers, bar)
    seconds = time.perf_counter() - t0
    found = int(sum((d[..., 2].max(-1) > 0).sum() for d in detections.values()))
    summary = {"detector": DETECTOR, "config": dataclasses.asdict(config), "frames": total,
               "found": found, "rate": round(found / max(total, 1), 4),
               "streams": len(streams), "seconds": round(seconds, 1),
               "frames_per_s": round(total / max(seconds, 1e-9), 1),
               "workers": workers}  # fmt: skip
    table = _lookup(detections)
    writer = WriterConfig(max_samples=max([s.samples for s in manifest.shards] + [1]),
                          overwrite=True)  # fmt: skip
    with SplitWriter(split_dir.parent, split_dir.name, writer) as out:
        for raw in _raw_samples(split_dir, manifest):
            out.write(with_det2d(decode_sample(raw, decode_frames=False), table))
        out.close(manifest.source, {**manifest.generator, "detect": summary},
                  created_by=f"posebert {__version__}")  # fmt: skip
    return summary


def detect_shards(root: str | os.PathLike, splits: tuple[str, ...] | None = None,
                  config: DetectConfig | None = None, workers: int = 1, overwrite: bool = False,
                  progress: bool = True) -> dict[str, dict | None]:  # fmt: skip
    """:func:`detect_split` on each named split under ``root`` (default: every split; ``root``
    may be a split folder); {split: summary, None where skipped}. Unknown split names are a
    one-line ``ValueError`` before anything runs."""
    found = find_splits(root)
    names = list(found) if splits is None else list(splits)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{root}: no split {', '.join(map(repr, missing))} "
                         f"(have {', '.join(found)})")  # fmt: skip
    for name in names:  # every split is checked before the first is rewritten
        if not Manifest.load(found[name]).has.get("frames"):
            raise ValueError(f"split {name!r} ({found[name]}) has no frames to detect on")
    return {name: detect_split(found[name], config, workers, overwrite, progress)
            for name in names}  # fmt: skip


def detection_summary(manifest: Manifest) -> str | None:
    """One line for ``shards stats``: the frames ``shards detect`` found a person in."""
    d = manifest.generator.get("detect") if manifest.has.get("det2d") else None
    if not d:
        return None
    return (f"{manifest.split}: det2d by shards detect: person found in {d['found']} of "
            f"{d['frames']} frames ({d['rate']:.1%}), {d['streams']} tracked streams, "
            f"{d['seconds']:g} s with {d['workers']} worker(s)")
