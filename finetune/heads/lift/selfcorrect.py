"""Self-correcting 2D -> 3D -> 2D lifting over time, after Wang et al., "3D Human Pose Machines
with Self-supervised Learning" (TPAMI 2019).

Reproduced from that paper: a 2D-to-3D module with temporal LSTMs over the sequence, a 3D-to-2D
pose projector of six fully connected layers, and the self-supervised correction: the predicted
3D, projected back by the projector, must match the input 2D, a loss that needs no 3D labels.
What differs: the paper lifts CNN image features; here the input is the 2D keypoints alone (the
shards' projections, optionally with detector noise), normalised to [-1, 1] (:func:`normalize_2d`)
and root-relative per frame. Per frame an MLP embeds the 2D, a **bidirectional** LSTM runs over
windows of ``window`` frames (so a frame's output depends on past and future frames of its
window: not causal; ``bidirectional=False`` makes it causal) and a linear head predicts
root-relative 3D in metres. Held-out sequences are lifted in overlapping windows, averaged.

The projector (root-relative 3D metres -> the normalised root-relative 2D the lifter sees) is
trained first on the labelled clips' (3D, 2D) pairs and then **frozen** while the lifter trains:
a frozen projector cannot drift to agree with wrong 3D, so the correction loss can only be met by
3D that projects onto the observed 2D. The supervised loss reads the 3D of the clips
``labelled_clips`` allows; the correction loss runs on every train clip and reads only its 2D
(the 3D of an unlabelled clip is never read, tested by setting it to NaN).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from data_shards.skeleton import NUM_JOINTS, ROOT
from finetune.clips import Sequence
from finetune.heads.lift import base
from finetune.heads.lift.base import LiftConfig, labelled_clips, model_inputs
from finetune.heads.lift.cyclic import frame_inputs
from finetune.heads.lift.data import root_relative_m
from finetune.loop import Part


@dataclasses.dataclass(frozen=True)
class SelfCorrectConfig(LiftConfig):
    """The recipe: Adam with a cosine decay (``optim``) for the projector, then the lifter."""

    steps: int = 500
    """Optimiser steps of the lifter."""
    batch_size: int = 16
    """Windows per step."""
    window: int = 32
    """Frames per training window (and per evaluation window, half-overlapping)."""
    width: int = 256
    """Per-frame MLP width (the LSTM input)."""
    hidden: int = 128
    """LSTM units per direction."""
    layers: int = 2
    """Stacked LSTM layers."""
    bidirectional: bool = True
    """True: each frame sees its whole window (not causal); False: only past frames (causal)."""
    projector_width: int = 256
    """Width of the projector's five hidden layers."""
    projector_steps: int = 1000
    """Steps that fit the 3D -> 2D projector on the labelled clips before it is frozen."""
    correction_weight: float = 0.0
    """Weight of the self-supervised correction loss (0: off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "window": self.window >= 2, "width": self.width >= 1, "hidden": self.hidden >= 1,
            "layers": self.layers >= 1, "projector_width": self.projector_width >= 1,
            "projector_steps": self.projector_steps >= 1,
            "correction_weight": self.correction_weight >= 0, "labels": self.labels > 0,
        }  # fmt: skip
        base.check_fields(self, checks)


# ------------------------------------------------------------------------------ the networks


class TemporalLifter(nn.Module):
    """(B, T, J, 2) normalised root-relative 2D -> (B, T, J, 3) root-relative metres."""

    def __init__(self, config: SelfCorrectConfig) -> None:
        super().__init__()
        c = config
        self.embed = nn.Sequential(nn.Linear(NUM_JOINTS * 2, c.width), nn.ReLU(),
                                   nn.Linear(c.width, c.width), nn.ReLU())  # fmt: skip
        self.lstm = nn.LSTM(c.width, c.hidden, num_layers=c.layers, batch_first=True,
                            bidirectional=c.bidirectional)  # fmt: skip
        self.head = nn.Linear(c.hidden * (2 if c.bidirectional else 1), NUM_JOINTS * 3)

    def forward(self, x2d: torch.Tensor) -> torch.Tensor:
        features = self.embed(x2d.flatten(2))  # (B, T, D)
        out = self.head(self.lstm(features)[0]).unflatten(2, (NUM_JOINTS, 3))  # (B, T, J, 3)
        return out - out[..., ROOT : ROOT + 1, :]


class Projector(nn.Module):
    """(..., J, 3) root-relative metres -> (..., J, 2) normalised root-relative 2D: six fully
    connected layers (Wang et al.'s 3D-to-2D pose projector)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        sizes = [NUM_JOINTS * 3, *[width] * 5, NUM_JOINTS * 2]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
        self.layers = nn.Sequential(*layers)

    def forward(self, pose3d: torch.Tensor) -> torch.Tensor:
        out = self.layers(pose3d.flatten(-2)).unflatten(-1, (NUM_JOINTS, 2))
        return out - out[..., ROOT : ROOT + 1, :]


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Clips:
    """Train sequences, each padded (edge frames repeated) to at least one window."""

    inputs: list[torch.Tensor]
    """(N', J, 2) per sequence."""
    targets: list[torch.Tensor | None]
    """(N', J, 3) metres, or None for a clip whose 3D may not be read."""
    valid: list[torch.Tensor]
    """(N',) 1 on real frames, 0 on padding."""


def _pad(x: np.ndarray, length: int) -> np.ndarray:
    return x if len(x) >= length else np.concatenate([x, np.repeat(x[-1:], length - len(x), 0)])


def train_clips(sequences: list[Sequence], config: SelfCorrectConfig) -> Clips:
    labelled = labelled_clips(sequences, config.labels, config.seed)
    clips = Clips([], [], [])
    for s, px in zip(sequences, model_inputs(sequences, config, "train"), strict=True):
        clips.inputs.append(torch.from_numpy(_pad(frame_inputs(px, s.image_size), config.window)))
        clips.targets.append(torch.from_numpy(_pad(root_relative_m(s.pose3d).astype(np.float32),
                                                   config.window))
                             if s.clip in labelled else None)  # fmt: skip
        real = np.arange(max(s.frames, config.window)) < s.frames
        clips.valid.append(torch.from_numpy(real.astype(np.float32)))
    return clips


def sample_windows(clips: Clips, indices: list[int], count: int, window: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None,
                                                        torch.Tensor]:  # fmt: skip
    """``count`` random windows from the clips ``indices`` (chosen by length): inputs
    (B, T, J, 2), targets (B, T, J, 3) (None when any clip has none) and the valid mask (B, T)."""
    lengths = torch.tensor([len(clips.inputs[i]) for i in indices], dtype=torch.float)
    picks = torch.multinomial(lengths, count, replacement=True, generator=generator)
    xs, ys, ws = [], [], []
    for p in picks.tolist():
        i = indices[p]
        start = int(torch.randint(len(clips.inputs[i]) - window + 1, (1,), generator=generator))
        xs.append(clips.inputs[i][start : start + window])
        ws.append(clips.valid[i][start : start + window])
        target = clips.targets[i]
        ys.append(None if target is None else target[start : start + window])
    y = None if any(t is None for t in ys) else torch.stack(ys)
    return torch.stack(xs), y, torch.stack(ws)


# ------------------------------------------------------------------------------ fit


def fit_projector(clips: Clips, labelled: list[int], config: SelfCorrectConfig,
                  log: base.FitLog = base.QUIET) -> tuple[Projector, list[dict]]:  # fmt: skip
    """Fits the projector on the labelled frames' (3D, 2D) pairs (``projector_steps`` of the
    config's optimiser and schedule), then freezes it; logged as the ``projector`` part."""
    trainer = log.trainer(config, "projector")
    projector = trainer.prepare(Projector(config.projector_width))
    pose3d = torch.cat([clips.targets[i][clips.valid[i] > 0] for i in labelled])
    pose2d = torch.cat([clips.inputs[i][clips.valid[i] > 0] for i in labelled])
    generator = torch.Generator().manual_seed(config.seed + 1)
    batch = min(256, len(pose3d))

    def step(i: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(pose3d), (batch,), generator=generator)
        x, y = pose3d[idx].to(trainer.device), pose2d[idx].to(trainer.device)
        return {"projector": base.joint_distance(projector(x), y)}

    losses = trainer.fit(step, Part(projector.parameters(), config.optim, loss="projector"),
                         config.projector_steps)  # fmt: skip
    return trainer.unwrap(projector).requires_grad_(False).eval(), losses


class FittedSelfCorrect:
    def __init__(self, lifter: TemporalLifter, projector: Projector, config: SelfCorrectConfig,
                 losses: list[dict], projector_losses: list[dict]) -> None:  # fmt: skip
        self.lifter, self.projector, self.config = lifter.eval(), projector, config
        self.losses, self.projector_losses = losses, projector_losses

    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        return [lift_sequence(self.lifter, frame_inputs(px, s.image_size), self.config.window)
                * 1000.0 for s, px in zip(sequences, model_inputs(sequences, self.config, split),
                                          strict=True)]  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"lifter.{k}": v for k, v in self.lifter.state_dict().items()},
            **{f"projector.{k}": v for k, v in self.projector.state_dict().items()},
        }


