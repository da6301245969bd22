"""`tcn`: VideoPose3D's temporal convolutional lifter (Pavllo et al., CVPR 2019).

Reproduced: the dilated temporal convolutions over 2D keypoint sequences
(:mod:`finetune.heads.lift.videopose3d`; filter widths 3,3,3 = 27 frames up to 3^5 = 243, dropout
0.25, batch norm, valid convolutions with sliced residuals), trained the paper's way for
single-frame targets with the strided ``TemporalModelOptimized1f`` on random frames with their
receptive-field context, and evaluated with the dilated model on the same weights over whole
sequences padded with their edge frames (all on the left when ``causal``). Adam (amsgrad),
exponential learning-rate decay (``optim``), batch-norm momentum decayed from 0.1 to 0.001,
horizontal flips in training and as test-time augmentation, MPJPE loss in metres; as the paper.

Semi-supervised (paper section 4): a second TCN predicts the root's camera position; on the
labelled clips it is trained with the 1/depth-weighted trajectory MPJPE, on the unlabelled
clips pose + trajectory are projected through the known intrinsics and compared with the 2D
input (screen-normalised units), and the mean bone lengths of the unlabelled predictions are
pulled to those of the labelled predictions (the paper's bone-length term); both after a
warm-up on labelled data alone. The unlabelled path reads the 2D keypoints and K only.

What differs here:

- ``channels`` is 1024 in the paper; the recipe uses 128 (and 128 frames a batch, 400 steps,
  about 10 epochs of the demo's ~5,000 train frames) so that the 243-frame row trains in about
  3 minutes on two busy CPU cores; at 1024 channels a 243-frame step costs ~60x more.
- The 2D are person-crop pixels whose intrinsics change from window to window, so the
  trajectory model sees the 2D back-projected through each frame's K (normalised camera
  coordinates, (u - c) / f) rather than screen coordinates (H3.6M's cameras are fixed; here
  the crop's zoom would otherwise hide the depth).
- The demo clips are 40-221 frames long: at 243 frames most of a window is replicated edge
  frames, so the 243-frame row mostly measures how the model copes with that padding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_shards.skeleton import BONES, ROOT, flip_permutation
from finetune.clips import Sequence
from finetune.evaluation.metrics import mpjpe
from finetune.heads.lift import base
from finetune.heads.lift.base import LiftConfig, labelled_clips, model_inputs
from finetune.heads.lift.data import normalize_2d, root_relative_m
from finetune.heads.lift.videopose3d import (
    TCNShape,
    TemporalModel,
    TemporalModelOptimized1f,
    pad_sequence,
)
from finetune.loop import OptimConfig, Part
from pretrain.engine.schedules import LRSchedule


@dataclasses.dataclass(frozen=True)
class TCNConfig(LiftConfig):
    """The recipe; the paper's values where the demo's CPU budget allows (see the docstring)."""

    steps: int = 400
    """Optimiser steps."""
    optim: OptimConfig = OptimConfig(kind="adam", lr=3e-3, amsgrad=True,
                                     schedule=LRSchedule(decay="exponential",
                                                         min_lr_ratio=0.05))  # fmt: skip
    """Adam (amsgrad), exponential decay to 5% of the peak at the last step (the paper's 0.95
    per epoch over ~60 epochs); the paper's peak 1e-3 is for 1024-frame batches, 400 steps of
    128 frames need 3e-3."""
    batch_size: int = 128
    """Frames per step (labelled; as many unlabelled again when ``semi``); the paper: 1024."""
    filter_widths: tuple[int, ...] = (3, 3, 3)
    """Kernel per block, receptive field = their product (paper: 3,3,3,3,3 = 243 frames)."""
    channels: int = 128
    """Width of every block; the paper's value is 1024, the recipe takes 128 for CPU time."""
    dropout: float = 0.25
    """Dropout after every block (the paper's 0.25)."""
    causal: bool = False
    """Output at t reads frames <= t only (all the padding on the left)."""
    flip: bool = True
    """Horizontal flips: random in training, averaged with the unflipped pass at test time."""
    semi: bool = False
    """Add the unlabelled objective (trajectory model, 2D reprojection, bone lengths)."""
    warmup: float = 0.2
    """Share of the steps trained on labelled data alone before the unlabelled terms start."""
    bone_weight: float = 1.0
    """Weight of the bone-length term of the unlabelled objective."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "filter_widths", tuple(self.filter_widths))  # lists from Python
        checks = {
            "filter_widths": len(self.filter_widths) >= 1
            and all(isinstance(w, int) and w >= 1 and w % 2 == 1 for w in self.filter_widths),
            "channels": self.channels >= 1, "dropout": 0 <= self.dropout < 1,
            "warmup": 0 <= self.warmup < 1, "bone_weight": self.bone_weight >= 0,
            "labels": self.labels > 0,  # a supervised loss needs at least one clip
        }  # fmt: skip
        base.check_fields(self, checks)

    def shape(self, joints_out: int = 17) -> TCNShape:
        return TCNShape(
            joints_out=joints_out,
            filter_widths=self.filter_widths,
            channels=self.channels,
            dropout=self.dropout,
            causal=self.causal,
        )


def bn_momentum(step: int, config: TCNConfig) -> float:
    """VideoPose3D decays batch-norm momentum exponentially from 0.1 to 0.001."""
    return 0.1 * 0.01 ** (step / config.steps)


# ------------------------------------------------------------------------------ data


def _rays(pose2d: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, J, 2) crop pixels -> normalised camera coordinates (u - c) / f through each K."""
    return (pose2d - K[:, None, :2, 2]) / K[:, None, [0, 1], [0, 1]]


