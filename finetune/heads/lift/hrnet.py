"""Image head: HRNet heatmaps -> soft-argmax 2D -> the cyclic 2D -> 3D autoencoder, end to end.

What is reproduced, and from where:

- the 2D stage of HRNet (Sun et al., "Deep High-Resolution Representation Learning for Human
  Pose Estimation", CVPR 2019): the heatmaps are a 1x1 convolution on the high-resolution
  branch of the last stage (stride 4), trained with an MSE loss against a Gaussian of
  ``sigma`` heatmap pixels at each 2D keypoint; the backbone is timm's ``hrnet_w18_small``
  (``pretrained=False``: no weights are downloaded, it starts from random init);
- integral regression (Sun et al., "Integral Human Pose Regression", ECCV 2018): a soft-argmax
  (the expectation of the softmax of ``beta * heatmap``) turns heatmaps into differentiable 2D
  keypoints, so the 3D loss reaches the image backbone. ``beta`` is an inverse temperature,
  one per joint, learned (log-parametrised) from ``1 / temperature``: an MSE-trained heatmap
  peaks near 1 and is near 0 elsewhere, where beta = 1 would give an almost uniform softmax
  (every joint pulled to the image centre);
- the lifter is :class:`finetune.heads.lift.cyclic.CyclicLifter` (Martinez et al., ICCV 2017, with a
  3D -> 2D decoder, bone symmetry and an input-2D skip): it sees the soft-argmax 2D, normalised
  to [-1, 1] and made root-relative per frame.

The ablation rows: the 3D loss alone (the image reaches 3D only through the soft-argmax), then
heatmap supervision, then the autoencoder's regularisers (2D reconstruction through the decoder
of the true, annotated 2D from the predicted 3D and from the labelled frames' true 3D, and
left/right bone symmetry), then the decoder skip (the decoder corrects the detached soft-argmax
2D towards the true 2D).

"+ regularisers" first diverged (3D loss 0.445 -> 1.11 m): the decoder's batch norm, right after
its first linear layer, read the 3D of the zero-initialised encoder head, whose batch spread is
0 at step 1, and sent a gradient orders of magnitude above the 3D loss's into the encoder, which
Adam's moments kept for the rest of the run (measured and explained in
:mod:`finetune.heads.lift.cyclic`).
The decoder has no batch norm now (``CyclicConfig.decoder_norm``) and no dropout, and it
reconstructs the true 2D instead of its own detached input.

What differs from the papers (a 2-core CPU recipe): 32 px inputs (the demo crops are 128 px), so
8 x 8 heatmaps (64 px inputs, 16 x 16 maps, cost four times as much per step: ``--set
image_size=64 --set sigma=2``); a few hundred steps of 16 frames from random init instead of
ImageNet weights and 200+ epochs; no augmentation. Batch norm: the backbone keeps timm's
BatchNorm2d in training mode on batches of 16 frames (the smallest batch HRNet's recipes use per
GPU), and the running statistics (momentum 0.1) are used when predicting; the lifter's
BatchNorm1d sees the same 16 frames. The frames come with the labels, in one pass over the
shards: :func:`finetune.clips.read_sequences` with ``frames=True, size=image_size`` (the
method's ``read``) gives every sequence its frames resized to ``image_size``, the 2D keypoints
and intrinsics following the resize. The heatmap targets come from the shards' 2D keypoints
(every train clip: 2D labels only); the 3D loss reads only the clips ``labelled_clips`` allows.
``noise_px``/``drop_prob`` (detector noise on keypoint inputs) do not apply to an image input
and must stay 0. For the same reason ``input`` (``--input detected``: the detector's keypoints
as the 2D input of the keypoint methods) changes nothing here: the head's input is the frames,
its 2D supervision (heatmaps, the decoder's target) stays the shards' annotated 2D and its 3D
loss the labelled 3D, so a detected-input row trains exactly as the ground-truth-input row.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_shards.skeleton import NUM_JOINTS, ROOT
from finetune.clips import Sequence
from finetune.heads.lift import base
from finetune.heads.lift.base import LiftConfig, labelled_clips
from finetune.heads.lift.cyclic import CyclicConfig, CyclicLifter, bone_symmetry_loss
from finetune.heads.lift.data import normalize_2d, root_relative_m
from finetune.loop import Part

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class HRNetConfig(LiftConfig):
    """The recipe: a 2-core CPU budget (see the docstring); Adam, cosine decay (``optim``)."""

    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 16
    """Frames per step (also the batch norm batch)."""
    log_every: int = 10
    """Steps between logged records."""
    backbone: str = "hrnet_w18_small"
    """A timm HRNet (``hrnet_w18_small``, ``hrnet_w18``, ``hrnet_w32`` ...), random init."""
    image_size: int = 32
    """Side the frames are resized to (a multiple of 32); heatmaps are a quarter of it."""
    sigma: float = 1.0
    """Gaussian target's standard deviation, heatmap pixels (1 px of an 8 px map is as wide,
    relative to the image, as the issue's ~2 px of a 16 px map)."""
    temperature: float = 0.05
    """Initial soft-argmax temperature (softmax of heatmap / temperature)."""
    learn_temperature: bool = True
    """Learn one temperature per joint (log-parametrised); False keeps it fixed."""
    heatmap_weight: float = 0.0
    """Weight of the heatmap MSE (mean over pixels; 0: no 2D supervision)."""
    decoder_weight: float = 0.0
    """Weight of the decoder's 2D reconstruction (normalised units; 0: no decoder)."""
    symmetry_weight: float = 0.0
    """Weight of the bone-symmetry loss on the predicted 3D (metres)."""
    skip: bool = False
    """Decoder output = its input 2D + a residual (needs the decoder)."""
    width: int = 512
    """Lifter width (Martinez et al.: 1024; halved for the CPU recipe)."""
    blocks: int = 2
    """Residual modules of two layers each in the lifter."""
    decoder_width: int = 256
    """Decoder width."""
    decoder_blocks: int = 1
    """Residual modules of two layers each in the decoder."""
    dropout: float = 0.25
    """Lifter dropout (Martinez et al.: 0.5; lower for a few hundred steps)."""
    predict_batch: int = 128
    """Frames per forward pass when predicting."""
    threads: int = 1
    """torch intra-op threads while fitting and predicting (restored after). 1: on the shared
    2-core machine, 2 OpenMP threads spin-waiting for each other under load made a step ~25x
    slower (20 s vs 0.7 s measured)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "image_size": self.image_size >= 32 and self.image_size % 32 == 0,
            "backbone": self.backbone.startswith("hrnet"), "sigma": self.sigma > 0,
            "temperature": self.temperature > 0, "heatmap_weight": self.heatmap_weight >= 0,
            "decoder_weight": self.decoder_weight >= 0,
            "symmetry_weight": self.symmetry_weight >= 0,
            "skip": not self.skip or self.decoder_weight > 0,
            "width": self.width >= 1, "blocks": self.blocks >= 0,
            "decoder_width": self.decoder_width >= 1, "decoder_blocks": self.decoder_blocks >= 0,
            "dropout": 0 <= self.dropout < 1, "predict_batch": self.predict_batch >= 1,
            "threads": self.threads >= 1,
            "noise_px": self.noise_px == 0, "drop_prob": self.drop_prob == 0,
        }  # fmt: skip
        why = {"image_size": " (a multiple of 32, at least 32)",
               "skip": " (the skip needs decoder_weight > 0)",
               "noise_px": " (the image head sees frames, not keypoints)",
               "drop_prob": " (the image head sees frames, not keypoints)"}  # fmt: skip
        base.check_fields(self, checks, why)

    def lifter(self) -> CyclicConfig:
        return CyclicConfig(width=self.width, blocks=self.blocks,
                            decoder_width=self.decoder_width, decoder_blocks=self.decoder_blocks,
                            dropout=self.dropout, decoder_weight=self.decoder_weight,
                            skip=self.skip, noise_px=0.0, drop_prob=0.0)  # fmt: skip


# ------------------------------------------------------------------------------ heatmaps


def heatmap_grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres (i + 0.5) of a heatmap, continuous pixel coordinates: (H,), (W,)."""
    return torch.arange(height) + 0.5, torch.arange(width) + 0.5


