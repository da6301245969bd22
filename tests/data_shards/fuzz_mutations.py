"""The mutations of the shard fuzzer (:mod:`fuzz_shards`): a real split written by the project's
writer, and seeded, reproducible ways to damage it.

A mutation is a small JSON spec ``{"id", "kind", "variant", "rehash", "seed", ...}``: the same
spec always makes the same bytes (:func:`apply`). ``rehash`` says what the manifest is told:
``none`` (bit rot behind the manifest's back: the sha256 no longer matches), ``hash`` (sha256 and
bytes rewritten to the damaged files, so the tar parser and the decoders are reached: a faulty
writer, or a deliberate tamperer) or ``count`` (sample counts, first keys and actions too).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_shards.schema import Meta, Sample, View
from data_shards.skeleton import NUM_JOINTS
from data_shards.tario import split_member_name
from data_shards.write import WriterConfig, write_split

KEYS = [f"k{i:04d}" for i in range(6)]
PER_SHARD = 2
BLOCK = 512


def make_sample(i: int) -> Sample:
    """Sample ``KEYS[i]``: 2 views x 2 frames of 24 x 16 px and every optional part."""
    rng = np.random.default_rng(i)
    V, T, W, H = 2, 2, 24, 16
    meta = Meta(source="fuzz", clip=f"clip{i // 3}", action=("walk", "run")[i % 2], fps=50.0,
                frames=[10 * i + t for t in range(T)],
                views=[View(camera=f"cam{v}", appearance=i) for v in range(V)],
                image_size=(W, H), subject="s0",
                has={p: True for p in ("frames", "masks", "pose3d", "pose2d", "cameras",
                                       "det2d")})  # fmt: skip
    yy, xx = np.mgrid[0:H, 0:W]
    base = rng.integers(0, 200, size=(V, T, 1, 1, 3))
    det = rng.uniform(0, W, size=(V, T, NUM_JOINTS, 3)).astype(np.float32)
    det[..., 2] = rng.uniform(0, 1, size=(V, T, NUM_JOINTS))
    Rt = np.concatenate([np.tile(np.eye(3), (V, 1, 1)), rng.normal(size=(V, 3, 1)) * 1e3], -1)
    return Sample(
        key=KEYS[i], meta=meta,
        frames=np.clip(base + 2 * (xx + yy)[None, None, :, :, None], 0, 255).astype(np.uint8),
        masks=rng.random((V, T, H, W)) > 0.5,
        pose3d=rng.normal(size=(T, NUM_JOINTS, 3)).astype(np.float32) * 500,
        pose2d=rng.uniform(0, W, size=(V, T, NUM_JOINTS, 2)).astype(np.float32),
        K=np.tile(np.eye(3, dtype=np.float32) * 20, (V, T, 1, 1)), Rt=Rt, det2d=det,
    )  # fmt: skip


def build_pristine(root: str | os.PathLike) -> Path:
    """Write the fuzzer's split with the project's writer: ``root/train``, 3 shards of 2."""
    samples = [make_sample(i) for i in range(len(KEYS))]
    write_split(root, "train", samples, {"fuzz": True}, {}, WriterConfig(max_samples=PER_SHARD))
    return Path(root) / "train"


@dataclass
class Member:
    name: str
    header: int
    """Offset of its (first) header block in the shard."""
    data: int
    size: int


class Pristine:
    """The untouched split, in memory: shard bytes, their members, the manifest."""

    def __init__(self, split: str | os.PathLike):
        self.split = Path(split)
        self.manifest = json.loads((self.split / "manifest.json").read_text())
        self.names = [s["name"] for s in self.manifest["shards"]]
        self.shards = {n: (self.split / n).read_bytes() for n in self.names}
        self.members = {n: members_of(data) for n, data in self.shards.items()}

    def restore(self, split: Path) -> None:
        """Make ``split`` hold exactly the pristine files (whatever a mutation left there)."""
        if split.is_symlink() or split.is_file():
            split.unlink()
        elif split.exists():
            shutil.rmtree(split)
        split.mkdir(parents=True)
        for name, data in self.shards.items():
            (split / name).write_bytes(data)
        shutil.copyfile(self.split / "manifest.json", split / "manifest.json")


def members_of(data: bytes) -> list[Member]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [Member(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def pack(items: list[tuple[str, bytes] | tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
         fmt: int = tarfile.PAX_FORMAT) -> bytes:  # fmt: skip
    """A tar of ``items``: (name, bytes) regular files like the writer's, or TarInfo (special)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for item in items:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
                continue
            info, data = item
            if not isinstance(info, tarfile.TarInfo):
                info = regular(info, len(data))
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def regular(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uname, info.gname = size, 0o644, "posebert", "posebert"
    return info


def items_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def fix_checksum(buf: bytearray, at: int) -> None:
    """Recompute the checksum of the header block at ``at`` (so the parser trusts it)."""
    header = buf[at : at + BLOCK]
    total = sum(header[:148]) + 8 * 32 + sum(header[156:])
    buf[at + 148 : at + 156] = f"{total:06o}".encode() + b"\0 "


def count_samples(data: bytes) -> tuple[int, str, dict[str, int] | None]:
    """(samples, first key, actions or None) as a reader groups the members of ``data``; a tar
    that breaks midway counts what came before."""
    groups: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for m in tar:
                if not m.isfile() or m.size > 1 << 20:
                    continue
                key, ext = split_member_name(m.name)
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = tar.extractfile(m).read()
    except Exception:  # a broken tar: what was grouped so far
        pass
    actions: Counter = Counter()
    for _, g in groups:
        try:
            actions[json.loads(g["meta.json"])["action"]] += 1
        except Exception:  # no readable action: the manifest gets none
            return len(groups), groups[0][0] if groups else "", None
    return len(groups), groups[0][0] if groups else "", dict(sorted(actions.items()))


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.path, "w"))


