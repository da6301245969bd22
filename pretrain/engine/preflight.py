"""Checks before a pretraining rank builds anything, and a report naming the rank that hung.

Preflight (:func:`check_start`, run on every rank, cheap: environment variables and manifest
JSON only):

- **World vs allocation.** Under SLURM the world size must be what srun started
  (``SLURM_STEP_NUM_TASKS``; times each task's local launcher processes for torchrun under
  srun) and what the job was given (``SLURM_JOB_NUM_NODES x SLURM_NTASKS_PER_NODE``); a
  ``RANK``/``WORLD_SIZE`` left exported in the job script would otherwise start every task as
  the same rank and hang the rendezvous. A multi-task job running ``posebert pretrain`` outside
  srun trains alone on one node. With GPUs, every local rank needs its own device.
- **Data vs ranks x workers x batch.** :class:`data_shards.read.ShardReader` splits the epoch
  by *samples*, not by shards (RELIABILITY.md: webdataset's split by shard gives ranks unequal
  step counts and DDP hangs), so a rank or worker without a whole shard is fine; what cannot
  work is a worker without a single batch: fewer than ``world_size x workers x batch`` samples
  (``drop_last``). The reader raises then too (``Plan.check``, on every rank alike, so nothing
  hangs); here the message names the numbers and the flags that fix it, before DeepSpeed and
  the process group start.

Hang report: every rank writes its step into the rendezvous store at each step boundary
(:func:`beat`). When a collective fails (the process-group timeout elapsed, or a peer's
connection closed), :func:`report_failure` posts "I failed" for this rank, then names the
ranks that did not answer: those whose last step boundary is behind this rank's, else those
that did not report a failure of their own within a short grace period (a rank stuck in
``time.sleep`` or in I/O never fails its collective; a dead rank never posts). One line, on
every surviving rank, before the process group is torn down. With NCCL, torch's watchdog may
abort the process at the timeout before Python sees an exception; gloo (CPU) always raises.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping

import torch
import torch.distributed as tdist

from data_shards.read import ReaderConfig, load_shards
from data_shards.stages import Plan
from pretrain.engine import dist
from pretrain.engine.dist import _SLURM_NON_TASK_STEPS, DistEnv

log = logging.getLogger(__name__)

BEAT_KEY = "posebert/beat/{}"
FAILED_KEY = "posebert/failed/{}"
_LOCAL_LAUNCHERS = ("torchrun", "deepspeed", "local")
_COLLECTIVE_FAILURE = re.compile(
    r"timed out|timeout|connection (closed|reset)|broken pipe|gloo|nccl", re.IGNORECASE
)


class PreflightError(ValueError):
    """The job cannot run as configured; the message says what to change."""


def check_start(
    env: DistEnv,
    reader: ReaderConfig,
    environ: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
) -> None:
    """Every preflight check for a pretraining rank (raises :class:`PreflightError`)."""
    check_world(env, environ, cuda_devices)
    check_data(reader, env.world_size, env.is_main)


def check_world(
    env: DistEnv, environ: Mapping[str, str] | None = None, cuda_devices: int | None = None
) -> None:
    """The world size agrees with the SLURM allocation and every local rank has a GPU.

    ``cuda_devices``: GPUs visible to this process (default: torch's count, 0 without CUDA).
    """
    environ = os.environ if environ is None else environ
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if "SLURM_JOB_ID" in environ:
        _check_slurm(env, environ)
    if cuda_devices and env.local_world_size > cuda_devices:
        raise PreflightError(
            f"{env.local_world_size} ranks on this node but {cuda_devices} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one rank per "
            "GPU; request --gpus-per-node (every task sees the node's GPUs), not --gpus-per-task"
        )


def _check_slurm(env: DistEnv, environ: Mapping[str, str]) -> None:
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID"))
    job_tasks = int(environ.get("SLURM_NTASKS", "1"))
    if step is None or step in _SLURM_NON_TASK_STEPS:
        if env.world_size == 1 and job_tasks > 1:
            raise PreflightError(
                f"the job has {job_tasks} tasks but `posebert pretrain` runs alone in the batch "
                "script: start one rank per task with srun (slurm/pretrain.sbatch does)"
            )
        return
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or job_tasks)
    per_task = env.local_world_size if env.launcher in _LOCAL_LAUNCHERS else 1
    if env.world_size != tasks * per_task:
        source = "srun" if env.launcher == "slurm" else f"RANK/WORLD_SIZE ({env.launcher})"
        raise PreflightError(
            f"world size {env.world_size} from {source}, but srun started {tasks} task(s)"
            + (f" x {per_task} local processes" if per_task > 1 else "")
            + ": do not export RANK/WORLD_SIZE in the job script (each srun task is one rank, "
            "from SLURM_PROCID)"
        )
    nodes = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
    per_node = environ.get("SLURM_NTASKS_PER_NODE")
    if nodes and per_node and per_node.isdigit() and tasks != int(nodes) * int(per_node):
        raise PreflightError(
            f"srun started {tasks} task(s) but the job was allocated {nodes} node(s) x "
            f"{per_node} task(s) per node = {int(nodes) * int(per_node)}: run srun without "
            "-n/-N, or submit with matching --nodes and --ntasks-per-node"
        )
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and int(gpus) > 0 and int(gpus) != env.local_world_size:
        raise PreflightError(
            f"{gpus} GPU(s) allocated on this node but {env.local_world_size} rank(s) run here: "
            "submit with --ntasks-per-node equal to --gpus-per-node (one rank per GPU)"
        )


def check_data(reader: ReaderConfig, world_size: int, verbose: bool = False) -> None:
    """Every rank's every loader worker gets at least one batch of the training split(s)."""
    shards, _, _ = load_shards(reader.splits)
    total = sum(s.samples for s in shards)
    workers = max(1, reader.num_workers)
    batch = reader.batch_size
    plan = Plan(total, world_size, world_size - 1, batch, workers, reader.drop_last)
    if not plan.batch_sizes(workers - 1):  # the last rank's last worker gets the fewest
        raise PreflightError(
            f"data: {total} samples in {len(shards)} shard(s) of {', '.join(reader.splits)} are "
            f"too few for {world_size} rank(s) x {workers} loader worker(s) x batches of {batch} "
            f"(at least {world_size * workers * batch} needed): write more samples (more inputs, "
            "or a smaller `posebert shards ... --stride`), or use fewer workers "
            "(--set data.num_workers=N), a smaller batch (--set engine.micro_batch_per_rank=N) "
            "or fewer ranks"
        )
    if verbose and len(shards) < world_size * workers:
        log.info(
            "%d shard(s) for %d rank(s) x %d worker(s): several workers read parts of the same "
            "shard (more I/O; smaller shards via `posebert shards ... --shard-samples` spread it)",
            len(shards),
            world_size,
            workers,
        )


# ----------------------------------------------------------------------------- hang report


def _store() -> tdist.Store:
    return tdist.distributed_c10d._get_default_store()


def beat(step: int) -> None:
    """Record in the rendezvous store that this rank reached step boundary ``step`` (one small
    write; nothing in a single process)."""
    if dist.get_world_size() > 1:
        _store().set(BEAT_KEY.format(dist.get_rank()), str(step))


def is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or a RuntimeError that reads like a timeout or lost peer."""
    if isinstance(exc, tdist.DistError):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))


def report_failure(exc: BaseException, timeout_s: float) -> str | None:
    """After a failed collective: log and return one line naming the rank(s) that did not
    answer (None when ``exc`` is not a collective failure or there is one process).

    Waits at most ``clamp(timeout_s / 4, 1, 60)`` seconds for the other ranks to post their own
    failures. Call it while the process group still exists."""
    if not is_collective_failure(exc) or not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        return None
    reason = _reason(exc, timeout_s)
    try:
        line = _who_is_silent(_store(), rank, world, reason, min(max(timeout_s / 4, 1.0), 60.0))
    except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process
        line = (
            f"rank {rank}: {reason}; the rendezvous store on rank 0 does not answer "
            f"({type(e).__name__}): rank 0 is gone or unreachable"
        )
    log.error("%s", line)
    return line


def _reason(exc: BaseException, timeout_s: float) -> str:
    text = str(exc)
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return f"a collective timed out after {timeout_s:g} s"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"a collective failed ({first[:160]})"


def _read_step(store: tdist.Store, r: int) -> int | None:
    key = BEAT_KEY.format(r)
    return int(store.get(key)) if store.check([key]) else None


def _who_is_silent(store: tdist.Store, rank: int, world: int, reason: str, grace_s: float) -> str:
    store.set(FAILED_KEY.format(rank), "1")
    steps = {r: _read_step(store, r) for r in range(world)}
    mine = steps[rank]
    behind = (
        []
        if mine is None
        else [r for r, s in steps.items() if r != rank and (s is None or s < mine)]
    )
    deadline = time.monotonic() + grace_s
    while not behind:
        failed = [r for r in range(world) if store.check([FAILED_KEY.format(r)])]
        silent = [r for r in range(world) if r not in failed]
        if not silent:
            return (
                f"rank {rank}: {reason} at step {mine} on every rank: the ranks are in "
                f"different collectives (last step boundaries {_steps(steps)})"
            )
        if time.monotonic() > deadline:
            behind = silent
            break
        time.sleep(0.2)
    where = ", ".join(f"rank {r} at {steps[r] if steps[r] is not None else 'none'}" for r in behind)
    return (
        f"rank {rank}: {reason} at step {mine}: rank(s) {', '.join(map(str, behind))} did not "
        f"answer (last step boundary: {where})"
    )


def _steps(steps: Mapping[int, int | None]) -> str:
    return ", ".join(f"{r}: {s}" for r, s in steps.items())