@torch.no_grad()
def lift_sequence(lifter: TemporalLifter, x2d: np.ndarray, window: int) -> np.ndarray:
    """(N, J, 2) -> (N, J, 3) metres: windows of ``window`` frames every ``window // 2`` (the
    last one flush with the end), each frame the mean of the windows that hold it."""
    n = len(x2d)
    starts = list(range(0, max(n - window, 0) + 1, max(window // 2, 1)))
    if starts[-1] + window < n:
        starts.append(n - window)
    device = base.module_device(lifter)
    x = torch.from_numpy(x2d).to(device)
    total = torch.zeros(n, NUM_JOINTS, 3, device=device)
    count = torch.zeros(n, 1, 1, device=device)
    for a in starts:
        total[a : a + window] += lifter(x[None, a : a + window])[0]
        count[a : a + window] += 1
    return (total / count).cpu().numpy()


def restore(config: SelfCorrectConfig, state_dict: dict[str, torch.Tensor]
            ) -> FittedSelfCorrect:  # fmt: skip
    lifter, projector = TemporalLifter(config), Projector(config.projector_width)
    for prefix, module in (("lifter.", lifter), ("projector.", projector)):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items()
                                if k.startswith(prefix)})  # fmt: skip
        module.to(base.resolve_device(config.device))
    return FittedSelfCorrect(lifter.eval(), projector.requires_grad_(False).eval(), config,
                             [], [])  # fmt: skip


def fit(data: base.LiftData, config: SelfCorrectConfig,
        log: base.FitLog = base.QUIET) -> FittedSelfCorrect:
    torch.manual_seed(config.seed)
    clips = train_clips(data.train, config)
    labelled = [i for i, t in enumerate(clips.targets) if t is not None]
    everything = list(range(len(clips.inputs)))
    unlabelled = Clips(clips.inputs, [None] * len(everything), clips.valid)  # 2D only
    projector, projector_losses = (fit_projector(clips, labelled, config, log)
                                   if config.correction_weight > 0
                                   else (Projector(config.projector_width), []))  # fmt: skip
    trainer = log.trainer(config)
    lifter = trainer.prepare(TemporalLifter(config))
    projector = projector.to(trainer.device)
    generator = torch.Generator().manual_seed(config.seed)

    def step(i: int) -> dict[str, torch.Tensor]:
        x, y, w = (t.to(trainer.device) for t in sample_windows(
            clips, labelled, config.batch_size, config.window, generator))  # fmt: skip
        terms = {"supervised": base.joint_distance(lifter(x).flatten(0, 1), y.flatten(0, 1),
                                              w.flatten())}  # fmt: skip
        if config.correction_weight > 0:  # every clip, its 2D only (y is never drawn here)
            xu, _, wu = sample_windows(unlabelled, everything, config.batch_size,
                                       config.window, generator)  # fmt: skip
            xu, wu = xu.to(trainer.device), wu.to(trainer.device)
            terms["correction"] = base.joint_distance(projector(lifter(xu)).flatten(0, 1),
                                                 xu.flatten(0, 1), wu.flatten())  # fmt: skip
        loss = terms["supervised"] + config.correction_weight * terms.get("correction", 0.0)
        return {"loss": loss, **terms}

    losses = trainer.fit(step, Part(lifter.parameters(), config.optim), config.steps)
    # both stay on the trainer's device
    return FittedSelfCorrect(trainer.unwrap(lifter), projector, config, losses, projector_losses)


ROWS = {
    "supervised no correction": {},
    "supervised + correction": {"correction_weight": 1.0},
    "10% labels no correction": {"labels": 0.1},
    "10% labels + correction (unlabelled clips)": {"labels": 0.1, "correction_weight": 1.0},
}

METHOD = base.LiftMethod(
    name="selfcorrect",
    config=SelfCorrectConfig,
    rows=ROWS,
    fit=fit,
    restore=restore,
    describe="Wang et al. (TPAMI 2019) self-correcting 2D-3D-2D lifting: per-frame MLP + "
    "bidirectional LSTM over 32-frame windows, a six-layer 3D -> 2D projector fitted on the "
    "labelled clips then frozen, and a reprojection (correction) loss on every clip",
)
