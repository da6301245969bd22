"""The one definition of a shard sample: members, shapes, units, encoding and validation.

A sample is a window of T consecutive frames of one clip seen from V views at once, so that
multi-view positives land in the same batch. Writers call :func:`encode_sample`, readers call
:func:`decode_sample`; nothing else knows member names. docs/shard-format.md describes the
format for people.

Members of sample ``KEY`` (``KEY.<member>`` inside the tar):

- ``v00.t000.jpg`` ...: RGB frame of view v at time t, H x W x 3, JPEG.
- ``masks.npy``: foreground masks, (V, T, H, ceil(W/8)) uint8, ``np.packbits`` along x.
- ``pose3d.npy``: 3D joints, (T, J, 3) float32, mm, world frame (Z up).
- ``pose2d.npy``: 2D joints per view, (V, T, J, 2) float32, pixels of the frame.
- ``cam_k.npy``: intrinsics per view and time, (V, T, 3, 3) float32, pixels of the frame.
- ``cam_rt.npy``: extrinsics per view, (V, 3, 4) float64, [R | t] world -> camera, t in mm.
- ``det2d.npy``: a 2D detector's joints per view, (V, T, J, 3) float32: x, y in pixels of the
  frame and a confidence in [0, 1]; a frame where the detector found no person has confidence
  0 (and x = y = 0) for every joint. Beside ``pose2d`` (ground truth, or the same detections
  for a video ingested with ``--detect``).
- ``meta.json``: metadata (:class:`Meta`), UTF-8 JSON.

Everything but ``meta.json`` is optional; ``meta.has`` says which members a sample carries, and
one split (one manifest) carries the same members in every sample. Arrays are ``.npy`` of plain
dtypes, read by :func:`data_shards.untrusted.load_npy`; no member is ever unpickled. What a
member claims is bounded before anything is allocated or decoded: the frame size
(:data:`MAX_IMAGE_SIDE`, read from each JPEG's header), the frames of a sample
(:data:`MAX_FRAME_BYTES`), an array's shape (the bytes it holds), JSON nesting.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from data_shards.skeleton import NUM_JOINTS
from data_shards.untrusted import MAX_JSON_DEPTH, brief, is_int, is_number, json_depth_ok, load_npy

SCHEMA_VERSION = 1

MASKS = "masks.npy"
POSE3D = "pose3d.npy"
POSE2D = "pose2d.npy"
CAM_K = "cam_k.npy"
CAM_RT = "cam_rt.npy"
DET2D = "det2d.npy"
META = "meta.json"
FRAME_RE = re.compile(r"^v(\d{2})\.t(\d{3})\.jpg$")

OPTIONAL_PARTS = ("frames", "masks", "pose3d", "pose2d", "cameras", "det2d")
ARRAY_MEMBERS = (MASKS, POSE3D, POSE2D, CAM_K, CAM_RT, DET2D)
MAX_IMAGE_SIDE = 4096
"""The largest frame width or height a sample may declare (a decoded 4096 x 4096 RGB frame is
48 MiB); a header claiming more is refused before anything is allocated or decoded."""
MAX_FRAME_BYTES = 2 * 1024**3
"""The most bytes a sample's decoded frames may take (V x T x H x W x 3): what ``decode``
allocates for one sample is bounded before a frame is read."""


def is_member(ext: str) -> bool:
    """Whether a member extension is one this schema reads (anything else, a pickle or a
    ``.pth`` included, is never even read)."""
    return ext == META or ext in ARRAY_MEMBERS or FRAME_RE.match(ext) is not None


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class SampleError(ValueError):
    """A sample that does not follow the schema. ``field`` names the offending member."""

    def __init__(self, key: str, field: str, message: str):
        super().__init__(f"sample {key!r}, {field}: {message}")
        self.key, self.field, self.message = key, field, message


def frame_member(view: int, time: int) -> str:
    """Member name of the JPEG frame of ``view`` at window position ``time``."""
    return f"v{view:02d}.t{time:03d}.jpg"


def is_size(value: object) -> bool:
    """(W, H), each a whole number in [1, MAX_IMAGE_SIDE]."""
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(is_int(v) and 1 <= v <= MAX_IMAGE_SIDE for v in value))  # fmt: skip


def make_key(*parts: object) -> str:
    """A sample key from parts: only [A-Za-z0-9_-] (a dot would split the key in a tar)."""
    key = "-".join(_KEY_BAD.sub("_", str(p)).strip("_") for p in parts)
    if not key:
        raise ValueError("empty sample key")
    return key


@dataclass
class View:
    """One view of a sample: which camera, and which appearance of the subject."""

    camera: str
    """Camera identifier (unique within the sample's clip)."""
    appearance: int = 0
    """Appearance id (clothing, body shape, lighting, background); 0 when unknown."""


@dataclass
class Meta:
    """``meta.json``: what a sample is and where it came from."""

    source: str
    """Data source: 'deepmimic', 'video', 'h36m'."""
    clip: str
    """Clip (sequence) identifier; train/val/test splits are made by clip."""
    action: str
    """Action label (for per-action reports)."""
    fps: float
    """Frame rate of the window."""
    frames: list[int]
    """Frame indices of the T frames within the clip (at ``fps``)."""
    views: list[View]
    """The V views, in member order."""
    image_size: tuple[int, int]
    """(W, H) of every frame and mask."""
    has: dict[str, bool]
    """Which optional parts the sample carries (keys: OPTIONAL_PARTS)."""
    subject: str = ""
    """Subject identifier."""
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    """Generator details (body scale, lighting, video file ...), free-form JSON."""

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, key: str, data: bytes) -> Meta:
        """Parse and :meth:`check` ``meta.json``; SampleError (field ``meta.json``) otherwise."""
        try:
            d = json.loads(data.decode("utf-8"))
            if not isinstance(d, dict):
                raise SampleError(key, META, f"invalid metadata: not an object ({brief(d)})")
            version = d.get("schema_version")
            if version != SCHEMA_VERSION:
                raise SampleError(
                    key, META, f"schema version {brief(version)}, expected {SCHEMA_VERSION}"
                )
            d["views"] = [View(**v) for v in d["views"]]
            d["image_size"] = tuple(d["image_size"])
            meta = cls(**d)
        except SampleError:
            raise
        except RecursionError:  # json nests one C call per bracket
            raise SampleError(key, META, "invalid metadata: nested too deeply") from None
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SampleError(key, META, f"invalid metadata ({type(e).__name__}: {e})") from None
        meta.check(key)
        return meta

    def check(self, key: str) -> None:
        """Raise SampleError (field ``meta.json``) unless every field has its type and range:
        what a reader allocates from (views, frames, image size) is bounded before it is used."""
        problem = ""
        texts = ("source", "clip", "action", "subject")
        if bad := [n for n in texts if not isinstance(getattr(self, n), str)]:
            problem = f"{bad[0]} must be a string, got {brief(getattr(self, bad[0]))}"
        elif not is_number(self.fps) or not 0 < self.fps < math.inf:
            problem = f"fps must be a number > 0, got {brief(self.fps)}"
        elif not (isinstance(self.frames, list) and self.frames
                  and all(is_int(t) for t in self.frames)):  # fmt: skip
            problem = f"frames must be a non-empty list of whole numbers, got {brief(self.frames)}"
        elif not (isinstance(self.views, list) and self.views and all(
                isinstance(v, View) and isinstance(v.camera, str) and is_int(v.appearance)
                for v in self.views)):  # fmt: skip
            problem = f"views must be a non-empty list of views, got {brief(self.views)}"
        elif not is_size(self.image_size):
            problem = (f"image_size must be [W, H] with 1 <= W, H <= {MAX_IMAGE_SIDE}, "
                       f"got {brief(self.image_size)}")  # fmt: skip
        elif (n := self.num_views * self.num_frames * 3 * math.prod(self.image_size)) > (
            MAX_FRAME_BYTES
        ):
            problem = f"V x T x H x W x 3 = {n} bytes of frames, more than {MAX_FRAME_BYTES}"
        elif not isinstance(self.has, dict) or not all(
            k in OPTIONAL_PARTS and isinstance(v, bool) for k, v in self.has.items()
        ):
            problem = (f"has must map parts of {OPTIONAL_PARTS} to true/false, "
                       f"got {brief(self.has)}")  # fmt: skip
        elif not isinstance(self.extra, dict) or not json_depth_ok(self.extra):
            problem = f"extra must be an object nested at most {MAX_JSON_DEPTH} deep"
        if problem:
            raise SampleError(key, META, f"invalid metadata: {problem}")


