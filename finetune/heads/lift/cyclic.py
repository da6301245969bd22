"""Cyclic 2D -> 3D -> 2D autoencoder with a bone-symmetry prior, per frame.

The encoder is the lifting network of Martinez et al., "A simple yet effective baseline for 3d
human pose estimation" (ICCV 2017): a linear layer to 1024 units, then two residual modules of
two (linear 1024 + batch norm + ReLU + dropout 0.5) layers each, then a linear layer to the 3D
joints. Reproduced here from that paper: the network, the per-frame 2D -> root-relative 3D task,
Adam with a decaying learning rate. Added on top, as the issue's ablation asks:

- a decoder of the same style (narrower; no batch norm, no dropout, see below) mapping the
  predicted 3D back to 2D, trained with a 2D reconstruction loss that flows back through the
  encoder (the "cycle"). Its target is the clean 2D (the shards' projections: the annotated 2D,
  no 3D needed) while the encoder reads detector-like input, and it is also trained on the
  labelled frames' true 3D -> clean 2D (``decoder_pairs``), so it is a real projector and the
  cycle on the predicted 3D is a consistency term. Root-relative 3D has lost the distance to
  the camera, so the decoder predicts 2D at unit RMS scale times the input 2D's scale;
- a bone-symmetry loss: each left bone as long as its mirror on the right
  (``LEFT_JOINTS``/``RIGHT_JOINTS`` of :mod:`data_shards.skeleton`);
- a skip connection from the input 2D to the decoder output: the decoder predicts a residual on
  top of the (noisy) input, its last layer starting at zero. Because the target is the clean
  2D, the residual is a 3D-informed correction of the detector noise and gets a real gradient
  (with a clean-input target it would get none, and "+ skip" would train like "+ both").

Every row sees the same detector-like input (the recipe's ``noise_px`` = 2 px Gaussian noise on
the 128 px crop, ``drop_prob`` = 5% of the joints dropped), so the rows stay comparable. On a
real detector's keypoints (``--input detected``) the rows start from no imitation noise, and the
decoder's target stays the clean, annotated 2D (a label, as the 3D is).

Why "+ decoder" first made the 3D far worse (val 476 mm against 139 mm, the 3D loss rising
while the reconstruction fell; weight 0.1 still 368 mm): Martinez et al.'s layer puts batch norm
right after the decoder's first linear layer, which reads the encoder's 3D. The encoder's head
starts at zero, so at step 1 the batch's 3D has no spread and batch norm divides by
sqrt(eps): the reconstruction gradient into the 3D was ~6e5 times the 3D loss's (measured:
8.6e3 against 0.015). Adam keeps that spike: its first moment drove the 3D the same way for ~100
steps (3D error 0.45 -> 2.4 m in 10 steps, 3D spread 0 -> 1.7 m) and its second moment then
shrank the encoder's step for the rest of the run. Batch norm also makes the decoder blind to
the 3D's scale, so nothing in the cycle resisted the growth. Measured at 150 steps, width 512
(val MPJPE, mm): encoder only 177; decoder as before 555; without the decoder's batch norm
(dropout 0.5 kept) 178; decoder dropout 0 with batch norm 727; true-3D pairs with batch norm
549. The fix is therefore no batch norm in the decoder (a projector must see the 3D's scale);
dropout 0 and the true-3D pairs are kept because a projector is deterministic and should be
one before the encoder is good, but neither is the cure.
On the demo shards (400 steps) the fixed decoder no longer hurts, but it does not help either
(val 160 against 158 mm), and the skip's residual, though it gets a gradient, stays near zero:
from the 3D alone it cannot tell the noise, and the noisy input (0.073) is already closer to
the clean 2D than the decoder's own projection (0.09).

What differs from Martinez et al.: inputs are the shards' 2D projections with detector noise,
normalised to [-1, 1] (:func:`normalize_2d`) and made root-relative per frame;
targets are root-relative metres; no max-norm constraint and a cosine learning-rate decay
instead of the exponential one (``optim.schedule``); fewer steps (a 2-core CPU recipe). The
supervised 3D loss and the decoder's true-3D pairs read only the clips ``labelled_clips``
allows; the cycle and symmetry losses use every train frame (they need no 3D).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from data_shards.skeleton import LEFT_JOINTS, NUM_JOINTS, PARENTS, RIGHT_JOINTS, ROOT
from finetune.clips import Sequence
from finetune.heads.lift import base
from finetune.heads.lift.base import LiftConfig, labelled_clips, model_inputs
from finetune.heads.lift.data import normalize_2d, root_relative_m
from finetune.loop import Part


@dataclasses.dataclass(frozen=True)
class CyclicConfig(LiftConfig):
    """The recipe: Martinez et al.'s encoder, Adam with a cosine decay (``optim``)."""

    steps: int = 400
    """Optimiser steps of ``batch_size`` random train frames."""
    width: int = 1024
    """Encoder width (Martinez et al.: 1024)."""
    blocks: int = 2
    """Residual modules of two layers each in the encoder (Martinez et al.: 2)."""
    decoder_width: int = 256
    """Decoder width."""
    decoder_blocks: int = 1
    """Residual modules of two layers each in the decoder."""
    dropout: float = 0.5
    """Encoder dropout (Martinez et al.: 0.5)."""
    decoder_norm: bool = False
    """Batch norm in the decoder's layers. Off: batch norm right after the decoder's first
    linear layer makes it blind to the scale of the 3D it reads, and divides the gradient to
    the encoder by the batch's spread of that 3D, which is ~0 for the zero-initialised encoder
    (see the module docstring)."""
    decoder_dropout: float = 0.0
    """Decoder dropout: 0, a projector is deterministic (0.5 keeps its error, and the gradient
    it sends to the encoder, noisy)."""
    decoder_pairs: bool = True
    """Also train the decoder on the labelled frames' true 3D -> clean 2D, so it is a real
    projector and the cycle through the predicted 3D is a consistency term."""
    noise_px: float = 2.0
    """Detector-like input for every row (the issue): 2 px Gaussian noise on the 128 px crop."""
    drop_prob: float = 0.05
    """... and 5% of the input joints dropped (moved to the centre of the kept ones)."""
    decoder_weight: float = 0.0
    """Weight of the 2D reconstruction loss through the decoder (0: no decoder)."""
    symmetry_weight: float = 0.0
    """Weight of the bone-symmetry loss on the predicted 3D (0: off)."""
    skip: bool = False
    """Decoder output = input 2D + decoder residual (needs the decoder)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "width": self.width >= 1, "blocks": self.blocks >= 0,
            "decoder_width": self.decoder_width >= 1, "decoder_blocks": self.decoder_blocks >= 0,
            "dropout": 0 <= self.dropout < 1, "decoder_dropout": 0 <= self.decoder_dropout < 1,
            "decoder_weight": self.decoder_weight >= 0,
            "symmetry_weight": self.symmetry_weight >= 0,
            "skip": not self.skip or self.decoder_weight > 0,
        }  # fmt: skip
        base.check_fields(self, checks, {"skip": " (the skip needs decoder_weight > 0)"})


# ------------------------------------------------------------------------------ the networks


def dense(d_in: int, d_out: int, dropout: float, norm: bool = True) -> nn.Sequential:
    """Martinez et al.'s layer: linear, batch norm (``norm``), ReLU, dropout."""
    return nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out) if norm else nn.Identity(),
                         nn.ReLU(), nn.Dropout(dropout))  # fmt: skip


