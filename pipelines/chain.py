"""The chain of ``posebert`` commands every pipeline runs, defined once.

pretrain -> export -> retrieval -> pose head -> future head, each a :class:`~pipelines.stages.
Stage` (the command's arguments, the file that exists once it is done, and whether it runs as
one process or on every rank of a job). ``posebert demo`` and ``posebert ablation`` run these
stages locally; ``posebert slurm pipeline`` groups the same stages into chained Slurm jobs
(:mod:`pipelines.slurm`). This module imports no training code, so the Slurm side stays light.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipelines.stages import Stage


@dataclasses.dataclass(frozen=True)
class Chain:
    """One pretraining run and its evaluation: where everything goes and how it is made."""

    shards: Path
    """Shard root (train, val, test)."""
    out: Path
    """Run folder: pretrain/, encoder/, retrieval/, pose/, future/ beneath it."""
    recipe: str = "demo_cpu"
    """Pretraining recipe."""
    levers: str | None = None
    """``posebert pretrain --levers`` (None: the recipe's own)."""
    pretrain_sets: tuple[str, ...] = ()
    """``--set`` overrides of the pretraining run."""
    max_steps: int | None = None
    """The run's last step (its final checkpoint marks the stage done); None: unknown."""
    pose_recipe: str = "default"
    pose_sets: tuple[str, ...] = ()
    future_recipe: str = "default"
    future_sets: tuple[str, ...] = ()
    nproc: int = 1
    """Local processes of the pretraining stage (``--nproc-per-node``)."""
    train_split: str | None = None
    """Split pretraining reads (default SHARDS/train)."""
    run_dir: Path | None = None
    """The pretraining run (None: OUT/pretrain), e.g. ``posebert slurm submit evaluate --run``."""
    encoder_dir: Path | None = None
    """The exported encoder (None: OUT/encoder), e.g. ``posebert slurm submit finetune
    --encoder``."""

    @property
    def run(self) -> Path:
        return self.run_dir or self.out / "pretrain"

    @property
    def encoder(self) -> Path:
        return self.encoder_dir or self.out / "encoder"


def _sets(values: tuple[str, ...]) -> list[str]:
    return [f"--set={v}" for v in values]


def pretrain(c: Chain) -> Stage:
    run = c.run
    args = ["pretrain", "--recipe", c.recipe, "--out", str(run)]
    args += ["--nproc-per-node", str(c.nproc)] if c.nproc > 1 else []
    args += ["--levers", c.levers] if c.levers is not None else []
    args += [f"--set=data.train={c.train_split or c.shards / 'train'}", *_sets(c.pretrain_sets)]
    done = run / "checkpoints" / (f"step_{c.max_steps}" if c.max_steps else "final")
    return Stage("pretrain", args, done, ranks="all")


def export(c: Chain) -> Stage:
    return Stage("export", ["export", "--run", str(c.run), "--out", str(c.encoder)],
                 c.encoder / "model.safetensors")  # fmt: skip


def retrieval(c: Chain, queries: str = "val", out: Path | None = None,
              cache: Path | None = None) -> Stage:  # fmt: skip
    out = out or c.out / "retrieval"
    args = ["evaluate", "retrieval", "--encoder", str(c.encoder), "--shards", str(c.shards),
            "--out", str(out), "--queries", queries]  # fmt: skip
    args += ["--cache", str(cache)] if cache is not None else []
    return Stage("retrieval", args, out / "retrieval.json", ranks="all")


def pose(c: Chain) -> Stage:
    out = c.out / "pose"
    args = ["finetune", "pose", "--encoder", str(c.encoder), "--shards", str(c.shards),
            "--out", str(out), "--cache", str(c.out / "retrieval" / "cache"),
            "--recipe", c.pose_recipe, *_sets(c.pose_sets)]  # fmt: skip
    return Stage("pose", args, out / "pose.json")


def future(c: Chain) -> Stage:
    out = c.out / "future"
    args = ["finetune", "future", "--shards", str(c.shards), "--out", str(out),
            "--recipe", c.future_recipe, *_sets(c.future_sets)]  # fmt: skip
    return Stage("future", args, out / "future.json")


def evaluation(c: Chain) -> list[Stage]:
    """Everything after pretraining: export, retrieval, the pose head, the future head."""
    return [export(c), retrieval(c), pose(c), future(c)]


def full(c: Chain) -> list[Stage]:
    """The whole chain: pretraining, then :func:`evaluation`."""
    return [pretrain(c), *evaluation(c)]
