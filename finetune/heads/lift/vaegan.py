"""Unsupervised 2D -> 3D lifting with a VAE-GAN (``vaegan``).

The lifter learns 3D from 2D alone, as in Chen et al. 2019 ("Unsupervised 3D pose estimation
with geometric self-supervision", CVPR) and Kudo et al. 2018: a 3D pose lifted from one view,
turned about the vertical axis and projected again, must look like a real 2D pose to a
discriminator that only ever sees real 2D. Here the lifter is a VAE (the issue's "seed 002"):

- encoder: 16 joints x 2 -> 1024 -> residual block -> mean and log-variance of a 51-d latent;
- decoder: 51 -> 1024 -> residual block -> 16 x 3; discriminator on 2D projections (32 ->
  ``disc_width`` -> residual block -> 1). Mish, batch norm, dropout 0.2 (Martinez et al. 2017
  blocks);
- losses: ``lambda_recon`` x the reprojection of the unrotated prediction onto the input 2D,
  ``beta(step)`` x KL(q(z|x) || N(0, I)), ``lambda_disc`` x the non-saturating GAN loss of the
  rotated projections (azimuth uniform in [-pi, pi) about the camera's y axis, the image's
  vertical). Gradients of the lifter and of the discriminator are clipped to a norm of
  ``optim.clip_norm`` (1.0) each, every step.
- beta (:func:`kl_beta`): 0 for ``warmup_epochs`` (issue: 10), then cyclical annealing (Fu
  et al. 2019): every ``cycle_epochs`` (issue: 40) it ramps linearly from 0 to
  ``lambda_kld`` over the first ``kl_ramp`` share of the cycle and holds. An epoch is one
  pass over the train frames: ``ceil(train frames / batch_size)`` steps. The CPU recipe
  (500 steps of 64 frames, ~6 epochs of the demo) scales the issue's 10 / 40 epochs to
  1 / 4; ``--set warmup_epochs=10 --set cycle_epochs=40`` restores them. Adam with betas
  (0.5, 0.999) and a constant learning rate for both players (``optim``), the generator
  stepped first, then the discriminator (two parts of :class:`finetune.loop.Trainer`).
- Rows: "unsupervised", "unsupervised (no KL)" (lambda_kld 0), "unsupervised (no
  adversarial)" (lambda_disc 0), "supervised reference" (no commas: ``--rows`` splits on them).

Decisions of this module:

- Joints and projection: 16 joints (no nose; it is filled back from a rigid head) and weak
  perspective on RMS-normalised 2D (:mod:`finetune.heads.lift.geometry16`). The decoder
  predicts x, y and depth of every joint (pelvis moved to the origin).
- Scale: monocular unsupervised 3D is defined up to scale, so each predicted pose is scaled to
  the mean bone length of the DeepMimic character's rest pose (0.267 m, a constant of the
  skeleton, not read from train 3D). The renders draw a body-height factor in [0.9, 1.1], so
  MPJPE carries up to ~10 % scale error; P-MPJPE (Procrustes) is the fair number.
- No train ``pose3d`` is read by an unsupervised row (a test trains on NaN 3D). The
  "supervised reference" row trains the same encoder-decoder (KL kept, no discriminator) on
  root-relative metres of the labelled clips (:func:`~finetune.heads.lift.base.labelled_clips`) and
  predicts metres directly: an upper reference, not part of the paper.

Not reproduced: Chen et al.'s lift-rotate-lift cycle (the ``cyclic`` method), temporal
discriminators, and perspective projection.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_shards.skeleton import ROOT
from finetune.clips import Sequence
from finetune.heads.lift import base
from finetune.heads.lift.base import LiftConfig, labelled_clips, model_inputs
from finetune.heads.lift.data import root_relative_m
from finetune.heads.lift.geometry16 import (
    BONES16,
    J16,
    KEEP,
    fill_nose,
    normalize_inputs,
    project,
    rest_bone_m,
    rest_pose_m,
    rotate_y,
)
from finetune.loop import OptimConfig, Part
from pretrain.engine.schedules import LRSchedule

__all__ = ["BONES16", "KEEP", "METHOD", "VAEGANConfig", "fill_nose", "fit", "project",
           "rest_bone_m", "rest_pose_m", "restore", "rotate_y"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VAEGANConfig(LiftConfig):
    """The recipe (the issue's values, epochs scaled for a 2-core CPU; see the docstring)."""

    steps: int = 500
    """Optimiser steps (of the lifter, and of the discriminator when there is one)."""
    batch_size: int = 64
    """Train frames per step."""
    optim: OptimConfig = OptimConfig(kind="adam", lr=1e-3, betas=(0.5, 0.999), clip_norm=1.0,
                                     schedule=LRSchedule(decay="constant"))  # fmt: skip
    """Both players: Adam with the usual GAN momentum (Radford et al. 2016), a constant
    learning rate, gradients clipped to norm 1 each."""
    width: int = 1024
    """Hidden width of encoder and decoder."""
    latent: int = 51
    """Latent dimensions of the VAE."""
    disc_width: int = 512
    """Hidden width of the discriminator (the issue leaves it open; 512 keeps a row ~2 min)."""
    dropout: float = 0.2
    """Dropout of every layer (lifter and discriminator)."""
    lambda_recon: float = 1.0
    """Weight of the reprojection (or, supervised, the 3D) reconstruction loss."""
    lambda_kld: float = 1e-3
    """Peak of the cyclical KL weight; 0 turns the KL term off."""
    lambda_disc: float = 1e-3
    """Weight of the adversarial term for the lifter; 0 turns the discriminator off."""
    warmup_epochs: float = 1.0
    """KL warm-up; the issue's 10 (and 40 below) assume hundreds of epochs: the CPU recipe
    runs ~6 (500 steps x 64 of the demo's 5,052 train frames), so both are scaled by 1/10."""
    cycle_epochs: float = 4.0
    """Length of one cyclical KL annealing cycle, epochs."""
    kl_ramp: float = 0.5
    """Share of each KL cycle spent ramping 0 -> lambda_kld (the rest holds it)."""
    supervised: bool = False
    """Train on 3D labels instead (the upper reference row)."""
    log_every: int = 20
    """Steps between logged records."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "width": self.width >= 1, "latent": self.latent >= 1,
            "disc_width": self.disc_width >= 1, "dropout": 0 <= self.dropout < 1,
            "lambda_recon": self.lambda_recon >= 0, "lambda_kld": self.lambda_kld >= 0,
            "lambda_disc": self.lambda_disc >= 0, "warmup_epochs": self.warmup_epochs >= 0,
            "cycle_epochs": self.cycle_epochs > 0, "kl_ramp": 0 < self.kl_ramp <= 1,
        }  # fmt: skip
        base.check_fields(self, checks)


def kl_beta(step: int, steps_per_epoch: int, config: VAEGANConfig) -> float:
    """KL weight at ``step``: 0 during the warm-up, then a cyclical ramp 0 -> lambda_kld."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return 0.0
    phase = ((step - warmup) % (config.cycle_epochs * steps_per_epoch)) / (
        config.cycle_epochs * steps_per_epoch)  # fmt: skip
    return config.lambda_kld * min(1.0, phase / config.kl_ramp)


# ------------------------------------------------------------------------------ networks


class Residual(nn.Module):
    """Two Linear-BN-Mish-Dropout layers with a skip (Martinez et al. 2017)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(*_layer(width, width, dropout), *_layer(width, width, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _layer(d_in: int, width: int, dropout: float) -> list[nn.Module]:
    return [nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.Mish(), nn.Dropout(dropout)]


def _mlp(d_in: int, width: int, d_out: int, dropout: float) -> nn.Sequential:
    """d_in -> width -> residual block -> d_out."""
    return nn.Sequential(*_layer(d_in, width, dropout), Residual(width, dropout),
                         nn.Linear(width, d_out))  # fmt: skip


class VAELifter(nn.Module):
    """2D (B, 16, 2) -> latent (B, L) -> root-relative 3D (B, 16, 3)."""

    def __init__(self, config: VAEGANConfig):
        super().__init__()
        self.latent = config.latent
        self.encoder = _mlp(J16 * 2, config.width, 2 * config.latent, config.dropout)
        self.decoder = _mlp(config.latent, config.width, J16 * 3, config.dropout)

    def encode(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x2d.flatten(1)).chunk(2, dim=-1)  # (B, L) each
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        pose = self.decoder(z).view(-1, J16, 3)  # (B, J, 3)
        return pose - pose[:, ROOT : ROOT + 1]

    def forward(self, x2d: torch.Tensor, sample: bool = True):
        mu, logvar = self.encode(x2d)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return self.decode(z), mu, logvar


def discriminator(config: VAEGANConfig) -> nn.Sequential:
    """2D pose (B, 32) -> real/fake logit (B, 1)."""
    return _mlp(J16 * 2, config.disc_width, 1, config.dropout)


# ------------------------------------------------------------------------------ training


class VAEGANFitted:
    def __init__(self, lifter: VAELifter, disc: nn.Module | None, config: VAEGANConfig,
                 losses: list[dict[str, float]]):  # fmt: skip
        self.lifter, self.config, self.losses = lifter.eval(), config, losses
        self.disc = disc.eval() if disc is not None else None

    def inputs(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, the normalised (N, 16, 2) 2D the lifter sees."""
        px = model_inputs(sequences, self.config, split)
        return [normalize_inputs(p, s.image_size) for p, s in zip(px, sequences, strict=True)]

    @torch.no_grad()
    def latents(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, (N, L) latent means."""
        device = base.module_device(self.lifter)
        return [_batched(lambda b: self.lifter.encode(b)[0], x, device)
                for x in self.inputs(split, sequences)]  # fmt: skip

    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        out, device = [], base.module_device(self.lifter)
        for x in self.inputs(split, sequences):
            pose = _batched(lambda b: self.lifter(b, sample=False)[0], x, device).astype(np.float64)
            if not self.config.supervised:  # normalised units -> metres by the rest-pose prior
                bones = np.stack([np.linalg.norm(pose[:, c] - pose[:, p], axis=-1)
                                  for p, c in BONES16], -1).mean(-1)  # fmt: skip
                pose = pose * (rest_bone_m() / np.maximum(bones, 1e-9))[:, None, None]
            out.append((fill_nose(pose) * 1000.0).astype(np.float32))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        parts = {"lifter": self.lifter} | ({"disc": self.disc} if self.disc is not None else {})
        return {f"{k}.{n}": v for k, m in parts.items() for n, v in m.state_dict().items()}


def _batched(fn, x: np.ndarray, device: torch.device, size: int = 4096) -> np.ndarray:
    """``fn`` over ``x`` in chunks of ``size`` rows on ``device``; the results on the CPU."""
    chunks = [fn(torch.from_numpy(x[i : i + size]).to(device)).cpu()
              for i in range(0, len(x), size)]  # fmt: skip
    return torch.cat(chunks).numpy()


def _train_arrays(data: base.LiftData, config: VAEGANConfig
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Train inputs (M, 16, 2) and, for the supervised row only, targets (M, 16, 3) metres."""
    train = data.train
    px = model_inputs(train, config, "train")
    if not config.supervised:
        x = [normalize_inputs(p, s.image_size) for p, s in zip(px, train, strict=True)]
        return torch.from_numpy(np.concatenate(x)), None
    keep = labelled_clips(train, config.labels, config.seed)
    pairs = [(normalize_inputs(p, s.image_size), root_relative_m(s.pose3d)[:, list(KEEP)])
             for p, s in zip(px, train, strict=True) if s.clip in keep]  # fmt: skip
    if not pairs:
        raise ValueError("VAEGANConfig.labels: the supervised row has no labelled train clip")
    x, y = (np.concatenate(a).astype(np.float32) for a in zip(*pairs, strict=True))
    return torch.from_numpy(x), torch.from_numpy(y)


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)), summed over the latent, mean over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()


