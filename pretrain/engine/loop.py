"""The training loop: any task module under DeepSpeed, resumable exactly, stoppable cleanly.

A *task* is an ``nn.Module`` whose ``forward(batch: dict, step: int)`` returns
``(loss, metrics)``: a scalar tensor and a ``dict[str, float]`` with the same keys on every
rank. Its randomness should come from a generator seeded by (seed, step, rank)
(:func:`pretrain.engine.runstate.step_generator`) plus dropout from the global RNG, whose
state is checkpointed.

A *reader* is :class:`data_shards.read.ShardReader` or anything with the same surface: iterable
of dict batches (``keys`` and tensors), ``epoch``, ``set_epoch(e)``, ``state_dict()``,
``load_state_dict(s)`` and an ``errors`` counter.

Running the same command again resumes from the newest valid checkpoint in ``out_dir``: a run
killed at any point ends with the same parameters and per-step losses as one never interrupted
(CPU, deterministic kernels), and the reader neither repeats nor skips samples.

Exit codes (``TrainResult.exit_code`` and :func:`exit_code_for`):

==  =====================================================================================
0   done: ``max_steps`` reached, final checkpoint written
1   error (exception; message on stderr)
65  stopped: ``nan_limit`` optimizer steps in a row had a non-finite loss; no final save
    (skipped steps never change the weights: the last checkpoint is good) (EX_DATAERR)
74  a checkpoint, the metrics or the run's config.json could not be written (disk full, quota);
    what was written before is intact (EX_IOERR)
75  preempted (SIGUSR1 / SIGUSR2 / SIGTERM): checkpoint written, requeue me (EX_TEMPFAIL)
==  =====================================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_shards.manifest import atomic_write_text
from pretrain.engine import dist, elastic, preflight
from pretrain.engine.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointManager,
    CheckpointRef,
    CheckpointWriteError,
    ResumeMismatch,
    install_safe_engine,
    refuse_unsafe_torch_load,
)
from pretrain.engine.deepspeed_config import EngineConfig, to_deepspeed_json
from pretrain.engine.metrics import MetricsLogger
from pretrain.engine.preemption import PreemptionFlag
from pretrain.engine.runstate import (
    capture_rng,
    check_compatible,
    check_loop_state,
    check_reader_state,
    check_rng_state,
    code_version,
    restore_rng,
    seed_everything,
)
from pretrain.engine.stream import BatchStream

log = logging.getLogger(__name__)

CLIENT_KEY = "posebert"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NONFINITE = 65
EXIT_CHECKPOINT = 74
EXIT_REQUEUE = 75
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""errno values of a write that failed for want of space (EFBIG: a file size limit)."""
READER_ERROR_FIELDS = ("bad_samples", "bad_shards", "lost_samples")
_RESERVED = {"skipped", "skipped_steps", "frames_per_s", "time_s"} | {
    f"reader_{k}" for k in READER_ERROR_FIELDS
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop's own settings (the optimizer side is :class:`EngineConfig`)."""

    max_steps: int = 1000
    """Optimizer steps to train (skipped steps count)."""
    log_every: int = 1
    """Write a metrics record every this many steps (and at the last step)."""
    checkpoint_every: int = 500
    """Checkpoint every this many steps; always at the end and on preemption."""
    keep_checkpoints: int = 3
    """Committed checkpoints kept (oldest removed first)."""
    nan_limit: int = 5
    """Stop with exit code 65 after this many consecutive steps with a non-finite loss."""
    seed: int = 0
    """Seed of the global RNGs (python, numpy, torch; mixed with the rank) on a fresh start."""
    resume: bool = True
    """Resume from the newest valid checkpoint in the run directory."""
    resume_may_change: tuple[str, ...] = (
        "train.max_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.nan_limit",
        "train.progress",
        "train.tensorboard",
        "train.dist_timeout_s",
        "train.resume_may_change",
        "data.decode",
    )
    """Dotted config fields (prefixes) that may differ from the checkpoint's on resume; any other
    difference, and any world size change, is refused naming the field."""
    progress: bool = True
    """A tqdm progress bar with frames/s on rank 0."""
    tensorboard: bool = True
    """TensorBoard event files under ``out_dir/tensorboard`` (rank 0)."""
    dist_timeout_s: float = dist.DEFAULT_TIMEOUT_S
    """Process-group timeout: a dead or hung peer ends the job after this long."""

    def __post_init__(self) -> None:
        positive = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "nan_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s: must be > 0, got {self.dist_timeout_s}")
        object.__setattr__(self, "resume_may_change", tuple(self.resume_may_change))


