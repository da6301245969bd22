"""Human3.6M in the VideoPose3D-style layout -> shard samples (V = 4 cameras of one instant).

Inputs (all but the first optional):

- ``data_3d_h36m.npz``: ``positions_3d`` = {subject: {action: (N, 32, 3) world metres}},
  stored as a pickled numpy object array. It is read WITHOUT ``np.load(allow_pickle=True)``
  (which runs arbitrary code from a crafted file): the zip is parsed here, and object arrays
  are unpickled by a restricted unpickler that can build nothing but numpy arrays, dtypes and
  plain containers (see :func:`load_npz`).
- ``data_2d_h36m_<name>.npz``: ``positions_2d`` = {subject: {action: [4 x (N', 17, 2)]}},
  pixels of the full camera image (N' >= N; extra trailing frames are dropped, as detections
  often run a little longer than the motion capture), and ``metadata``.
- cameras JSON: {subject: [{name, K (3x3) or fx fy cx cy, R (3x3), t (mm) or center (mm),
  width, height}, ... one per camera, in the 2D files' camera order]}. ``R``/``t`` map world to
  camera (``X_cam = R X_world + t``, OpenCV axes, see :mod:`data_shards.camera`); give
  ``center`` instead of ``t`` for calibrations that store the camera position C (t = -R C).
- frames: ``FRAMES/<subject>/<action>.<camera name>/<number:06d>.jpg`` where number = frame
  index + 1 (1-based, as ``ffmpeg -i video FRAMES/.../%06d.jpg`` numbers them; see
  ``H36MConfig.first_frame_number``), extracted at the motion-capture rate (50 fps).

Every frame of every view is cropped around the person (square :func:`person_box` of its 2D
joints: the detections when given, else the 3D projected with the cameras) and resized to the
output size; pose2d and the intrinsics are mapped into that crop, so pose2d is in pixels of
the output frame even when no frames are written. The 32 markers are reduced to the 17
joints of :mod:`data_shards.skeleton` and metres become millimetres (H36M's world is Z up).
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_shards.camera import Camera, crop_intrinsics, intrinsics, person_box
from data_shards.manifest import Manifest
from data_shards.schema import Meta, Sample, View, make_key
from data_shards.skeleton import NUM_JOINTS
from data_shards.video import crop_resize, transform_points
from data_shards.write import WriterConfig, write_split

log = logging.getLogger(__name__)

DROPPED_JOINTS = (4, 5, 9, 10, 11, 16, 20, 21, 22, 23, 24, 28, 29, 30, 31)
"""Markers of the 32 that the usual 17-joint reduction leaves out (toes, hands, duplicates)."""
KEEP_JOINTS = tuple(j for j in range(32) if j not in DROPPED_JOINTS)
"""The 32-marker indices of the 17 joints of :data:`data_shards.skeleton.JOINT_NAMES`."""
CAMERA_NAMES = ("54138969", "55011271", "58860488", "60457274")
"""H36M camera serials in the usual 2D-file order: frame folder names when no cameras JSON."""
DEFAULT_SPLITS = {"train": ("S1", "S5", "S6", "S7", "S8"), "val": ("S9",), "test": ("S11",)}


class H36MError(ValueError):
    """Human3.6M input that cannot be used (the message names the file and the entry)."""


# ---------------------------------------------------------------- safe .npz reading


def _allowed_globals() -> dict[tuple[str, str], Any]:
    # The callables a numpy pickle of arrays, dtypes and plain containers refers to; taken
    # from numpy's own reducers so that no private module is imported by name.
    reconstruct, scalar = np.empty(0).__reduce__()[0], np.float64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 (Python 2 era) pickles
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside dicts/lists; refuses every other global (no code runs)."""

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_npy(f: IO[bytes], where: str) -> Any:
    """One ``.npy`` stream -> array (0-d object arrays -> the object they hold)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if dtype.hasobject:
            arr = _RestrictedUnpickler(f).load()
            if not isinstance(arr, np.ndarray) or arr.shape != shape:
                raise ValueError(f"pickled {type(arr).__name__} is not the declared array")
            return arr.item() if arr.shape == () else arr
        count = math.prod(shape)
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ValueError("file ends inside the array data")
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()
    except (ValueError, EOFError, TypeError, AttributeError, pickle.UnpicklingError) as e:
        raise H36MError(f"{where}: unreadable array ({type(e).__name__}: {e})") from None


def load_npz(path: str | os.PathLike) -> dict[str, Any]:
    """Read every array of an ``.npz`` without running code from it.

    Object arrays are unpickled with a restricted unpickler (numpy arrays, dtypes, dict, list,
    tuple, set, str, numbers only); a pickle referring to anything else raises H36MError
    before it can be called. ``np.load(..., allow_pickle=True)`` would execute it.

    Returns:
        {array name: ndarray, or the object held by a 0-d object array (e.g. a dict)}.
    """
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise H36MError(f"{path}: not a readable .npz file ({e})") from None
    out = {}
    with archive:
        for info in archive.infolist():
            if info.filename.endswith(".npy"):
                with archive.open(info) as f:
                    out[info.filename[:-4]] = _read_npy(f, f"{path}:{info.filename}")
    return out


def _entry(npz: dict[str, Any], name: str, path: os.PathLike | str) -> dict:
    if name not in npz or not isinstance(npz[name], dict):
        raise H36MError(f"{os.fspath(path)}: no '{name}' dict of subjects (found {sorted(npz)})")
    return npz[name]


# ---------------------------------------------------------------- loaders


def load_positions_3d(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """``data_3d_h36m.npz`` -> {subject: {action: (N, 17, 3) float64 world mm}}.

    Accepts (N, 32, 3) markers (reduced with :data:`KEEP_JOINTS`) or already reduced (N, 17, 3).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for subject, actions in _entry(load_npz(path), "positions_3d", path).items():
        out[str(subject)] = {}
        for action, pos in dict(actions).items():
            pos = np.asarray(pos, dtype=np.float64)
            if pos.ndim != 3 or pos.shape[1] not in (32, NUM_JOINTS) or pos.shape[2] != 3:
                raise H36MError(f"{path}: {subject}/{action}: shape {pos.shape}, "
                                "expected (N, 32, 3)")
            if not np.isfinite(pos).all():
                raise H36MError(f"{path}: {subject}/{action}: NaN or inf positions")
            pos = pos[:, KEEP_JOINTS] if pos.shape[1] == 32 else pos
            out[str(subject)][str(action)] = pos * 1000.0  # metres -> mm
    return out


