"""Streaming reader: shards -> seeded, resumable, exactly-once batches of torch tensors.

A visible list of stages (STYLE.md habit 9, :mod:`data_shards.stages`), composed with
``webdataset.DataPipeline`` in every loader worker::

    plan_epoch -> split_by_node -> split_by_worker -> read_shards -> shuffle -> skip_to_cursor
               -> safe_decode -> apply_transforms -> batch_samples

Splitting is by samples, not shards (webdataset's split_by_node gives ranks unequal counts and
DDP hangs at the end of the epoch): the epoch's shard order, shuffled by (seed,
epoch), with the manifest's counts, is one sequence of N samples; rank r takes a contiguous
range, worker w a batch-aligned sub-range of it, and reads only the shards overlapping it. With
``drop_last`` every rank gets the same number of full batches (like
``DistributedSampler(drop_last=True)``); samples lost to bad input are made up by repeating good
ones at the end of the worker's stream (``batch["padded"]``), so no rank takes fewer steps.

The stream is a pure function of (seed, epoch, rank, world_size, num_workers, batch size,
shuffle settings). Each batch carries its logical worker and that worker's cursor (samples out
of the shuffle stage, rejected ones included); ``ShardReader.load_state_dict`` makes each worker
replay its tar stream and shuffle, without decoding, up to its cursor. rank and world_size are
passed in: workers never read the environment (spawned workers without RANK would all read
everything).

Bad input is skipped with one warning naming shard and key, counted in ``ShardReader.errors``,
and costs nothing else; past ``error_budget`` the reader raises. Members are decoded only by
``schema.decode_sample`` (JPEG, .npy without pickle, JSON): nothing is ever unpickled, and
webdataset's default ``.decode()`` is never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import resource
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.manifest import MANIFEST_NAME, Manifest
from data_shards.resplit import Remaining, remaining_after, shuffle_seed
from data_shards.stages import (
    ErrorBudgetExceeded,
    Plan,
    ReaderError,
    ShardRef,
    WorkerContext,
    batch_samples,
    decode_checked,
    plan_epoch,
    read_shards,
    safe_decode,
    shuffle,
    skip_to_cursor,
    split_by_node,
    split_by_worker,
)
from data_shards.transforms import Decoded, Transform, apply_transforms, collate
from data_shards.untrusted import one_line

log = logging.getLogger(__name__)

STATE_VERSION = 1
FRAME_MODES = ("decode", "jpeg", "off")
FLOAT_DTYPES = ("float32", "float64", "float16")
BUDGETED = ("bad_samples", "bad_shards")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http://, s3:// ...


@dataclasses.dataclass
class ReaderConfig:
    """What to read and how; validated when built. rank/world_size are not here on purpose."""

    splits: tuple[str, ...] | str
    """Split directories (or their manifest.json); several are read as one split. Local paths
    only: URLs such as ``pipe:cmd`` would run commands and are refused."""
    batch_size: int = 8
    """Samples per batch (per rank)."""
    seed: int = 0
    """Seed of the shard order and shuffle buffers (with the epoch) and of transforms."""
    shuffle: bool = True
    """Shuffle the shard order per epoch and samples within each worker's buffer."""
    shuffle_buffer: int = 64
    """Samples (encoded bytes) held by each worker's shuffle buffer; 1 keeps the order."""
    num_workers: int = 0
    """Loader worker processes (0: read in the main process). Part of the stream's identity:
    a state saved with one value only restores with the same."""
    start_method: str | None = None
    """Worker start method ('fork', 'spawn', 'forkserver'); None: the platform default."""
    drop_last: bool = True
    """True (training): every rank gets the same number of full batches. False (evaluation):
    every sample exactly once; the last batch of a rank may be short and ranks may differ by one."""
    frames: str = "decode"
    """'decode': uint8 tensor; 'jpeg': the encoded bytes, each header checked (format, size)
    but not decoded, for :func:`data_shards.device_decode.decode_batch` on the GPU; 'off': none."""
    masks: bool = True
    """Return foreground masks when the split has them."""
    float_dtype: str = "float32"
    """dtype of pose3d, pose2d, K and Rt."""
    error_budget: int = 10
    """Bad samples + unreadable shards tolerated per rank and epoch before raising."""
    transforms: tuple[Transform, ...] = ()
    """Callables ``(sample, rng) -> sample`` applied in order after decoding (picklable for
    spawn); rng is seeded by (seed, epoch, sample position), so augmentation is reproducible."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Pin batch tensors (faster host-to-GPU copies)."""
    timeout_s: float = 0.0
    """Fail if a worker takes longer than this for one batch (0: wait forever)."""

    def __post_init__(self) -> None:
        if isinstance(self.splits, (str, os.PathLike)):
            self.splits = (self.splits,)
        self.splits = tuple(os.fspath(s) for s in self.splits)
        self.transforms = tuple(self.transforms)
        if not self.splits:
            raise ValueError("splits: at least one split directory is needed")
        for s in self.splits:
            if _URL.match(s):
                raise ValueError(f"splits: {s!r} is a URL; only local paths are read")
        checks = {
            "batch_size": self.batch_size >= 1,
            "seed": self.seed >= 0,
            "shuffle_buffer": self.shuffle_buffer >= 1,
            "num_workers": self.num_workers >= 0,
            "frames": self.frames in FRAME_MODES,
            "float_dtype": self.float_dtype in FLOAT_DTYPES,
            "error_budget": self.error_budget >= 0,
            "prefetch_factor": self.prefetch_factor >= 1,
            "timeout_s": self.timeout_s >= 0,
            "start_method": self.start_method in (None, "fork", "spawn", "forkserver"),
            "transforms": all(callable(t) for t in self.transforms),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"ReaderConfig.{name}: invalid value {getattr(self, name)!r}")