@dataclasses.dataclass
class TrainResult:
    """How a call to :func:`train` ended."""

    exit_code: int
    status: str
    """'done', 'requeue' or 'nonfinite'."""
    step: int
    """Optimizer steps completed."""
    start_step: int
    """Step the call started from (0 on a fresh run)."""
    skipped_steps: int
    last_checkpoint: str | None
    last_loss: float | None
    signal: str | None = None


@dataclasses.dataclass
class _State:
    step: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0


def exit_code_for(exc: BaseException) -> int:
    """The exit code an entry point should use for an exception out of :func:`train`: 74
    (EX_IOERR) for a checkpoint that could not be written and for any write that ran out of
    space (the metrics file, the run's config.json), else 1."""
    if isinstance(exc, CheckpointWriteError):
        return EXIT_CHECKPOINT
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return EXIT_CHECKPOINT
    return EXIT_FAILED


def _quiet_deepspeed() -> None:
    ds_log = logging.getLogger("DeepSpeed")
    if ds_log.getEffectiveLevel() < logging.WARNING:
        ds_log.setLevel(logging.WARNING)


def build_engine(task: nn.Module, cfg: EngineConfig, world_size: int) -> Any:
    """``deepspeed.initialize`` with the generated config; checkpoints made safe."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed guesses, with a warning
    import deepspeed

    _quiet_deepspeed()
    params = [p for p in task.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=task, model_parameters=params, config=to_deepspeed_json(cfg, world_size)
    )
    install_safe_engine(engine)
    return engine


def _resolved_config(
    config_json: str | Mapping[str, Any] | None, engine_cfg: EngineConfig, train_cfg: TrainConfig
) -> dict[str, Any]:
    run = json.loads(config_json) if isinstance(config_json, str) else dict(config_json or {})

    def plain(cfg: Any) -> Any:
        return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists

    return {"run": run, "engine": plain(engine_cfg), "train": plain(train_cfg)}


def _check_reader(reader: Any, engine_cfg: EngineConfig, env: dist.DistEnv) -> None:
    missing = [
        a for a in ("epoch", "set_epoch", "state_dict", "load_state_dict") if not hasattr(reader, a)
    ]
    if missing:
        raise TypeError(f"reader lacks {', '.join(missing)} (see pretrain.engine.loop)")
    batch = getattr(getattr(reader, "config", None), "batch_size", None)
    if batch is not None and batch != engine_cfg.micro_batch_per_rank:
        raise ValueError(
            f"reader batch_size {batch} != engine micro_batch_per_rank "
            f"{engine_cfg.micro_batch_per_rank} (set one from the other)"
        )
    for attr, want in (("rank", env.rank), ("world_size", env.world_size)):
        have = getattr(reader, attr, want)
        if have != want:
            raise ValueError(f"reader was built for {attr}={have}, this process has {want}")


def train(
    task: nn.Module,
    reader: Any,
    train_cfg: TrainConfig,
    engine_cfg: EngineConfig,
    out_dir: str | os.PathLike,
    config_json: str | Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``task`` on ``reader``'s batches under DeepSpeed, resuming from ``out_dir``.

    Initialises torch.distributed from the launcher's environment if needed (gloo on CPU, nccl
    on GPU). ``config_json`` (the run's resolved config, JSON text or a dict) is stored in every
    checkpoint and compared on resume. Raises on errors (see :func:`exit_code_for`). A process
    group this call initialised is destroyed before it returns (see :func:`dist.shutdown`).
    """
    refuse_unsafe_torch_load()
    owns_group = not dist.is_initialized()  # then this call also tears it down
    try:
        result = _train(task, reader, train_cfg, engine_cfg, Path(out_dir), config_json)
    except BaseException as e:
        preflight.report_failure(e, train_cfg.dist_timeout_s)  # names a rank that hung
        if owns_group:
            with contextlib.suppress(Exception):
                dist.shutdown(barrier_first=False)
        raise
    if owns_group:
        dist.shutdown()
    return result


