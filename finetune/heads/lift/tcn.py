"""`tcn`: VideoPose3D's temporal convolutional lifter (Pavllo et al., CVPR 2019).

Reproduced: the dilated temporal convolutions over 2D keypoint sequences
(:mod:`finetune.heads.lift.videopose3d`; filter widths 3,3,3 = 27 frames up to 3^5 = 243, dropout
0.25, batch norm, valid convolutions with sliced residuals), trained the paper's way for
single-frame targets with the strided ``TemporalModelOptimized1f`` on random frames with their
receptive-field context, and evaluated with the dilated model on the same weights over whole
sequences padded with their edge frames (all on the left when ``causal``). Adam (amsgrad),
exponential learning-rate decay, batch-norm momentum decayed from 0.1 to 0.001, horizontal
flips in training and as test-time augmentation, MPJPE loss in metres; as the paper.

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
from tqdm import tqdm

from data_shards.skeleton import BONES, ROOT, flip_permutation
from finetune.heads.lift.base import (
    LiftConfig,
    LiftData,
    LiftMethod,
    check_fields,
    labelled_clips,
    model_inputs,
)
from finetune.heads.lift.data import Sequence, normalize_2d, root_relative_m
from finetune.heads.lift.videopose3d import (
    TCNShape,
    TemporalModel,
    TemporalModelOptimized1f,
    pad_sequence,
)


@dataclasses.dataclass
class TCNConfig(LiftConfig):
    """The recipe; the paper's values where the demo's CPU budget allows (see the docstring)."""

    steps: int = 400
    lr: float = 3e-3
    """The paper's 1e-3 is for 1024-frame batches over ~60 epochs; 400 steps of 128 need more."""
    batch_size: int = 128
    """Frames per step (labelled; as many unlabelled again when ``semi``); the paper: 1024."""
    filter_widths: tuple[int, ...] = (3, 3, 3)
    """Kernel per block, receptive field = their product (paper: 3,3,3,3,3 = 243 frames)."""
    channels: int = 128
    """Width of every block; the paper's value is 1024, the recipe takes 128 for CPU time."""
    dropout: float = 0.25
    causal: bool = False
    """Output at t reads frames <= t only (all the padding on the left)."""
    lr_final: float = 0.05
    """Learning rate at the last step, as a share of ``lr`` (exponential decay; the paper's
    0.95 per epoch over ~60 epochs)."""
    flip: bool = True
    """Horizontal flips: random in training, averaged with the unflipped pass at test time."""
    semi: bool = False
    """Add the unlabelled objective (trajectory model, 2D reprojection, bone lengths)."""
    warmup: float = 0.2
    """Share of the steps trained on labelled data alone before the unlabelled terms start."""
    bone_weight: float = 1.0
    log_every: int = 25

    def __post_init__(self) -> None:
        super().__post_init__()
        self.filter_widths = tuple(self.filter_widths)
        checks = {
            "filter_widths": len(self.filter_widths) >= 1
            and all(isinstance(w, int) and w >= 1 and w % 2 == 1 for w in self.filter_widths),
            "channels": self.channels >= 1, "dropout": 0 <= self.dropout < 1,
            "lr_final": 0 < self.lr_final <= 1, "warmup": 0 <= self.warmup < 1,
            "bone_weight": self.bone_weight >= 0, "log_every": self.log_every >= 1,
            "labels": self.labels > 0,  # a supervised loss needs at least one clip
        }  # fmt: skip
        check_fields(self, checks)

    def shape(self, joints_out: int = 17) -> TCNShape:
        return TCNShape(
            joints_out=joints_out,
            filter_widths=self.filter_widths,
            channels=self.channels,
            dropout=self.dropout,
            causal=self.causal,
        )


def learning_rate(step: int, config: TCNConfig) -> float:
    return config.lr * config.lr_final ** (step / config.steps)


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