def load_positions_2d(path: str | os.PathLike) -> dict[str, dict[str, list[np.ndarray]]]:
    """``data_2d_h36m_<name>.npz`` -> {subject: {action: [per camera (N', 17, 2) pixels]}}."""
    npz = load_npz(path)
    meta = npz.get("metadata")
    if isinstance(meta, dict) and meta.get("layout_name", "h36m") != "h36m":
        raise H36MError(f"{path}: 2D joints in layout {meta['layout_name']!r}; only the 17-joint "
                        "'h36m' order is supported")
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for subject, actions in _entry(npz, "positions_2d", path).items():
        out[str(subject)] = {}
        for action, cams in dict(actions).items():
            arrays = [np.asarray(c, dtype=np.float64) for c in cams]
            for c, a in enumerate(arrays):
                if a.ndim != 3 or a.shape[1:] != (NUM_JOINTS, 2):
                    raise H36MError(f"{path}: {subject}/{action} camera {c}: shape {a.shape}, "
                                    f"expected (N, {NUM_JOINTS}, 2)")
            out[str(subject)][str(action)] = arrays
    return out


def _camera(d: dict) -> Camera:
    if "K" in d:
        K = np.asarray(d["K"], dtype=np.float64)
    else:
        K = intrinsics(*(float(d[k]) for k in ("fx", "fy", "cx", "cy")))
    R = np.asarray(d["R"], dtype=np.float64)
    if ("t" in d) == ("center" in d):
        raise KeyError("exactly one of 't' and 'center'")
    t = np.asarray(d["t"], dtype=np.float64) if "t" in d else -R @ np.asarray(d["center"], float)
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise ValueError("R is not a rotation matrix")
    return Camera(K, R, t, int(d["width"]), int(d["height"]), str(d["name"]))