def _train(
    task: nn.Module,
    reader: Any,
    train_cfg: TrainConfig,
    engine_cfg: EngineConfig,
    out: Path,
    config_json: str | Mapping[str, Any] | None,
) -> TrainResult:
    with PreemptionFlag() as flag:  # from the start: a signal during set-up is not lost
        env = dist.init_distributed(timeout_s=train_cfg.dist_timeout_s)
        _check_reader(reader, engine_cfg, env)
        ckpt = CheckpointManager(out, keep=train_cfg.keep_checkpoints)
        ref = _find_checkpoint(ckpt, train_cfg)
        if ref is not None:  # another world size: the accumulation that keeps the global batch
            engine_cfg = elastic.engine_for(ref, engine_cfg, env.world_size)
        meta = {
            "world_size": env.world_size,
            "config": _resolved_config(config_json, engine_cfg, train_cfg),
            "code_version": code_version(),
        }
        _check_resumable(ckpt, ref, meta, train_cfg)
        if ref is None:
            seed_everything(train_cfg.seed, env.rank)
        engine = build_engine(task, engine_cfg, env.world_size)
        state, ref = _resume(ckpt, engine, reader, ref, meta, train_cfg, engine_cfg)
        with MetricsLogger(
            out,
            dist.is_main(),
            state.step,
            train_cfg.max_steps,
            tensorboard=train_cfg.tensorboard,
            progress=train_cfg.progress,
        ) as metrics:
            if ref is not None:
                metrics.note(f"resumed from {ref.path} (step {ref.step})")
            loop = _Loop(engine, reader, train_cfg, engine_cfg, ckpt, meta, metrics, flag, env)
            result = loop.run(state, ref)
        if result.exit_code == EXIT_REQUEUE:
            # The checkpoint is committed and the decision made: a late SIGTERM (srun's
            # --kill-on-bad-exit reacts to the first rank's 75) must not turn 75 into 143.
            # Still inside the block: no default handler comes back in between.
            flag.ignore_from_now()
    return result


def _find_checkpoint(ckpt: CheckpointManager, train_cfg: TrainConfig) -> CheckpointRef | None:
    """The verified checkpoint to resume from, or None on a fresh run."""
    if train_cfg.resume:
        return ckpt.find()
    if ckpt.steps():
        raise CheckpointError(f"{ckpt.root} holds checkpoints and resume is off: use a new --out")
    return None


def _check_compatible(ref: CheckpointRef, meta: dict[str, Any], train_cfg: TrainConfig) -> None:
    """``ref`` against this run: every config field but those that may change (and the
    accumulation, when the world size changed and the global batch is kept)."""
    may_change = train_cfg.resume_may_change + elastic.may_change(ref, meta["world_size"])
    check_compatible(ref.meta, meta, may_change, world_may_change=True)
    elastic.check_global_batch(ref, meta)


def _check_resumable(ckpt: CheckpointManager, ref: CheckpointRef | None, meta: dict[str, Any],
                     train_cfg: TrainConfig) -> None:  # fmt: skip
    """Check ``ref`` against this run; then rank 0 records the resolved config in
    ``out_dir/config.json``."""
    if ref is not None:
        _check_compatible(ref, meta, train_cfg)
    if dist.is_main():
        ckpt.root.parent.mkdir(parents=True, exist_ok=True)
        _write_config(ckpt.root.parent / "config.json", json.dumps(meta, indent=1) + "\n")
    return ref


