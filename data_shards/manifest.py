"""Split manifests: the list of shards of one split with their sample counts and checksums.

Layout on disk::

    ROOT/
      train/manifest.json  train/shard-000000.tar  train/shard-000001.tar ...
      val/manifest.json    val/shard-000000.tar ...
      test/...

The manifest is the source of truth for a reader: a shard missing from it is never read, and
a shard that yields fewer samples than its manifest count was truncated (webdataset and GNU tar
both accept a tar cut at a 512-byte boundary without complaint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_shards.schema import MAX_IMAGE_SIDE, OPTIONAL_PARTS, SCHEMA_VERSION, is_size
from data_shards.untrusted import MAX_JSON_DEPTH, brief, is_int, is_number, json_depth_ok

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_MANIFEST_BYTES = 64 * 1024**2
"""A manifest.json larger than this is not read (the writer's take about 300 bytes per shard,
so this is some 200,000 shards)."""
MAX_SHARD_SAMPLES = 2**16
"""The most samples one shard may list (the writer's default is 64; webdataset shards hold a
few thousand). A reader plans the epoch from the listed counts before it opens a shard: a
count of 10**12 must not become the plan, and a shard that ends short of its count costs one
empty bookkeeping batch per missing batch (about 1 s for 2**16 at batch size 1)."""


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent."""


@dataclass
class ShardInfo:
    """One shard file of a split."""

    name: str
    """File name, relative to the split directory."""
    samples: int
    """Number of samples (windows) in the shard."""
    bytes: int
    """File size."""
    sha256: str
    """Hex SHA-256 of the file."""
    actions: dict[str, int] = field(default_factory=dict)
    """Samples per action label."""
    first_key: str = ""
    """Key of the shard's first sample (a cheap identity check for readers)."""


