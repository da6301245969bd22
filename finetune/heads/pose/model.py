"""The pose head's modules, and a trained row saved and loaded back for prediction.

The head predicts the 17 joints of every frame, root-relative in the camera coordinates of the
frame's view (what one image determines), in metres; everything outside reports mm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from data_shards.configtools import to_dict
from data_shards.manifest import atomic_write_bytes, atomic_write_text
from data_shards.skeleton import NUM_JOINTS
from data_shards.untrusted import brief, is_int

if TYPE_CHECKING:
    from pretrain.model import PoseBERTConfig

MM_PER_UNIT = 1000.0  # the head predicts metres; errors are reported in mm


class PoseHead(nn.Module):
    """Standardise features with fixed statistics, then one linear map to J x 3 (metres)."""

    def __init__(self, dim: int, joints: int = NUM_JOINTS):
        super().__init__()
        self.joints = joints
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, joints * 3)

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """features (N, D) and targets (N, J, 3) of the rows the head will be trained on: the
        features are standardised with their statistics and the head starts as the mean-pose
        predictor (zero weights, bias = mean target), so training moves away from that floor."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))
        self.linear.weight.zero_()
        self.linear.bias.copy_(targets.mean(0).flatten())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.mean) / self.std
        return self.linear(x).unflatten(-1, (self.joints, 3))  # (..., J, 3)


class PoseRegressor(nn.Module):
    """A PoseBERT encoder (contextualised per-frame features) and a :class:`PoseHead`. With
    ``normalize`` the head reads the L2-normalised features retrieval searches (the probe)."""

    def __init__(self, encoder: nn.Module, head: PoseHead, normalize: bool = False):
        super().__init__()
        self.encoder, self.head, self.normalize = encoder, head, normalize

    def forward(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        features = self.encoder.embed(frames, masks)
        if self.normalize:
            features = nn.functional.normalize(features, dim=-1)
        return self.head(features)  # (B, V, T, J, 3) metres


class PosePredictor:
    """A trained regressor as a frame embedder (``posebert`` embedders' interface): predictions
    (B, V, T, J * 3) in mm, so :func:`finetune.evaluation.embed.embed_split` gathers them with
    the poses and labels of every frame."""

    def __init__(self, model: PoseRegressor, transforms: tuple = (), fingerprint: str = "pose"):
        self.model, self.transforms, self.fingerprint = model.eval(), tuple(transforms), fingerprint

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        masks = None if masks is None else masks.to(device)
        pred = self.model(frames.to(device), masks)
        return (pred * MM_PER_UNIT).flatten(-2).float().cpu()

    def predict(self, frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """frames (B, V, T, 3, H, W) uint8 at the encoder's input size -> (B, V, T, J, 3) mm,
        root-relative in each view's camera coordinates."""
        return self(frames, masks).unflatten(-1, (-1, 3))


def save_head(path: str | os.PathLike, model: PoseRegressor, meta: dict) -> Path:
    """``PATH.safetensors`` (encoder and head) and ``PATH.json`` (the encoder's config, the
    input size and ``meta``: the row it came from)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path.with_suffix(".safetensors"), save(state))
    info = {"encoder": to_dict(model.encoder.cfg), "dim": model.head.mean.numel(),
            "joints": model.head.joints, "normalize": model.normalize, **meta}  # fmt: skip
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return path.with_suffix(".safetensors")


_SAVED = ("encoder", "dim", "joints", "normalize", "row", "input_size")
"""The fields of a saved head's JSON (``row`` and ``input_size``: :func:`save_head`'s meta)."""


def read_head_info(file: Path) -> tuple[PoseBERTConfig, bool, int | None]:
    """(encoder config, normalize, input size) of a saved head's JSON, every field checked
    before anything is built: the encoder config within the bounds documented beside its
    fields, ``dim`` its width, ``joints`` :data:`NUM_JOINTS`, ``input_size`` at most
    :data:`pretrain.config.MAX_IMAGE_SIZE`; one :class:`pretrain.export.EncoderError` line
    naming the file otherwise."""
    from pretrain.export import (
        EncoderError,
        check_fields,
        check_input_size,
        encoder_config,
        read_json,
    )

    info = check_fields(read_json(file), _SAVED, _SAVED[:4], file, "a saved pose head")
    cfg = encoder_config(info["encoder"], file, "encoder")
    width = cfg.encoder.width
    checks = {
        "dim": (info["dim"] == width and is_int(info["dim"]), f"the encoder's width {width}"),
        "joints": (info["joints"] == NUM_JOINTS and is_int(info["joints"]), str(NUM_JOINTS)),
        "normalize": (isinstance(info["normalize"], bool), "true or false"),
        "row": (isinstance(info.get("row", {}), dict), "a mapping"),
    }
    for name, (ok, want) in checks.items():
        if not ok:
            raise EncoderError(f"{file}: {name} is {brief(info[name])}, not {want}")
    return cfg, info["normalize"], check_input_size(info.get("input_size"), file, "input_size")


def load_head(path: str | os.PathLike) -> PosePredictor:
    """The row :func:`save_head` wrote at ``path`` (with or without suffix), ready to predict;
    frames are resized to the size the encoder was trained at. Both files are input from
    elsewhere: the JSON is checked (:func:`read_head_info`) before the model is built, the
    weights must be finite, fit it and hold a positive ``head.std``; each failure is one
    :class:`pretrain.export.EncoderError` line (a ValueError) naming the file."""
    from data_shards.transforms import Resize
    from pretrain.export import EncoderError, fit, read_weights
    from pretrain.model import PoseBERT

    path = Path(path).with_suffix("")
    info_path, weights_file = path.with_suffix(".json"), path.with_suffix(".safetensors")
    for p in (info_path, weights_file):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; not a saved pose head")
    cfg, normalize, size = read_head_info(info_path)
    weights = read_weights(weights_file)  # finite, or one line naming it
    model = PoseRegressor(PoseBERT(cfg), PoseHead(cfg.encoder.width), normalize)
    fit(model, weights, weights_file)  # missing, unexpected or mis-shaped tensors
    std = model.head.std
    if not bool((std > 0).all()):  # features are divided by it
        raise EncoderError(f"{weights_file}: tensor head.std holds {int((std <= 0).sum())} "
                           "values <= 0")  # fmt: skip
    return PosePredictor(model, (Resize(size),) if size else (), f"pose-head:{path.name}")