def _write_config(path: Path, text: str) -> None:
    """Replace the run's config.json atomically (``posebert export`` reads it; a full disk must
    not leave it cut), and not at all when it already says the same."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text() == text:
            return
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e}; the previous one is unchanged",
                      str(path)) from None  # fmt: skip


def _resume(ckpt: CheckpointManager, engine: Any, reader: Any, ref: CheckpointRef | None,
            meta: dict[str, Any], train_cfg: TrainConfig,
            engine_cfg: EngineConfig) -> tuple[_State, CheckpointRef | None]:  # fmt: skip
    """Collective: load ``ref`` into the engine, the reader and the RNGs. A checkpoint that
    verified against its manifest but will not load (a file rewritten behind a rewritten
    manifest) or holds an invalid resume state is moved aside as ``step_N.corrupt`` with one
    warning naming the file, and the next valid checkpoint is loaded (all ranks agree first);
    none left is an error. A checkpoint of another world size is re-divided
    (:mod:`pretrain.engine.elastic`). Returns the state and the checkpoint actually resumed
    from."""
    while ref is not None:
        problem = None
        try:
            client = elastic.load(ckpt, engine, ref)
            state = _restore(client, reader, ref, engine_cfg, train_cfg.seed)
        except CheckpointCorrupt as e:
            problem = f"rank {dist.get_rank()}: {e}"
        problems = [p for p in dist.all_gather_object(problem) if p]
        if not problems:
            return state, ref
        ref = ckpt.reject(ref, problems[0])
        _check_compatible(ref, meta, train_cfg)
    return _State(), None


def _restore(client: Mapping[str, Any], reader: Any, ref: CheckpointRef,
             engine_cfg: EngineConfig, seed: int) -> _State:  # fmt: skip
    """Check every field of the saved state against this run before applying any of it:
    :class:`CheckpointCorrupt` naming the file and the field when one is wrong. A state of
    another world size continues the epoch on this one (the reader re-splits it) with the
    global RNGs seeded from (seed, step, rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    old = elastic.saved_world(ref)
    max_epoch = ref.step * engine_cfg.global_batch(world)  # an epoch takes a sample at least
    try:
        if not isinstance(client, Mapping) or CLIENT_KEY not in client:
            raise ValueError(f"no {CLIENT_KEY!r} state (not written by this engine)")
        ours = client[CLIENT_KEY]
        check_loop_state(ours, ref.step, ref.meta.get("config"), old)
        for entry in ours["ranks"] if old != world else [ours["ranks"][rank]]:
            check_rng_state(entry["rng"])
            check_reader_state(entry["reader"], reader, max_epoch)
        if old != world:
            if not hasattr(reader, "resplit"):
                raise ResumeMismatch(f"world_size: checkpoint written by {old} ranks, this run "
                                     f"has {world}, and {type(reader).__name__} cannot "
                                     "re-split an epoch")  # fmt: skip
            reader.resplit([entry["reader"] for entry in ours["ranks"]])
    except ValueError as e:
        raise CheckpointCorrupt(f"{ref.client_file(rank)}: resume state {e}") from None
    if old != world:
        elastic.reseed(seed, ref.step, rank)
    else:
        reader.load_state_dict(ours["ranks"][rank]["reader"])  # another stream: refused
        restore_rng(ours["ranks"][rank]["rng"])
    return _State(ours["step"], ours["skipped_steps"], ours["bad_in_row"])


def _zero_loss(engine: Any) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=engine.device))