class _Pool:
    """Every frame of some sequences as a training sample: the receptive-field windows (into
    the padded, concatenated 2D) and, when ``labelled``, the 3D targets. An unlabelled pool
    is built without touching ``pose3d``."""

    def __init__(self, seqs: list[Sequence], inputs: list[np.ndarray], config: TCNConfig,
                 labelled: bool) -> None:  # fmt: skip
        rf = config.shape().receptive_field
        screen, rays, starts, scale, pose, traj = [], [], [], [], [], []
        offset = 0
        for s, px in zip(seqs, inputs, strict=True):
            w = s.image_size[0]
            screen.append(pad_sequence(normalize_2d(px, s.image_size), rf, config.causal))
            rays.append(pad_sequence(_rays(px, s.K), rf, config.causal))
            starts.append(offset + np.arange(s.frames))
            offset += s.frames + rf - 1
            scale.append(2 * s.K[:, [0, 1], [0, 1]] / w)  # rays -> screen units
            if labelled:
                pose.append(root_relative_m(s.pose3d))
                traj.append(s.pose3d[:, ROOT] / 1000.0)
        cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.float32))  # noqa: E731
        self.screen, self.rays, self.scale = cat(screen), cat(rays), cat(scale)
        self.starts = torch.from_numpy(np.concatenate(starts))
        self.window = torch.arange(rf)
        self.centre = rf - 1 if config.causal else rf // 2
        self.pose = cat(pose) if labelled else None
        self.traj = cat(traj) if labelled else None

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, n: int, gen: torch.Generator, flip: bool) -> dict[str, torch.Tensor]:
        m = torch.randint(len(self), (n,), generator=gen)
        idx = self.starts[m, None] + self.window  # (B, rf)
        out = {"screen": self.screen[idx], "rays": self.rays[idx],
               "ray": self.rays[idx[:, self.centre]], "scale": self.scale[m]}  # fmt: skip
        if self.pose is not None:
            out["pose"], out["traj"] = self.pose[m], self.traj[m]
        if flip:
            out = _flip(out, torch.rand(n, generator=gen) < 0.5)
        return out


