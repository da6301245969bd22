"""Stages of a pipeline: each one ``posebert`` command, printed before it runs, skipped when its
output exists, so running a pipeline again continues where it stopped; a record of what ran
(command and seconds) is kept beside the outputs."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Protocol

from data_shards.manifest import atomic_write_text


class Done(Protocol):
    """What marks a stage finished: a file's path, or any check with ``exists()``."""

    def exists(self) -> bool: ...


@dataclasses.dataclass
class Stage:
    name: str
    args: list[str]
    """Arguments of the ``posebert`` command."""
    done: Done
    """Exists once the stage has finished (usually the path of its last output)."""
    ranks: Literal["one", "all"] = "one"
    """In a Slurm job: one process, or one task per GPU (``srun``: pretraining, embedding)."""

    @property
    def command(self) -> str:
        return shlex.join(["posebert", *self.args])


def open_record(record_path: Path, what: str, settings: dict) -> dict:
    """The stage record of a staged run (``{"settings", "stages"}``), continued from
    ``record_path`` when it holds one with the same settings; creates the folder. One-line
    ``ValueError`` when nproc is below 1 or the folder holds ``what`` with other settings."""
    if settings.get("nproc", 1) < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {settings['nproc']}")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record and record.get("settings") != settings:
        raise ValueError(f"{record_path.parent} holds {what} with other settings "
                         f"{record.get('settings')}; choose another --out or delete "
                         "it")  # fmt: skip
    record_path.parent.mkdir(parents=True, exist_ok=True)
    return {"settings": settings, "stages": record.get("stages", {})}


def run_stages(stages: list[Stage], tag: str, record: dict, record_path: Path) -> int:
    """Run each stage whose output is missing as ``python -m posebert ARGS``, printing the
    command first; record its command and time in ``record["stages"]`` (saved to
    ``record_path`` after each). Returns 0, or the failed stage's exit code (at least 1)."""
    for i, stage in enumerate(stages, 1):
        command = stage.command
        if stage.done.exists():
            print(f"[{tag} {i}/{len(stages)}] {stage.name}: done already ({stage.done})",
                  flush=True)  # fmt: skip
            continue
        print(f"[{tag} {i}/{len(stages)}] {stage.name}: $ {command}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "posebert", *stage.args])
        seconds = time.perf_counter() - t0
        if code != 0 or not stage.done.exists():
            print(f"{tag}: stage {stage.name} failed (exit {code}); fix the cause above and run "
                  f"the same {tag} command again to continue", file=sys.stderr)  # fmt: skip
            return code or 1
        record["stages"][stage.name] = {"command": command, "seconds": round(seconds, 1)}
        atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return 0


def print_plan(stages: list[Stage], tag: str) -> int:
    """``--dry-run``: every stage's command in order, marked where its output already exists
    (a real run would skip it); runs and writes nothing. Returns 0."""
    for i, stage in enumerate(stages, 1):
        status = "  # done already" if stage.done.exists() else ""
        print(f"[{tag} {i}/{len(stages)}] {stage.name}: $ {stage.command}{status}", flush=True)
    return 0
