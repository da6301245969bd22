"""Writing one split: webdataset shards with size/count limits, then the manifest.

A split is written into a hidden temporary directory and renamed into place only when every
shard is closed and the manifest is on disk, so an interrupted run never leaves a split that
looks complete, and an existing split is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from data_shards.manifest import Manifest, ShardInfo, fsync_path, sha256_file
from data_shards.schema import Sample, encode_sample

SHARD_PATTERN = "shard-%06d.tar"


@dataclass(frozen=True)
class WriterConfig:
    """Shard size limits and encoding of one split."""

    max_samples: int = 64
    """Samples per shard at most (several shards per split let readers split work)."""
    max_bytes: int = 256 * 1024**2
    """Bytes per shard at most (the limit is checked before each sample)."""
    jpeg_quality: int = 90
    """JPEG quality of frames that are not already encoded."""
    overwrite: bool = False
    """Replace an existing split directory."""

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_bytes < 1024:
            raise ValueError("max_samples must be >= 1 and max_bytes >= 1024")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class _Open:
    count: int = 0
    actions: Counter = field(default_factory=Counter)
    first_key: str = ""


class SplitWriter:
    """Write samples of one split into ``root/split``; use as a context manager.

    Tar headers carry fixed owner, mode and mtime so that the same samples give the same bytes.
    """

    def __init__(self, root: str | os.PathLike, split: str, config: WriterConfig | None = None):
        self.config = config or WriterConfig()
        self.root, self.split = Path(root), split
        self.final = self.root / split
        if (self.final / "manifest.json").exists() and not self.config.overwrite:
            raise FileExistsError(f"{self.final} already holds a split (use --overwrite)")
        self.tmp = self.root / f".{split}.tmp{os.getpid()}"
        self._shards: dict[str, _Open] = {}
        self._layout: tuple | None = None
        self._sink: wds.ShardWriter | None = None

    def __enter__(self) -> SplitWriter:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._sink = wds.ShardWriter(
            str(self.tmp / SHARD_PATTERN),
            maxcount=self.config.max_samples,
            maxsize=self.config.max_bytes,
            verbose=0,
            encoder=False,
            mtime=0,  # an int: a float mtime makes tarfile add a PAX header per member
            user="posebert",
            group="posebert",
            mode=0o644,
        )
        return self

    def write(self, sample: Sample) -> None:
        """Validate, encode and append one sample (all samples must share V, T, size, parts)."""
        m = sample.meta
        layout = (
            m.num_views,
            m.num_frames,
            tuple(m.image_size),
            m.fps,
            tuple(sorted(m.has.items())),
        )
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"sample {sample.key}: layout {layout} differs from {self._layout}")
        obj = encode_sample(sample, self.config.jpeg_quality)
        self._sink.write(obj)  # may roll over to the next shard first
        info = self._shards.setdefault(os.path.basename(self._sink.fname), _Open())
        if info.count == 0:
            info.first_key = sample.key
        info.count += 1
        info.actions[m.action] += 1

    def close(self, source: dict, generator: dict, created_by: str = "") -> Manifest:
        """Close the last shard, checksum every shard, write the manifest, move into place."""
        self._sink.close()
        if self._layout is None:
            raise ValueError(f"split {self.split!r}: no samples were written")
        V, T, size, fps, has = self._layout
        shards = []
        for name, info in sorted(self._shards.items()):
            path = self.tmp / name
            fsync_path(path)
            shards.append(
                ShardInfo(
                    name,
                    info.count,
                    path.stat().st_size,
                    sha256_file(path),
                    dict(sorted(info.actions.items())),
                    info.first_key,
                )
            )
        manifest = Manifest(
            self.split, shards, V, T, size, fps, dict(has), source, generator, created_by=created_by
        )
        manifest.save(self.tmp)
        fsync_path(self.tmp)
        if self.final.exists():
            old = self.root / f".{self.split}.old{os.getpid()}"
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.final)
        fsync_path(self.root)
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # leave nothing that could pass for a split
            if self._sink is not None:
                self._sink.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_split(
    root: str | os.PathLike,
    split: str,
    samples: Iterable[Sample],
    source: dict,
    generator: dict,
    config: WriterConfig | None = None,
) -> Manifest:
    """Write every sample of ``samples`` as split ``split`` under ``root``; returns the manifest."""
    from data_shards import __version__

    with SplitWriter(root, split, config) as writer:
        for sample in samples:
            writer.write(sample)
        return writer.close(source, generator, created_by=f"posebert {__version__}")
