"""Embeddings of a split through a verified cache, shared by several ranks.

Files are keyed by the embedder's fingerprint and the split manifest's sha256, written
atomically with a sha256 file beside them (:mod:`finetune.evaluation.store`), and verified
before they are read. The key (:func:`cache_key`) is also stored inside each file and checked on
every read: a file moved or swapped from another entry (the random-init row's rows in the
model's folder) is refused, not silently used; a file without a key (an older format) is
rebuilt. Several ranks meet at barriers (torch.distributed) or, without a process group, in the
cache folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from finetune.evaluation.embed import (
    Embeddings,
    FrameEmbedder,
    _ranks,
    as_embedder,
    embed_split,
    embed_split_part,
    merge_parts,
    split_fingerprint,
)
from finetune.evaluation.store import (
    checksum_path,
    is_complete,
    open_verified,
    save_verified,
    stored_key,
)


def cache_key(embedder: FrameEmbedder, split_dir: str | os.PathLike, normalize: bool = True
              ) -> str:  # fmt: skip
    """What a cache file's rows depend on: the embedder's and the split's full fingerprints and
    the normalisation (stored inside the file, checked on every read)."""
    return (f"embeddings embedder={embedder.fingerprint} split={split_fingerprint(split_dir)} "
            f"l2norm={bool(normalize)}")  # fmt: skip


def _is_cached(path: Path, key: str | None = None) -> bool:
    """A complete entry in the current format, holding ``key`` when given (an entry without a
    key line, from an older version, is rebuilt)."""
    found = stored_key(path) if is_complete(path) else None
    return found is not None and (key is None or found == key)


def embed_split_cached(encoder: torch.nn.Module | FrameEmbedder, split_dir: str | os.PathLike,
                       cache_dir: str | os.PathLike, batch_size: int = 8,
                       **kwargs) -> tuple[Embeddings, Path]:  # fmt: skip
    """:func:`embed_split` through the cache; returns the embeddings and their cache folder.

    The folder is ``cache_dir/<embedder fingerprint[:16]>-<manifest sha256[:16]>``; a complete
    file is verified before it is read (a mismatch raises :class:`ChecksumError`, a file that
    holds another entry's key :class:`CacheKeyError`), a missing or half-written one (no
    checksum) is rebuilt. Keywords: ``normalize`` (L2, default True),
    ``rank``/``world_size``, ``timeout_s`` (default 1800) and those of :func:`embed_split`.

    Several ranks (torch.distributed initialised, or explicit ``rank``/``world_size``; every
    rank calls this): each embeds its share and writes it as a verified part file in the
    folder; rank 0 merges the parts in manifest order, writes the one cache file and removes
    the parts; every rank then reads that file, so all return the same rows as one process.
    With a process group the ranks meet at barriers; without one, in the folder (rank 0 waits
    for the parts, the others for the cache file; up to ``timeout_s``; one run per cache folder
    at a time). The folder must be one that every rank sees (one machine, or a shared file
    system). A part left by a killed run is reused (same embedder, split, batch size and world
    size: the same rows).
    """
    path, emb = _ensure_cached(encoder, split_dir, cache_dir, batch_size, **kwargs)
    if emb is None:
        key = cache_key(as_embedder(encoder), split_dir, kwargs.get("normalize", True))
        emb = Embeddings.load(path, key)
    return emb, path.parent


def cache_embeddings(encoder: torch.nn.Module | FrameEmbedder, split_dir: str | os.PathLike,
                     cache_dir: str | os.PathLike, batch_size: int = 8, **kwargs) -> Path:
    """:func:`embed_split_cached` for ranks that will not use the rows: the same collective
    (every rank calls it), returns the cache file's path and loads nothing (read it with
    ``Embeddings.load(path, cache_key(...))``)."""
    return _ensure_cached(encoder, split_dir, cache_dir, batch_size, **kwargs)[0]


def _ensure_cached(encoder, split_dir, cache_dir, batch_size: int = 8, normalize: bool = True,
                   rank: int | None = None, world_size: int | None = None,
                   timeout_s: float = 1800.0,
                   **kwargs) -> tuple[Path, Embeddings | None]:  # fmt: skip
    """The cache file's path, and the rows when this process has just embedded all of them."""
    embedder = as_embedder(encoder)
    folder = Path(cache_dir) / f"{embedder.fingerprint[:16]}-{split_fingerprint(split_dir)[:16]}"
    path = folder / f"embeddings{'-l2norm' if normalize else ''}.npz"
    rank, world_size, grouped = _ranks(rank, world_size)
    key = cache_key(embedder, split_dir, normalize)
    hit = _is_cached(path)
    if grouped:  # every rank takes the branch rank 0 takes
        from pretrain.engine import dist

        hit = dist.broadcast_object(hit)
    if hit:
        return path, None
    if world_size == 1:
        emb = embed_split(embedder, split_dir, batch_size, normalize, rank=0, world_size=1,
                          **kwargs)  # fmt: skip
        _save_cache(emb, path, embedder, split_dir, normalize, key)
        return path, emb
    _build_from_parts(embedder, split_dir, path, rank, world_size, grouped, batch_size,
                      normalize, timeout_s, key, **kwargs)  # fmt: skip
    return path, None


