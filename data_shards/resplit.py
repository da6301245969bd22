"""The rest of an epoch after a change of world size: which samples earlier ranks consumed.

A run checkpointed on W ranks and resumed on W' != W ranks (or another number of loader
workers) cannot continue the saved cursors: each cursor counts samples out of one worker's
shuffle buffer over that worker's range of the epoch. But the stream is a pure function of the
plan (:mod:`data_shards.read`), so the samples each old worker handed out can be recomputed
without reading a byte: run the same seeded :func:`data_shards.stages.shuffle` over the epoch
positions of the worker's range and take the first ``cursor`` of them. The epoch then continues
as a *segment*: the positions nobody consumed, in epoch order, split across the new ranks and
workers exactly like a whole epoch (contiguous rank ranges, batch-aligned worker ranges, a
shuffle buffer per worker, seeded with the segment's number too). Nothing is repeated, nothing
consumed is lost; with ``drop_last`` the segment, like any epoch, leaves out a tail shorter than
one batch per rank (counted by the reader).

A segment's layout goes into the reader state's ``history`` (world size, workers and every
rank's cursors per earlier segment of the epoch: a few integers per worker, never a list of
samples), so a run may change its world size again within the same epoch.

Exact as long as the consumed part of the epoch lost no sample to a damaged shard (a lost sample
shifts that worker's shuffle); such losses were counted and named when they happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any

import numpy as np

from data_shards.stages import Plan, shuffle

MAX_SEGMENTS = 64
"""World-size changes within one epoch a reader state may record."""


class Remaining:
    """Positions [0, total) of an epoch minus sorted, disjoint runs ``excluded`` ([a, b) rows).

    Position v of the segment (0 <= v < len(self)) is the v-th remaining epoch position.
    """

    def __init__(self, total: int, excluded: np.ndarray | None = None):
        runs = np.zeros((0, 2), np.int64) if excluded is None else np.asarray(excluded, np.int64)
        self.total, self.excluded = total, runs.reshape(-1, 2)
        edges = np.concatenate([[0], self.excluded.ravel(), [total]])
        lo, hi = edges[0::2], edges[1::2]
        keep = hi > lo
        self.kept_lo, self.kept_hi = lo[keep], hi[keep]
        self.starts = np.concatenate([[0], np.cumsum(self.kept_hi - self.kept_lo)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def without(self, positions: Sequence[int]) -> Remaining:
        """These positions minus ``positions`` (remaining ones, any order)."""
        p = np.unique(np.asarray(positions, np.int64))
        if len(p) == 0:
            return self
        breaks = np.flatnonzero(np.diff(p) != 1) + 1
        lo = p[np.concatenate([[0], breaks])]
        hi = p[np.concatenate([breaks - 1, [len(p) - 1]])] + 1
        runs = np.concatenate([self.excluded, np.stack([lo, hi], axis=1)])
        runs = runs[np.argsort(runs[:, 0], kind="stable")]
        merged: list[list[int]] = []
        for a, b in runs.tolist():
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return Remaining(self.total, np.array(merged, np.int64))

    def position(self, v: int) -> int:
        """The epoch position of segment position ``v``."""
        j = int(np.searchsorted(self.starts, v, side="right")) - 1
        return int(self.kept_lo[j] + (v - self.starts[j]))

    def epoch_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The epoch positions [a, b) whose remaining ones are segment positions [lo, hi)."""
        if lo >= hi:
            return 0, 0
        return self.position(lo), self.position(hi - 1) + 1

    def holes(self, lo: int, hi: int, base: int = 0) -> tuple[tuple[int, int], ...]:
        """The excluded runs inside epoch positions [lo, hi), clipped, minus ``base``."""
        ex = self.excluded
        inside = ex[(ex[:, 1] > lo) & (ex[:, 0] < hi)]
        return tuple((int(max(a, lo)) - base, int(min(b, hi)) - base) for a, b in inside.tolist())

    def positions(self, lo: int, hi: int) -> list[int]:
        """Epoch positions of segment positions [lo, hi), in order."""
        if lo >= hi:
            return []
        j0 = int(np.searchsorted(self.starts, lo, side="right")) - 1
        j1 = int(np.searchsorted(self.starts, hi - 1, side="right")) - 1
        parts = []
        for j in range(j0, j1 + 1):
            a = self.kept_lo[j] + max(0, lo - self.starts[j])
            b = self.kept_lo[j] + min(self.starts[j + 1], hi) - self.starts[j]
            parts.append(np.arange(a, b))
        return np.concatenate(parts).tolist()