def mpjpe_m(pred: torch.Tensor, true: torch.Tensor, weight: torch.Tensor | None = None):
    err = (pred - true).norm(dim=-1)
    return (err * weight).mean() if weight is not None else err.mean()


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
        out = []
        rf, perm = self.pos.receptive_field, torch.from_numpy(flip_permutation())
        for s, px in zip(sequences, model_inputs(sequences, self.config, split), strict=True):
            x = torch.from_numpy(pad_sequence(normalize_2d(px, s.image_size), rf,
                                              self.config.causal)).float()[None]  # fmt: skip
            y = self.pos(x)[0]  # (N, J, 3)
            if self.config.flip:
                mirrored = x[..., perm, :] * x.new_tensor([-1.0, 1.0])
                back = self.pos(mirrored)[0][:, perm] * y.new_tensor([-1.0, 1.0, 1.0])
                y = (y + back) / 2
            y[:, ROOT] = 0  # root-relative, as the paper's evaluation
            out.append(y.numpy() * 1000.0)
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
    terms = {"loss_3d": mpjpe_m(pred[:n], lab["pose"])}
    if traj is None:
        return terms
    rays = lab["rays"] if unl is None else torch.cat([lab["rays"], unl["rays"]])
    root = traj(rays)[:, 0, 0]  # (B, 3) camera metres
    terms["loss_traj"] = mpjpe_m(root[:n], lab["traj"], 1 / lab["traj"][:, 2])
    if unl is not None:
        rel = pred[n:] - pred[n:, ROOT : ROOT + 1]  # the trajectory model owns the root
        terms["loss_2d"] = reprojection(rel, root[n:], unl["ray"], unl["scale"])
        lengths = bone_lengths(pred)
        terms["loss_bone"] = config.bone_weight * (
            lengths[n:].mean(0) - lengths[:n].mean(0)).abs().mean()  # fmt: skip
    return terms


def fit(data: LiftData, config: TCNConfig, progress: bool = True) -> FittedTCN:
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train = data.train
    inputs = model_inputs(train, config, "train")
    chosen = labelled_clips(train, config.labels, config.seed)
    split = [[i for i, s in enumerate(train) if (s.clip in chosen) == flag] for flag in (1, 0)]
    lab = _Pool([train[i] for i in split[0]], [inputs[i] for i in split[0]], config, True)
    unl = None
    if config.semi and split[1]:
        unl = _Pool([train[i] for i in split[1]], [inputs[i] for i in split[1]], config, False)
    pos = TemporalModelOptimized1f(config.shape())
    traj = TemporalModelOptimized1f(config.shape(joints_out=1)) if config.semi else None
    params = [*pos.parameters(), *(traj.parameters() if traj else [])]
    opt = torch.optim.Adam(params, lr=config.lr, amsgrad=True)
    losses: list[dict[str, float]] = []
    start_semi = int(config.warmup * config.steps)
    bar = tqdm(range(config.steps), disable=not progress, desc="tcn", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, config)
        for model in (pos, traj):
            if model is not None:
                model.train().set_bn_momentum(bn_momentum(step, config))
        semi_now = unl is not None and step >= start_semi
        terms = _step_losses(pos, traj, lab.batch(config.batch_size, gen, config.flip),
                             unl.batch(config.batch_size, gen, config.flip) if semi_now else None,
                             config)  # fmt: skip
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % config.log_every == 0 or step == config.steps - 1:
            losses.append({"step": step, "loss": loss.item(),
                           **{k: v.item() for k, v in terms.items()}})  # fmt: skip
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return FittedTCN(_sequence_model(pos), _sequence_model(traj) if traj else None, config,
                     losses)  # fmt: skip


def _sequence_model(trained: TemporalModelOptimized1f) -> TemporalModel:
    """The dilated model holding the strided model's weights (the same state dict)."""
    model = TemporalModel(trained.shape)
    model.load_state_dict(trained.state_dict())
    return model.eval()


ROWS = {
    "rf1": {"filter_widths": (1, 1, 1)},
    "rf27": {"filter_widths": (3, 3, 3)},
    "rf243": {"filter_widths": (3, 3, 3, 3, 3)},
    "rf27 10% labels": {"labels": 0.1},
    "rf27 10% labels + unlabelled": {"labels": 0.1, "semi": True},
}

METHOD = LiftMethod(
    name="tcn",
    config=TCNConfig,
    rows=ROWS,
    fit=fit,
    describe="VideoPose3D (Pavllo et al., CVPR 2019): dilated temporal convolutions over 2D "
    "keypoints, single-frame strided training, semi-supervised back-projection; "
    "128 channels (paper 1024).",
)