def _gan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


class _Epochs:
    """Batches of the train frames, a fresh seeded permutation every epoch."""

    def __init__(self, count: int, config: VAEGANConfig, gen: torch.Generator) -> None:
        self.count, self.size, self.gen = count, config.batch_size, gen
        self.per_epoch = math.ceil(count / config.batch_size)
        self.order = torch.randperm(count, generator=gen)

    def __call__(self, step: int) -> torch.Tensor:
        k = step % self.per_epoch
        if k == 0 and step > 0:
            self.order = torch.randperm(self.count, generator=self.gen)
        return self.order[k * self.size : (k + 1) * self.size]


def fit(data: base.LiftData, config: VAEGANConfig, log: base.FitLog = base.QUIET) -> VAEGANFitted:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = _train_arrays(data, config)
    trainer = log.trainer(config)
    lifter = trainer.prepare(VAELifter(config))
    adversarial = config.lambda_disc > 0 and not config.supervised
    disc = trainer.prepare(discriminator(config)) if adversarial else None
    epochs = _Epochs(len(x_all), config, gen)

    def step(i: int) -> dict[str, torch.Tensor | float]:
        idx = epochs(i)
        x = x_all[idx].to(trainer.device)  # (B, J, 2)
        pose, mu, logvar = lifter(x)  # (B, J, 3)
        beta = kl_beta(i, epochs.per_epoch, config)
        terms = {"kl": _kl(mu, logvar)}
        if config.supervised:
            terms["recon"] = (pose - y_all[idx].to(trainer.device)).pow(2).sum(-1).mean()
        else:
            terms["recon"] = (pose[..., :2] - x).pow(2).sum(-1).mean()
        loss = config.lambda_recon * terms["recon"] + beta * terms["kl"]
        if disc is not None:
            angle = ((torch.rand(len(x), generator=gen) * 2 - 1) * math.pi).to(trainer.device)
            fake = project(rotate_y(pose, angle))  # (B, J, 2)
            real = x_all[torch.randint(len(x_all), (len(x),), generator=gen)].to(trainer.device)
            # one batch through the discriminator, so batch norm sees real and fake alike
            logits = disc(torch.cat([real, fake]).flatten(1))[len(x) :]
            terms["adv"] = _gan(logits, real=True)
            loss = loss + config.lambda_disc * terms["adv"]
            # the discriminator's own term (stepped after the lifter; ``fake`` detached)
            logits = disc(torch.cat([real, fake.detach()]).flatten(1))
            terms["disc"] = _gan(logits[: len(x)], True) + _gan(logits[len(x) :], False)
        return {"loss": loss, "beta": beta, **terms}

    parts = [Part(lifter.parameters(), config.optim)]
    if disc is not None:
        parts.append(Part(disc.parameters(), config.optim, loss="disc"))
    losses = trainer.fit(step, parts, config.steps)
    disc = trainer.unwrap(disc) if disc is not None else None
    return VAEGANFitted(trainer.unwrap(lifter), disc, config, losses)  # on the trainer's device


