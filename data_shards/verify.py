"""`posebert shards verify` and `posebert shards stats`: check shards against their manifest.

verify reads every byte, once: file sizes and SHA-256 against the manifest, every sample
decoded and validated with the schema, sample counts and actions per shard, no stray or missing
shard file, no key twice in a split, no member the schema does not know (a ``.pyd`` or
``.pickle`` that a default ``webdataset`` decode would unpickle) or the sample does not declare.
It reports every problem it finds, one line each (shard, key, what), rather than stopping at the
first one: a decoder failing in a way the schema did not foresee is reported like the rest.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_shards import augment
from data_shards.detect_shards import detection_summary
from data_shards.manifest import Manifest, ManifestError, ShardInfo, find_splits, sha256_file
from data_shards.schema import (
    Meta,
    Sample,
    SampleError,
    check_layout,
    decode_sample,
    is_member,
    member_names,
)
from data_shards.tario import ShardError, iter_tar_samples
from data_shards.untrusted import one_line

MAX_PROBLEM_CHARS = 400
"""A problem's description is cut to this length: one readable line whatever a file holds."""


@dataclass(frozen=True)
class Problem:
    """One mismatch between the files and the manifest."""

    split: str
    shard: str
    key: str
    what: str

    def __post_init__(self) -> None:
        for name in ("shard", "key", "what"):
            object.__setattr__(self, name, one_line(getattr(self, name), MAX_PROBLEM_CHARS))

    def __str__(self) -> str:
        where = f"{self.split}/{self.shard}" + (f" key {self.key}" if self.key else "")
        return f"{where}: {self.what}"


def _decode(raw: dict, manifest: Manifest) -> tuple[Sample | None, str]:
    """(sample, "") or (None, what is wrong): the split's layout is checked from the metadata
    before any frame is decoded, and no decoder failure escapes."""
    key = str(raw["__key__"])

    def fits(meta: Meta) -> None:
        m = manifest
        check_layout(meta, m.views, m.frames, m.image_size, m.has, key)

    try:
        return decode_sample(raw, check_meta=fits), ""
    except SampleError as e:
        return None, f"{e.field}: {e.message}"
    except Exception as e:  # a failure the schema did not foresee must not end the report
        return None, f"cannot be decoded ({type(e).__name__}: {e})"


def _member_problems(raw: dict, meta: Meta | None) -> list[str]:
    """Members no reader reads: unknown to the schema (a ``.pyd`` or ``.pickle`` that
    ``webdataset``'s default ``.decode()`` would unpickle), or known but not declared by the
    sample's ``meta.json``."""
    found = set(raw) - {"__key__"}
    unknown = sorted(ext for ext in found if not is_member(ext))
    out = [f"member .{ext}: not in the schema (never read; a default webdataset decode would "
           f"unpickle .pyd/.pickle)" for ext in unknown]  # fmt: skip
    if meta is not None:
        stray = sorted(found - set(unknown) - member_names(meta))
        out += [f"member .{ext}: not declared by meta.json (has, views, frames)" for ext in stray]
    return out


def _check_samples(split: str, path: Path, info: ShardInfo, manifest: Manifest,
                   seen: dict[str, str]) -> tuple[list[Problem], str | None]:  # fmt: skip
    """Problems of one shard's samples (every one decoded), and the file's sha256 from the same
    read (None when the tar could not be read to its end). ``seen``: key -> shard, of the split
    so far."""
    problems, actions, count, bad, digest = [], Counter(), 0, 0, hashlib.sha256()

    def problem(key: str, what: str) -> None:
        problems.append(Problem(split, info.name, key, what))

    others: list[str] = []
    try:
        for raw in iter_tar_samples(path, digest=digest, others=others):
            count += 1
            key = str(raw["__key__"])
            if count == 1 and info.first_key and key != info.first_key:
                problem(key, f"first key, expected {info.first_key}")
            if key in seen:
                problem(key, f"key repeated (also in {seen[key]})")
            seen.setdefault(key, info.name)
            s, what = _decode(raw, manifest)
            if what:
                problem(key, what)
                bad += 1
            for what in _member_problems(raw, s.meta if s is not None else None):
                problem(key, what)
            if s is not None:
                actions[s.meta.action] += 1
    except ShardError as e:
        problem("", e.message)
        digest = None
    for what in others:  # readers pass them over; a shard the project wrote has none
        problem("", what)
    if count != info.samples:
        problem("", f"{count} samples, manifest says {info.samples}")
    elif not bad and dict(actions) != info.actions:
        problem("", f"actions {dict(actions)} != manifest")
    return problems, digest.hexdigest() if digest is not None else None


def verify_split(
    split_dir: str | os.PathLike, decode: bool = True, progress: bool = True
) -> list[Problem]:
    """All problems of one split directory (an empty list when it is intact).

    Each shard is read once: with ``decode``, its sha256 is computed while its samples are.
    """
    split_dir = Path(split_dir)
    split = split_dir.name
    try:
        manifest = Manifest.load(split_dir)
    except ManifestError as e:
        return [Problem(split, "manifest.json", "", str(e))]
    problems, seen = [], {}
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
        sha = None
        if decode:
            found, sha = _check_samples(split, path, info, manifest, seen)
            problems.extend(found)
        if (sha or sha256_file(path)) != info.sha256:
            problems.append(Problem(split, info.name, "", "sha256 differs from the manifest"))
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