def gaussian_heatmaps(points: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, J, 2) keypoints (x, y) in heatmap pixels -> (B, J, H, W) Gaussians peaking at 1."""
    ys, xs = heatmap_grid(*size)
    dx = xs.to(points) - points[..., 0:1]  # (B, J, W)
    dy = ys.to(points) - points[..., 1:2]  # (B, J, H)
    return torch.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * sigma**2))


def soft_argmax(heatmaps: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """(B, J, H, W) heatmaps -> (B, J, 2) expected (x, y) under softmax(beta * heatmap), heatmap
    pixels (the convention of :func:`gaussian_heatmaps`); ``beta`` a scalar or (J,)."""
    B, J, H, W = heatmaps.shape  # beta: (J or 1, 1) on the heatmaps' device
    beta = torch.as_tensor(beta, dtype=heatmaps.dtype, device=heatmaps.device).reshape(-1, 1)
    prob = torch.softmax(heatmaps.flatten(2) * beta, dim=-1).view(B, J, H, W)
    ys, xs = heatmap_grid(H, W)
    x = (prob.sum(2) * xs.to(prob)).sum(-1)  # marginal over rows, then E[x]
    y = (prob.sum(3) * ys.to(prob)).sum(-1)
    return torch.stack([x, y], dim=-1)


# ------------------------------------------------------------------------------ the model


def lifter_input(unit: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, J, 2) image fractions -> the lifter's input: normalised [-1, 1], root-relative."""
    x2d = normalize_2d(unit * unit.new_tensor(image_size), image_size)  # crop px -> [-1, 1]
    return x2d - x2d[:, ROOT : ROOT + 1]


