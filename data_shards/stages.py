"""The stages of the streaming reader: epoch plan, node/worker split, tar read, shuffle,
resume skip, safe decode and batching (composed by :mod:`data_shards.read`)."""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice, repeat
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from data_shards.manifest import Manifest
from data_shards.schema import Meta, Sample, SampleError, check_layout, decode_sample, is_member
from data_shards.tario import iter_tar_samples
from data_shards.transforms import Decoded
from data_shards.untrusted import one_line

if TYPE_CHECKING:
    from data_shards.resplit import Remaining

log = logging.getLogger(__name__)


class ReaderError(RuntimeError):
    """The reader cannot produce the stream asked for (too few samples, a bad state)."""


class ErrorBudgetExceeded(ReaderError):
    """More bad samples / shards than ``ReaderConfig.error_budget`` allows."""


class ShardRef(NamedTuple):  # one shard of the manifest(s)
    path: str
    samples: int
    first_key: str
    sha256: str = ""


class ShardSlice(NamedTuple):
    """Samples [start, stop) of one shard; ``offset`` is the global position of its sample 0."""

    path: str
    first_key: str
    offset: int
    start: int
    stop: int
    sha256: str = ""
    """The manifest's hash of the file: checked before any sample is read ("" skips it)."""
    count: int = -1
    """The manifest's sample count of the whole shard (-1: unknown). A slice that reads to it
    checks that the file ends there: a count below the real one is an error, not obeyed."""
    skip: tuple[tuple[int, int], ...] = ()
    """Runs [a, b) of shard samples inside [start, stop) not to read: the part of an epoch that
    ranks of an earlier world size consumed (:mod:`data_shards.resplit`)."""