@dataclass
class Sample:
    """A decoded sample. Arrays are numpy; absent parts are None."""

    key: str
    meta: Meta
    frames: np.ndarray | None = None
    """(V, T, H, W, 3) uint8 RGB."""
    masks: np.ndarray | None = None
    """(V, T, H, W) bool, True = person."""
    pose3d: np.ndarray | None = None
    """(T, J, 3) float32, world mm."""
    pose2d: np.ndarray | None = None
    """(V, T, J, 2) float32, pixels."""
    K: np.ndarray | None = None
    """(V, T, 3, 3) float32 intrinsics."""
    Rt: np.ndarray | None = None
    """(V, 3, 4) float64 extrinsics [R | t], t in mm."""
    det2d: np.ndarray | None = None
    """(V, T, J, 3) float32: detector x, y (pixels) and confidence (0 where nobody was found)."""
    jpegs: list[list[bytes]] | None = field(default=None, repr=False)
    """Encoded frames [view][time] when frame decoding was deferred (``decode_frames=False``)."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (deterministic for the same pixels and quality)."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """JPEG bytes -> (H, W, 3) uint8. Raises ValueError on a corrupt or non-RGB image, and,
    when ``size`` (W, H) is given, on another size: the size is read from the header, so a
    frame of the wrong size (a 13000 x 13000 one included) is refused before it is decoded."""
    return _read_jpeg(data, size, decode=True)


def check_jpeg_header(data: bytes, size: tuple[int, int]) -> None:
    """What :func:`decode_jpeg` checks before it decodes, and nothing more: the format (JPEG)
    and the size (W, H), read from the header only. For frames handed over undecoded (the
    reader's ``frames="jpeg"``, decoded later on a GPU), so a frame claiming another size never
    reaches a decoder. Raises ValueError."""
    _read_jpeg(data, size, decode=False)


def _read_jpeg(data: bytes, size: tuple[int, int] | None, decode: bool) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.format != "JPEG":
                raise ValueError(f"not a JPEG ({im.format})")
            if size is not None and tuple(im.size) != tuple(size):
                raise ValueError(f"size {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} "
                                 "(not decoded)")  # fmt: skip
            if not decode:
                return None
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except Image.DecompressionBombError as e:  # Image.open refuses > 2 x MAX_IMAGE_PIXELS
        raise ValueError(f"header claims a huge image, not decoded ({e})") from None
    except (OSError, SyntaxError) as e:  # PIL signals corrupt data with OSError
        raise ValueError(f"corrupt JPEG ({e})") from None


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) bool -> (..., H, ceil(W/8)) uint8."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`."""
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def encode_sample(sample: Sample, jpeg_quality: int = 90) -> dict[str, bytes | str]:
    """A :class:`Sample` -> the members of one webdataset sample (``__key__`` included).

    Frames are taken from ``sample.jpegs`` if set (already encoded), else encoded from
    ``sample.frames``. The sample is validated first, so a writer can never emit one the
    reader would reject.
    """
    validate(sample)
    m = sample.meta
    out: dict[str, bytes | str] = {"__key__": sample.key, META: m.to_json()}
    if m.has.get("frames"):
        for v in range(m.num_views):
            for t in range(m.num_frames):
                jpg = (
                    sample.jpegs[v][t]
                    if sample.jpegs is not None
                    else encode_jpeg(sample.frames[v, t], jpeg_quality)
                )
                out[frame_member(v, t)] = jpg
    if m.has.get("masks"):
        out[MASKS] = _npy_bytes(pack_masks(sample.masks))
    if m.has.get("pose3d"):
        out[POSE3D] = _npy_bytes(sample.pose3d.astype(np.float32))
    if m.has.get("pose2d"):
        out[POSE2D] = _npy_bytes(sample.pose2d.astype(np.float32))
    if m.has.get("cameras"):
        out[CAM_K] = _npy_bytes(sample.K.astype(np.float32))
        out[CAM_RT] = _npy_bytes(sample.Rt.astype(np.float64))
    if m.has.get("det2d"):
        out[DET2D] = _npy_bytes(sample.det2d.astype(np.float32))
    return out


def _load_npy(key: str, raw: dict[str, bytes], member: str, dtype: type) -> np.ndarray:
    if member not in raw:
        raise SampleError(key, member, "missing member")
    try:
        arr = load_npy(raw[member])
    except ValueError as e:
        raise SampleError(key, member, f"not a plain .npy array ({e})") from None
    if arr.dtype != dtype:
        raise SampleError(key, member, f"dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def member_names(meta: Meta) -> set[str]:
    """The members a sample with ``meta`` carries (besides ``__key__``)."""
    names = {META}
    has = meta.has
    if has.get("frames"):
        names.update(frame_member(v, t) for v in range(meta.num_views)
                     for t in range(meta.num_frames))  # fmt: skip
    parts = {"masks": (MASKS,), "pose3d": (POSE3D,), "pose2d": (POSE2D,),
             "cameras": (CAM_K, CAM_RT), "det2d": (DET2D,)}  # fmt: skip
    for part, members in parts.items():
        if has.get(part):
            names.update(members)
    return names


def check_layout(meta: Meta, views: int, frames: int, image_size: tuple[int, int],
                 has: dict[str, bool], key: str) -> None:  # fmt: skip
    """SampleError (field ``meta.json``) unless ``meta`` has the split's layout: V, T, (W, H)
    and the same parts (so its sample collates with the others)."""
    got = (meta.num_views, meta.num_frames, tuple(meta.image_size))
    want = (views, frames, tuple(image_size))
    parts = sorted(p for p, on in meta.has.items() if on)
    split_parts = sorted(p for p, on in has.items() if on)
    if got != want or parts != split_parts:
        raise SampleError(
            key, META, f"layout V,T,(W,H)={got}, parts {parts}; the split has {want}, {split_parts}"
        )


def decode_sample(raw: dict[str, bytes], decode_frames: bool = True,
                  check_meta: Callable[[Meta], None] | None = None) -> Sample:  # fmt: skip
    """Members of one webdataset sample -> a validated :class:`Sample`.

    Only the members named in the module docstring are read; any other member (a pickle, a
    ``.pth``) is ignored, never decoded. ``check_meta`` is called with the parsed metadata
    before any other member is decoded (a reader refuses a sample of another layout there, at
    no decoding cost). With ``decode_frames=False`` the frames stay JPEG bytes (``jpegs``), each
    header checked as :func:`decode_jpeg` would (format, size). Raises :class:`SampleError`
    naming the key and field.
    """
    key = str(raw.get("__key__", "?"))
    if META not in raw:
        raise SampleError(key, META, "missing member")
    meta = Meta.from_json(key, raw[META])
    if check_meta is not None:
        check_meta(meta)
    V, T = meta.num_views, meta.num_frames
    s = Sample(key=key, meta=meta)
    if meta.has.get("frames"):
        jpegs = []
        for v in range(V):
            row = []
            for t in range(T):
                name = frame_member(v, t)
                if name not in raw:
                    raise SampleError(key, name, "missing member")
                row.append(raw[name])
            jpegs.append(row)
        if decode_frames:
            s.frames = decode_frames_of(key, jpegs, meta.image_size)
        else:  # decoded later (on a GPU): the headers are checked here all the same
            check_frame_headers(key, jpegs, meta.image_size)
            s.jpegs = jpegs
    if meta.has.get("masks"):
        W, H = meta.image_size
        packed = _load_npy(key, raw, MASKS, np.uint8)
        if packed.shape != (V, T, H, (W + 7) // 8):
            raise SampleError(key, MASKS, f"shape {packed.shape} does not fit V={V} T={T} {W}x{H}")
        s.masks = unpack_masks(packed, W)
    if meta.has.get("pose3d"):
        s.pose3d = _load_npy(key, raw, POSE3D, np.float32)
    if meta.has.get("pose2d"):
        s.pose2d = _load_npy(key, raw, POSE2D, np.float32)
    if meta.has.get("cameras"):
        s.K = _load_npy(key, raw, CAM_K, np.float32)
        s.Rt = _load_npy(key, raw, CAM_RT, np.float64)
    if meta.has.get("det2d"):
        s.det2d = _load_npy(key, raw, DET2D, np.float32)
    _validate_parts(s)  # the metadata was checked when parsed
    return s


def decode_frames_of(key: str, jpegs: list[list[bytes]], image_size: tuple[int, int]) -> np.ndarray:
    """[view][time] JPEG bytes -> (V, T, H, W, 3) uint8, checking every frame's size."""
    W, H = image_size
    V, T = len(jpegs), len(jpegs[0])
    out = np.empty((V, T, H, W, 3), dtype=np.uint8)
    for v in range(V):
        for t in range(T):
            try:
                out[v, t] = decode_jpeg(jpegs[v][t], (W, H))
            except ValueError as e:
                raise SampleError(key, frame_member(v, t), str(e)) from None
    return out


def check_frame_headers(key: str, jpegs: list[list[bytes]], image_size: tuple[int, int]) -> None:
    """SampleError naming the frame unless every one of [view][time] is a JPEG whose header
    says ``image_size`` (:func:`check_jpeg_header`; nothing is decoded)."""
    for v, row in enumerate(jpegs):
        for t, data in enumerate(row):
            try:
                check_jpeg_header(data, image_size)
            except ValueError as e:
                raise SampleError(key, frame_member(v, t), str(e)) from None


def _check_array(key: str, name: str, arr: np.ndarray | None, shape: tuple, finite: bool) -> None:
    if arr is None:
        raise SampleError(key, name, "declared in meta.has but absent")
    if arr.shape != shape:
        raise SampleError(key, name, f"shape {arr.shape}, expected {shape}")
    if finite and not np.isfinite(arr).all():
        raise SampleError(key, name, "contains NaN or inf")


def validate(s: Sample) -> None:
    """Check the metadata's fields, then shapes, dtypes and finiteness of every part
    ``s.meta.has`` declares."""
    s.meta.check(s.key)
    _validate_parts(s)


def _validate_parts(s: Sample) -> None:
    m = s.meta
    V, T, J = m.num_views, m.num_frames, NUM_JOINTS
    W, H = m.image_size
    if _KEY_BAD.search(s.key):
        raise SampleError(s.key, "__key__", "only [A-Za-z0-9_-] allowed in a key")
    if m.has.get("frames"):
        if s.jpegs is not None:
            if len(s.jpegs) != V or any(len(row) != T for row in s.jpegs):
                raise SampleError(s.key, "frames", f"expected {V} views x {T} frames of JPEG")
        else:
            _check_array(s.key, "frames", s.frames, (V, T, H, W, 3), finite=False)
            if s.frames.dtype != np.uint8:
                raise SampleError(s.key, "frames", f"dtype {s.frames.dtype}, expected uint8")
    if m.has.get("masks"):
        _check_array(s.key, MASKS, s.masks, (V, T, H, W), finite=False)
    if m.has.get("pose3d"):
        _check_array(s.key, POSE3D, s.pose3d, (T, J, 3), finite=True)
    if m.has.get("pose2d"):
        _check_array(s.key, POSE2D, s.pose2d, (V, T, J, 2), finite=True)
    if m.has.get("cameras"):
        _check_array(s.key, CAM_K, s.K, (V, T, 3, 3), finite=True)
        _check_array(s.key, CAM_RT, s.Rt, (V, 3, 4), finite=True)
    if m.has.get("det2d"):
        _check_array(s.key, DET2D, s.det2d, (V, T, J, 3), finite=True)
        if s.det2d[..., 2].min() < 0 or s.det2d[..., 2].max() > 1:
            raise SampleError(s.key, DET2D, "confidence outside [0, 1]")
