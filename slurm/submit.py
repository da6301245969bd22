"""Submit rendered jobs with sbatch, chain them, record them, show their state.

The rendered script is written beside the run's outputs (``OUT/slurm/KIND.sbatch``) and each
submission appended to ``OUT/slurm_jobs.json``, which ``posebert slurm status OUT`` reads.
Everything up to the ``sbatch`` call is testable without a cluster (``dry_run``; a stub
``sbatch`` on PATH that prints "Submitted batch job N").
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from slurm.jobs import Job
from slurm.resources import last_line

JOBS_FILE = "slurm_jobs.json"
_SUBMITTED = re.compile(r"Submitted batch job (\d+)|^\s*(\d+)(?:;\S+)?\s*$")


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
        raise ValueError(f"sbatch {script.name} failed: {last_line(p.stderr, p.returncode)}")
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
    if dry_run:
        return Submitted(job.kind, None, str(job.script_path), dependency, str(job.log))
    job.record_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot open a log in a missing dir
    job.script_path.write_text(text)
    job_id = sbatch(job.script_path, dependency)
    done = Submitted(job.kind, job_id, str(job.script_path), dependency, str(job.log))
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


def describe(done: Sequence[Submitted], jobs: Sequence[Job], dry_run: bool) -> str:
    """What a submission prints: each job's id, dependency, script and log; on a dry run
    every rendered script and the sbatch line that would submit it."""
    lines = []
    for d, job in zip(done, jobs, strict=True):
        if dry_run:
            dep = f" --dependency={d.dependency} --kill-on-invalid-dep=yes" if d.dependency else ""
            lines += [f"# ---- {d.script}", job.render(), f"# sbatch{dep} {d.script}", ""]
        else:
            after = f" after {d.dependency}" if d.dependency else ""
            lines.append(f"{d.kind}: job {d.job_id}{after}  (script {d.script}, log {d.log})")
    return "\n".join(lines)


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