class BatchSizes(Sequence[int]):
    """``full`` batches of ``size``, then one of ``rest`` if it is not 0: the batches of one
    worker, without a list (the counts come from a manifest, read before any shard is opened;
    a list would allocate 8 bytes for every batch it claims)."""

    def __init__(self, size: int, full: int, rest: int = 0):
        self.size, self.full, self.rest = size, full, rest

    def __len__(self) -> int:
        return self.full + (self.rest > 0)

    def __getitem__(self, i):  # an int, or a slice (step 1: another BatchSizes)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            stop = max(start, stop)
            full = max(0, min(stop, self.full) - start)
            return BatchSizes(self.size, full, self.rest if start <= self.full < stop else 0)
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"batch {i} of {n}")
        return self.size if j < self.full else self.rest

    def __iter__(self) -> Iterator[int]:
        yield from repeat(self.size, self.full)
        if self.rest:
            yield self.rest

    def __eq__(self, other: object) -> bool:
        if isinstance(other, BatchSizes):
            return (self.size if self.full else 0, self.full, self.rest) == (
                other.size if other.full else 0, other.full, other.rest)  # fmt: skip
        return isinstance(other, (list, tuple)) and len(other) == len(self) and all(
            a == b for a, b in zip(self, other, strict=True))  # fmt: skip

    def __repr__(self) -> str:
        return f"BatchSizes(size={self.size}, full={self.full}, rest={self.rest})"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which samples of the epoch's global sequence each rank and worker reads."""

    total: int
    world_size: int
    rank: int
    batch_size: int
    workers: int
    drop_last: bool

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        r = self.rank if rank is None else rank
        if self.drop_last:  # same number of full batches on every rank
            per = self.total // self.world_size // self.batch_size * self.batch_size
            return r * per, (r + 1) * per
        base, extra = divmod(self.total, self.world_size)
        lo = r * base + min(r, extra)
        return lo, lo + base + (r < extra)

    def worker_range(self, worker: int, rank: int | None = None) -> tuple[int, int]:
        lo, hi = self.rank_range(rank)
        batches = -(-(hi - lo) // self.batch_size)
        base, extra = divmod(batches, self.workers)
        first = worker * base + min(worker, extra)
        last = first + base + (worker < extra)
        return min(hi, lo + first * self.batch_size), min(hi, lo + last * self.batch_size)

    def batch_sizes(self, worker: int, rank: int | None = None) -> BatchSizes:
        lo, hi = self.worker_range(worker, rank)
        full, rest = divmod(hi - lo, self.batch_size)
        return BatchSizes(self.batch_size, full, rest)

    def check(self) -> None:
        """Raise ReaderError unless every rank and worker gets a batch (the last rank and the
        last worker get the fewest)."""
        r, w = self.world_size - 1, self.workers - 1
        if not self.batch_sizes(w, r):
            raise ReaderError(
                f"{self.total} samples are too few for {self.world_size} ranks x {self.workers} "
                f"workers x batches of {self.batch_size}: rank {r} worker {w} would get no batch "
                f"(drop_last={self.drop_last}); use fewer workers or a smaller batch"
            )


@dataclasses.dataclass
class WorkerContext:
    """Mutable state of one logical worker's stream, shared by its stages."""

    worker: int
    batch_sizes: Sequence[int]
    resume_cursor: int = 0
    """Samples that already left the shuffle stage before this stream (replayed, not decoded)."""
    batches_done: int = 0
    budget: int = 10
    errors_so_far: int = 0
    """Budgeted errors of this rank's epoch before this stream (so a worker can stop early)."""
    cursor: int = 0
    quiet: bool = False
    pending: Counter = dataclasses.field(default_factory=Counter)
    ring: deque = dataclasses.field(default_factory=deque)

    def report(self, what: str, shard: str, key: str, message: str, lost: int = 0) -> None:
        """Count and log one skipped 'sample' or 'shard' remainder (silent while replaying)."""
        if self.quiet:  # already counted before the state was saved
            return
        self.pending[f"bad_{what}s"] += 1
        if lost:
            self.pending["lost_samples"] += lost
        shard, key, message = (one_line(str(t)) for t in (shard, key, message))  # keys: from tars
        log.warning("skipped %s: shard %s, sample %s: %s", what, shard, key, message)
        self.errors_so_far += 1
        if self.errors_so_far > self.budget:
            raise ErrorBudgetExceeded(
                f"{self.errors_so_far} bad samples/shards exceed error_budget={self.budget} "
                f"(last: shard {shard}, sample {key}: {message})"
            )

    def take_pending(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


def plan_epoch(
    shards: list[ShardRef], seed: int, epoch: int, shuffle: bool
) -> Iterator[ShardSlice]:
    """The epoch's shard list, shuffled by (seed, epoch), with global sample offsets."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)) if shuffle else None
    offset = 0
    for i in range(len(shards)) if order is None else order.tolist():
        s = shards[i]
        yield ShardSlice(s.path, s.first_key, offset, 0, s.samples, s.sha256, s.samples)
        offset += s.samples


def _clip(
    slices: Iterable[ShardSlice], lo: int, hi: int, remaining: Remaining | None
) -> Iterator[ShardSlice]:
    """The parts of ``slices`` inside positions [lo, hi) of the sequence being split: the
    epoch's, or with ``remaining`` the positions an earlier world size left unread (lo and hi
    count those; the slices keep epoch positions and carry the consumed runs as ``skip``)."""
    if remaining is not None:
        lo, hi = remaining.epoch_range(lo, hi)
    for s in slices:
        start, stop = max(s.start, lo - s.offset), min(s.stop, hi - s.offset)
        if start >= stop:
            continue
        skip = remaining.holes(s.offset + start, s.offset + stop, s.offset) if remaining else ()
        if sum(b - a for a, b in skip) < stop - start:  # else: nothing of it left to read
            yield s._replace(start=start, stop=stop, skip=skip)


def split_by_node(
    slices: Iterable[ShardSlice], plan: Plan, remaining: Remaining | None = None
) -> Iterator[ShardSlice]:
    """Keep the parts of shards inside this rank's contiguous sample range."""
    yield from _clip(slices, *plan.rank_range(), remaining)


def split_by_worker(
    slices: Iterable[ShardSlice], plan: Plan, worker: int, remaining: Remaining | None = None
) -> Iterator[ShardSlice]:
    """Keep the parts inside this (logical) worker's batch-aligned sub-range."""
    yield from _clip(slices, *plan.worker_range(worker), remaining)


def _kept(s: ShardSlice) -> Iterator[int]:
    """Shard indices of the samples of ``s`` to read, in file order."""
    at = s.start
    for a, b in (*s.skip, (s.stop, s.stop)):
        yield from range(at, a)
        at = b


def _keeper(skip: tuple[tuple[int, int], ...]) -> Callable[[int], bool] | None:
    if not skip:
        return None
    starts = [a for a, _ in skip]

    def keep(i: int) -> bool:
        j = bisect.bisect_right(starts, i) - 1
        return j < 0 or i >= skip[j][1]

    return keep


def read_shards(slices: Iterable[ShardSlice], ctx: WorkerContext) -> Iterator[dict]:
    """Raw member dicts of each slice (nothing decoded), checked against the manifest counts.

    A shard that is missing, broken or shorter than its manifest count loses only the samples
    it cannot deliver (one counted error); a cut at a 512-byte boundary is caught by the count.
    A shard holding more samples than its manifest count is one counted error too (the samples
    past the count are not read): the slice that reads to the count looks one sample further,
    before it hands out its last sample (a consumer that has its planned samples stops pulling,
    so a check after that sample would never run: without a shuffle buffer, the last shard of
    each worker went unchecked).
    """
    for s in slices:
        name, key, problem = os.path.basename(s.path), "-", ""
        want, got, last = s.stop - s.start - sum(b - a for a, b in s.skip), 0, None
        first = s.start == 0 and (not s.skip or s.skip[0][0] > 0)  # sample 0 is read
        indices = _kept(s)
        try:
            samples = iter_tar_samples(s.path, skip=s.start, sha256=s.sha256 or None,
                                       wanted=is_member, keep=_keeper(s.skip))  # fmt: skip
            with contextlib.closing(samples):
                for raw in samples:
                    if got == 0 and first and s.first_key and raw["__key__"] != s.first_key:
                        problem = f"first key {raw['__key__']!r}, manifest says {s.first_key!r}"
                        break
                    raw["__shard__"], raw["__index__"] = name, s.offset + next(indices)
                    got, key = got + 1, raw["__key__"]
                    if got == want:
                        last = raw  # handed out below, once the end of the file is checked
                        break
                    yield raw
                if last is not None and s.stop == s.count and next(samples, None) is not None:
                    problem = f"holds more samples than the manifest's {s.count}; the rest unread"
        except OSError as e:  # ShardError (broken tar) is an OSError, so is a missing file
            problem = f"{type(e).__name__}: {e}"
        if got < want:
            where = f"after {key}" if got else "(first)"
            problem = problem or f"file ends after {s.start + got} samples, manifest: >= {s.stop}"
            ctx.report("shard", name, where, f"{problem}; {want - got} samples lost", want - got)
        elif problem:
            ctx.report("shard", name, f"after {key}", problem)
        if last is not None:
            yield last


def shuffle(raws: Iterable[dict], bufsize: int, seed: list[int]) -> Iterator[dict]:
    """Seeded buffer shuffle of encoded samples (bufsize 1: pass-through)."""
    if bufsize <= 1:
        yield from raws
        return
    rng = random.Random(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    buf: list[dict] = []
    for raw in raws:
        if len(buf) < bufsize:
            buf.append(raw)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = raw
    rng.shuffle(buf)
    yield from buf


def skip_to_cursor(raws: Iterable[dict], ctx: WorkerContext) -> Iterator[dict]:
    """Count samples leaving the shuffle (the cursor); drop, undecoded, those before the resume
    cursor. Errors met while replaying were counted before the state was saved: stay quiet."""
    it = iter(raws)
    ctx.ring = deque(maxlen=2 * max(ctx.batch_sizes[:1], default=1))  # the first is the largest
    while True:
        ctx.quiet = ctx.cursor < ctx.resume_cursor
        raw = next(it, None)
        ctx.quiet = False
        if raw is None:
            return
        ctx.cursor += 1
        ctx.ring.append(raw)
        if ctx.cursor > ctx.resume_cursor:
            yield raw


def decode_checked(raw: dict, layout: Manifest, frames: str) -> Sample:
    """schema.decode_sample, refusing a sample that does not fit the split's layout (so it
    collates with the others) before anything but its metadata is decoded. Raises
    SampleError."""
    key = str(raw.get("__key__", "?"))

    def fits(meta: Meta) -> None:
        check_layout(meta, layout.views, layout.frames, layout.image_size, layout.has, key)

    return decode_sample(raw, decode_frames=frames == "decode", check_meta=fits)


def safe_decode(raws: Iterable[dict], ctx: WorkerContext, decode: Callable) -> Iterator[Decoded]:
    """Decode each sample with the schema's decoders only; a bad one is skipped and counted."""
    for raw in raws:
        try:
            sample = decode(raw)
        except Exception as e:  # untrusted bytes through PIL/numpy/json: any failure rejects
            detail = f"{e.field}: {e.message}" if isinstance(e, SampleError) else repr(e)
            ctx.report("sample", raw["__shard__"], raw["__key__"], detail)
            continue
        yield Decoded(raw["__index__"], sample)


def batch_samples(
    items: Iterable[Decoded],
    ctx: WorkerContext,
    collate: Callable[[list[Decoded]], dict],
    redecode: Callable[[dict], Decoded | None],
    pad: bool,
) -> Iterator[dict]:
    """Group into the planned batches; each carries worker, cursor and errors since the last.

    ``pad``: a batch left short by rejected samples is filled with repeats of the good samples
    among the worker's last 2 x batch raw samples (the same in a replay), those not already in
    the batch first (a repeat in the same batch is a false negative), so batch counts stay equal.
    """
    items = iter(items)
    for size in ctx.batch_sizes[ctx.batches_done :]:
        got = list(islice(items, size))
        padded = 0
        if len(got) < size and pad:
            taken = {d.index for d in got}
            fill = [d for d in map(redecode, ctx.ring) if d is not None]
            fill.sort(key=lambda d: d.index in taken)  # stable: ring order otherwise
            if not fill:
                raise ReaderError(f"worker {ctx.worker}: no readable sample left to fill a batch")
            padded = size - len(got)
            got += [fill[i % len(fill)] for i in range(padded)]
        batch = collate(got) if got else {"keys": []}  # empty: bookkeeping only, not handed out
        batch.update(worker=ctx.worker, cursor=ctx.cursor, errors=ctx.take_pending(), padded=padded)
        yield batch