class ImageLifter(nn.Module):
    """images (B, 3, S, S) uint8 -> heatmaps (B, J, S/4, S/4) -> 2D (B, J, 2) normalised
    -> root-relative 3D (B, J, 3) metres, and the decoder's 2D reconstruction."""

    def __init__(self, config: HRNetConfig) -> None:
        super().__init__()
        import timm

        # feature_location='': the raw stage-4 branches (no classification "incre" modules);
        # index 1 is the stride-4 high-resolution branch HRNet's pose head reads (index 0 would
        # be the stride-2 stem, two convolutions deep).
        self.backbone = timm.create_model(config.backbone, pretrained=False, features_only=True,
                                          feature_location="", out_indices=(1,))  # fmt: skip
        self.head = nn.Conv2d(self.backbone.feature_info.channels()[0], NUM_JOINTS, 1)
        nn.init.normal_(self.head.weight, std=0.001)  # HRNet's final-layer init
        nn.init.zeros_(self.head.bias)
        self.log_beta = nn.Parameter(torch.full((NUM_JOINTS,), -float(np.log(config.temperature))),
                                     requires_grad=config.learn_temperature)  # fmt: skip
        self.lifter = CyclicLifter(config.lifter())
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.head(self.backbone(x)[0])  # (B, J, S/4, S/4)

    def keypoints(self, heatmaps: torch.Tensor) -> torch.Tensor:
        """(B, J, h, w) -> (B, J, 2) in [0, 1] of the image (x / width, y / height)."""
        h, w = heatmaps.shape[-2:]
        return soft_argmax(heatmaps, self.log_beta.exp()) / heatmaps.new_tensor([w, h])

    def forward(self, images: torch.Tensor, image_size: tuple[int, int]) -> dict:
        heat = self.heatmaps(images)
        unit = self.keypoints(heat)
        x2d = lifter_input(unit, image_size)
        pose3d = self.lifter.encode(x2d)
        return {"heatmaps": heat, "unit": unit, "x2d": x2d, "pose3d": pose3d,
                "recon": self.lifter.decode(pose3d, x2d.detach())}  # fmt: skip


# ------------------------------------------------------------------------------ data


def check_frames(sequences: list[Sequence], config: HRNetConfig) -> None:
    """One-line ``ValueError`` unless every sequence carries its frames at ``image_size``."""
    size = config.image_size
    for s in sequences:
        if s.images is None or s.images.shape[1:] != (3, size, size):
            found = "no frames" if s.images is None else f"frames {s.images.shape[1:]}"
            raise ValueError(f"hrnet: clip {s.clip!r} ({s.split}) has {found}; read the "
                             f"sequences with frames=True, size={size}")  # fmt: skip


def train_set(sequences: list[Sequence], config: HRNetConfig) -> dict[str, torch.Tensor]:
    """Every train frame: images, 2D keypoints as image fractions (F, J, 2), 3D targets
    (F, J, 3) metres and a 0/1 label mask; unlabelled clips' 3D is never read (zeros)."""
    check_frames(sequences, config)
    labelled = labelled_clips(sequences, config.labels, config.seed)
    unit, targets, mask = [], [], []
    for s in sequences:
        unit.append(s.pose2d / np.asarray(s.image_size, np.float32))
        has = s.clip in labelled
        targets.append(root_relative_m(s.pose3d) if has
                       else np.zeros((s.frames, NUM_JOINTS, 3), np.float32))  # fmt: skip
        mask.append(np.full(s.frames, float(has), np.float32))
    sizes = {s.image_size for s in sequences}
    if len(sizes) != 1:
        raise ValueError(f"train crops of several sizes {sorted(sizes)}; one is expected")
    return {"images": torch.from_numpy(np.concatenate([s.images for s in sequences])),
            "unit": torch.from_numpy(np.concatenate(unit)).float(),
            "targets": torch.from_numpy(np.concatenate(targets)).float(),
            "mask": torch.from_numpy(np.concatenate(mask)), "image_size": sizes.pop()}  # fmt: skip