def load_cameras(path: str | os.PathLike) -> dict[str, list[Camera]]:
    """Cameras JSON (see the module docstring) -> {subject: [Camera, ...]} in file order."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise H36MError(f"{path}: unreadable cameras file ({e})") from None
    if not isinstance(data, dict):
        raise H36MError(f"{path}: expected {{subject: [camera, ...]}}")
    out = {}
    for subject, cams in data.items():
        out[subject] = []
        for i, d in enumerate(cams if isinstance(cams, list) else [None]):
            try:
                out[subject].append(_camera(d))
            except (KeyError, ValueError, TypeError) as e:
                raise H36MError(f"{path}: {subject} camera {i}: {type(e).__name__}: {e}") from None
        names = [c.name for c in out[subject]]
        if len(set(names)) != len(names) or not all(names):
            raise H36MError(f"{path}: {subject}: camera names must be unique and non-empty")
    return out


def base_action(action: str) -> str:
    """'Walking 1' -> 'Walking': the action label without H36M's trailing take number."""
    return re.sub(r"\s+\d+$", "", action.strip()) or action


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class H36MConfig:
    """How Human3.6M becomes samples."""

    size: tuple[int, int] = (128, 128)
    """(W, H) of the output frames (and of the pixel frame of pose2d and the intrinsics)."""
    frames: int = 16
    """T: frames per window (at the output rate)."""
    stride: int | None = None
    """Frames between window starts (at the output rate); None = T."""
    fps: float | None = None
    """Output rate; must divide ``source_fps`` (50 -> 25, 10 ...). None keeps the source rate."""
    source_fps: float = 50.0
    """Rate of the motion capture, the 2D files and the extracted frames."""
    margin: float = 0.2
    """Person box margin, as a fraction of the joints' extent on every side."""
    splits: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    """Split name -> subjects. Subjects in no split are not written."""
    pose2d_from: str = "auto"
    """'detections' (the 2D file), 'projection' (3D through the cameras) or 'auto' (the 2D
    file when given, else projection)."""
    camera_names: tuple[str, ...] = CAMERA_NAMES
    """Frame folder suffixes when there is no cameras JSON (which then supplies the names)."""
    first_frame_number: int = 1
    """File number of frame index 0 in the frames folders."""

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be two positive ints (W, H), got {self.size}")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if self.frames < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError("frames and stride must be >= 1")
        if self.fps is not None:
            ratio = self.source_fps / self.fps if self.fps > 0 else 0.0
            if ratio < 1 or abs(ratio - round(ratio)) > 1e-6:
                raise ValueError(f"fps {self.fps} must divide source_fps {self.source_fps}")
        if self.margin < 0 or self.first_frame_number < 0:
            raise ValueError("margin and first_frame_number must be >= 0")
        if self.pose2d_from not in ("auto", "detections", "projection"):
            raise ValueError(f"pose2d_from must be auto|detections|projection: {self.pose2d_from}")
        splits = {str(k): tuple(str(s) for s in v) for k, v in self.splits.items()}
        seen = [s for subjects in splits.values() for s in subjects]
        if not splits or len(set(seen)) != len(seen):
            raise ValueError(f"splits must be non-empty and disjoint: {splits}")
        if any(not k or "/" in k or k.startswith(".") for k in splits):
            raise ValueError(f"invalid split name in {sorted(splits)}")
        object.__setattr__(self, "splits", splits)

    @property
    def step(self) -> int:
        """Source frames per output frame."""
        return 1 if self.fps is None else round(self.source_fps / self.fps)

    def to_dict(self) -> dict:
        """JSON-ready settings (recorded in the manifest)."""
        return json.loads(json.dumps({**asdict(self), "stride": self.stride or self.frames}))


@dataclass
class H36MData:
    """Loaded inputs of :func:`ingest_h36m` (2D and cameras optional)."""

    pose3d: dict[str, dict[str, np.ndarray]]
    pose2d: dict[str, dict[str, list[np.ndarray]]] | None = None
    cameras: dict[str, list[Camera]] | None = None


@dataclass
class _Clip:
    subject: str
    action: str
    names: list[str]
    pose3d: np.ndarray
    """(N, 17, 3) mm."""
    cameras: list[Camera] | None
    points2d: np.ndarray | None
    """(V, N, 17, 2) full-image pixels that place the crop (and become pose2d)."""
    pose2d_from: str


