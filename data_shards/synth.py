"""The embedded data set: DeepMimic motion rendered from a multi-camera rig as shard samples.

For every clip (resampled to ``fps``), windows of T consecutive frames are rendered from V
cameras of an H36M-like ring rig, each window in one or more random appearances
(:mod:`data_shards.appearance`), into :class:`~data_shards.schema.Sample` objects with encoded
JPEGs, masks, 3D/2D joints and per-frame crop cameras. Every random choice is drawn from
``SynthConfig.seed`` and the window's identity (clip, start frame, appearance index), never from
the order of work, so the samples are identical for any number of worker processes.

Splits are by clip (action), never by frame: :data:`SPLITS`. Motion augmentation (mirrored and
time-warped copies, :mod:`data_shards.augment`) is added to the train split only, so held-out
evaluation never changes with it.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from data_shards import augment, mocap, schema
from data_shards.appearance import Appearance, AppearanceConfig, background_crops, draw_appearance
from data_shards.camera import Camera, person_box, ring_rig
from data_shards.render import BodyRenderer, composite

if TYPE_CHECKING:
    from data_shards.manifest import Manifest
    from data_shards.write import WriterConfig

SOURCE = "deepmimic"
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("walk", "jump", "kick", "punch", "spin", "backflip", "cartwheel", "crawl",
              "dance_a", "getup_facedown", "roll"),
    "val": ("run", "spinkick"),
    "test": ("dance_b", "getup_faceup"),
}  # fmt: skip
"""Clips per split. Each held-out clip has a related one in train (run~walk, spinkick~spin+kick,
dance_b~dance_a, getup_faceup~getup_facedown), so held-out motion is new but not alien."""


@dataclass(frozen=True)
class SynthConfig:
    """How the embedded data set is rendered."""

    views: int = 4
    """Cameras of the ring rig (azimuths 45 + 360 k / views degrees)."""
    frames: int = 16
    """T, frames per window (sample)."""
    stride: int | None = None
    """Start-frame step between windows; None = frames // 2."""
    size: int = 128
    """Side of the square person crop, pixels."""
    fps: float = 50.0
    """Frame rate the clips are resampled to."""
    seed: int = 0
    """Root of every random choice (appearance, body height)."""
    appearances_per_window: int = 1
    """Appearances each window is rendered in, as separate samples."""
    appearances_per_sample: int = 1
    """Appearances of the same instants inside one sample, as extra views: a sample then has
    ``views * appearances_per_sample`` views, camera-minor (positives across appearance). Each
    appearance has its own body shape (part thickness and head size, ``appearance.thickness``,
    ``appearance.head_size``) but all share the window's body height, which moves the joints:
    every view of an instant shows one 3D pose."""
    crop_margin: float = 0.2
    """Crop box margin around the projected joints, fraction of their extent on every side."""
    jpeg_quality: int = 90
    height_scale: tuple[float, float] = (0.9, 1.1)
    """Range of the body-height factor, drawn per window (shared by its appearances)."""
    rig_radius_mm: float = 4500.0
    rig_height_mm: float = 1600.0
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    mirror: bool = False
    """Add a mirrored copy of every train clip (``CLIP~mirror``): the motion reflected across
    the world plane y = 0 with left and right exchanged, a real body (:func:`mocap.mirror`)."""
    speeds: tuple[float, ...] = ()
    """Playback speeds of extra time-warped copies of every train clip (``CLIP~x0.8``), each in
    [0.1, 10] and not 1; resampled from the keyframes with slerp (:func:`mocap.resample`)."""

    def __post_init__(self) -> None:
        positive = ("views", "frames", "size", "appearances_per_window", "appearances_per_sample")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"SynthConfig.stride must be >= 1 or None, got {self.stride}")
        if not self.fps > 0 or self.seed < 0 or not 0 <= self.crop_margin <= 2:
            raise ValueError("SynthConfig: need fps > 0, seed >= 0 and 0 <= crop_margin <= 2")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(
                f"SynthConfig.jpeg_quality must lie in [1, 100], got {self.jpeg_quality}"
            )
        lo, hi = self.height_scale
        if not 0 < lo <= hi:
            raise ValueError(f"SynthConfig.height_scale: need 0 < low <= high, got {lo, hi}")
        if not isinstance(self.mirror, bool):
            raise ValueError(f"SynthConfig.mirror must be true or false, got {self.mirror!r}")
        object.__setattr__(
            self, "speeds", augment.checked_speeds(self.speeds, "SynthConfig.speeds")
        )

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else max(1, self.frames // 2)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (for manifests). The augmentation fields appear only when set:
        a manifest written without augmentation reads as it did before they existed."""
        d = asdict(self)
        for name in ("mirror", "speeds"):
            if not d[name]:
                del d[name]
        return d


def augmented_clips(clips: Sequence[str], config: SynthConfig) -> tuple[str, ...]:
    """``clips`` with the augmented copies ``config`` asks for: the clips of a train split."""
    return augment.with_copies(clips, config.mirror, config.speeds)


@dataclass(frozen=True)
class Job:
    """One sample to render: a window of a clip in one or more appearances."""

    clip: str
    start: int
    """First frame of the window (at the config's fps)."""
    appearances: tuple[int, ...]
    """Appearance indices of the window (one per group of ``views`` views)."""

    @property
    def key(self) -> str:
        return schema.make_key(
            SOURCE, self.clip, f"a{self.appearances[0]:04d}", f"f{self.start:05d}"
        )


@functools.cache
def motion(clip: str, fps: float) -> mocap.MotionClip:
    """Clip ``clip`` (or an augmented copy, :class:`~data_shards.augment.ClipVariant`)
    resampled to ``fps`` (cached per process)."""
    return augment.ClipVariant.parse(clip).motion(fps)


def window_starts(num_frames: int, length: int, stride: int) -> list[int]:
    """Start frames of windows of ``length`` every ``stride`` frames; a last window is aligned
    to the clip's end so every frame is covered. Empty if the clip is shorter than a window."""
    if num_frames < length:
        return []
    starts = list(range(0, num_frames - length + 1, stride))
    if starts[-1] != num_frames - length:
        starts.append(num_frames - length)
    return starts


def check_clip_lengths(clips: Sequence[str], config: SynthConfig) -> None:
    """ValueError naming every clip (or augmented copy) shorter than one window of
    ``config.frames``, and the longest window all of them allow: such a clip would give no
    sample at all, silently (a held-out split would come out empty or lose an action)."""
    lengths = {clip: motion(clip, config.fps).num_frames for clip in clips}
    short = [f"{clip} ({n})" for clip, n in lengths.items() if n < config.frames]
    if short:
        raise ValueError(
            f"a window of {config.frames} frames is longer than clip(s) {', '.join(short)} "
            f"(frames at {config.fps:g} fps); use --frames {min(lengths.values())} or less, or "
            "leave them out (--clips, --val-clips, --test-clips)"
        )


def plan_jobs(clips: Sequence[str], config: SynthConfig) -> list[Job]:
    """Every sample of ``clips`` in output order: clip, then window start, then appearance."""
    jobs = []
    per = config.appearances_per_sample
    for clip in clips:
        for start in window_starts(motion(clip, config.fps).num_frames, config.frames,
                                   config.window_stride):  # fmt: skip
            for s in range(config.appearances_per_window):
                jobs.append(Job(clip, start, tuple(range(s * per, (s + 1) * per))))
    return jobs


def _rng(config: SynthConfig, stream: int, *ids: int) -> np.random.Generator:
    """A generator seeded by the config seed, a stream tag and the window's identity."""
    return np.random.default_rng([config.seed, stream, *ids])


@functools.cache
def rig_centre(clip: str, fps: float) -> tuple[float, float, float]:
    """Centre of the clip's rig: the mean pelvis position on the ground (mm, height scale 1)."""
    root = mocap.joints3d(motion(clip, fps))[:, 0]  # (N, 3)
    return (float(root[:, 0].mean()), float(root[:, 1].mean()), 0.0)


def clip_rig(clip: str, config: SynthConfig) -> list[Camera]:
    """The ring rig around :func:`rig_centre` (one fixed rig per clip, like a studio).

    Walk, run and spin travel up to 2.8 m: a rig centred on the world origin would see the
    person off-centre and at changing distances.
    """
    centre = np.asarray(rig_centre(clip, config.fps))
    rig = ring_rig(config.views, config.rig_radius_mm, config.rig_height_mm)
    # the rig is built around the origin; moving it by +centre: X_cam = R (X - centre) + t
    return [Camera(c.K, c.R, c.t - c.R @ centre, c.width, c.height, c.name) for c in rig]


@dataclass
class _Views:
    """Per-view output arrays of one sample, filled in place."""

    jpegs: list[list[bytes]]  # [V][T]
    masks: np.ndarray  # (V, T, H, W) bool
    pose2d: np.ndarray  # (V, T, J, 2)
    K: np.ndarray  # (V, T, 3, 3)
    Rt: np.ndarray  # (V, 3, 4)


def crop_boxes(cams: Sequence[Camera], joints: np.ndarray, margin: float) -> np.ndarray:
    """(C, T, 4) square person boxes (x0, y0, x1, y1), full-image pixels, per camera and frame,
    around the projection of ``joints`` (T, J, 3) mm."""
    return np.array([[person_box(cam.project(j), margin) for j in joints] for cam in cams])


def render_job(renderer: BodyRenderer, job: Job, config: SynthConfig) -> schema.Sample:
    """Render one :class:`Job` into a complete :class:`~data_shards.schema.Sample`."""
    variant = augment.ClipVariant.parse(job.clip)
    clip_id, copy_ids = mocap.CLIP_NAMES.index(variant.base), variant.rng_ids()
    T, C, S = config.frames, config.views, config.size
    window = mocap.subclip(motion(job.clip, config.fps), job.start, job.start + T)
    height = float(_rng(config, 1, clip_id, job.start, *copy_ids).uniform(*config.height_scale))
    joints = mocap.joints3d(window, height)  # (T, J, 3) mm
    cams = clip_rig(job.clip, config)
    boxes = crop_boxes(cams, joints, config.crop_margin)  # (C, T, 4)
    crops = [[cam.crop(box, (S, S)) for box in boxes[c]] for c, cam in enumerate(cams)]
    V = C * len(job.appearances)
    out = _Views(
        jpegs=[[b""] * T for _ in range(V)],
        masks=np.zeros((V, T, S, S), dtype=bool),
        pose2d=np.zeros((V, T, joints.shape[1], 2)),
        K=np.zeros((V, T, 3, 3)),
        Rt=np.zeros((V, 3, 4)),
    )
    looks = []
    for k, a in enumerate(job.appearances):
        rng = _rng(config, 2, clip_id, job.start, a, *copy_ids)
        look = draw_appearance(rng, C, config.appearance)
        looks.append(look.to_json())
        renderer.set_appearance(look, height)
        _render_views(renderer, window, look, crops, boxes, out, k * C, config)
    for v in range(V):
        cam = cams[v % C]
        out.Rt[v] = np.concatenate([cam.R, cam.t[:, None]], axis=1)
        for t in range(T):
            out.K[v, t] = crops[v % C][t].K
            out.pose2d[v, t] = crops[v % C][t].project(joints[t])
    extra = {"height_scale": height, "appearances": looks, "seed": config.seed,
             "rig_centre_mm": list(rig_centre(job.clip, config.fps)),
             "crop_margin": config.crop_margin, "renderer": "pybullet TinyRenderer"}  # fmt: skip
    if variant.is_copy:  # what the copy is made of (frames count in the copy's own time)
        extra["motion"] = {"clip": variant.base, "mirror": variant.mirror, "speed": variant.speed}
    meta = schema.Meta(
        source=SOURCE, clip=job.clip, action=variant.base, subject="humanoid", fps=config.fps,
        frames=list(range(job.start, job.start + T)),
        views=[schema.View(cams[v % C].name, job.appearances[v // C]) for v in range(V)],
        image_size=(S, S), has={part: part != "det2d" for part in schema.OPTIONAL_PARTS},
        extra=extra,
    )  # fmt: skip
    return schema.Sample(
        key=job.key, meta=meta, masks=out.masks, pose3d=joints.astype(np.float32),
        pose2d=out.pose2d.astype(np.float32), K=out.K.astype(np.float32), Rt=out.Rt,
        jpegs=out.jpegs,
    )  # fmt: skip


def _render_views(
    renderer: BodyRenderer,
    window: mocap.MotionClip,
    look: Appearance,
    crops: list[list[Camera]],
    boxes: np.ndarray,
    out: _Views,
    first_view: int,
    config: SynthConfig,
) -> None:
    """Render every frame of ``window`` from every camera in appearance ``look`` into views
    ``first_view ...`` of ``out``. ``crops`` [C][T] cameras, ``boxes`` (C, T, 4) their boxes."""
    size = (config.size, config.size)
    backgrounds = [background_crops(look.backgrounds[c], boxes[c], size) for c in range(len(crops))]
    for t in range(window.num_frames):
        renderer.set_pose(window, t)
        for c, views in enumerate(crops):
            image = renderer.render(views[t], look.light)
            out.masks[first_view + c, t] = image.mask
            rgb = composite(image, backgrounds[c][t])
            out.jpegs[first_view + c][t] = schema.encode_jpeg(rgb, config.jpeg_quality)


# ----------------------------------------------------------------------------- processes

_WORKER: tuple[BodyRenderer, SynthConfig] | None = None  # this worker process's renderer


def _init_worker(config: SynthConfig) -> None:
    global _WORKER
    _WORKER = (BodyRenderer(), config)


def _work(job: Job) -> schema.Sample:
    assert _WORKER is not None, "worker not initialised"
    return render_job(_WORKER[0], job, _WORKER[1])


def _samples_in_process(jobs: Sequence[Job], config: SynthConfig) -> Iterator[schema.Sample]:
    with BodyRenderer() as renderer:
        for job in jobs:
            yield render_job(renderer, job, config)


def _samples_in_pool(
    jobs: Sequence[Job], config: SynthConfig, workers: int
) -> Iterator[schema.Sample]:
    """Samples rendered by ``workers`` processes, yielded in job order.

    spawn, not fork: a parent holding threads (torch, tqdm) or a pybullet client must not be
    copied mid-state; each worker builds its own client once. A ProcessPoolExecutor rather than
    a multiprocessing.Pool: a worker that dies raises BrokenProcessPool instead of hanging. At
    most ``4 * workers`` samples are in flight, so a slow consumer does not fill memory.
    """
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=(config,))
    try:
        pending: deque[Future] = deque()
        todo = iter(jobs)
        for job in itertools.islice(todo, 4 * workers):
            pending.append(pool.submit(_work, job))
        while pending:
            sample = pending.popleft().result()
            for job in itertools.islice(todo, 1):
                pending.append(pool.submit(_work, job))
            yield sample
    finally:  # also when the consumer stops early: drop the queued work, do not render it
        pool.shutdown(wait=True, cancel_futures=True)


def iter_samples(
    clips: Sequence[str] | str,
    config: SynthConfig | None = None,
    workers: int = 1,
    progress: bool = True,
    shuffle: bool = False,
) -> Iterator[schema.Sample]:
    """Render the samples of ``clips`` (clip or augmented-copy names, or a split name of
    :data:`SPLITS`; the "train" split with its augmented copies, :func:`augmented_clips`).

    Yields :class:`~data_shards.schema.Sample` objects with encoded JPEGs, in the
    deterministic order of :func:`plan_jobs` (permuted by ``config.seed`` with ``shuffle``, so
    that every shard mixes clips), identical for any ``workers`` (>= 1; above 1, a
    process pool with one pybullet client per process). Shows a tqdm bar if ``progress``.
    Worker processes are spawned: a script calling this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard (without it, BrokenProcessPool is raised).
    """
    from tqdm import tqdm

    config = config or SynthConfig()
    if isinstance(clips, str):
        if clips not in SPLITS:
            raise ValueError(f"unknown split {clips!r}; expected one of {sorted(SPLITS)}")
        split, clips = clips, SPLITS[clips]
        clips = augmented_clips(clips, config) if split == "train" else clips
    for clip in clips:
        augment.ClipVariant.parse(clip)  # an unknown clip or tag raises here, before any work
    check_clip_lengths(clips, config)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = plan_jobs(clips, config)
    if shuffle:
        jobs = [jobs[i] for i in np.random.default_rng(config.seed).permutation(len(jobs))]
    stream = (
        _samples_in_pool(jobs, config, min(workers, len(jobs)))
        if workers > 1 and len(jobs) > 1
        else _samples_in_process(jobs, config)
    )
    with tqdm(total=len(jobs), desc="render deepmimic", unit="sample", disable=not progress) as bar:
        for sample in stream:
            bar.update(1)
            yield sample


# ----------------------------------------------------------------------------- splits


def split_table(
    val: Sequence[str] | None = None, test: Sequence[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Clips per split: :data:`SPLITS`, or the given val / test clips with train = the rest."""
    if val is None and test is None:
        return dict(SPLITS)
    val, test = tuple(val or ()), tuple(test or ())
    named = val + test
    unknown = [c for c in named if c not in mocap.CLIP_NAMES]
    if unknown or len(set(named)) != len(named):
        raise ValueError(f"val/test clips must be distinct names of {mocap.CLIP_NAMES}: {named}")
    table = {
        "train": tuple(c for c in mocap.CLIP_NAMES if c not in named),
        "val": val,
        "test": test,
    }
    return {name: clips for name, clips in table.items() if clips}


def build_splits(
    out_dir: str | os.PathLike,
    config: SynthConfig | None = None,
    writer_config: WriterConfig | None = None,
    *,
    splits: dict[str, Sequence[str]] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Render every split of ``splits`` (default :data:`SPLITS`) as shards under ``out_dir``.

    Returns {split name: manifest}. Samples are rendered in a seeded random order, so each
    shard mixes clips, and each split is written atomically by
    :func:`data_shards.write.write_split`. The "train" split also gets the augmented copies of
    its clips (:func:`augmented_clips`), listed in its manifest's ``source["augmentation"]``.
    """
    from data_shards.write import write_split  # imports webdataset (and torch): only when used

    config = config or SynthConfig()
    generator = {"command": "synth", "config": config.to_dict()}
    table = {name: augmented_clips(clips, config) if name == "train" else tuple(clips)
             for name, clips in (splits or SPLITS).items()}  # fmt: skip
    # before any split is rendered (or one would be left written, the next one not)
    check_clip_lengths([clip for clips in table.values() for clip in clips], config)
    manifests = {}
    for name, clips in (splits or SPLITS).items():
        source = {"source": SOURCE, "clips": list(clips), "data": "pybullet==3.2.7 DeepMimic"}
        rendered = table[name]
        copies = [c for c in rendered if c not in clips]
        if copies:
            source["augmentation"] = {
                "mirror": config.mirror, "speeds": list(config.speeds), "clips": copies,
                "windows": len(plan_jobs(copies, config)),
            }  # fmt: skip
        samples = iter_samples(rendered, config, workers=workers, progress=progress, shuffle=True)
        manifests[name] = write_split(out_dir, name, samples, source, generator, writer_config)
    return manifests