def restore(config: VAEGANConfig, state_dict: dict[str, torch.Tensor]) -> VAEGANFitted:
    lifter = VAELifter(config)
    lifter.load_state_dict({k.removeprefix("lifter."): v for k, v in state_dict.items()
                            if k.startswith("lifter.")})  # fmt: skip
    weights = {k.removeprefix("disc."): v for k, v in state_dict.items() if k.startswith("disc.")}
    disc = None
    if weights:
        disc = discriminator(config)
        disc.load_state_dict(weights)
    device = base.resolve_device(config.device)
    return VAEGANFitted(lifter.to(device), disc.to(device) if disc else None, config, [])


# ------------------------------------------------------------------------------ latent plot


def latent_plot(fitted: VAEGANFitted, sequences: list[Sequence], path: str | Path) -> Path:
    """The latent means of ``sequences`` in 2D (UMAP when installed, else PCA), coloured by
    action; written as a PNG at ``path``."""
    from finetune.report import pyplot, save_figure

    splits = sorted({s.split for s in sequences})
    groups = [[s for s in sequences if s.split == split] for split in splits]
    z = np.concatenate([m for split, group in zip(splits, groups, strict=True)
                        for m in fitted.latents(split, group)]).astype(np.float64)  # fmt: skip
    actions = np.concatenate([[s.action] * s.frames for group in groups for s in group])
    try:
        import umap

        xy, how = umap.UMAP(random_state=fitted.config.seed).fit_transform(z), "UMAP"
    except ImportError:
        zc = z - z.mean(0)
        _, _, vt = np.linalg.svd(zc, full_matrices=False)
        xy, how = zc @ vt[:2].T, "PCA"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = plt.get_cmap("tab20")
    for i, action in enumerate(sorted(set(actions))):
        sel = actions == action
        ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=0.5, label=action, color=colours(i % 20))
    ax.set_title(f"vaegan latent means ({how}), {' + '.join(splits)}")
    ax.legend(markerscale=4, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


METHOD = base.LiftMethod(
    name="vaegan",
    config=VAEGANConfig,
    rows={
        "unsupervised": {},
        "unsupervised (no KL)": {"lambda_kld": 0.0},
        "unsupervised (no adversarial)": {"lambda_disc": 0.0},
        "supervised reference": {"supervised": True, "labels": 1.0},
    },
    fit=fit,
    restore=restore,
    figure=latent_plot,
    describe="VAE-GAN lifter from 2D alone (Chen et al. 2019 rotate-and-discriminate; VAE "
    "latent with cyclical KL); scaled by the rest pose's bone length; supervised: upper reference",
)