def _clip(data: H36MData, subject: str, action: str, config: H36MConfig) -> _Clip:
    pose3d = data.pose3d[subject][action]
    cams = None
    if data.cameras is not None:
        if subject not in data.cameras:
            raise H36MError(f"cameras file has no subject {subject}")
        cams = data.cameras[subject]
    names = [c.name for c in cams] if cams else list(config.camera_names)
    points, source = None, "none"
    use_det = data.pose2d is not None and config.pose2d_from != "projection"
    if use_det:
        dets = data.pose2d.get(subject, {}).get(action)
        if dets is None:
            raise H36MError(f"2D file has no {subject}/{action}")
        if len(dets) != len(names) or any(len(d) < len(pose3d) for d in dets):
            raise H36MError(f"{subject}/{action}: 2D has {len(dets)} cameras of "
                            f"{[len(d) for d in dets]} frames; expected {len(names)} of >= "
                            f"{len(pose3d)} (the 3D frame count)")
        points, source = np.stack([d[: len(pose3d)] for d in dets]), "detections"
    elif cams is not None:
        points, source = np.stack([c.project(pose3d) for c in cams]), "projection"
    return _Clip(subject, action, names, pose3d, cams, points, source)


def frame_path(frames_dir: Path, subject: str, action: str, camera: str, index: int,
               config: H36MConfig) -> Path:
    """``FRAMES/<subject>/<action>.<camera>/<number:06d>.jpg`` of 0-based frame ``index``."""
    number = index + config.first_frame_number
    return frames_dir / subject / f"{action}.{camera}" / f"{number:06d}.jpg"


def read_crop(path: str | os.PathLike, box: Sequence[float], size: tuple[int, int],
              camera: Camera | None = None) -> np.ndarray:
    """Region ``box`` (x0, y0, x1, y1, full-image pixels) of an image file at ``size`` (W, H).

    Same geometry as :func:`data_shards.video.crop_resize`; JPEGs are decoded at 1/2 .. 1/8
    scale when the crop still has at least the output resolution there (DCT scaling keeps the
    continuous pixel grid: scaled pixel i covers full pixels [i s, (i + 1) s)), which makes
    decoding large frames several times faster. With ``camera`` the image size is checked.

    Returns:
        (H, W, 3) uint8.
    """
    try:
        with Image.open(path) as im:
            full = im.size
            if camera is not None and full != (camera.width, camera.height):
                raise H36MError(f"{path}: {full[0]}x{full[1]} image, camera {camera.name} is "
                                f"{camera.width}x{camera.height}")
            bw, bh = box[2] - box[0], box[3] - box[1]
            im.draft("RGB", (math.ceil(full[0] * size[0] / bw), math.ceil(full[1] * size[1] / bh)))
            scale = round(full[0] / im.size[0])  # 1, 2, 4 or 8
            return crop_resize(im, np.asarray(box, dtype=np.float64) / scale, size)
    except OSError as e:
        raise H36MError(f"{path}: unreadable frame ({e})") from None


def _window(clip: _Clip, src: np.ndarray, out: np.ndarray, frames_dir: Path | None,
            config: H36MConfig) -> Sample:
    """The sample of source frames ``src`` (T,) = output frames ``out`` (T,)."""
    V, T, size = len(clip.names), len(src), config.size
    pose2d = K = Rt = frames = None
    extra = {"action_full": clip.action, "source_frames": src.tolist(),
             "pose2d_from": clip.pose2d_from}
    if clip.points2d is not None:
        pts = clip.points2d[:, src]  # (V, T, 17, 2)
        boxes = np.array([[person_box(pts[v, t], config.margin) for t in range(T)]
                          for v in range(V)])  # (V, T, 4)
        pose2d = np.stack([[transform_points(pts[v, t], boxes[v, t], size) for t in range(T)]
                           for v in range(V)])
        extra["boxes"] = np.round(boxes, 3).tolist()
        if clip.cameras is not None:
            K = np.array([[crop_intrinsics(c.K, b, size) for b in boxes[v]]
                          for v, c in enumerate(clip.cameras)])  # (V, T, 3, 3)
            Rt = np.stack([np.hstack([c.R, c.t[:, None]]) for c in clip.cameras])  # (V, 3, 4)
        if frames_dir is not None:
            cams = clip.cameras or [None] * V
            frames = np.stack([np.stack([
                read_crop(frame_path(frames_dir, clip.subject, clip.action, name, i, config),
                          boxes[v, t], size, cams[v])
                for t, i in enumerate(src)]) for v, name in enumerate(clip.names)])  # (V, T, ...)
    has = {"frames": frames is not None, "masks": False, "pose3d": True,
           "pose2d": pose2d is not None, "cameras": K is not None}
    meta = Meta(
        source="h36m", clip=make_key(f"{clip.subject}_{clip.action}"),
        action=base_action(clip.action), fps=config.source_fps / config.step,
        frames=out.tolist(), views=[View(n, 0) for n in clip.names], image_size=size, has=has,
        subject=clip.subject, extra=extra)
    return Sample(make_key(meta.clip, f"{out[0]:06d}"), meta, frames=frames,
                  pose3d=clip.pose3d[src].astype(np.float32),
                  pose2d=None if pose2d is None else pose2d.astype(np.float32), K=K, Rt=Rt)


