"""The chain of ``posebert`` commands every pipeline runs, defined once.

pretrain -> export -> retrieval -> pose head -> future head, each a :class:`~pipelines.stages.
Stage` (the command's arguments, the file that exists once it is done, and whether it runs as
one process or on every rank of a job). ``posebert demo`` and ``posebert ablation`` run these
stages locally; ``posebert slurm pipeline`` groups the same stages into chained Slurm jobs
(:mod:`pipelines.slurm`). This module imports no training code, so the Slurm side stays light.

The video chain (:func:`video`): the detector over the shards -> a lifter trained on its 2D ->
an embedded clip rendered as an ordinary video -> ``posebert predict`` of that video.
"""

from __future__ import annotations

import dataclasses
import json
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


# ------------------------------------------------------------------------------ video chain


@dataclasses.dataclass(frozen=True)
class VideoChain:
    """From the shards to the 3D poses of an ordinary video, through the 2D detector."""

    shards: Path
    """Shard root the detector runs over (in place) and the lifter trains on."""
    out: Path
    """Run folder: lift-detected/, <clip>.mp4 (+ its truth), predict/ beneath it."""
    clip: str = "dance_b"
    """The held-out clip rendered as the video."""
    video_sets: tuple[str, ...] = ("size=[640,360]", "fps=50")
    """``shards render-video --set`` fields (size, fps, max_frames, ...)."""
    lift_sets: tuple[str, ...] = ()
    """``finetune lift --set`` overrides of the lifter."""
    row: str = "rf27"
    """The TCN row trained and used."""
    workers: int = 2
    """Detector processes."""

    @property
    def lifter(self) -> Path:
        return self.out / "lift-detected"

    @property
    def video(self) -> Path:
        return self.out / f"{self.clip}.mp4"

    @property
    def prediction(self) -> Path:
        """``posebert predict``'s summary of the video (written last, once all is there)."""
        return self.out / "predict" / f"{self.clip}.json"


@dataclasses.dataclass(frozen=True)
class SplitsCarry:
    """The ``done`` of a stage that rewrites shards in place and leaves no file of its own:
    every split's manifest under ``root`` says it carries ``member`` (what
    :func:`pipelines.stages.run_stages` asks of a stage's ``done``: ``exists()``)."""

    root: Path
    member: str

    def exists(self) -> bool:
        manifests = [m for m in sorted(self.root.glob("*/manifest.json"))
                     if not m.parent.name.startswith(".")]  # a writer's unfinished split
        return bool(manifests) and all(
            json.loads(m.read_text()).get("has", {}).get(self.member) for m in manifests)

    def __str__(self) -> str:
        return f"every split of {self.root} carries {self.member}"


def detect(v: VideoChain) -> Stage:
    """The detector's 2D beside the ground truth of every split, in place (a split that carries
    them already is skipped, so a stopped run continues)."""
    args = ["shards", "detect", str(v.shards), "--workers", str(v.workers)]
    return Stage("detect", args, SplitsCarry(v.shards, "det2d"))


def lift_detected(v: VideoChain) -> Stage:
    args = ["finetune", "lift", "--method", "tcn", "--shards", str(v.shards), "--out",
            str(v.lifter), "--rows", v.row, "--input", "detected", *_sets(v.lift_sets)]  # fmt: skip
    return Stage("lift-detected", args, v.lifter / "lift.json")


def render_video(v: VideoChain) -> Stage:
    args = ["shards", "render-video", v.clip, "--out", str(v.video), *_sets(v.video_sets)]
    return Stage("render-video", args, v.video.with_name(v.video.name + ".truth.npz"))


def predict(v: VideoChain) -> Stage:
    args = ["predict", str(v.video), "--out", str(v.prediction.parent), "--lifter",
            str(v.lifter), "--row", v.row]  # fmt: skip
    return Stage("predict", args, v.prediction)


def video(v: VideoChain) -> list[Stage]:
    """detect -> lift on detected 2D -> render a held-out clip as a video -> predict it."""
    return [detect(v), lift_detected(v), render_video(v), predict(v)]
