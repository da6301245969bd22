"""Writing one split: webdataset shards with size/count limits, then the manifest.

A split is written into a hidden temporary directory and renamed into place only when every
shard is closed and the manifest is on disk, so an interrupted run never leaves a split that
looks complete, and an existing split is replaced only with ``overwrite=True``. On any failure
(a full disk included) the temporary directory is removed and the first error is raised, naming
the file it was writing; an existing split is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from data_shards.manifest import (
    MAX_SHARD_SAMPLES,
    Manifest,
    ShardInfo,
    cleanup_on_error,
    fsync_path,
    name_the_file,
    sha256_file,
)
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
        if not 1 <= self.max_samples <= MAX_SHARD_SAMPLES or self.max_bytes < 1024:
            raise ValueError(f"max_samples must be in [1, {MAX_SHARD_SAMPLES}] (what readers "
                             "accept) and max_bytes >= 1024")  # fmt: skip
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
    Sample keys must be unique within the split (a repeated key would be one sample twice). A
    block left without :meth:`close` (an error, or none) removes what it wrote.
    """

    def __init__(self, root: str | os.PathLike, split: str, config: WriterConfig | None = None):
        self.config = config or WriterConfig()
        self.root, self.split = Path(root), split
        self.final = self.root / split
        if (self.final / "manifest.json").exists() and not self.config.overwrite:
            raise FileExistsError(f"{self.final} already holds a split (use --overwrite)")
        self.tmp = self.root / f".{split}.tmp{os.getpid()}"
        self._shards: dict[str, _Open] = {}
        self._keys: set[str] = set()
        self._layout: tuple | None = None
        self._sink: wds.ShardWriter | None = None
        self._files: dict[str, BinaryIO] = {}  # shard path -> its open file (ours to close)
        self._done = False

    def _open_shard(self, path: str) -> BinaryIO:
        """ShardWriter's opener: the file is ours, so it is closed even when a failed write
        leaves the tar stream unable to close it."""
        f = open(path, "wb")
        self._files[path] = f
        return f

    def _shard_done(self, path: str) -> None:
        """ShardWriter's post hook, after a shard's tar stream is closed: close the file (the
        last buffered bytes are written here, so a full disk can fail here too)."""
        f = self._files.pop(path, None)
        if f is not None:
            f.close()

    def __enter__(self) -> SplitWriter:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        with cleanup_on_error(self.tmp):  # __exit__ only runs once __enter__ has returned
            self._sink = self._open_sink()
        return self

    def _open_sink(self) -> wds.ShardWriter:
        return wds.ShardWriter(
            str(self.tmp / SHARD_PATTERN),
            maxcount=self.config.max_samples,
            maxsize=self.config.max_bytes,
            post=self._shard_done,
            verbose=0,
            opener=self._open_shard,
            encoder=False,
            mtime=0,  # an int: a float mtime makes tarfile add a PAX header per member
            user="posebert",
            group="posebert",
            mode=0o644,
        )

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
        if sample.key in self._keys:
            raise ValueError(f"split {self.split!r}: sample key {sample.key!r} written twice")
        obj = encode_sample(sample, self.config.jpeg_quality)
        self._sink.write(obj)  # may roll over to the next shard first
        self._keys.add(sample.key)
        info = self._shards.setdefault(os.path.basename(self._sink.fname), _Open())
        if info.count == 0:
            info.first_key = sample.key
        info.count += 1
        info.actions[m.action] += 1

    def close(self, source: dict, generator: dict, created_by: str = "") -> Manifest:
        """Close the last shard, checksum every shard, write the manifest, move into place."""
        if self._layout is None:
            raise ValueError(f"split {self.split!r}: no samples were written")
        self._sink.close()
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
        self._move_into_place()
        self._done = True
        return manifest

    def _move_into_place(self) -> None:
        """Rename the finished temporary directory to the split, keeping the old split until
        the new one is in place (and putting it back if that rename fails)."""
        if self.final.exists():
            old = self.root / f".{self.split}.old{os.getpid()}"
            os.replace(self.final, old)
            try:
                os.replace(self.tmp, self.final)
            except BaseException:
                os.replace(old, self.final)
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new split is complete: not an error
        else:
            os.replace(self.tmp, self.final)
        fsync_path(self.root)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        # Failed, or left without close(): leave nothing that could pass for a split, and let
        # the first error through (closing the sink after a failed write fails again: a full
        # disk, or a ShardWriter already closed once).
        with contextlib.suppress(Exception):
            if self._sink is not None and hasattr(self._sink, "tarstream"):
                self._sink.close()
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
        name_the_file(exc, self._sink.fname if self._sink is not None else None)


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