def _flip(b: dict[str, torch.Tensor], which: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mirror the chosen samples: x -> -x (screen and rays are centred), left <-> right."""
    perm = torch.from_numpy(flip_permutation())
    out = {}
    for k, v in b.items():
        if k == "scale":
            out[k] = v
            continue
        f = v.clone()
        if k != "traj":
            f = f[..., perm, :]
        f[..., 0] = -f[..., 0]
        shape = (-1,) + (1,) * (v.ndim - 1)
        out[k] = torch.where(which.view(shape), f, v)
    return out


# ------------------------------------------------------------------------------ losses


def reprojection(pose: torch.Tensor, traj: torch.Tensor, ray: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean 2D distance (screen-normalised units, as the paper) between the 2D input and the
    projection of pose (B, J, 3) + trajectory (B, 3) through the frame's K (as rays x scale)."""
    absolute = pose + traj[:, None]
    z = absolute[..., 2:].clamp(min=0.1)  # a body behind the camera would blow up the loss
    return (((absolute[..., :2] / z - ray) * scale[:, None]).norm(dim=-1)).mean()


def bone_lengths(pose: torch.Tensor) -> torch.Tensor:
    parents, children = zip(*BONES, strict=True)
    return (pose[..., list(children), :] - pose[..., list(parents), :]).norm(dim=-1)


# ------------------------------------------------------------------------------ training


class FittedTCN:
    def __init__(self, pos: TemporalModel, traj: TemporalModel | None, config: TCNConfig,
                 losses: list[dict[str, float]]) -> None:  # fmt: skip
        self.pos, self.traj, self.config, self.losses = pos.eval(), traj, config, losses

    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        out, device = [], base.module_device(self.pos)
        rf, perm = self.pos.receptive_field, torch.from_numpy(flip_permutation()).to(device)
        for s, px in zip(sequences, model_inputs(sequences, self.config, split), strict=True):
            x = torch.from_numpy(pad_sequence(normalize_2d(px, s.image_size), rf,
                                              self.config.causal)).float()[None]  # fmt: skip
            x = x.to(device)
            y = self.pos(x)[0]  # (N, J, 3)
            if self.config.flip:
                mirrored = x[..., perm, :] * x.new_tensor([-1.0, 1.0])
                back = self.pos(mirrored)[0][:, perm] * y.new_tensor([-1.0, 1.0, 1.0])
                y = (y + back) / 2
            y[:, ROOT] = 0  # root-relative, as the paper's evaluation
            out.append(y.cpu().numpy() * 1000.0)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"model_pos.{k}": v for k, v in self.pos.state_dict().items()}
        if self.traj is not None:
            sd.update({f"model_traj.{k}": v for k, v in self.traj.state_dict().items()})
        return sd