class _Loop:
    """One call's worth of training; keeps the per-call objects together."""

    def __init__(self, engine, reader, train_cfg, engine_cfg, ckpt, meta, metrics, flag, env):
        self.engine, self.reader, self.cfg, self.ecfg = engine, reader, train_cfg, engine_cfg
        self.ckpt, self.meta, self.metrics, self.flag, self.env = ckpt, meta, metrics, flag, env
        self.stream = BatchStream(reader, engine.device)

    def run(self, state: _State, ref: CheckpointRef | None) -> TrainResult:
        self.state, start = state, state.step
        last_saved = ref.step if ref is not None else None
        last_ckpt = str(ref.path) if ref is not None else None
        clock, last_loss = time.perf_counter(), None

        def result(code: int, status: str, signal: str | None = None) -> TrainResult:
            s = self.state
            return TrainResult(
                code, status, s.step, start, s.skipped_steps, last_ckpt, last_loss, signal
            )

        while self.state.step < self.cfg.max_steps:
            preflight.beat(self.state.step)  # read by preflight.report_failure on a hang
            if dist.all_reduce_flag(self.flag.set, self.engine.device):
                if last_saved != self.state.step:
                    last_ckpt = self._save()
                self.metrics.note(
                    f"preempted ({self.flag.name or 'signal on another rank'}) at step "
                    f"{self.state.step}: checkpoint {last_ckpt}; exit {EXIT_REQUEUE} to requeue"
                )
                return result(EXIT_REQUEUE, "requeue", self.flag.name or None)
            record = self._step()
            last_loss = record["loss"]
            if self.state.step % self.cfg.log_every == 0 or self.state.step == self.cfg.max_steps:
                now = time.perf_counter()
                self._log(record, now - clock)
                clock = now
            self.metrics.advance()
            if self.state.bad_in_row >= self.cfg.nan_limit:
                self.metrics.note(
                    f"stopping: {self.state.bad_in_row} steps in a row with a non-finite loss "
                    f"(nan_limit={self.cfg.nan_limit}); last good checkpoint {last_ckpt}"
                )
                return result(EXIT_NONFINITE, "nonfinite")
            if self.state.step % self.cfg.checkpoint_every == 0:
                last_ckpt, last_saved = self._save(), self.state.step
        if last_saved != self.state.step:
            last_ckpt = self._save()
        return result(EXIT_OK, "done")

    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches, skipped on every rank when a
        loss is non-finite on any rank. With grad_accum > 1 and a bad micro-batch after good
        ones, DeepSpeed's window is completed with zero-gradient backward passes at lr 0: the
        parameters do not change, Adam's moments see the good micro-batches."""
        step, engine, accum = self.state.step, self.engine, self.ecfg.grad_accum
        lr = self.ecfg.lr_schedule.lr(step, self.ecfg.optimizer.lr, self.cfg.max_steps)
        self._set_lr(lr)
        losses: list[float] = []
        sums: dict[str, float] = {}
        bad_ranks: list[int] = []
        for micro in range(accum):
            batch = self.stream.next()
            if bad_ranks:
                continue  # consumed (the stream stays aligned with other runs), not computed
            loss, metrics = engine(batch, step)
            losses.append(float(loss.detach()))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bad_ranks = dist.ranks_where(not math.isfinite(losses[-1]), engine.device)
            if bad_ranks:
                if micro > 0:
                    self._finish_window(accum - micro)
                continue
            engine.backward(loss)
            engine.step()
        self.state.step += 1
        if bad_ranks:
            self.state.skipped_steps += 1
            self.state.bad_in_row += 1
            self.metrics.note(
                f"step {step + 1}: non-finite loss on rank(s) {bad_ranks}; step skipped "
                f"({self.state.bad_in_row} in a row, {self.state.skipped_steps} in all)"
            )
        else:
            self.state.bad_in_row = 0
        n = len(losses)
        return dict(
            step=self.state.step,
            lr=lr,
            loss=sum(losses) / n,
            metrics={k: v / n for k, v in sums.items()},
            skipped=bool(bad_ranks),
        )

    def _finish_window(self, remaining: int) -> None:
        if self.ecfg.zero_stage == 3:
            raise RuntimeError(
                "non-finite loss inside a gradient-accumulation window under ZeRO-3: "
                "cannot skip the step (use grad_accum=1 or ZeRO <= 2)"
            )
        self._set_lr(0.0)
        for _ in range(remaining):
            self.engine.backward(_zero_loss(self.engine))
            self.engine.step()

    def _log(self, record: dict[str, Any], elapsed: float) -> None:
        """Average loss and metrics over ranks (one all_reduce), add the counters, write."""
        names = sorted(record["metrics"])
        errors = getattr(self.reader, "errors", {})
        local = [record["loss"], *(record["metrics"][k] for k in names)]
        local += [float(errors.get(k, 0)) for k in READER_ERROR_FIELDS]
        local.append(float(self.stream.frames))
        total = dist.all_reduce_sum(local, self.engine.device)
        world = self.env.world_size
        k = 1 + len(names)
        out = dict(step=record["step"], epoch=int(self.reader.epoch), lr=record["lr"])
        out["loss"] = total[0] / world
        for name, v in zip(names, total[1:k], strict=True):
            out[f"task_{name}" if name in out or name in _RESERVED else name] = v / world
        out["skipped"] = record["skipped"]
        out["skipped_steps"] = self.state.skipped_steps
        for name, v in zip(READER_ERROR_FIELDS, total[k : k + 3], strict=True):
            out[f"reader_{name}"] = int(v)
        out["frames_per_s"] = total[-1] / max(elapsed, 1e-9)
        out["time_s"] = elapsed
        self.stream.frames = 0
        self.metrics.log(out)

    def _save(self) -> str:
        ours = dict(
            step=self.state.step,
            skipped_steps=self.state.skipped_steps,
            bad_in_row=self.state.bad_in_row,
            config_json=json.dumps(self.meta["config"], sort_keys=True),
            code_version=self.meta["code_version"],
            ranks=dist.all_gather_object(
                {"rng": capture_rng(), "reader": self.reader.state_dict()}
            ),
        )
        # under one key: DeepSpeed drops its own keys (e.g. 'skipped_steps') from what it returns
        client_state = {CLIENT_KEY: ours}
        ref = self.ckpt.save(self.engine, self.state.step, client_state, self.meta)
        return str(ref.path)
