"""The jobs: a script of this folder with its settings filled in.

A job script here is bash with two marker lines: ``#@SBATCH@`` becomes the ``#SBATCH``
directives (from the command line and the defaults in ``common.sh``) and ``#@SETTINGS@`` the
script's variables, with absolute paths: sbatch runs a *copy* of the script from its spool
directory, so ``$0`` and ``dirname`` say nothing about where the repository is.

- ``pretrain.sbatch``: one ``posebert`` command on every rank, preemptible and self-requeueing.
- ``stages.sbatch``: stages (each one ``posebert`` command, on one task or on every rank) in
  order, stopping at the first that fails; ``posebert slurm pipeline`` gives it the stages of
  ``pipelines/chain.py``.
- ``shards.sbatch``: a job array building shards.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from slurm.resources import COMMON, HERE, Resources

RANKS = ("one", "all")


class Stage(Protocol):
    """One stage of a job (``pipelines.stages.Stage`` is one): ``posebert ARGS``."""

    name: str
    args: list[str]
    ranks: str
    """one: a single task; all: one srun task per GPU (or per --tasks-per-node) on every node."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One job to render and submit: a script of this folder with its settings."""

    kind: str
    """pretrain, evaluate, finetune or shards: the rendered script is RECORD_DIR/KIND.sbatch."""
    template: str
    """The script of this folder it renders (TEMPLATE.sbatch): pretrain, stages or shards."""
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

    @property
    def log(self) -> Path:
        return self.record_dir / ("%x-%A_%a.out" if self.resources.array else "%x-%j.out")

    def render(self) -> str:
        """The job script: the template with its directives and settings filled in."""
        for path in (self.record_dir, self.workdir):
            if re.search(r"\s", str(path)):
                raise ValueError(f"{path}: #SBATCH lines cannot hold a path with whitespace")
        template = (HERE / f"{self.template}.sbatch").read_text()
        directives = "\n".join(
            f"#SBATCH {d}" for d in self.resources.directives(self.record_dir, self.workdir)
        )
        settings = {"POSEBERT_COMMON": str(COMMON), "POSEBERT": posebert_command(), **self.settings}
        block = "\n".join(_assign(k, v) for k, v in settings.items())
        for marker, text in (("#@SBATCH@", directives), ("#@SETTINGS@", block)):
            if template.count(f"\n{marker}\n") != 1:
                raise ValueError(f"{self.template}.sbatch: needs exactly one {marker} line")
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


def absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(path))


# ----------------------------------------------------------------------------- the jobs


def preemptible_job(
    resources: Resources,
    name: str,
    args: Sequence[str],
    record_dir: Path,
    shards: Path | None = None,
    kind: str = "pretrain",
) -> Job:
    """``posebert ARGS`` on every rank (one srun task per GPU, or tasks_per_node on CPU),
    requeued after exit 75 (preempted, checkpoint written). With ``shards``, the job appends
    ``--set=data.train=`` ROOT, ROOT/train or every ROOT/part-*/train, found when it starts."""
    if resources.signal_s is None:
        raise ValueError("pretraining jobs are preemptible: give the USR1 warning (signal_s)")
    settings = {
        "NAME": name,
        "STAGE": list(args),
        "SHARDS": str(absolute(shards)) if shards else "",
    }
    return Job(kind, "pretrain", resources, settings, record_dir)


def pretrain_job(
    resources: Resources,
    recipe: str,
    out: Path,
    shards: Path | None = None,
    overrides: Sequence[str] = (),
    record_dir: Path | None = None,
) -> Job:
    """``posebert pretrain --recipe RECIPE --out OUT`` as a :func:`preemptible_job`; its
    training data from ``shards`` (default: the recipe's)."""
    out = absolute(out)
    args = ["pretrain", "--recipe", recipe, "--out", str(out), *(f"--set={o}" for o in overrides)]
    return preemptible_job(resources, "pretrain", args, record_dir or out / "slurm", shards)


def stages_job(kind: str, resources: Resources, stages: Sequence[Stage], record_dir: Path) -> Job:
    """The ``stages`` in order in one job (``stages.sbatch``), stopping at the first that
    fails: ``STAGES`` (names), ``RANKS`` and one array ``STAGE_i`` of arguments each."""
    if not stages:
        raise ValueError(f"{kind}: a job needs at least one stage")
    settings: dict[str, str | Sequence[str]] = {
        "STAGES": [s.name for s in stages],
        "RANKS": [s.ranks for s in stages],
    }
    for i, stage in enumerate(stages):
        if stage.ranks not in RANKS:
            raise ValueError(
                f"stage {stage.name}: ranks must be one of {RANKS}, not {stage.ranks!r}"
            )
        if not stage.args:
            raise ValueError(f"stage {stage.name}: no posebert arguments")
        settings[f"STAGE_{i}"] = list(stage.args)
    return Job(kind, "stages", resources, settings, record_dir)


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
    items = [str(absolute(Path(f))) for f in inputs] if inputs else list(clips)
    tasks = -(-len(items) // per_task)
    array = f"0-{tasks - 1}" + (f"%{parallel}" if parallel > 0 else "")
    resources = dataclasses.replace(resources, array=array)
    out = absolute(out)
    return Job(
        "shards",
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


def clip_names(text: str | None) -> list[str]:
    """``--clips A,B,...`` (or ``all``: every embedded motion clip); None: none."""
    if text is None:
        return []
    if text.strip() == "all":
        from data_shards.mocap import CLIP_NAMES

        return list(CLIP_NAMES)
    return [c.strip() for c in text.split(",") if c.strip()]