def dist_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world_size) from RANK/WORLD_SIZE (torchrun, deepspeed) or SLURM_PROCID/NTASKS.

    Call it in the main process and pass the result to the reader; (0, 1) when neither is set.
    """
    env = os.environ if env is None else env
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            if not 0 <= rank < size:
                raise ValueError(f"{rank_var}={rank} outside [0, {size_var}={size})")
            return rank, size
    return 0, 1


class StreamState(NamedTuple):
    """Where the logical workers' streams start; ``offset`` is the logical worker of physical
    worker 0 (DataLoader always starts its round robin at 0); ``errors`` so far this epoch."""

    epoch: int = 0
    cursors: tuple[int, ...] = ()
    batches: tuple[int, ...] = ()
    offset: int = 0
    errors: int = 0
    segment: int = 0
    """Earlier world sizes within this epoch (:mod:`data_shards.resplit`); 0 for most runs."""


class ShardDataset(IterableDataset):
    """One rank's view of a split: each loader worker runs the stage list on its range."""

    def __init__(
        self,
        config: ReaderConfig,
        shards: list[ShardRef],
        layout: Manifest,
        rank: int,
        world_size: int,
    ):
        self.config, self.shards, self.layout = config, shards, layout
        self.rank, self.world_size = rank, world_size
        self.epoch_total = sum(s.samples for s in shards)
        self.remaining: Remaining | None = None
        self.plan = self.plan_for(self.epoch_total)
        self.plan.check()
        self.state = StreamState()

    def plan_for(self, total: int, world_size: int | None = None, workers: int | None = None
                 ) -> Plan:  # fmt: skip
        cfg = self.config
        return Plan(total, world_size or self.world_size, self.rank if world_size is None else 0,
                    cfg.batch_size, workers or max(1, cfg.num_workers), cfg.drop_last)  # fmt: skip

    def set_remaining(self, remaining: Remaining | None) -> None:
        """Read only ``remaining`` of the epoch (None: all of it); raises ReaderError when that
        is too little for a batch on every rank and worker."""
        plan = self.plan_for(self.epoch_total if remaining is None else len(remaining))
        plan.check()
        self.plan, self.remaining = plan, remaining

    def pipeline(self, worker: int) -> wds.DataPipeline:
        """The visible stage list of one logical worker for the current state."""
        cfg, st = self.config, self.state
        ctx = WorkerContext(
            worker,
            self.plan.batch_sizes(worker),
            resume_cursor=st.cursors[worker] if st.cursors else 0,
            batches_done=st.batches[worker] if st.batches else 0,
            budget=cfg.error_budget,
            errors_so_far=st.errors,
        )
        lo, _ = self.plan.worker_range(worker)
        decode = partial(decode_checked, layout=self.layout, frames=cfg.frames)
        transform = partial(
            apply_transforms, transforms=cfg.transforms, seed=cfg.seed, epoch=st.epoch
        )

        def redecode(raw: dict) -> Decoded | None:
            with contextlib.suppress(Exception):  # rejected (and counted) the first time
                return next(transform([Decoded(raw["__index__"], decode(raw))]))
            return None

        return wds.DataPipeline(
            partial(plan_epoch, self.shards, cfg.seed, st.epoch, cfg.shuffle),
            partial(split_by_node, plan=self.plan, remaining=self.remaining),
            partial(split_by_worker, plan=self.plan, worker=worker, remaining=self.remaining),
            partial(read_shards, ctx=ctx),
            partial(
                shuffle,
                bufsize=cfg.shuffle_buffer if cfg.shuffle else 1,
                seed=shuffle_seed(cfg.seed, st.epoch, lo, st.segment),
            ),
            partial(skip_to_cursor, ctx=ctx),
            partial(safe_decode, ctx=ctx, decode=decode),
            transform,
            partial(
                batch_samples,
                ctx=ctx,
                redecode=redecode,
                pad=cfg.drop_last,
                collate=partial(
                    collate, frames=cfg.frames, masks=cfg.masks, float_dtype=cfg.float_dtype
                ),
            ),
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.plan.workers:
            raise ReaderError(f"{info.num_workers} loader workers, planned {self.plan.workers}")
        physical = info.id if info is not None else 0
        return iter(self.pipeline((physical + self.state.offset) % self.plan.workers))


def _passthrough(batch: dict) -> dict:
    return batch


def _digest(shards: list[ShardRef]) -> str:
    """Identity of the shard list (names, counts, first keys), independent of where it lives."""
    ids = [(os.path.basename(s.path), s.samples, s.first_key) for s in shards]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def load_shards(splits: tuple[str, ...]) -> tuple[list[ShardRef], Manifest, list[str]]:
    """Manifests of the splits -> shard list, common layout, tar files not in any manifest."""
    refs, layout, unlisted = [], None, []
    for split in splits:
        path = Path(split)
        directory = path.parent if path.name == MANIFEST_NAME else path
        m = Manifest.load(directory)
        if layout is not None and (m.views, m.frames, m.image_size, m.has) != (
            layout.views,
            layout.frames,
            layout.image_size,
            layout.has,
        ):
            raise ReaderError(f"{directory}: layout differs from {splits[0]}; cannot mix them")
        layout = layout or m
        refs += [ShardRef(str(directory / s.name), s.samples, s.first_key, s.sha256)
                 for s in m.shards]  # fmt: skip
        listed = {s.name for s in m.shards}
        unlisted += [str(p) for p in sorted(directory.glob("*.tar")) if p.name not in listed]
    return refs, layout, unlisted


class ShardReader:
    """The main-process reader: iterate for one epoch of batches; ``state_dict`` for resume.

    ``for batch in reader`` continues the current epoch from its cursors and, once the epoch is
    exhausted, moves to the next one. ``set_epoch(e)`` with a new e starts epoch e afresh; the
    same e keeps the position (so a restored reader is not reset by the usual training loop).
    A batch is :func:`data_shards.transforms.collate`'s dict plus ``worker``, ``cursor``,
    ``errors`` (counts since that worker's previous batch) and ``padded`` (repeats at the end).
    """

    def __init__(self, config: ReaderConfig, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        shards, layout, unlisted = load_shards(config.splits)
        self.layout = layout
        try:
            self.dataset = ShardDataset(config, shards, layout, rank, world_size)
        except ReaderError as e:  # too few samples: say which split(s)
            raise ReaderError(f"{', '.join(config.splits)}: {e}") from None
        self.errors: Counter = Counter({k: 0 for k in (*BUDGETED, "lost_samples")})
        if unlisted:
            log.warning(
                "ignored %d tar files not in the manifest: %s",
                len(unlisted),
                one_line(", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")),
            )
            self.errors["unlisted_shards"] = len(unlisted)
        self.epoch = 0
        self._start_epoch(0)

    @property
    def workers(self) -> int:
        return self.dataset.plan.workers

    def __len__(self) -> int:
        """Batches per epoch on this rank (an upper bound when drop_last=False and samples fail)."""
        return sum(len(self.dataset.plan.batch_sizes(w)) for w in range(self.workers))

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_errors, self.history = epoch, Counter(), []
        if self.dataset.remaining is not None:
            self.dataset.set_remaining(None)
        self._cursors, self._batches, self._next = [0] * self.workers, [0] * self.workers, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning, unless it is already the current one."""
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def _loader(self) -> DataLoader:
        cfg = self.config
        extra = {}
        if cfg.num_workers:
            extra = dict(
                prefetch_factor=cfg.prefetch_factor,
                timeout=cfg.timeout_s,
                multiprocessing_context=cfg.start_method,
            )
        # in_order: batches come round-robin from workers 0, 1, ...; the resume relies on it
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            collate_fn=_passthrough,
            pin_memory=cfg.pin_memory,
            in_order=True,
            **extra,
        )

    def __iter__(self) -> Iterator[dict]:
        self.dataset.state = StreamState(
            self.epoch,
            tuple(self._cursors),
            tuple(self._batches),
            self._next,
            self._budget_used(),
            len(self.history),
        )
        for batch in self._loader():
            self._account(batch)
            if batch["keys"]:
                yield batch
        self._start_epoch(self.epoch + 1)

    def _budget_used(self) -> int:
        return sum(self.epoch_errors[k] for k in BUDGETED)

    def _account(self, batch: dict) -> None:
        w = batch["worker"]
        self._cursors[w], self._next = batch["cursor"], (w + 1) % self.workers
        self._batches[w] += 1
        self.errors.update(batch["errors"])
        self.epoch_errors.update(batch["errors"])
        if self._budget_used() > self.config.error_budget:
            raise ErrorBudgetExceeded(
                f"epoch {self.epoch}: errors {dict(self.epoch_errors)} "
                f"exceed error_budget={self.config.error_budget}"
            )

    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return dict(
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            drop_last=cfg.drop_last,
            workers=self.workers,
            rank=self.rank,
            world_size=self.world_size,
            samples=self.dataset.epoch_total,
            shards=_digest(self.dataset.shards),
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream after the last batch handed out."""
        return dict(
            version=STATE_VERSION,
            epoch=self.epoch,
            cursors=list(self._cursors),
            batches=list(self._batches),
            next_worker=self._next,
            errors=dict(self.errors),
            epoch_errors=dict(self.epoch_errors),
            fingerprint=self._fingerprint(),
            history=[dict(seg) for seg in self.history],
        )

    def remaining(self, epoch: int, history: list[dict[str, Any]]) -> Remaining:
        """What ``history`` (earlier world sizes within ``epoch``) left of the epoch; ValueError
        naming the field of a history that cannot come from this data."""
        cfg = self.config
        return remaining_after(history, self.dataset.epoch_total, seed=cfg.seed, epoch=epoch,
                               batch_size=cfg.batch_size, drop_last=cfg.drop_last,
                               bufsize=cfg.shuffle_buffer if cfg.shuffle else 1)  # fmt: skip

    def resplit(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch of a run with another world size or number of loader workers:
        ``states`` are its ranks' :meth:`state_dict`, in rank order. The samples those ranks
        consumed are recomputed (:mod:`data_shards.resplit`) and the rest of the epoch is split
        across this reader's ranks and workers; every rank calls this with the same states.
        Counters carry over (rank 0 holds the sums, so totals over ranks stay the same).
        ReaderError names a state of another data set or settings; ValueError a field out of
        range."""
        mine = self._fingerprint()
        if not states:
            raise ReaderError("no reader state to continue from")
        first = states[0]
        for r, st in enumerate(states):
            if st.get("version") != STATE_VERSION:
                raise ReaderError(f"reader state {r}: version {st.get('version')}, expected "
                                  f"{STATE_VERSION}")  # fmt: skip
            theirs = st["fingerprint"]
            for k in sorted(set(mine) - {"rank", "world_size", "workers"}):
                if theirs.get(k) != mine[k]:
                    raise ReaderError(f"reader state {r} has {k}={theirs.get(k)!r}, this reader "
                                      f"{mine[k]!r}")  # fmt: skip
            if (theirs.get("rank"), theirs.get("world_size")) != (r, len(states)):
                raise ReaderError(
                    f"reader state {r} is rank {theirs.get('rank')} of "
                    f"{theirs.get('world_size')}, expected {r} of {len(states)}"
                )
            same = (st["epoch"], st.get("history", []), theirs["workers"]) == (
                first["epoch"],
                first.get("history", []),
                first["fingerprint"]["workers"],
            )
            if not same:
                raise ReaderError(f"reader state {r} is at another epoch or segment than rank 0's")
        epoch, history = first["epoch"], list(first.get("history", []))
        cursors = [[int(c) for c in st["cursors"]] for st in states]
        if history or any(any(c) for c in cursors):
            workers = first["fingerprint"]["workers"]
            history.append(dict(world_size=len(states), workers=workers, cursors=cursors))
        remaining = self.remaining(epoch, history)
        self._start_epoch(epoch)
        try:
            if history:
                self.dataset.set_remaining(remaining)
                self.history = history
        except ReaderError:  # too few left for a batch on every new rank: the next epoch
            log.warning("epoch %d: the %d samples left unread when the world size changed are "
                        "too few for a batch on every rank and worker; going on with epoch %d",
                        epoch, len(remaining), epoch + 1)  # fmt: skip
            self._start_epoch(epoch + 1)
        totals = sum((Counter(st["errors"]) for st in states), Counter())
        totals.pop("unlisted_shards", None)
        self.errors.update({k: 0 for k in totals} if self.rank else totals)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuses a state of another stream."""
        if state.get("version") != STATE_VERSION:
            raise ReaderError(
                f"reader state version {state.get('version')}, expected {STATE_VERSION}"
            )
        mine, theirs = self._fingerprint(), state["fingerprint"]
        for k, v in mine.items():
            if theirs.get(k) != v:
                raise ReaderError(f"reader state has {k}={theirs.get(k)!r}, this reader {v!r}")
        history = list(state.get("history", []))
        remaining = self.remaining(int(state["epoch"]), history) if history else None
        self._start_epoch(int(state["epoch"]))
        self.dataset.set_remaining(remaining)
        self.history = history
        self._cursors = [int(c) for c in state["cursors"]]
        self._batches = [int(b) for b in state["batches"]]
        self._next = int(state["next_worker"])
        self.errors = Counter(state["errors"])
        self.epoch_errors = Counter(state["epoch_errors"])


def measure_read_throughput(
    split: str, num_workers: int = 0, batch_size: int = 16, epochs: int = 1, **config: Any
) -> dict[str, float]:
    """Read ``epochs`` whole epochs of one rank; frames per second of wall time and per CPU
    second of every process involved (main + workers: "per core", robust to a busy machine)."""
    reader = ShardReader(
        ReaderConfig(split, batch_size=batch_size, num_workers=num_workers, **config), 0, 1
    )
    frames, cpu0, start = 0, _cpu_seconds(), time.perf_counter()
    for _ in range(epochs):
        for batch in reader:  # whole epochs, so the workers have exited and are accounted
            frames += len(batch["keys"]) * reader.layout.views * reader.layout.frames
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    return dict(
        frames=frames,
        seconds=wall,
        frames_per_s=frames / wall,
        cpu_seconds=cpu,
        frames_per_cpu_s=frames / cpu,
        workers=num_workers,
    )


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)
