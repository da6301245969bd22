"""Frame encoder: any timm backbone, uint8 frames in, pooled features out.

Weights come only from a local file (nothing is fetched from a hub at run time). Frames travel
as uint8 and are normalised here, on the device, where it costs nothing next to the backbone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import timm
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclasses.dataclass
class BackboneConfig:
    """Which timm model encodes each frame, and how frames are prepared for it."""

    name: str = "resnet50"
    """Any timm model name; built with ``pretrained=False, num_classes=0`` (pooled features)."""
    weights: str | None = None
    """Local weights file (.safetensors preferred; .pth/.pt/.bin read with
    ``torch.load(weights_only=True)``); None: random initialisation. A classifier head in the
    file is ignored; any other missing, unexpected or mis-shaped key is an error."""
    channels_last: bool = True
    """Run the backbone in channels-last memory format (faster convolutions on GPUs): the
    frames enter it channels-last and every convolution's output follows; the weights keep the
    default layout, which DeepSpeed needs (it broadcasts each parameter viewed as bytes at
    start, which a channels-last weight refuses, and ZeRO re-lays them out flat anyway)."""
    background_mask: bool = False
    """Multiply each frame by its foreground mask before the backbone: after normalisation, so
    the background becomes 0, the mean colour (the seed found it helps retrieval, GUIDE 6)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (RGB, in [0, 1]) subtracted from the frames."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation (RGB, in [0, 1]) the frames are divided by."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate passed to timm (only when > 0: not every model accepts it)."""

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if not timm.is_model(self.name):
            raise ValueError(f"BackboneConfig.name: {self.name!r} is not a timm model name")
        if self.weights is not None:
            self.weights = os.fspath(self.weights)
            if not self.weights.endswith(WEIGHT_SUFFIXES):
                raise ValueError(
                    f"BackboneConfig.weights: {self.weights!r} must end with one of "
                    f"{', '.join(WEIGHT_SUFFIXES)}"
                )
        checks = {
            "mean": len(self.mean) == 3,
            "std": len(self.std) == 3 and all(s > 0 for s in self.std),
            "drop_path_rate": 0.0 <= self.drop_path_rate < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"BackboneConfig.{name}: invalid value {getattr(self, name)!r}")


class FrameEncoder(nn.Module):
    """uint8 frames (N, 3, H, W) [+ foreground masks (N, H, W)] -> features (N, F)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        extra = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate > 0 else {}
        self.model = timm.create_model(cfg.name, pretrained=False, num_classes=0, **extra)
        if cfg.weights is not None:
            load_weights(self.model, cfg.weights)
        self.num_features: int = int(self.model.num_features)
        """F: width of the pooled features."""
        # The normalisation in 0..255 units, float32 per device, from the config: not buffers,
        # which a bf16 engine casts (123.675 would become 123.5), nor in the checkpoint.
        self._normalisers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normaliser(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32 (1, 3, 1, 1) in 0..255 units on ``device``."""
        if device not in self._normalisers:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) * 255
                         for v in (self.cfg.mean, self.cfg.std))  # fmt: skip
            self._normalisers[device] = (mean.to(device), std.to(device))
        return self._normalisers[device]

    def preprocess(self, frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalised input of the backbone (N, 3, H, W), in the
        backbone's parameter dtype (bf16 under a bf16 engine) and memory format."""
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames must be uint8 (N, 3, H, W), got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (N, 3, H, W), got {tuple(frames.shape)}")
        mean, std = self.normaliser(frames.device)
        x = (frames.float() - mean) / std  # (N, 3, H, W) float32, whatever the engine's dtype
        if self.cfg.background_mask:
            if masks is None:
                raise ValueError("background_mask is on but no foreground masks were given")
            N, _, H, W = frames.shape
            if tuple(masks.shape) != (N, H, W):
                raise ValueError(f"masks must be (N, H, W) = {(N, H, W)}, got {tuple(masks.shape)}")
            x = x * masks[:, None].to(x.dtype)  # (N, 1, H, W) broadcast over channels
        x = x.to(_param_dtype(self.model))
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, frames: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 frames (N, 3, H, W), masks (N, H, W) bool (True = person; used only with
        ``background_mask``) -> pooled features (N, F)."""
        return self.model(self.preprocess(frames, masks))


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file; safetensors, or a torch pickle read weights-only (no
    code runs). A ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper and a DataParallel
    ``module.`` prefix are removed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {p} (weights are read from a local file only; "
            "nothing is downloaded)"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {p}: expected a mapping of names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file into a timm model, strictly except for its classifier head
    (ImageNet checkpoints carry one; ``num_classes=0`` models have none). Raises ValueError
    listing missing, unexpected and mis-shaped keys."""
    state = read_state_dict(path)
    own = model.state_dict()
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k == h or k.startswith(h + ".") for h in heads)
    }
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        name = type(model).__name__
        parts = [
            f"{len(missing)} missing ({_few(missing)})" if missing else "",
            f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
            f"{len(shapes)} mis-shaped ({_few(shapes)})" if shapes else "",
        ]
        raise ValueError(
            f"backbone weights {os.fspath(path)} do not fit the {name} model: "
            + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state, strict=True)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")
