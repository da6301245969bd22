"""What a job asks the scheduler for: the site's defaults (``common.sh``), the command line's
request, and the ``#SBATCH`` lines they make.

Every site knob lives in ``common.sh``; :func:`site_settings` reads it the way a job will (its
defaults, overridden by the environment), and :func:`resolve` fills what a command line left
open from it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = HERE / "common.sh"
KNOBS = (
    "POSEBERT_PARTITION",
    "POSEBERT_ACCOUNT",
    "POSEBERT_QOS",
    "POSEBERT_GPUS_PER_NODE",
    "POSEBERT_CPUS_PER_TASK",
    "POSEBERT_TIME",
    "POSEBERT_EVAL_TIME",
    "POSEBERT_SHARDS_TIME",
    "POSEBERT_SIGNAL_S",
    "POSEBERT_ARRAY_PARALLEL",
    "POSEBERT_SBATCH_EXTRA",
)
TIME_KNOBS = {"pretrain": "POSEBERT_TIME", "shards": "POSEBERT_SHARDS_TIME"}
"""The time limit of each kind of job (every other kind: POSEBERT_EVAL_TIME)."""
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def site_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The knobs of ``common.sh`` as the job will see them (its defaults, overridden by the
    environment), read by sourcing it in bash."""
    script = (
        'source "$1" >/dev/null || exit 3; shift; for v; do printf "%s=%s\\0" "$v" "${!v-}"; done'
    )
    p = subprocess.run(
        ["bash", "-c", script, "bash", str(COMMON), *KNOBS],
        capture_output=True,
        text=True,
        env=None if environ is None else dict(environ),
        timeout=30,
    )
    if p.returncode != 0:
        raise ValueError(f"{COMMON}: sourcing it failed: {last_line(p.stderr, p.returncode)}")
    return dict(item.split("=", 1) for item in p.stdout.split("\0") if item)


def site_int(site: Mapping[str, str], key: str) -> int:
    try:
        return int(site[key])
    except (KeyError, ValueError):
        raise ValueError(f"slurm/common.sh: {key}={site.get(key)!r} is not a number") from None


def last_line(text: str, code: int) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {code}"


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one job asks the scheduler for (the #SBATCH lines)."""

    nodes: int = 1
    """Nodes (--nodes)."""
    gpus_per_node: int = 0
    """GPUs per node; one task (rank) per GPU. 0: a CPU job."""
    tasks_per_node: int = 1
    """Tasks per node (--ntasks-per-node); equals gpus_per_node on GPU jobs."""
    cpus_per_task: int = 1
    """CPU cores per task (--cpus-per-task): the rank and its loader workers."""
    time: str = "01:00:00"
    """Time limit in a Slurm format (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    job_name: str = "posebert"
    signal_s: int | None = None
    """SIGUSR1 to the step's tasks this long before the limit, plus --requeue (preemptible)."""
    array: str | None = None
    """--array specification (shard building)."""
    extra: tuple[str, ...] = ()
    """More #SBATCH options (common.sh POSEBERT_SBATCH_EXTRA)."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node < 1 or self.cpus_per_task < 1:
            raise ValueError("--tasks-per-node and --cpus-per-task must be >= 1")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(
                f"{self.gpus_per_node} GPUs per node need {self.gpus_per_node} tasks per node "
                f"(one rank per GPU), not {self.tasks_per_node}; --tasks-per-node is for CPU "
                "jobs (--gpus-per-node 0)"
            )
        limit = time_seconds(self.time)
        if self.signal_s is not None and not 0 < self.signal_s < limit:
            raise ValueError(
                f"the preemption warning ({self.signal_s} s before the limit) must be > 0 and "
                f"shorter than the time limit {self.time} ({limit} s)"
            )
        for name in ("job_name", "partition", "account", "qos"):
            if re.search(r"\s", getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} contains whitespace")

    def one_task(self) -> Resources:
        """The same with one task (and at most one GPU) per node: one process on one node."""
        return dataclasses.replace(self, gpus_per_node=min(self.gpus_per_node, 1), tasks_per_node=1)

    def directives(self, record_dir: Path, workdir: Path) -> list[str]:
        log = "%x-%A_%a.out" if self.array else "%x-%j.out"
        lines = [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
        ]
        lines += [f"--gpus-per-node={self.gpus_per_node}"] * bool(self.gpus_per_node)
        lines += [
            f"--time={self.time}",
            f"--output={record_dir / log}",
            "--open-mode=append",
            f"--chdir={workdir}",
        ]
        for name in ("partition", "account", "qos"):
            if getattr(self, name):
                lines.append(f"--{name}={getattr(self, name)}")
        if self.array:
            lines.append(f"--array={self.array}")
        if self.signal_s is not None:
            lines += [f"--signal=USR1@{self.signal_s}", "--requeue"]
        return lines + list(self.extra)


def time_seconds(text: str) -> int:
    """A Slurm time limit in seconds ('30' = 30 min, '1-12' = 36 h, '2:00:00' = 2 h)."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    return int(a) * 60 + int(b or 0)


@dataclasses.dataclass(frozen=True)
class Request:
    """The resource flags of a ``posebert slurm`` command; None: the site's default."""

    nodes: int = 1
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    """CPU jobs only: ranks per node (default 1); a GPU job runs one task per GPU."""
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    """None: posebert-KIND."""
    signal_s: int | None = None
    """Preemptible (pretraining) jobs: the USR1 warning, seconds before the limit."""


def resolve(
    request: Request, kind: str, site: Mapping[str, str] | None = None, **fixed
) -> Resources:
    """The resources of a job of ``kind`` (pretrain, evaluate, finetune, shards): the request,
    the site's defaults (``common.sh``, read when ``site`` is None) for what it leaves open,
    then ``fixed`` (the job's own shape, e.g. ``nodes=1``). Pretraining jobs get the
    preemption warning."""
    site = site_settings() if site is None else site
    r = request
    gpus = r.gpus_per_node
    gpus = gpus if gpus is not None else site_int(site, "POSEBERT_GPUS_PER_NODE")
    if gpus and r.tasks_per_node is not None and r.tasks_per_node != gpus:
        raise ValueError(
            "--tasks-per-node is for CPU jobs (--gpus-per-node 0): with GPUs "
            "there is one task per GPU"
        )
    values = dict(
        nodes=r.nodes,
        gpus_per_node=gpus,
        tasks_per_node=gpus or (r.tasks_per_node if r.tasks_per_node is not None else 1),
        cpus_per_task=r.cpus_per_task or site_int(site, "POSEBERT_CPUS_PER_TASK"),
        time=r.time or site.get(TIME_KNOBS.get(kind, "POSEBERT_EVAL_TIME")) or "01:00:00",
        partition=r.partition if r.partition is not None else site["POSEBERT_PARTITION"],
        account=r.account if r.account is not None else site["POSEBERT_ACCOUNT"],
        qos=site.get("POSEBERT_QOS", ""),
        job_name=r.job_name or f"posebert-{kind}",
        extra=tuple(shlex.split(site.get("POSEBERT_SBATCH_EXTRA", ""))),
    )
    if kind == "pretrain":
        values["signal_s"] = (
            r.signal_s if r.signal_s is not None else site_int(site, "POSEBERT_SIGNAL_S")
        )
    values.update(fixed)
    return Resources(**values)