@dataclass
class Manifest:
    """``manifest.json`` of one split."""

    split: str
    shards: list[ShardInfo]
    views: int
    """V: views per sample."""
    frames: int
    """T: frames per sample."""
    image_size: tuple[int, int]
    """(W, H) of every frame."""
    fps: float
    has: dict[str, bool]
    """Optional parts every sample carries (see schema.OPTIONAL_PARTS)."""
    source: dict = field(default_factory=dict)
    """Where the data came from (data source, clips, files)."""
    generator: dict = field(default_factory=dict)
    """Settings of the command that wrote the split (reproducibility)."""
    schema_version: int = SCHEMA_VERSION
    created_by: str = ""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def actions(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for s in self.shards:
            total.update(s.actions)
        return dict(sorted(total.items()))

    def to_json(self) -> str:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["samples"] = self.samples
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/manifest.json`` atomically (temp file, fsync, rename)."""
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Read and check ``directory/manifest.json``: every field's type and range, so that a
        bad manifest is one ManifestError naming the file and the field, never a traceback."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (is this a split directory?)")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not read")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:  # json nests one C call per bracket
            raise ManifestError(f"{path}: unreadable manifest (nested too deeply)") from None
        except ValueError as e:
            raise ManifestError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
        problem = _check_manifest(d)
        if problem:
            raise ManifestError(f"{path}: {problem}")
        d.pop("samples", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        d["image_size"] = tuple(d["image_size"])
        return cls(**d)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _field_problems(d: dict, fields: dict[str, tuple[Callable[[Any], bool], str]],
                    required: tuple[str, ...], where: str) -> str:  # fmt: skip
    """The first field of ``d`` that is missing, unknown or fails its check, as 'FIELD: what'."""
    for name in d:
        if name not in fields:
            return f"{where}{brief(name)}: unknown field"
    for name in required:
        if name not in d:
            return f"{where}{name}: missing"
    for name, (ok, want) in fields.items():
        if name in d and not ok(d[name]):
            return f"{where}{name}: expected {want}, got {brief(d[name])}"
    return ""


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and bool(name) and name.isprintable() and "/" not in name
            and "\\" not in name and not name.startswith("."))  # fmt: skip


def _counts(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and is_int(v) and v >= 0 for k, v in value.items()
    )


def _json_object(value: object) -> bool:
    return isinstance(value, dict) and json_depth_ok(value)


_SHARD_FIELDS = {
    "name": (_plain_name, "a plain file name (printable, no '/', not hidden)"),
    "samples": (lambda v: is_int(v) and 1 <= v <= MAX_SHARD_SAMPLES,
                f"a whole number in [1, {MAX_SHARD_SAMPLES}] (no writer lists an empty shard)"),
    "bytes": (lambda v: is_int(v) and v >= 0, "a whole number >= 0"),
    "sha256": (lambda v: isinstance(v, str) and _SHA256.match(v) is not None,
               "64 lowercase hex digits"),
    "actions": (_counts, "an object of action: count >= 0"),
    "first_key": (lambda v: isinstance(v, str) and v.isprintable(), "a string"),
}  # fmt: skip
_FIELDS = {
    "split": (lambda v: isinstance(v, str) and v.isprintable(), "a string"),
    "shards": (lambda v: isinstance(v, list), "a list of shards"),
    "views": (lambda v: is_int(v) and v >= 1, "a whole number >= 1"),
    "frames": (lambda v: is_int(v) and v >= 1, "a whole number >= 1"),
    "image_size": (is_size, f"[W, H], each in [1, {MAX_IMAGE_SIDE}]"),
    "fps": (lambda v: is_number(v) and 0 < v < math.inf, "a number > 0"),
    "has": (lambda v: isinstance(v, dict) and all(k in OPTIONAL_PARTS and isinstance(on, bool)
                                                  for k, on in v.items()),
            f"an object of part: true/false, parts of {OPTIONAL_PARTS}"),
    "source": (_json_object, f"an object nested at most {MAX_JSON_DEPTH} deep"),
    "generator": (_json_object, f"an object nested at most {MAX_JSON_DEPTH} deep"),
    "schema_version": (is_int, "a whole number"),
    "created_by": (lambda v: isinstance(v, str), "a string"),
    "samples": (lambda v: is_int(v) and v >= 0, "a whole number >= 0"),
}  # fmt: skip


def _check_manifest(d: object) -> str:
    """What is wrong with a parsed manifest, as 'FIELD: problem' ("" when nothing is)."""
    if not isinstance(d, dict):
        return f"expected a JSON object, got {brief(d)}"
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        return f"schema version {brief(version)}, this reader knows {SCHEMA_VERSION}"
    required = ("split", "shards", "views", "frames", "image_size", "fps", "has")
    if problem := _field_problems(d, _FIELDS, required, ""):
        return problem
    names, first_keys = set(), {}
    for i, shard in enumerate(d["shards"]):
        where = f"shards[{i}]."
        if not isinstance(shard, dict):
            return f"shards[{i}]: expected an object, got {brief(shard)}"
        if problem := _field_problems(shard, _SHARD_FIELDS, ("name", "samples", "bytes",
                                                             "sha256"), where):  # fmt: skip
            return problem
        if shard["name"] in names:
            return f"{where}name: {brief(shard['name'])} listed twice"
        names.add(shard["name"])
        key = shard.get("first_key", "")
        if key and key in first_keys:  # a copy of a shard under another name: its samples twice
            return (f"{where}first_key: {brief(key)} also begins {brief(first_keys[key])} "
                    "(the same samples listed twice?)")  # fmt: skip
        first_keys[key] = shard["name"]
        counted = sum(shard.get("actions", {}).values())
        if shard.get("actions") and counted != shard["samples"]:
            return f"{where}actions: add up to {counted}, not samples={shard['samples']}"
    total = sum(shard["samples"] for shard in d["shards"])
    if d.get("samples", total) != total:
        return f"samples: {d['samples']}, but the shards hold {total}"
    return ""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename over ``path``, fsync the directory.

    On any failure (a full disk, an interrupt) the temp file is removed, ``path`` keeps what it
    held, and the first error is raised, naming ``path`` when it names no file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with cleanup_on_error(tmp, name=path):
        write_file(tmp, data)
        os.replace(tmp, path)
    fsync_path(path.parent)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write and fsync ``data`` as ``path``. If a write fails, the file is still closed but the
    first error is the one raised (closing flushes again, and fails again, on a full disk)."""
    f = open(path, "wb")
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    f.close()


@contextlib.contextmanager
def cleanup_on_error(*paths: str | os.PathLike, name: str | os.PathLike | None = None
                     ) -> Iterator[None]:  # fmt: skip
    """Remove ``paths`` (files or directories, temporary ones) if the block fails, then re-raise
    its error, naming ``name`` (default: the first path) if it names no file
    (:func:`name_the_file`)."""
    try:
        yield
    except BaseException as e:
        for p in paths:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        name_the_file(e, name if name is not None else paths[0])
        raise


def name_the_file(error: BaseException, path: str | os.PathLike | None) -> None:
    """Give an OSError from the system (errno set) that names no file ``path``, so its one
    line says where: "[Errno 28] No space left on device: 'out/.train.tmp7/shard-000003.tar'"
    (a write or fsync on an open file names none)."""
    if isinstance(error, OSError) and error.errno and error.filename is None and path:
        error.filename = os.fspath(path)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_splits(root: str | os.PathLike) -> dict[str, Path]:
    """Split name -> directory for every subdirectory of ``root`` holding a manifest.

    ``root`` may also be a split directory itself.
    """
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return {root.name: root}
    if not root.is_dir():
        raise ManifestError(f"{root}: no such directory")
    found = {p.name: p for p in sorted(root.iterdir()) if (p / MANIFEST_NAME).is_file()}
    if not found:
        raise ManifestError(f"{root}: no split directory with a {MANIFEST_NAME} inside")
    order = {s: i for i, s in enumerate(SPLITS)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))
