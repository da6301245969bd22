"""Render the job scripts in this folder, submit them with sbatch, chain them, show their state.

A job script here (``pretrain.sbatch`` ...) is bash with two marker lines: ``#@SBATCH@`` becomes
the ``#SBATCH`` directives (from the command line and the defaults in ``common.sh``) and
``#@SETTINGS@`` the script's variables, with absolute paths: sbatch runs a *copy* of the script
from its spool directory, so ``$0`` and ``dirname`` say nothing about where the repository is.
The rendered script is written beside the run's outputs (``OUT/slurm/KIND.sbatch``) and each
submission appended to ``OUT/slurm_jobs.json``, which ``posebert slurm status OUT`` reads.

Everything up to the ``sbatch`` call is testable without a cluster (``dry_run``; a stub
``sbatch`` on PATH that prints "Submitted batch job N").
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = HERE / "common.sh"
KINDS = ("pretrain", "evaluate", "finetune", "shards")
JOBS_FILE = "slurm_jobs.json"
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
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_SUBMITTED = re.compile(r"Submitted batch job (\d+)|^\s*(\d+)(?:;\S+)?\s*$")


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
        raise ValueError(f"{COMMON}: sourcing it failed: {_last_line(p.stderr, p.returncode)}")
    return dict(item.split("=", 1) for item in p.stdout.split("\0") if item)


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
class Job:
    """One job to render and submit: a script of this folder with its settings."""

    kind: str
    """pretrain, evaluate, finetune or shards (the template ``KIND.sbatch``)."""
    resources: Resources
    settings: Mapping[str, str | Sequence[str]]
    """The script's variables: str -> ``NAME=value``, a list -> a bash array."""
    record_dir: Path
    """Where the rendered script and the job's log go (created on submission)."""
    workdir: Path = dataclasses.field(default_factory=Path.cwd)
    """The job's working directory (relative paths in a recipe are read from here)."""

    @property
    def script_path(self) -> Path:
        return self.record_dir / f"{self.kind}.sbatch"

    def render(self) -> str:
        """The job script: the template with its directives and settings filled in."""
        for path in (self.record_dir, self.workdir):
            if re.search(r"\s", str(path)):
                raise ValueError(f"{path}: #SBATCH lines cannot hold a path with whitespace")
        template = (HERE / f"{self.kind}.sbatch").read_text()
        directives = "\n".join(
            f"#SBATCH {d}" for d in self.resources.directives(self.record_dir, self.workdir)
        )
        settings = {"POSEBERT_COMMON": str(COMMON), "POSEBERT": posebert_command(), **self.settings}
        block = "\n".join(_assign(k, v) for k, v in settings.items())
        for marker, text in (("#@SBATCH@", directives), ("#@SETTINGS@", block)):
            if template.count(f"\n{marker}\n") != 1:
                raise ValueError(f"{self.kind}.sbatch: needs exactly one {marker} line")
            template = template.replace(f"\n{marker}\n", f"\n{text}\n")
        return template


def posebert_command() -> list[str]:
    """This environment's ``posebert`` (the venv's console script), as an absolute command;
    ``python -m posebert`` when the script is missing. Not symlink-resolved: the venv's
    python is a link out of the venv."""
    exe = Path(os.path.abspath(sys.executable))
    script = exe.parent / "posebert"
    return [str(script)] if script.is_file() else [str(exe), "-m", "posebert"]


def _assign(name: str, value: str | Sequence[str]) -> str:
    if isinstance(value, str):
        return f"{name}={shlex.quote(value)}"
    return f"{name}=({' '.join(shlex.quote(str(v)) for v in value)})"