def _step_losses(pos, traj, lab: dict, unl: dict | None, config: TCNConfig
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The loss terms of one step; ``unl`` (unlabelled batch: 2D and K only) when semi."""
    n = len(lab["screen"])
    screen = lab["screen"] if unl is None else torch.cat([lab["screen"], unl["screen"]])
    pred = pos(screen)[:, 0]  # (B, J, 3): one output per receptive-field window
    terms = {"loss_3d": mpjpe(pred[:n], lab["pose"])}
    if traj is None:
        return terms
    rays = lab["rays"] if unl is None else torch.cat([lab["rays"], unl["rays"]])
    root = traj(rays)[:, 0]  # (B, 1, 3) camera metres: the root as a one-joint pose
    err = mpjpe(root[:n], lab["traj"][:, None], reduce="none")  # (B,)
    terms["loss_traj"] = (err * (1 / lab["traj"][:, 2])).mean()  # weighted by 1 / depth
    if unl is not None:
        rel = pred[n:] - pred[n:, ROOT : ROOT + 1]  # the trajectory model owns the root
        terms["loss_2d"] = reprojection(rel, root[n:, 0], unl["ray"], unl["scale"])
        lengths = bone_lengths(pred)
        terms["loss_bone"] = config.bone_weight * (
            lengths[n:].mean(0) - lengths[:n].mean(0)).abs().mean()  # fmt: skip
    return terms


def _pools(train: list[Sequence], config: TCNConfig) -> tuple[_Pool, _Pool | None]:
    """The labelled pool and, when ``semi`` and some clip is unlabelled, the unlabelled one
    (built without reading ``pose3d``)."""
    inputs = model_inputs(train, config, "train")
    chosen = labelled_clips(train, config.labels, config.seed)
    split = [[i for i, s in enumerate(train) if (s.clip in chosen) == flag] for flag in (1, 0)]
    lab = _Pool([train[i] for i in split[0]], [inputs[i] for i in split[0]], config, True)
    unl = None
    if config.semi and split[1]:
        unl = _Pool([train[i] for i in split[1]], [inputs[i] for i in split[1]], config, False)
    return lab, unl


def fit(data: base.LiftData, config: TCNConfig, log: base.FitLog = base.QUIET) -> FittedTCN:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    lab, unl = _pools(data.train, config)
    trainer = log.trainer(config)
    pos = trainer.prepare(TemporalModelOptimized1f(config.shape()))
    traj = trainer.prepare(TemporalModelOptimized1f(config.shape(joints_out=1))) \
        if config.semi else None  # fmt: skip
    params = [*pos.parameters(), *(traj.parameters() if traj else [])]
    start_semi = int(config.warmup * config.steps)

    def batch(pool: _Pool) -> dict[str, torch.Tensor]:
        drawn = pool.batch(config.batch_size, gen, config.flip)
        return {k: v.to(trainer.device) for k, v in drawn.items()}

    def step(i: int) -> dict[str, torch.Tensor]:
        for model in (pos, traj):
            if model is not None:
                trainer.unwrap(model).set_bn_momentum(bn_momentum(i, config))
        semi_now = unl is not None and i >= start_semi
        terms = _step_losses(pos, traj, batch(lab), batch(unl) if semi_now else None, config)
        return {"loss": sum(terms.values()), **terms}

    losses = trainer.fit(step, Part(params, config.optim), config.steps)
    traj_model = _sequence_model(trainer.unwrap(traj)) if traj is not None else None
    return FittedTCN(_sequence_model(trainer.unwrap(pos)), traj_model, config, losses)


def _sequence_model(trained: TemporalModelOptimized1f) -> TemporalModel:
    """The dilated model holding the strided model's weights (the same state dict), on the
    strided model's device."""
    model = TemporalModel(trained.shape)
    model.load_state_dict(trained.state_dict())
    return model.to(base.module_device(trained)).eval()


def restore(config: TCNConfig, state_dict: dict[str, torch.Tensor]) -> FittedTCN:
    models = {}
    for prefix, joints in (("model_pos.", 17), ("model_traj.", 1)):
        weights = {k.removeprefix(prefix): v for k, v in state_dict.items()
                   if k.startswith(prefix)}  # fmt: skip
        if weights:
            models[prefix] = TemporalModel(config.shape(joints_out=joints)).eval()
            models[prefix].load_state_dict(weights)
            models[prefix].to(base.resolve_device(config.device))
    return FittedTCN(models["model_pos."], models.get("model_traj."), config, [])


ROWS = {
    "rf1": {"filter_widths": (1, 1, 1)},
    "rf27": {"filter_widths": (3, 3, 3)},
    "rf243": {"filter_widths": (3, 3, 3, 3, 3)},
    "rf27 10% labels": {"labels": 0.1},
    "rf27 10% labels + unlabelled": {"labels": 0.1, "semi": True},
}

METHOD = base.LiftMethod(
    name="tcn",
    config=TCNConfig,
    rows=ROWS,
    fit=fit,
    restore=restore,
    describe="VideoPose3D (Pavllo et al., CVPR 2019): dilated temporal convolutions over 2D "
    "keypoints, single-frame strided training, semi-supervised back-projection; "
    "128 channels (paper 1024).",
)
