"""A checksummed file store: files written atomically with a sha256 beside them, and read only
after the bytes match it (the embedding cache, FAISS indexes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from data_shards.manifest import atomic_write_bytes


class ChecksumError(RuntimeError):
    """A cached file does not match the sha256 beside it (tampered or corrupted): not read."""


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_verified(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically with ``path.sha256`` beside it.

    Order matters for a run killed at any point: the old checksum is removed first, then the
    data replaced (temp + fsync + rename), then the new checksum written the same way. Every
    crash state is "no checksum" (a cache miss, rebuilt) or a consistent pair; a mismatching
    pair can only come from tampering or corruption, and :func:`open_verified` refuses it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()
    checksum_path(path).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_bytes(checksum_path(path), f"{digest}  {path.name}\n".encode())
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """True when both the file and its checksum exist (a finished write, maybe tampered)."""
    path = Path(path)
    return path.is_file() and checksum_path(path).is_file()


def open_verified(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` after checking them against ``path.sha256``; raises
    :class:`ChecksumError` (nothing parsed) on a mismatch or a missing checksum."""
    path = Path(path)
    sums = checksum_path(path)
    if not sums.is_file():
        raise ChecksumError(f"{path}: no checksum file {sums.name}; refusing to read it")
    expected = sums.read_text().split()[0] if sums.read_text().strip() else ""
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual[:16]}... does not match {sums.name} ({expected[:16]}...); "
            "the file was modified or corrupted; delete it (and its .sha256) to rebuild"
        )
    return data
