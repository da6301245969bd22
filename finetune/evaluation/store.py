"""A checksummed file store: files written atomically with a sha256 beside them, and read only
after the bytes match it (the embedding cache, FAISS indexes).

A cached file can also carry the key it was computed for (the encoder and split fingerprints,
...) inside it, as a first line ``posebert-cache-key KEY``: a checksum only says the bytes are
the ones written, not that they belong at this path; a file copied or swapped from another cache
entry (with its checksum) verifies, and only the key tells the model's rows from another
encoder's.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from data_shards.manifest import atomic_write_bytes

KEY_MAGIC = b"posebert-cache-key "
_KEY_MAX = 4096  # bytes of the key line read before giving up


class ChecksumError(ValueError):
    """A cached file does not match the sha256 beside it (tampered or corrupted): not read.
    The one-line message names the file and says how to rebuild it."""


class CacheKeyError(ChecksumError):
    """A verified cached file holds another key than the one asked for (moved or swapped)."""


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _short(key: str) -> str:
    """A key for a message: 64-digit hashes cut to 12."""
    return re.sub(r"[0-9a-f]{64}", lambda m: m.group()[:12], key)


def save_verified(path: str | os.PathLike, data: bytes, key: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically with ``path.sha256`` beside it; with ``key``, the
    key line first (:func:`open_verified` checks it).

    Order matters for a run killed at any point: the old checksum is removed first, then the
    data replaced (temp + fsync + rename), then the new checksum written the same way. Every
    crash state is "no checksum" (a cache miss, rebuilt) or a consistent pair; a mismatching
    pair can only come from tampering or corruption, and :func:`open_verified` refuses it.
    A failed write (a full disk) raises an ``OSError`` naming the file; the entry is then a
    cache miss.
    """
    path = Path(path)
    if key is not None:
        if "\n" in key or len(key.encode()) > _KEY_MAX:
            raise ValueError(f"cache key for {path}: one line of at most {_KEY_MAX} bytes")
        data = KEY_MAGIC + key.encode() + b"\n" + data
    digest = hashlib.sha256(data).hexdigest()
    target = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        atomic_write_bytes(path, data)
        target = checksum_path(path)
        atomic_write_bytes(target, f"{digest}  {path.name}\n".encode())
    except OSError as e:  # the write does not say which file
        raise OSError(e.errno, e.strerror or str(e), str(target)) from None
    return path


def is_complete(path: str | os.PathLike) -> bool:
    """True when both the file and its checksum exist (a finished write, maybe tampered)."""
    path = Path(path)
    return path.is_file() and checksum_path(path).is_file()


def stored_key(path: str | os.PathLike) -> str | None:
    """The key line of a cached file (None: written without one, or unreadable); read from
    its first bytes only, not verified (:func:`open_verified` verifies)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(KEY_MAGIC) + _KEY_MAX + 1)
    except OSError:
        return None
    if not head.startswith(KEY_MAGIC) or b"\n" not in head:
        return None
    return head[len(KEY_MAGIC) : head.index(b"\n")].decode(errors="replace")


def open_verified(path: str | os.PathLike, key: str | None = None) -> bytes:
    """The bytes of ``path`` after checking them against ``path.sha256``; raises
    :class:`ChecksumError` (nothing parsed) on a mismatch or a missing checksum. A key line is
    removed from what is returned; with ``key``, it must be there and equal ``key``
    (:class:`CacheKeyError` otherwise)."""
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
    found = None
    if data.startswith(KEY_MAGIC) and b"\n" in data[: len(KEY_MAGIC) + _KEY_MAX + 1]:
        end = data.index(b"\n")
        found, data = data[len(KEY_MAGIC) : end].decode(errors="replace"), data[end + 1 :]
    if key is not None and found != key:
        held = "no cache key (an older format)" if found is None else f"key {_short(found)}"
        raise CacheKeyError(
            f"{path}: holds {held}, this entry is {_short(key)} (moved or swapped from another "
            "cache entry?); delete it (and its .sha256) to rebuild"
        )
    return data