def shuffle_seed(seed: int, epoch: int, lo: int, segment: int) -> list[int]:
    """The shuffle buffer's seed of the worker whose range starts at ``lo`` (segment 0 keeps
    the seed of a run that never changed its world size)."""
    return [seed, epoch, lo] if segment == 0 else [seed, epoch, lo, segment]


def consumed(
    remaining: Remaining,
    plan: Plan,
    cursors: Sequence[Sequence[int]],
    seed: int,
    epoch: int,
    bufsize: int,
    segment: int,
) -> list[int]:
    """Epoch positions handed out by every (rank, worker) of ``plan`` over ``remaining``, each
    worker up to its cursor: the same shuffle replayed on positions instead of samples."""
    out: list[int] = []
    for rank, worker_cursors in enumerate(cursors):
        for worker, cursor in enumerate(worker_cursors):
            lo, hi = plan.worker_range(worker, rank)
            stream = shuffle(
                remaining.positions(lo, hi), bufsize, shuffle_seed(seed, epoch, lo, segment)
            )
            out += islice(stream, cursor)
    return out


def remaining_after(
    history: Sequence[Mapping[str, Any]],
    total: int,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    drop_last: bool,
    bufsize: int,
) -> Remaining:
    """What is left of the epoch after the segments in ``history`` (each: ``world_size``,
    ``workers``, ``cursors`` per rank and worker), replayed in order. A history that cannot
    come from this epoch (wrong types, a cursor beyond its worker's samples) raises
    ValueError naming the field."""
    _need(isinstance(history, list) and len(history) <= MAX_SEGMENTS, "history",
          f"a list of at most {MAX_SEGMENTS} segments")  # fmt: skip
    remaining = Remaining(total)
    for segment, seg in enumerate(history):
        plan = _check_segment(seg, f"history[{segment}]", len(remaining), batch_size, drop_last)
        remaining = remaining.without(
            consumed(remaining, plan, seg["cursors"], seed, epoch, bufsize, segment)
        )
    return remaining


def _need(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field}: expected {expected}")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _check_segment(seg: Any, field: str, total: int, batch_size: int, drop_last: bool) -> Plan:
    _need(isinstance(seg, Mapping) and {"world_size", "workers", "cursors"} <= set(seg), field,
          "a mapping with world_size, workers and cursors")  # fmt: skip
    world, workers, cursors = seg["world_size"], seg["workers"], seg["cursors"]
    _need(_is_int(world, 1, 1 << 20), f"{field}.world_size", "an integer >= 1")
    _need(_is_int(workers, 1, 4096), f"{field}.workers", "an integer in 1..4096")
    plan = Plan(total, world, 0, batch_size, workers, drop_last)
    _need(isinstance(cursors, list) and len(cursors) == world, f"{field}.cursors",
          f"{world} lists (one a rank)")  # fmt: skip
    for rank, per_worker in enumerate(cursors):
        _need(isinstance(per_worker, list) and len(per_worker) == workers,
              f"{field}.cursors[{rank}]", f"{workers} cursors (one a worker)")  # fmt: skip
        for worker, cursor in enumerate(per_worker):
            lo, hi = plan.worker_range(worker, rank)
            _need(_is_int(cursor, 0, hi - lo), f"{field}.cursors[{rank}][{worker}]",
                  f"0..{hi - lo} (the samples of that worker)")  # fmt: skip
    return plan
