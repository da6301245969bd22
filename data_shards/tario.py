"""Raw sample iteration over one tar shard: members grouped by key, bytes only, nothing decoded.

webdataset names a member ``KEY.EXT`` where KEY is the basename up to its first dot; the
writer stores the members of one sample next to each other. Errors in the tar structure
(a garbled header, a file cut inside a member) raise :class:`ShardError` naming the shard;
a file cut at a member boundary ends early without error, which only the manifest count
reveals (the reader checks it).

Hostile or damaged files are refused before they cost memory or time: a path that is not a
regular file (a FIFO would block ``open`` forever), a sparse member or one larger than
:data:`MAX_MEMBER_BYTES` (a 1 MB shard can claim a 6 GB member), and, when the manifest's
sha256 is given, any file whose bytes do not match it (bit rot: the first pass hashes the
file, so not one sample of a damaged shard is handed out).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

MAX_MEMBER_BYTES = 64 * 1024**2
"""The largest member read (a frame, an array, the metadata); larger claims are refused."""


class ShardError(IOError):
    """A shard that cannot be read to its end. ``shard`` names it."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"shard {shard}: {message}")
        self.shard, self.message = shard, message


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/KEY.v00.t000.jpg' -> ('dir/KEY', 'v00.t000.jpg'); no dot -> (name, '')."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext if dot else ""


def check_shard_file(path: str | os.PathLike, sha256: str | None = None) -> None:
    """Refuse (:class:`ShardError`) a path that is not a regular file, or whose bytes do not
    hash to ``sha256`` (when given)."""
    shard = os.path.basename(os.fspath(path))
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ShardError(shard, f"cannot be opened ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise ShardError(shard, "not a regular file (a FIFO, device or directory); not read")
    if sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != sha256:
            raise ShardError(shard, "sha256 does not match the manifest (damaged or modified); "
                                    "no sample of it is read")  # fmt: skip


def _kind(info: tarfile.TarInfo) -> str:
    kinds = (("symbolic link", info.issym()), ("hard link", info.islnk()),
             ("directory", info.isdir()), ("FIFO", info.isfifo()),
             ("device", info.isdev()))  # fmt: skip
    return next((name for name, yes in kinds if yes), "a special member")


class _Hashing:
    """A binary file that feeds every byte read through it to ``digest``."""

    def __init__(self, f: BinaryIO, digest: Any):
        self.f, self.digest = f, digest

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return data


def iter_tar_samples(path: str | os.PathLike, skip: int = 0, sha256: str | None = None,
                     wanted: Callable[[str], bool] | None = None, digest: Any = None,
                     keep: Callable[[int], bool] | None = None,
                     others: list[str] | None = None,
                     ) -> Iterator[dict[str, bytes]]:  # fmt: skip
    """Yield the samples of a tar file as ``{'__key__': key, ext: bytes, ...}`` in file order.

    The first ``skip`` samples are passed over without reading their member data; members whose
    extension ``wanted`` rejects are passed over the same way (their names still count). Only
    regular files are read (links, devices and directories are ignored: a shard is data, not a
    file tree to recreate). Raises :class:`ShardError` on a structurally broken tar, a path that
    is not a regular file, a sparse or oversized member, or a sha256 mismatch (see the module
    docstring). ``digest`` (a ``hashlib`` object), when given, is fed every byte of the file as
    it is read: a caller reading every sample gets the file's hash from the same single pass
    (complete once the generator is exhausted without error). ``keep``, when given, is asked
    for each sample's index in the file (from 0) past ``skip``: samples it rejects are passed
    over unread like skipped ones. ``others``, when given, receives a line for each member that
    is not a regular file (name and kind), passed over as always.
    """
    shard = os.path.basename(os.fspath(path))
    check_shard_file(path, sha256)
    index, current, key, names, keys = 0, None, None, set(), set()
    try:
        with open(path, "rb") as f, tarfile.open(
            fileobj=(src := f if digest is None else _Hashing(f, digest)), mode="r|"
        ) as tar:
            for info in tar:
                if not info.isfile():
                    if others is not None:
                        others.append(f"member {info.name!r}: {_kind(info)}, not read")
                    continue
                if info.issparse() or info.size > MAX_MEMBER_BYTES:
                    what = "a sparse member" if info.issparse() else f"{info.size} bytes"
                    limit = f"at most {MAX_MEMBER_BYTES} plain bytes are read"
                    raise ShardError(shard, f"member {info.name!r} claims {what} ({limit})")
                k, ext = split_member_name(info.name)
                if k != key:
                    if current is not None:
                        yield current
                    if key is not None:
                        index += 1
                    if k in keys:  # a sample written twice: delivering it again would repeat it
                        raise ShardError(shard, f"sample key {k!r} appears twice")
                    key, names = k, set()
                    keys.add(k)
                    wanted_sample = index >= skip and (keep is None or keep(index))
                    current = {"__key__": k} if wanted_sample else None
                if current is None or not ext:
                    continue
                if ext in names:
                    raise ShardError(shard, f"member {info.name!r} appears twice")
                names.add(ext)
                if wanted is not None and not wanted(ext):
                    continue  # passed over unread
                data = tar.extractfile(info)
                current[ext] = data.read() if data is not None else b""
            if current is not None:
                yield current
            while digest is not None and src.read(1 << 20):
                pass  # tarfile stops reading at the end-of-archive blocks
    except tarfile.TarError as e:
        raise ShardError(
            shard, f"broken tar after sample {index} ({type(e).__name__}: {e})"
        ) from None
    except EOFError as e:
        raise ShardError(shard, f"file ends inside a member after sample {index} ({e})") from None