def payload(marker: str) -> bytes:
    """A pickle that creates ``marker`` when unpickled."""
    return pickle.dumps(_Marker(marker))


def object_npy(marker: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


class Edit:
    """A mutation in progress: shard bytes, the manifest, extra files; :meth:`write` commits."""

    def __init__(self, p: Pristine, rng: random.Random, marker: str):
        self.p, self.rng, self.marker = p, rng, marker
        self.shards = dict(p.shards)
        self.manifest = copy.deepcopy(p.manifest)
        self.manifest_raw: bytes | None = None
        self.changed: set[str] = set()
        self.fs: list = []  # (path under the split, callable(path)) run after writing
        self.weak: set[str] = set()  # keys whose content may change undetectably

    def shard(self) -> str:
        return self.rng.choice(self.p.names)

    def member(self, shard: str) -> Member:
        return self.rng.choice(self.p.members[shard])

    def items(self, shard: str) -> list[tuple[str, bytes]]:
        return items_of(self.p.shards[shard])

    def set(self, shard: str, data: bytes) -> None:
        self.shards[shard] = data
        self.changed.add(shard)

    def write(self, split: Path, rehash: str) -> None:
        for name in self.changed:
            if name in self.shards:
                (split / name).write_bytes(self.shards[name])
        by_name = {s["name"]: s for s in self.manifest.get("shards", [])
                   if isinstance(s, dict) and isinstance(s.get("name"), str)}  # fmt: skip
        for name in sorted(self.changed) if rehash != "none" else ():
            entry, data = by_name.get(name), self.shards.get(name)
            if entry is None or data is None:
                continue
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
            if rehash == "count":
                entry["samples"], entry["first_key"], actions = count_samples(data)
                entry.pop("actions", None)
                if actions is not None:
                    entry["actions"] = actions
        if rehash == "count" and "samples" in self.manifest:
            self.manifest["samples"] = sum(s["samples"] for s in by_name.values())
        raw = self.manifest_raw
        if raw is None:
            raw = (json.dumps(self.manifest, indent=1) + "\n").encode()
        (split / "manifest.json").write_bytes(raw)
        for rel, make in self.fs:
            make(split / rel)
