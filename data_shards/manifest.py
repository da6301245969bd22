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

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_shards.schema import SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


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
        """Read and check ``directory/manifest.json``; ManifestError names what is wrong."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{path}: no manifest (is this a split directory?)")
        try:
            d = json.loads(path.read_text())
            d.pop("samples", None)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            d["image_size"] = tuple(d["image_size"])
            m = cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise ManifestError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
        if m.schema_version != SCHEMA_VERSION:
            raise ManifestError(
                f"{path}: schema version {m.schema_version}, this reader knows {SCHEMA_VERSION}"
            )
        names = [s.name for s in m.shards]
        if len(set(names)) != len(names) or any("/" in n or n.startswith(".") for n in names):
            raise ManifestError(f"{path}: shard names must be unique plain file names")
        return m


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename over ``path``, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


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
