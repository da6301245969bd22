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
  ``clip_norm`` (1.0) each, every step.
- beta (:func:`kl_beta`): 0 for ``warmup_epochs`` (issue: 10), then cyclical annealing (Fu
  et al. 2019): every ``cycle_epochs`` (issue: 40) it ramps linearly from 0 to
  ``lambda_kld`` over the first ``kl_ramp`` share of the cycle and holds. An epoch is one
  pass over the train frames: ``ceil(train frames / batch_size)`` steps. The CPU recipe
  (500 steps of 64 frames, ~6 epochs of the demo) scales the issue's 10 / 40 epochs to
  1 / 4; ``--set warmup_epochs=10 --set cycle_epochs=40`` restores them. Adam with betas
  (0.5, 0.999) for both players.
- Rows: "unsupervised", "unsupervised (no KL)" (lambda_kld 0), "unsupervised (no
  adversarial)" (lambda_disc 0), "supervised reference" (no commas: ``--rows`` splits on them).

Decisions of this module:

- Joints: the 17-joint skeleton without the nose (joint 9); the head top hangs on the thorax.
  The nose is filled for the 17-joint output by a rigid head taken from the mocap character's
  rest pose (:func:`rest_pose_m`): a fixed offset from the thorax along "up" (thorax -> head)
  and "forward" (left shoulder - right shoulder, crossed with up), in units of the thorax-head
  length. Whether the head turns against the chest is not seen from these 16 joints.
- Projection: weak perspective (scaled orthographic) on normalised 2D. Input: VideoPose3D
  screen coordinates, root-relative, divided by their RMS distance from the pelvis. The decoder
  predicts x, y and depth of every joint (pelvis moved to the origin); the projection is (x, y),
  renormalised to RMS 1 before the discriminator sees it.
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
import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data_shards import mocap
from data_shards.skeleton import JOINT_INDEX, NUM_JOINTS, PARENTS, ROOT
from finetune.heads.lift.base import (
    LiftConfig,
    LiftData,
    LiftMethod,
    check_fields,
    labelled_clips,
    model_inputs,
)
from finetune.heads.lift.data import Sequence, normalize_2d, root_relative_m

NOSE = JOINT_INDEX["nose"]
KEEP = tuple(j for j in range(NUM_JOINTS) if j != NOSE)
"""The 16 lifted joints, in 17-joint order without the nose."""
J16 = len(KEEP)
_THORAX, _HEAD = JOINT_INDEX["thorax"], JOINT_INDEX["head"]
_LSH, _RSH = JOINT_INDEX["l_shoulder"], JOINT_INDEX["r_shoulder"]
_P17 = [PARENTS[_THORAX] if j == NOSE else (_THORAX if p == NOSE else p)
        for j, p in enumerate(PARENTS)]  # fmt: skip
BONES16 = tuple((KEEP.index(p), KEEP.index(j)) for j, p in enumerate(_P17) if j != NOSE and p >= 0)
"""(parent, child) in 16-joint indices: the 17-joint bones with head top -> thorax."""


@dataclasses.dataclass
class VAEGANConfig(LiftConfig):
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    width: int = 1024
    """Hidden width of encoder and decoder."""
    latent: int = 51
    disc_width: int = 512
    """Hidden width of the discriminator (the issue leaves it open; 512 keeps a row ~2 min)."""
    dropout: float = 0.2
    lambda_recon: float = 1.0
    lambda_kld: float = 1e-3
    """Peak of the cyclical KL weight; 0 turns the KL term off."""
    lambda_disc: float = 1e-3
    """Weight of the adversarial term for the lifter; 0 turns the discriminator off."""
    warmup_epochs: float = 1.0
    """KL warm-up; the issue's 10 (and 40 below) assume hundreds of epochs: the CPU recipe
    runs ~6 (500 steps x 64 of the demo's 5,052 train frames), so both are scaled by 1/10."""
    cycle_epochs: float = 4.0
    kl_ramp: float = 0.5
    """Share of each KL cycle spent ramping 0 -> lambda_kld (the rest holds it)."""
    clip_norm: float = 1.0
    """Max gradient norm of the lifter and (separately) of the discriminator, every step."""
    supervised: bool = False
    """Train on 3D labels instead (the upper reference row)."""
    log_every: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "width": self.width >= 1, "latent": self.latent >= 1,
            "disc_width": self.disc_width >= 1, "dropout": 0 <= self.dropout < 1,
            "lambda_recon": self.lambda_recon >= 0, "lambda_kld": self.lambda_kld >= 0,
            "lambda_disc": self.lambda_disc >= 0, "warmup_epochs": self.warmup_epochs >= 0,
            "cycle_epochs": self.cycle_epochs > 0, "kl_ramp": 0 < self.kl_ramp <= 1,
            "clip_norm": self.clip_norm > 0, "log_every": self.log_every >= 1,
        }  # fmt: skip
        check_fields(self, checks)