def _last_line(text: str, code: int) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {code}"


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit ``script``; the job id. ValueError (one line) when sbatch is missing or fails."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise ValueError(
            "sbatch not found on PATH: submit from a SLURM login node, or use "
            "--dry-run to print the job script"
        )
    argv = [exe]
    if dependency:  # a dependency that can never be met cancels the job instead of parking it
        argv += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    p = subprocess.run([*argv, str(script)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise ValueError(f"sbatch {script.name} failed: {_last_line(p.stderr, p.returncode)}")
    for line in p.stdout.splitlines():
        m = _SUBMITTED.search(line)
        if m:
            return m.group(1) or m.group(2)
    raise ValueError(f"sbatch printed {p.stdout.strip()!r}, not 'Submitted batch job N'")


@dataclasses.dataclass
class Submitted:
    """One submission (``job_id`` None on a dry run)."""

    kind: str
    job_id: str | None
    script: str
    dependency: str | None
    log: str


def submit(
    job: Job, runs_dir: Path, dependency: str | None = None, dry_run: bool = False
) -> Submitted:
    """Render ``job``; unless ``dry_run``, write the script beside the run, submit it and
    append the submission to ``runs_dir/slurm_jobs.json``."""
    text = job.render()
    log = job.record_dir / ("%x-%A_%a.out" if job.resources.array else "%x-%j.out")
    if dry_run:
        return Submitted(job.kind, None, str(job.script_path), dependency, str(log))
    job.record_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot open a log in a missing dir
    job.script_path.write_text(text)
    job_id = sbatch(job.script_path, dependency)
    done = Submitted(job.kind, job_id, str(job.script_path), dependency, str(log))
    record(runs_dir, done)
    return done


def record(runs_dir: Path, done: Submitted) -> None:
    """Append a submission to ``runs_dir/slurm_jobs.json`` (temp file + rename)."""
    path = runs_dir / JOBS_FILE
    data = load_jobs(runs_dir) if path.is_file() else {"jobs": []}
    entry = dataclasses.asdict(done)
    entry["submitted"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["jobs"].append(entry)
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def load_jobs(runs_dir: Path) -> dict:
    path = Path(runs_dir) / JOBS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (submit with `posebert slurm ...` first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
        raise ValueError(f"{path}: expected {{'jobs': [...]}}")
    return data


# ----------------------------------------------------------------------------- the jobs


def pretrain_job(
    resources: Resources,
    recipe: str,
    out: Path,
    shards: Path | None = None,
    overrides: Sequence[str] = (),
    record_dir: Path | None = None,
) -> Job:
    """One srun task per GPU (or tasks_per_node on CPU), each ``posebert pretrain``."""
    if resources.signal_s is None:
        raise ValueError("pretraining jobs are preemptible: give the USR1 warning (signal_s)")
    out = _abs(out)
    return Job(
        "pretrain",
        resources,
        {
            "RECIPE": recipe,
            "RUN_DIR": str(out),
            "SHARDS": str(_abs(shards)) if shards else "",
            "SETS": [f"--set={o}" for o in overrides],
        },
        record_dir or out / "slurm",
    )


def evaluate_job(
    resources: Resources,
    pretrain_run: Path,
    shards: Path,
    out: Path,
    record_dir: Path | None = None,
) -> Job:
    """``posebert export`` of the run into OUT/encoder, then retrieval into OUT/retrieval."""
    out = _abs(out)
    return Job(
        "evaluate",
        resources,
        {"PRETRAIN_RUN": str(_abs(pretrain_run)), "SHARDS": str(_abs(shards)), "OUT": str(out)},
        record_dir or out / "slurm",
    )


def finetune_job(
    resources: Resources,
    encoder: Path,
    shards: Path,
    out: Path,
    record_dir: Path | None = None,
    pose_overrides: Sequence[str] = (),
    future_overrides: Sequence[str] = (),
) -> Job:
    """``posebert finetune pose`` into OUT/pose and ``future`` into OUT/future; one process.
    The overrides are the heads' ``--set key=value`` fields."""
    if resources.nodes != 1 or resources.tasks_per_node != 1:
        raise ValueError("fine-tuning runs one process: --nodes 1, one task (at most 1 GPU)")
    out = _abs(out)
    return Job(
        "finetune",
        resources,
        {
            "ENCODER": str(_abs(encoder)),
            "SHARDS": str(_abs(shards)),
            "OUT": str(out),
            "POSE_SETS": [f"--set={o}" for o in pose_overrides],
            "FUTURE_SETS": [f"--set={o}" for o in future_overrides],
        },
        record_dir or out / "slurm",
    )


def shards_job(
    resources: Resources,
    out: Path,
    inputs: Sequence[str] = (),
    clips: Sequence[str] = (),
    per_task: int = 1,
    extra: Sequence[str] = (),
    parallel: int = 0,
    record_dir: Path | None = None,
) -> Job:
    """A job array: task i runs ``posebert shards video`` on inputs[i*per_task:...] (or
    ``shards synth --clips`` on clips[...]) into OUT/part-i."""
    if bool(inputs) == bool(clips):
        raise ValueError("shards: give video --inputs or synth --clips (one of them)")
    if per_task < 1:
        raise ValueError(f"--per-task must be >= 1, got {per_task}")
    items = [str(_abs(Path(f))) for f in inputs] if inputs else list(clips)
    tasks = -(-len(items) // per_task)
    array = f"0-{tasks - 1}" + (f"%{parallel}" if parallel > 0 else "")
    resources = dataclasses.replace(resources, array=array)
    out = _abs(out)
    return Job(
        "shards",
        resources,
        {
            "MODE": "video" if inputs else "synth",
            "INPUTS": items,
            "PER_TASK": str(per_task),
            "OUT": str(out),
            "EXTRA": list(extra),
        },
        record_dir or out / "slurm",
    )


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Glob patterns (expanded here, not by the shell) -> sorted files; each must match."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if Path(f).is_file())
        if not matched:
            raise ValueError(f"--inputs {pattern!r} matches no file")
        files += [f for f in matched if f not in files]
    return files


def _abs(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """pretrain -> export + retrieval -> fine-tuning, each after the previous one succeeded."""

    pretrain: Resources
    evaluate: Resources
    finetune: Resources
    recipe: str
    shards: Path
    out: Path
    overrides: tuple[str, ...] = ()
    pose_overrides: tuple[str, ...] = ()
    future_overrides: tuple[str, ...] = ()


def pipeline_jobs(spec: PipelineSpec) -> list[Job]:
    """The three jobs; scripts and logs in RUN/slurm; RUN/pretrain, RUN/encoder,
    RUN/retrieval, RUN/pose, RUN/future."""
    run = _abs(spec.out)
    record_dir = run / "slurm"
    return [
        pretrain_job(
            spec.pretrain, spec.recipe, run / "pretrain", spec.shards, spec.overrides, record_dir
        ),
        evaluate_job(spec.evaluate, run / "pretrain", spec.shards, run, record_dir),
        finetune_job(spec.finetune, run / "encoder", spec.shards, run, record_dir,
                     spec.pose_overrides, spec.future_overrides),  # fmt: skip
    ]


def submit_chain(
    jobs: Sequence[Job], runs_dir: Path, after: str | None = None, dry_run: bool = False
) -> list[Submitted]:
    """Submit ``jobs`` in order, each with ``--dependency=afterok:`` the previous one (the
    first after ``after`` if given). A failure names the jobs already submitted."""
    done: list[Submitted] = []
    previous = after
    for job in jobs:
        dependency = f"afterok:{previous}" if previous else None
        try:
            done.append(submit(job, runs_dir, dependency, dry_run))
        except ValueError as e:
            if done and not dry_run:
                ids = ", ".join(f"{d.kind} {d.job_id}" for d in done)
                raise ValueError(
                    f"{e} (already submitted: {ids}; scancel them or "
                    "resubmit the rest with --after)"
                ) from None
            raise
        previous = done[-1].job_id or f"<{job.kind} job id>"
    return done


# ----------------------------------------------------------------------------- status


def _run_tool(argv: list[str]) -> subprocess.CompletedProcess | None:
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=60)


def parse_scontrol(text: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` output (one record per line, KEY=VALUE fields) -> dicts."""
    records = []
    for line in text.splitlines():
        fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
        if "JobId" in fields:
            records.append(fields)
    return records


def job_state(job_id: str) -> list[dict[str, str]]:
    """State rows of one job (several for an array): from ``scontrol show job`` while
    slurmctld remembers it (MinJobAge), else ``squeue``; no accounting database needed."""
    p = _run_tool(["scontrol", "show", "job", "-o", job_id])
    if p is not None and p.returncode == 0:
        rows = [
            {
                "job": f"{r['ArrayJobId']}_{r['ArrayTaskId']}"
                if r.get("ArrayJobId") and r.get("ArrayTaskId")
                else r.get("JobId", job_id),
                "state": r.get("JobState", "?"),
                "exit": r.get("ExitCode", "-"),
                "restarts": r.get("Restarts", "0"),
                "where": r.get("NodeList")
                if r.get("NodeList") not in (None, "(null)")
                else r.get("Reason", ""),
            }
            for r in parse_scontrol(p.stdout)
        ]
        if rows:
            return rows
    q = _run_tool(["squeue", "-h", "-j", job_id, "-o", "%i|%T|%R"])
    if q is not None and q.returncode == 0 and q.stdout.strip():
        rows = []
        for line in q.stdout.strip().splitlines():
            jid, state, where = (line.split("|") + ["", "", ""])[:3]
            rows.append({"job": jid, "state": state, "exit": "-", "restarts": "-", "where": where})
        return rows
    if p is None and q is None:
        raise ValueError("neither scontrol nor squeue is on PATH: run this on a SLURM login node")
    return [
        {
            "job": job_id,
            "state": "UNKNOWN",
            "exit": "-",
            "restarts": "-",
            "where": "no longer known to slurmctld (finished; no accounting queried)",
        }
    ]


def status_rows(runs_dir: Path) -> list[dict[str, str]]:
    """One row per job (array task) recorded in ``runs_dir/slurm_jobs.json``."""
    rows = []
    for entry in load_jobs(runs_dir)["jobs"]:
        if entry.get("job_id"):
            for r in job_state(str(entry["job_id"])):
                rows.append({"kind": entry.get("kind", "?"), **r})
    return rows


def format_table(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> str:
    widths = {c: max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
