"""`posebert shards verify` and `posebert shards stats`: check shards against their manifest.

verify reads every byte: file sizes and SHA-256 against the manifest, every sample decoded
and validated with the schema, sample counts and actions per shard, no stray or missing
shard file. It reports every problem it finds (shard, key, what) rather than stopping at the
first one.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_shards import augment
from data_shards.detect_shards import detection_summary
from data_shards.manifest import Manifest, ManifestError, ShardInfo, find_splits, sha256_file
from data_shards.schema import SampleError, decode_sample
from data_shards.tario import ShardError, iter_tar_samples


@dataclass(frozen=True)
class Problem:
    """One mismatch between the files and the manifest."""

    split: str
    shard: str
    key: str
    what: str

    def __str__(self) -> str:
        where = f"{self.split}/{self.shard}" + (f" key {self.key}" if self.key else "")
        return f"{where}: {self.what}"


def _check_samples(split: str, path: Path, info: ShardInfo, manifest: Manifest) -> list[Problem]:
    problems, actions, count = [], Counter(), 0
    try:
        for raw in iter_tar_samples(path):
            count += 1
            key = str(raw["__key__"])
            if count == 1 and info.first_key and key != info.first_key:
                problems.append(
                    Problem(split, info.name, key, f"first key, expected {info.first_key}")
                )
            try:
                s = decode_sample(raw)
            except SampleError as e:
                problems.append(Problem(split, info.name, key, f"{e.field}: {e.message}"))
                continue
            m = s.meta
            layout = (m.num_views, m.num_frames, tuple(m.image_size))
            expected = (manifest.views, manifest.frames, tuple(manifest.image_size))
            if layout != expected:
                problems.append(
                    Problem(split, info.name, key, f"(V, T, size) {layout} != manifest {expected}")
                )
            if {k for k, v in m.has.items() if v} != {k for k, v in manifest.has.items() if v}:
                problems.append(
                    Problem(split, info.name, key, f"parts {m.has} != manifest {manifest.has}")
                )
            actions[m.action] += 1
    except ShardError as e:
        problems.append(Problem(split, info.name, "", e.message))
    if count != info.samples:
        problems.append(
            Problem(split, info.name, "", f"{count} samples, manifest says {info.samples}")
        )
    elif dict(actions) != info.actions:
        problems.append(Problem(split, info.name, "", f"actions {dict(actions)} != manifest"))
    return problems


def verify_split(
    split_dir: str | os.PathLike, decode: bool = True, progress: bool = True
) -> list[Problem]:
    """All problems of one split directory (an empty list when it is intact)."""
    split_dir = Path(split_dir)
    split = split_dir.name
    try:
        manifest = Manifest.load(split_dir)
    except ManifestError as e:
        return [Problem(split, "manifest.json", "", str(e))]
    problems = []
    listed = {s.name for s in manifest.shards}
    for stray in sorted(p.name for p in split_dir.glob("*.tar") if p.name not in listed):
        problems.append(Problem(split, stray, "", "shard file not in the manifest"))
    for info in tqdm(manifest.shards, desc=f"verify {split}", unit="shard", disable=not progress):
        path = split_dir / info.name
        if not path.is_file():
            problems.append(Problem(split, info.name, "", "missing shard file"))
            continue
        size = path.stat().st_size
        if size != info.bytes:
            problems.append(
                Problem(split, info.name, "", f"{size} bytes, manifest says {info.bytes}")
            )
        if sha256_file(path) != info.sha256:
            problems.append(Problem(split, info.name, "", "sha256 differs from the manifest"))
        if decode:
            problems.extend(_check_samples(split, path, info, manifest))
    return problems


def verify(root: str | os.PathLike, decode: bool = True, progress: bool = True) -> list[Problem]:
    """Problems of every split under ``root`` (or of ``root`` itself if it is a split)."""
    problems = []
    for split_dir in find_splits(root).values():
        problems.extend(verify_split(split_dir, decode=decode, progress=progress))
    return problems


def stats_table(root: str | os.PathLike) -> str:
    """Counts per split and action (windows and frames), as an aligned text table."""
    splits = {name: Manifest.load(d) for name, d in find_splits(root).items()}
    actions = sorted({a for m in splits.values() for a in m.actions})
    names = list(splits)
    lines = []
    for name, m in splits.items():
        size_mb = sum(s.bytes for s in m.shards) / 1e6
        parts = ",".join(k for k, v in sorted(m.has.items()) if v)
        lines.append(
            f"{name}: {m.samples} windows x {m.views} views x {m.frames} frames "
            f"= {m.samples * m.views * m.frames} frames, {m.image_size[0]}x{m.image_size[1]} px, "
            f"{m.fps:g} fps, {len(m.shards)} shards, {size_mb:.1f} MB; parts: {parts}"
        )
    width = max([len("action")] + [len(a) for a in actions])
    header = f"{'action':<{width}} " + " ".join(f"{n:>8}" for n in names)
    lines += ["", "windows per action", header, "-" * len(header)]
    for a in actions:
        lines.append(
            f"{a:<{width}} " + " ".join(f"{splits[n].actions.get(a, 0):>8}" for n in names)
        )
    lines.append(f"{'total':<{width}} " + " ".join(f"{splits[n].samples:>8}" for n in names))
    lines += [line for m in splits.values() if (line := detection_summary(m))]
    lines += [line for m in splits.values() if (line := augment.summary(m))]
    for name, m in splits.items():  # videos ingested with --detect
        for file, c in (m.source or {}).get("detection", {}).items():
            seen = c.get("detected", 0) + c.get("lost", 0)
            rate = c.get("detected", 0) / seen if seen else 0.0
            lines.append(f"{name}: {file}: person found in {c.get('detected', 0)} of {seen} "
                         f"frames ({rate:.1%}), {c.get('lost', 0)} dropped")  # fmt: skip
    return "\n".join(lines)