def _save_cache(emb: Embeddings, path: Path, embedder: FrameEmbedder, split_dir, normalize: bool,
                key: str) -> None:  # fmt: skip
    emb.save(path, key)
    info = dict(embedder=embedder.fingerprint, split=str(split_dir), rows=len(emb),
                dim=int(emb.vectors.shape[1]), normalize=normalize)  # fmt: skip
    save_verified(path.parent / "info.json", json.dumps(info, indent=1).encode())


def _part_path(path: Path, rank: int, world_size: int, batch_size: int) -> Path:
    return path.parent / "parts" / f"{path.stem}.b{batch_size}.rank{rank}-of-{world_size}.npz"


def _build_from_parts(embedder: FrameEmbedder, split_dir, path: Path, rank: int,
                      world_size: int, grouped: bool, batch_size: int, normalize: bool,
                      timeout_s: float, key: str, **kwargs) -> None:  # fmt: skip
    """Each rank's share -> a verified part file; rank 0 merges them into ``path``."""
    parts = [_part_path(path, r, world_size, batch_size) for r in range(world_size)]
    part_keys = [f"{key} part={p.name}" for p in parts]
    if not _is_cached(parts[rank], part_keys[rank]):
        emb, samples = embed_split_part(embedder, split_dir, rank, world_size, batch_size,
                                        normalize, **kwargs)  # fmt: skip
        buf = io.BytesIO()
        np.savez(buf, samples=samples, **emb.columns())
        del emb
        save_verified(parts[rank], buf.getvalue(), part_keys[rank])
        del buf
    wanted = list(zip(parts, part_keys, strict=True))
    _meet(grouped, wanted if rank == 0 else [], timeout_s)  # every part written
    if rank == 0:
        merged = merge_parts([_read_part(p, k) for p, k in wanted])
        _save_cache(merged, path, embedder, split_dir, normalize, key)
        del merged
        for p in parts:  # after the cache file is complete: a kill before this leaves parts
            checksum_path(p).unlink(missing_ok=True)
            p.unlink(missing_ok=True)
    _meet(grouped, [(path, key)], timeout_s)  # the cache file written


def _read_part(path: Path, key: str) -> tuple[Embeddings, np.ndarray]:
    with np.load(io.BytesIO(open_verified(path, key)), allow_pickle=False) as z:
        emb = Embeddings(**{f.name: z[f.name] for f in dataclasses.fields(Embeddings)})
        return emb, z["samples"]


def _meet(grouped: bool, paths: list[tuple[Path, str]], timeout_s: float,
          poll_s: float = 0.2) -> None:  # fmt: skip
    """A barrier: torch.distributed's, or (no process group) wait until ``paths`` are complete
    (written with their checksum) and hold their key (a stale file of an older run does not
    count)."""
    if grouped:
        from pretrain.engine import dist

        dist.barrier()
        return
    deadline = time.monotonic() + timeout_s
    while not all(_is_cached(p, k) for p, k in paths):
        if time.monotonic() > deadline:
            missing = [p.name for p, k in paths if not _is_cached(p, k)]
            raise TimeoutError(f"waited {timeout_s:g} s for {', '.join(missing)}")
        time.sleep(poll_s)