# ------------------------------------------------------------------------------ training


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to ``count`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loss_terms(model: ImageLifter, out: dict, batch: dict[str, torch.Tensor],
               config: HRNetConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """The row's loss terms on one batch (``batch``: the true 2D ``unit`` as image fractions,
    3D ``targets``, label ``mask`` and ``image_size``). The decoder reconstructs the true
    (annotated) 2D from the predicted 3D, and from the labelled frames' true 3D (``projector``,
    as in :func:`finetune.heads.lift.cyclic.cycle_terms`); with the skip it corrects the soft-argmax
    2D."""
    unit, targets, mask = batch["unit"], batch["targets"], batch["mask"]
    terms = {"encoder": base.joint_distance(out["pose3d"], targets, mask)}
    if config.heatmap_weight > 0:
        h, w = out["heatmaps"].shape[-2:]
        target = gaussian_heatmaps(unit * unit.new_tensor([w, h]), (h, w), config.sigma)
        terms["heatmap"] = F.mse_loss(out["heatmaps"], target)
    if config.decoder_weight > 0:
        clean = lifter_input(unit, batch["image_size"])
        terms["decoder"] = base.joint_distance(out["recon"], clean)
        recon = model.lifter.decode(targets, out["x2d"].detach())
        terms["projector"] = base.joint_distance(recon, clean, mask)  # 0 with no labelled frame
    if config.symmetry_weight > 0:
        terms["symmetry"] = bone_symmetry_loss(out["pose3d"])
    return terms


def total_loss(terms: dict[str, torch.Tensor], config: HRNetConfig) -> torch.Tensor:
    weights = {"encoder": 1.0, "heatmap": config.heatmap_weight,
               "decoder": config.decoder_weight, "projector": config.decoder_weight,
               "symmetry": config.symmetry_weight}  # fmt: skip
    return sum(weights[k] * v for k, v in terms.items())


class FittedHRNet(base.FittedModule):
    @torch.no_grad()
    def predict(self, split: str, sequences: list[Sequence]) -> list[np.ndarray]:
        """Needs the sequences' frames (read with ``frames=True, size=image_size``)."""
        check_frames(sequences, self.config)
        out = []
        with torch_threads(self.config.threads):
            for s in sequences:
                images = torch.from_numpy(s.images).split(self.config.predict_batch)
                chunks = [self.model(x.to(self.device), s.image_size)["pose3d"].cpu()
                          for x in images]  # fmt: skip
                out.append(torch.cat(chunks).numpy() * 1000.0)  # metres -> mm
        return out


restore = base.restore_module(FittedHRNet, ImageLifter)


def fit(data: base.LiftData, config: HRNetConfig, log: base.FitLog = base.QUIET) -> FittedHRNet:
    with torch_threads(config.threads):
        return _fit(data, config, log)


def _fit(data: base.LiftData, config: HRNetConfig, log: base.FitLog) -> FittedHRNet:
    torch.manual_seed(config.seed)
    train = train_set(data.train, config)
    if train["mask"].sum() == 0:
        raise ValueError("HRNetConfig.labels: the encoder loss needs at least one labelled clip")
    trainer = log.trainer(config)
    model = trainer.prepare(ImageLifter(config))
    generator = torch.Generator().manual_seed(config.seed)
    count = len(train["images"])
    batch = min(config.batch_size, count)

    def step(i: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(count, (batch,), generator=generator)
        out = model(train["images"][idx].to(trainer.device), train["image_size"])
        drawn = {k: train[k][idx].to(trainer.device) for k in ("unit", "targets", "mask")}
        terms = loss_terms(trainer.unwrap(model), out,
                           {**drawn, "image_size": train["image_size"]}, config)  # fmt: skip
        return {"loss": total_loss(terms, config), **terms}

    losses = trainer.fit(step, Part(model.parameters(), config.optim), config.steps)
    return FittedHRNet(trainer.unwrap(model), config, losses)  # on the trainer's device


HEATMAPS = {"heatmap_weight": 100.0}
REGULARISERS = {**HEATMAPS, "decoder_weight": 1.0, "symmetry_weight": 1.0}
ROWS = {
    "encoder loss only": {},
    "+ heatmap supervision": HEATMAPS,
    "+ regularisers": REGULARISERS,
    "+ skip": {**REGULARISERS, "skip": True},
}

METHOD = base.LiftMethod(
    name="hrnet",
    config=HRNetConfig,
    rows=ROWS,
    fit=fit,
    restore=restore,
    read=lambda config: {"frames": True, "size": config.image_size},
    reads_2d=False,
    describe="HRNet (timm hrnet_w18_small, random init) heatmaps on the rendered frames -> "
    "soft-argmax with a learned temperature -> the cyclic 2D -> 3D autoencoder, end to end",
)
