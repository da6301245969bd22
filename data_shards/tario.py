"""Raw sample iteration over one tar shard: members grouped by key, bytes only, nothing decoded.

webdataset names a member ``KEY.EXT`` where KEY is the basename up to its first dot; the
writer stores the members of one sample next to each other. Errors in the tar structure
(a garbled header, a file cut inside a member) raise :class:`ShardError` naming the shard;
a file cut at a member boundary ends early without error, which only the manifest count
reveals (the reader checks it).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator


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


def iter_tar_samples(path: str | os.PathLike, skip: int = 0) -> Iterator[dict[str, bytes]]:
    """Yield the samples of a tar file as ``{'__key__': key, ext: bytes, ...}`` in file order.

    The first ``skip`` samples are passed over without reading their member data. Only
    regular files are read (links, devices and directories are ignored: a shard is data, not a
    file tree to recreate). Raises :class:`ShardError` on a structurally broken tar.
    """
    shard = os.path.basename(os.fspath(path))
    index, current, key = 0, None, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member_name(info.name)
                if k != key:
                    if current is not None:
                        yield current
                    if key is not None:
                        index += 1
                    key = k
                    current = {"__key__": k} if index >= skip else None
                if current is None or not ext:
                    continue
                if ext in current:
                    raise ShardError(shard, f"member {info.name!r} appears twice")
                data = tar.extractfile(info)
                current[ext] = data.read() if data is not None else b""
            if current is not None:
                yield current
    except tarfile.TarError as e:
        raise ShardError(
            shard, f"broken tar after sample {index} ({type(e).__name__}: {e})"
        ) from None
    except EOFError as e:
        raise ShardError(shard, f"file ends inside a member after sample {index} ({e})") from None