class ResidualBlock(nn.Module):
    """Two :func:`dense` layers with an identity shortcut (Martinez et al., Fig. 1)."""

    def __init__(self, width: int, dropout: float, norm: bool = True) -> None:
        super().__init__()
        self.layers = nn.Sequential(dense(width, width, dropout, norm),
                                    dense(width, width, dropout, norm))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class MartinezMLP(nn.Module):
    """Linear-in -> ``blocks`` residual modules -> linear-out, on flat (B, D) vectors."""

    def __init__(self, d_in: int, d_out: int, width: int, blocks: int, dropout: float,
                 norm: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.stem = dense(d_in, width, dropout, norm)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout, norm) for _ in range(blocks)))
        self.head = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class CyclicLifter(nn.Module):
    """encode: (B, J, 2) normalised root-relative 2D -> (B, J, 3) root-relative metres;
    decode: (B, J, 3) -> (B, J, 2), plus the input 2D when ``skip``."""

    def __init__(self, config: CyclicConfig) -> None:
        super().__init__()
        c = config
        self.encoder = MartinezMLP(NUM_JOINTS * 2, NUM_JOINTS * 3, c.width, c.blocks, c.dropout)
        self.decoder = MartinezMLP(NUM_JOINTS * 3, NUM_JOINTS * 2, c.decoder_width,
                                   c.decoder_blocks, c.decoder_dropout, c.decoder_norm)  # fmt: skip
        # The default init puts the untrained encoder's joints about a metre off, which a
        # 2-core recipe of a few hundred steps spends most of its time undoing; start at zero
        nn.init.zeros_(self.encoder.head.weight)
        nn.init.zeros_(self.encoder.head.bias)
        self.skip = c.skip
        if self.skip:  # the residual starts at zero: the untrained decoder returns its input
            nn.init.zeros_(self.decoder.head.weight)
            nn.init.zeros_(self.decoder.head.bias)

    def encode(self, x2d: torch.Tensor) -> torch.Tensor:
        out = self.encoder(x2d.flatten(1)).unflatten(1, (NUM_JOINTS, 3))  # (B, J, 3)
        return out - out[:, ROOT : ROOT + 1]

    def decode(self, x3d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        """(B, J, 3) metres -> (B, J, 2) normalised root-relative 2D. Root-relative 3D has lost
        the distance to the camera, hence the 2D scale: the decoder predicts the 2D at unit
        RMS scale and takes the scale from the input 2D ``x2d`` (not differentiated)."""
        scale = x2d.detach().square().sum(-1).mean(-1).sqrt()[:, None, None]  # (B, 1, 1)
        out = self.decoder(x3d.flatten(1)).unflatten(1, (NUM_JOINTS, 2)) * scale  # (B, J, 2)
        return x2d + out if self.skip else out

    def forward(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pose3d = self.encode(x2d)
        return pose3d, self.decode(pose3d, x2d)


# ------------------------------------------------------------------------------ losses


def bone_symmetry_loss(pose3d: torch.Tensor) -> torch.Tensor:
    """Mean |left bone length - right bone length| over the mirrored bone pairs (each joint of
    ``LEFT_JOINTS`` with its parent against its ``RIGHT_JOINTS`` partner); (..., J, 3) input,
    answer in its units. Zero for a mirror-symmetric skeleton."""
    left, right = list(LEFT_JOINTS), list(RIGHT_JOINTS)
    parents_l, parents_r = [PARENTS[j] for j in left], [PARENTS[j] for j in right]
    length_l = (pose3d[..., left, :] - pose3d[..., parents_l, :]).norm(dim=-1)
    length_r = (pose3d[..., right, :] - pose3d[..., parents_r, :]).norm(dim=-1)
    return (length_l - length_r).abs().mean()


# ------------------------------------------------------------------------------ data


def frame_inputs(pose2d_px: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(N, J, 2) pixels -> normalised [-1, 1], root-relative per frame (float32)."""
    x = normalize_2d(pose2d_px.astype(np.float32), image_size)
    return (x - x[:, ROOT : ROOT + 1]).astype(np.float32)


def train_frames(sequences: list[Sequence], config: LiftConfig) -> dict[str, torch.Tensor]:
    """Every train frame: the model's (detector-like) inputs (F, J, 2), the clean 2D the decoder
    reconstructs (the shards' 2D projections: 2D labels, F, J, 2), 3D targets (F, J, 3) metres
    and a 0/1 label mask (F,). The 3D of a clip outside ``labelled_clips`` is never read (its
    targets stay zero)."""
    labelled = labelled_clips(sequences, config.labels, config.seed)
    inputs, clean, targets, mask = [], [], [], []
    for s, px in zip(sequences, model_inputs(sequences, config, "train"), strict=True):
        inputs.append(frame_inputs(px, s.image_size))
        clean.append(frame_inputs(s.pose2d, s.image_size))
        has = s.clip in labelled
        targets.append(root_relative_m(s.pose3d).astype(np.float32) if has
                       else np.zeros((s.frames, NUM_JOINTS, 3), np.float32))  # fmt: skip
        mask.append(np.full(s.frames, float(has), np.float32))
    named = {"inputs": inputs, "clean": clean, "targets": targets, "mask": mask}
    return {name: torch.from_numpy(np.concatenate(arrays)) for name, arrays in named.items()}


def cycle_terms(model: CyclicLifter, x2d: torch.Tensor, pose3d: torch.Tensor,
                clean: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                config: CyclicConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """The decoder's terms: ``decoder``, the cycle (predicted 3D -> the clean 2D) and, with
    ``decoder_pairs``, ``projector`` (the labelled frames' true 3D -> the clean 2D), which
    makes the decoder a projector before and while the encoder's 3D is still poor."""
    terms = {"decoder": base.joint_distance(model.decode(pose3d, x2d), clean)}
    if config.decoder_pairs:  # 0 when the batch holds no labelled frame
        terms["projector"] = base.joint_distance(model.decode(targets, x2d), clean, mask)
    return terms


# ------------------------------------------------------------------------------ fit


class FittedCyclic(base.FittedModule):
    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        out = []
        for s, px in zip(sequences, model_inputs(sequences, self.config, split), strict=True):
            x = torch.from_numpy(frame_inputs(px, s.image_size)).to(self.device)
            out.append(self.model.encode(x).cpu().numpy() * 1000.0)  # metres -> mm
        return out


restore = base.restore_module(FittedCyclic, CyclicLifter)


def fit(data: base.LiftData, config: CyclicConfig, log: base.FitLog = base.QUIET) -> FittedCyclic:
    torch.manual_seed(config.seed)
    frames = train_frames(data.train, config)
    if frames["mask"].sum() == 0:
        raise ValueError("CyclicConfig.labels: the encoder loss needs at least one labelled clip")
    trainer = log.trainer(config)
    model = trainer.prepare(CyclicLifter(config))
    generator = torch.Generator().manual_seed(config.seed)
    count = len(frames["inputs"])
    batch = min(config.batch_size, count)
    weights = {"encoder": 1.0, "decoder": config.decoder_weight,
               "projector": config.decoder_weight, "symmetry": config.symmetry_weight}  # fmt: skip

    def step(i: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(count, (batch,), generator=generator)
        x2d, clean, y3d, w = (frames[k][idx].to(trainer.device)
                              for k in ("inputs", "clean", "targets", "mask"))  # fmt: skip
        pose3d = model.encode(x2d)
        terms = {"encoder": base.joint_distance(pose3d, y3d, w)}
        if config.decoder_weight > 0:
            terms.update(cycle_terms(model, x2d, pose3d, clean, y3d, w, config))
        if config.symmetry_weight > 0:
            terms["symmetry"] = bone_symmetry_loss(pose3d)
        return {"loss": sum(weights[k] * v for k, v in terms.items()), **terms}

    losses = trainer.fit(step, Part(model.parameters(), config.optim), config.steps)
    return FittedCyclic(trainer.unwrap(model), config, losses)  # on the trainer's device


ROWS = {
    "encoder loss only": {},
    "+ decoder": {"decoder_weight": 1.0},
    "+ bone symmetry": {"symmetry_weight": 1.0},
    "+ both": {"decoder_weight": 1.0, "symmetry_weight": 1.0},
    "+ skip": {"decoder_weight": 1.0, "symmetry_weight": 1.0, "skip": True},
}

METHOD = base.LiftMethod(
    name="cyclic",
    config=CyclicConfig,
    rows=ROWS,
    fit=fit,
    restore=restore,
    describe="Martinez et al. (ICCV 2017) residual MLP lifter per frame, with a 3D -> 2D "
    "decoder (cycle reconstruction), a left/right bone-symmetry loss and an input-2D skip "
    "into the decoder",
)