def kl_beta(step: int, steps_per_epoch: int, config: VAEGANConfig) -> float:
    """KL weight at ``step``: 0 during the warm-up, then a cyclical ramp 0 -> lambda_kld."""
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return 0.0
    phase = ((step - warmup) % (config.cycle_epochs * steps_per_epoch)) / (
        config.cycle_epochs * steps_per_epoch)  # fmt: skip
    return config.lambda_kld * min(1.0, phase / config.kl_ramp)


# ------------------------------------------------------------------------------ geometry


@functools.cache
def rest_pose_m() -> np.ndarray:
    """(17, 3) joints of the DeepMimic character at rest (identity rotations), metres."""
    identity = np.array([1.0, 0.0, 0.0, 0.0])  # (w, x, y, z)
    clip = mocap.MotionClip("rest", False, np.zeros(1), np.zeros((1, 3)), identity[None],
                            np.tile(identity, (1, 8, 1)), np.zeros((1, 4)))  # fmt: skip
    return mocap.joints3d_m(clip)[0]


def _head_frame(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit up and forward, and thorax-head length, of (..., 17 or 16 in 17 order, 3) joints."""
    up = p[..., _HEAD, :] - p[..., _THORAX, :]
    length = np.linalg.norm(up, axis=-1, keepdims=True)
    up = up / np.maximum(length, 1e-9)
    left = p[..., _LSH, :] - p[..., _RSH, :]
    left = left - (left * up).sum(-1, keepdims=True) * up
    left = left / np.maximum(np.linalg.norm(left, axis=-1, keepdims=True), 1e-9)
    return up, np.cross(left, up), left, length


@functools.cache
def nose_offset() -> tuple[float, float, float]:
    """The rest pose's nose - thorax along (up, forward, left), over the thorax-head length."""
    rest = rest_pose_m()
    up, fwd, left, length = _head_frame(rest)
    d = rest[NOSE] - rest[_THORAX]
    return tuple(float(d @ a / length[0]) for a in (up, fwd, left))


def fill_nose(pose16: np.ndarray) -> np.ndarray:
    """(N, 16, 3) -> (N, 17, 3): the nose put where the rest pose's rigid head has it."""
    out = np.zeros((*pose16.shape[:-2], NUM_JOINTS, 3), dtype=np.float64)
    out[..., list(KEEP), :] = pose16
    up, fwd, left, length = _head_frame(out)
    a, b, c = nose_offset()
    out[..., NOSE, :] = out[..., _THORAX, :] + length * (a * up + b * fwd + c * left)
    return out


@functools.cache
def rest_bone_m() -> float:
    """Mean length of :data:`BONES16` at rest (metres): the unsupervised rows' only 3D prior."""
    rest = rest_pose_m()[list(KEEP)]
    return float(np.mean([np.linalg.norm(rest[c] - rest[p]) for p, c in BONES16]))


def normalize_inputs(pose2d_px: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(N, 17, 2) pixels -> (N, 16, 2) screen coordinates, root-relative, RMS 1 per frame."""
    x = normalize_2d(pose2d_px.astype(np.float32), image_size)[:, list(KEEP)]
    x = x - x[:, ROOT : ROOT + 1]
    rms = np.sqrt((x**2).sum(-1).mean(-1))[:, None, None]
    return (x / np.maximum(rms, 1e-6)).astype(np.float32)


def rotate_y(pose: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) turned by ``angle`` (B,) about the camera's y axis (the image's vertical)."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    x, y, z = pose.unbind(-1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)


def project(pose: torch.Tensor) -> torch.Tensor:
    """Weak perspective: (B, J, 3) root-relative -> (B, J, 2), renormalised to RMS 1."""
    xy = pose[..., :2]
    rms = xy.pow(2).sum(-1).mean(-1).clamp_min(1e-8).sqrt()[:, None, None]
    return xy / rms


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
        self.lifter, self.disc, self.config, self.losses = lifter.eval(), disc, config, losses

    def inputs(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, the normalised (N, 16, 2) 2D the lifter sees."""
        px = model_inputs(sequences, self.config, split)
        return [normalize_inputs(p, s.image_size) for p, s in zip(px, sequences, strict=True)]

    @torch.no_grad()
    def latents(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Per sequence, (N, L) latent means."""
        return [_batched(lambda b: self.lifter.encode(b)[0], x)
                for x in self.inputs(split, sequences)]  # fmt: skip

    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        out = []
        for x in self.inputs(split, sequences):
            pose = _batched(lambda b: self.lifter(b, sample=False)[0], x).astype(np.float64)
            if not self.config.supervised:  # normalised units -> metres by the rest-pose prior
                bones = np.stack([np.linalg.norm(pose[:, c] - pose[:, p], axis=-1)
                                  for p, c in BONES16], -1).mean(-1)  # fmt: skip
                pose = pose * (rest_bone_m() / np.maximum(bones, 1e-9))[:, None, None]
            out.append((fill_nose(pose) * 1000.0).astype(np.float32))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        parts = {"lifter": self.lifter} | ({"disc": self.disc} if self.disc is not None else {})
        return {f"{k}.{n}": v for k, m in parts.items() for n, v in m.state_dict().items()}


def _batched(fn, x: np.ndarray, size: int = 4096) -> np.ndarray:
    chunks = [fn(torch.from_numpy(x[i : i + size])) for i in range(0, len(x), size)]
    return torch.cat(chunks).numpy()


def _train_arrays(data: LiftData, config: VAEGANConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def fit(data: LiftData, config: VAEGANConfig, progress: bool = True) -> VAEGANFitted:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    x_all, y_all = _train_arrays(data, config)
    steps_per_epoch = math.ceil(len(x_all) / config.batch_size)
    lifter = VAELifter(config).train()
    adversarial = config.lambda_disc > 0 and not config.supervised
    disc = discriminator(config).train() if adversarial else None
    betas = (0.5, 0.999)  # the usual GAN momentum (Radford et al. 2016)
    opt = torch.optim.Adam(lifter.parameters(), lr=config.lr, betas=betas)
    opt_d = None if disc is None else torch.optim.Adam(disc.parameters(), lr=config.lr, betas=betas)
    losses: list[dict[str, float]] = []
    order = torch.randperm(len(x_all), generator=gen)
    for step in tqdm(range(config.steps), desc="vaegan", unit="step", disable=not progress):
        k = step % steps_per_epoch
        if k == 0 and step > 0:
            order = torch.randperm(len(x_all), generator=gen)
        idx = order[k * config.batch_size : (k + 1) * config.batch_size]
        x = x_all[idx]  # (B, J, 2)
        pose, mu, logvar = lifter(x)  # (B, J, 3)
        beta = kl_beta(step, steps_per_epoch, config)
        terms = {"kl": _kl(mu, logvar)}
        if config.supervised:
            terms["recon"] = (pose - y_all[idx]).pow(2).sum(-1).mean()
        else:
            terms["recon"] = (pose[..., :2] - x).pow(2).sum(-1).mean()
        loss = config.lambda_recon * terms["recon"] + beta * terms["kl"]
        if disc is not None:
            angle = (torch.rand(len(x), generator=gen) * 2 - 1) * math.pi
            fake = project(rotate_y(pose, angle))  # (B, J, 2)
            real = x_all[torch.randint(len(x_all), (len(x),), generator=gen)]
            # one batch through the discriminator, so batch norm sees real and fake alike
            logits = disc(torch.cat([real, fake]).flatten(1))[len(x) :]
            terms["adv"] = _gan(logits, real=True)
            loss = loss + config.lambda_disc * terms["adv"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(lifter.parameters(), config.clip_norm)
        opt.step()
        if disc is not None:
            logits = disc(torch.cat([real, fake.detach()]).flatten(1))
            terms["disc"] = _gan(logits[: len(x)], True) + _gan(logits[len(x) :], False)
            opt_d.zero_grad(set_to_none=True)
            terms["disc"].backward()
            nn.utils.clip_grad_norm_(disc.parameters(), config.clip_norm)
            opt_d.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            losses.append({"step": step, "loss": float(loss.detach()), "beta": beta,
                           **{n: float(v.detach()) for n, v in terms.items()}})  # fmt: skip
    return VAEGANFitted(lifter, disc, config, losses)


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


METHOD = LiftMethod(
    name="vaegan",
    config=VAEGANConfig,
    rows={
        "unsupervised": {},
        "unsupervised (no KL)": {"lambda_kld": 0.0},
        "unsupervised (no adversarial)": {"lambda_disc": 0.0},
        "supervised reference": {"supervised": True, "labels": 1.0},
    },
    fit=fit,
    figure=latent_plot,
    describe="VAE-GAN lifter from 2D alone (Chen et al. 2019 rotate-and-discriminate; VAE "
    "latent with cyclical KL); scaled by the rest pose's bone length; supervised: upper reference",
)
