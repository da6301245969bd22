"""One launcher-aware view of the distributed job (STYLE.md habits 4 and 5).

:class:`DistEnv` maps what torchrun, the deepspeed launcher, :mod:`pretrain.engine.launch` and
SLURM ``srun`` put in the environment to rank, local rank, world size and the rendezvous
address. Nothing here keeps a rank in a module global or patches ``print``: callers pass the
:class:`DistEnv` (or ask torch.distributed, which is the single source of truth once
initialised). Every collective has a single-process path, so code that gathers across ranks runs
unchanged in a CPU unit test.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
SLURM_PORT_BASE = 10000
"""``MASTER_PORT`` under SLURM when none is exported: ``SLURM_PORT_BASE + job id % 20000``
(below Linux's ephemeral range 32768-60999, the same on every task of the job)."""
_SLURM_NON_TASK_STEPS = {"batch", "extern", "interactive", "4294967294", "4294967295"}


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank in [0, world_size)."""
    local_rank: int = 0
    """Rank on this node; picks the GPU."""
    world_size: int = 1
    """Number of processes in the job."""
    local_world_size: int = 1
    """Processes on this node."""
    master_addr: str = "127.0.0.1"
    """Rendezvous host (rank 0's node)."""
    master_port: int = 29500
    """Rendezvous TCP port."""
    launcher: str = "single"
    """'torchrun', 'deepspeed', 'local' (:func:`pretrain.engine.launch.launch_local`), 'env'
    (RANK/WORLD_SIZE set by something else), 'slurm' (srun task) or 'single'."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size={self.world_size})")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(
                f"local_rank {self.local_rank} outside [0, local_world_size="
                f"{self.local_world_size})"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port {self.master_port} is not a TCP port")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """True inside a rank started by a launcher (torchrun, deepspeed, ``--nproc-per-node``,
        an srun task): such a process must not start ranks of its own."""
        return self.launcher != "single"

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> DistEnv:
        """Read the launcher's variables: RANK/WORLD_SIZE first (torchrun, deepspeed, our local
        launcher; also torchrun started by srun), then SLURM srun task variables, else a
        single process."""
        env = os.environ if env is None else env
        try:
            if "RANK" in env and "WORLD_SIZE" in env:
                return _from_rank_vars(env)
            if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
                step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
                if step is not None and step not in _SLURM_NON_TASK_STEPS:
                    return _from_slurm(env)
                if int(env["SLURM_NTASKS"]) > 1:
                    log.warning(
                        "SLURM_NTASKS=%s but this is not an srun task (step %s): running as one "
                        "process; start the ranks with srun",
                        env["SLURM_NTASKS"],
                        step,
                    )
        except KeyError as e:
            raise ValueError(f"distributed environment: {e.args[0]} is not set") from None
        except ValueError as e:
            raise ValueError(f"distributed environment: {e}") from None
        port = env.get("MASTER_PORT")
        return cls(
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(port) if port else free_port(),
            launcher="single",
        )

    def export(self, environ: dict[str, str] | os._Environ | None = None) -> None:
        """Write the torchrun-style variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
        MASTER_ADDR, MASTER_PORT) so libraries that read them (DeepSpeed) agree with us."""
        environ = os.environ if environ is None else environ
        environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _launcher_name(env: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        return "deepspeed"
    return env.get("POSEBERT_LAUNCHER", "env")


def _from_rank_vars(env: Mapping[str, str]) -> DistEnv:
    world = int(env["WORLD_SIZE"])
    local_world = env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE"))
    return DistEnv(
        rank=int(env["RANK"]),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(local_world) if local_world else world,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        launcher=_launcher_name(env),
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    nodelist = nodelist or env["SLURM_NODELIST"]
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    else:
        port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"].split("_")[0]) % 20000
    return DistEnv(
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        world_size=int(env["SLURM_NTASKS"]),
        local_world_size=_slurm_local_world_size(env),
        master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
        master_port=port,
        launcher="slurm",
    )


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    """Tasks on this node: this node's entry of SLURM_STEP_TASKS_PER_NODE (the step's own
    layout; '2(x3),1' = 2, 2, 2, 1), else SLURM_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE.
    The latter is inherited from sbatch and wrong when srun lays the step out otherwise."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return int(env.get("SLURM_NTASKS_PER_NODE") or env["SLURM_NTASKS"])
    counts = expand_tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM_NODEID={node} but tasks per node {spec!r} lists {len(counts)}")
    return counts[node]


def expand_tasks_per_node(spec: str) -> list[int]:
    """'2(x3),1' -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE's run-length format)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"cannot parse tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names, in order.

    'n[1-3,5]' -> n1 n2 n3 n5; zero padding is kept ('gpu[08-10]' -> gpu08 gpu09 gpu10);
    several groups ('a[1-2],b3') and several bracket ranges in one name
    ('r[1-2]-n[1-2]' -> r1-n1 r1-n2 r2-n1 r2-n2) are expanded.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        hosts += _expand_name(name)
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_name(name: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", name)
    if m is None:
        if "[" in name or "]" in name:
            raise ValueError(f"bad host name {name!r}")
        return [name]
    head, tail = name[: m.start()], name[m.end() :]
    out = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in host name {name!r}")
        width = len(lo)
        for i in range(int(lo), int(hi if sep else lo) + 1):
            out += [head + str(i).zfill(width) + rest for rest in _expand_name(tail)]
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for single-process and local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    env: DistEnv | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DistEnv:
    """Initialise torch.distributed for ``env`` (read from the environment when None): gloo on
    CPU, nccl on GPU (one device per local rank), with a timeout so a dead peer ends the job
    instead of hanging it. Exports the torchrun-style variables. Idempotent."""
    env = DistEnv.from_environ() if env is None else env
    env.export()
    if tdist.is_initialized():
        if tdist.get_world_size() != env.world_size or tdist.get_rank() != env.rank:
            raise RuntimeError(
                f"torch.distributed already initialised as rank {tdist.get_rank()} of "
                f"{tdist.get_world_size()}, environment says {env.rank} of {env.world_size}"
            )
        return env
    backend = backend or default_backend()
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    tdist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return env


def shutdown(barrier_first: bool = True) -> None:
    """Leave the job cleanly: barrier, then destroy the default process group. A process that
    exits with its gloo group alive can abort in teardown ("terminate called without an active
    exception", exit 134) while a peer is still connected."""
    if not is_initialized():
        return
    if barrier_first and get_world_size() > 1:
        tdist.barrier()
    tdist.destroy_process_group()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed: ranks' output is interleaved by the launcher)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if get_world_size() > 1:
        tdist.barrier()


def all_reduce_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on any rank (one tiny all_reduce)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def ranks_where(flag: bool, device: torch.device | str = "cpu") -> list[int]:
    """The ranks on which ``flag`` is True, known to every rank (one all_gather)."""
    if get_world_size() == 1:
        return [0] if flag else []
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    out = [torch.zeros_like(t) for _ in range(get_world_size())]
    tdist.all_gather(out, t)
    return [r for r, v in enumerate(out) if v.item() > 0]


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; one all_reduce)."""
    if get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size, world = tdist.get_rank(), x.shape[0], tdist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        tdist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        if any(int(s) != x.shape[0] for s in sizes):
            raise ValueError(f"all_gather_with_grad: dim 0 differs across ranks: {sizes}")
        parts = [torch.empty_like(x) for _ in range(world)]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on this rank's rows: sum their gradients here, then the
        # engine's gradient averaging gives the gradient of the mean loss over ranks.
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 in rank order; the gradient flows
    back to each rank's own rows. One process: ``x`` itself."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