def iter_h36m_samples(data: H36MData, subjects: list[str], frames_dir: str | os.PathLike | None,
                      config: H36MConfig, progress: bool = True,
                      desc: str = "h36m") -> Iterator[Sample]:
    """Samples of ``subjects`` (all their actions, sorted), windows in time order.

    Yields :class:`Sample` with pose3d (T, 17, 3) mm; pose2d (4, T, 17, 2) and frames
    (4, T, H, W, 3) in the crop; K (4, T, 3, 3) and Rt (4, 3, 4) with cameras.
    """
    frames_root = Path(frames_dir) if frames_dir is not None else None
    if frames_root is not None and not frames_root.is_dir():
        raise H36MError(f"{frames_root}: frames directory not found")
    if frames_root is not None and data.pose2d is None and data.cameras is None:
        raise H36MError("frames are cropped around the person: give a 2D file or cameras")
    clips = [(s, a) for s in subjects for a in sorted(data.pose3d[s])]
    T, stride, step = config.frames, config.stride or config.frames, config.step
    for subject, action in tqdm(clips, desc=desc, unit="clip", disable=not progress):
        clip = _clip(data, subject, action, config)
        n_out = -(-len(clip.pose3d) // step)  # output frames: source 0, step, 2 step, ...
        if n_out < T:
            log.warning("%s/%s: skipped, %d frames is shorter than a window of %d",
                        subject, action, n_out, T)
        for start in range(0, n_out - T + 1, stride):
            out = np.arange(start, start + T)
            yield _window(clip, out * step, out, frames_root, config)


def load_h36m(npz3d: str | os.PathLike, npz2d: str | os.PathLike | None = None,
              cameras_json: str | os.PathLike | None = None) -> H36MData:
    """Load and check the inputs of :func:`ingest_h36m`."""
    return H36MData(
        load_positions_3d(npz3d),
        load_positions_2d(npz2d) if npz2d is not None else None,
        load_cameras(cameras_json) if cameras_json is not None else None,
    )


def ingest_h36m(
    npz3d: str | os.PathLike,
    npz2d: str | os.PathLike | None,
    frames_dir: str | os.PathLike | None,
    cameras_json: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: H36MConfig | None = None,
    writer_config: WriterConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Write Human3.6M as one split per ``config.splits`` entry under ``out_dir``.

    Splits are by subject. A split none of whose subjects is in the 3D file is skipped with a
    warning. Each split is written atomically (see :mod:`data_shards.write`).

    Returns:
        {split name: manifest} of the splits written.
    """
    config = config or H36MConfig()
    if config.pose2d_from == "detections" and npz2d is None:
        raise H36MError("pose2d_from='detections' needs a 2D file")
    if config.pose2d_from == "projection" and cameras_json is None:
        raise H36MError("pose2d_from='projection' needs a cameras file")
    data = load_h36m(npz3d, npz2d, cameras_json)
    unused = sorted(set(data.pose3d) - {s for v in config.splits.values() for s in v})
    if unused:
        log.info("subjects in no split, not written: %s", ", ".join(unused))
    generator = {"command": "h36m", "config": config.to_dict()}
    manifests = {}
    for split, wanted in config.splits.items():
        subjects = [s for s in wanted if s in data.pose3d]
        if len(subjects) < len(wanted):
            log.warning("split %s: subjects %s are not in %s", split,
                        [s for s in wanted if s not in data.pose3d], os.fspath(npz3d))
        if not subjects:
            continue
        source = {"source": "h36m", "npz3d": os.path.basename(npz3d), "subjects": subjects,
                  "npz2d": os.path.basename(npz2d) if npz2d else None,
                  "cameras": os.path.basename(cameras_json) if cameras_json else None,
                  "frames": frames_dir is not None}
        samples = iter_h36m_samples(data, subjects, frames_dir, config, progress, f"h36m {split}")
        manifests[split] = write_split(out_dir, split, samples, source, generator, writer_config)
    if not manifests:
        raise H36MError(f"{npz3d}: none of the split subjects {config.splits} is in the file")
    return manifests
