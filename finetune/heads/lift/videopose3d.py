"""VideoPose3D's temporal convolutional lifter (Pavllo et al., CVPR 2019), its checkpoints.

Two modules share one state dict (VideoPose3D ``common/model.py``):

- :class:`TemporalModel`, the sequence model: dilated 1D convolutions over the frames (block
  ``i`` has kernel ``filter_widths[i]`` and dilation ``prod(filter_widths[:i])``), each block a
  dilated conv then a 1x1 conv, batch norm, ReLU, dropout, and a residual sliced to the valid
  part. Convolutions are valid: ``forward`` maps (B, T, J, 2) to (B, T - rf + 1, J_out, 3),
  ``rf`` the receptive field ``prod(filter_widths)``; padding is the caller's
  (:func:`pad_sequence`).
- :class:`TemporalModelOptimized1f`, the training variant for single-frame targets: stride =
  filter width instead of dilation, so an input of exactly ``rf`` frames costs one output's
  work. In eval mode it gives the sequence model's output on the same window.

``causal=True`` slices the residuals at the window's last frame and :func:`pad_sequence` puts
all the padding on the left, so the output for frame t reads frames <= t only.

:func:`load_videopose3d` imports the published checkpoints (``pretrained_h36m_*.bin``: a dict
with ``model_pos``, optionally ``model_traj``, ``epoch``, ``lr``, ``optimizer``,
``random_state``) with ``torch.load(weights_only=True)`` and an allow-list of the numpy types
the random state holds; the architecture is read off the weight shapes. A file is input from
elsewhere: every tensor must be contiguous with all its elements stored (a stride-0 tensor of a
few bytes can claim any shape), and the shape read off it must lie within :class:`TCNShape`'s
bounds, before any layer is built.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch
from torch import nn

from finetune.heads.lift.base import check_fields

MAX_CHANNELS = 4096
MAX_BLOCKS = 8
MAX_WIDTH = 9
MAX_RECEPTIVE_FIELD = 6561  # 3^8
MAX_JOINTS = 256


@dataclasses.dataclass(frozen=True)
class TCNShape:
    """The architecture (what a state dict alone does not say: ``causal``, ``dropout``).
    Bounded so a shape read off a file cannot make the process allocate without limit (the
    published models: 1024 channels, 5 blocks of width 3)."""

    joints_in: int = 17
    """Input joints (at most 256)."""
    joints_out: int = 17
    """17 for the pose model; 1 for the trajectory model (the root's camera position); at most
    256."""
    filter_widths: tuple[int, ...] = (3, 3, 3)
    """Kernel of each block; the receptive field is their product (3,3,3: 27; 3^5: 243). At
    most 8 blocks, odd widths of at most 9, a receptive field of at most 6561 frames."""
    channels: int = 1024
    """Width of every block (at most 4096: a dilated 3-wide layer then holds 200 MB)."""
    dropout: float = 0.25
    causal: bool = False
    in_features: int = 2
    """Values per input joint (2D: 2; at most 8)."""

    def __post_init__(self) -> None:
        widths = self.filter_widths
        checks = {
            "joints_in": 1 <= self.joints_in <= MAX_JOINTS,
            "joints_out": 1 <= self.joints_out <= MAX_JOINTS,
            "filter_widths": 1 <= len(widths) <= MAX_BLOCKS
            and all(1 <= w <= MAX_WIDTH and w % 2 == 1 for w in widths)
            and math.prod(widths) <= MAX_RECEPTIVE_FIELD,
            "channels": 1 <= self.channels <= MAX_CHANNELS, "dropout": 0 <= self.dropout < 1,
            "in_features": 1 <= self.in_features <= 8,
        }  # fmt: skip
        why = {"filter_widths": f" (1 to {MAX_BLOCKS} odd widths of at most {MAX_WIDTH}, a "
                                f"receptive field of at most {MAX_RECEPTIVE_FIELD})",
               "channels": f" (1..{MAX_CHANNELS})", "joints_in": f" (1..{MAX_JOINTS})",
               "joints_out": f" (1..{MAX_JOINTS})"}  # fmt: skip
        check_fields(self, checks, why)

    @property
    def receptive_field(self) -> int:
        return math.prod(self.filter_widths)


class _TemporalBase(nn.Module):
    """Layers and bookkeeping both variants share (so their state dicts are the same)."""

    def __init__(self, shape: TCNShape, strided: bool) -> None:
        super().__init__()
        self.shape = shape
        widths = shape.filter_widths
        c = shape.channels
        self.expand_conv = nn.Conv1d(shape.joints_in * shape.in_features, c, widths[0],
                                     stride=widths[0] if strided else 1, bias=False)  # fmt: skip
        self.expand_bn = nn.BatchNorm1d(c, momentum=0.1)
        convs, bns = [], []
        # pad[i]: frames block i trims each side; shift[i]: where its residual is read
        # (VideoPose3D's causal_shift); dilation grows by the previous widths.
        self.pad, self.shift = [widths[0] // 2], [widths[0] // 2 if shape.causal else 0]
        dilation = widths[0]
        for w in widths[1:]:
            self.pad.append((w - 1) * dilation // 2)
            step = 1 if strided else dilation  # strided: time already shrunk by `dilation`
            self.shift.append(w // 2 * step if shape.causal else 0)
            convs.append(nn.Conv1d(c, c, w, stride=w if strided else 1,
                                   dilation=1 if strided else dilation, bias=False))  # fmt: skip
            convs.append(nn.Conv1d(c, c, 1, bias=False))
            bns += [nn.BatchNorm1d(c, momentum=0.1), nn.BatchNorm1d(c, momentum=0.1)]
            dilation *= w
        self.layers_conv = nn.ModuleList(convs)
        self.layers_bn = nn.ModuleList(bns)
        self.shrink = nn.Conv1d(c, shape.joints_out * 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(shape.dropout)

    @property
    def receptive_field(self) -> int:
        return self.shape.receptive_field

    def set_bn_momentum(self, momentum: float) -> None:
        for bn in [self.expand_bn, *self.layers_bn]:
            bn.momentum = momentum

    def _residual(self, x: torch.Tensor, block: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, J, 2) -> (B, T - rf + 1, J_out, 3)."""
        if x.ndim != 4 or x.shape[-2:] != (self.shape.joints_in, self.shape.in_features):
            raise ValueError(f"expected (B, T, {self.shape.joints_in}, "
                             f"{self.shape.in_features}) input, got {tuple(x.shape)}")  # fmt: skip
        if x.shape[1] < self.receptive_field:
            raise ValueError(f"{x.shape[1]} frames < receptive field {self.receptive_field}")
        b = x.shape[0]
        x = x.flatten(2).transpose(1, 2)  # (B, J*2, T)
        x = self.drop(self.relu(self.expand_bn(self.expand_conv(x))))
        for i in range(len(self.pad) - 1):
            res = self._residual(x, i + 1)
            x = self.drop(self.relu(self.layers_bn[2 * i](self.layers_conv[2 * i](x))))
            x = res + self.drop(
                self.relu(self.layers_bn[2 * i + 1](self.layers_conv[2 * i + 1](x)))
            )
        x = self.shrink(x)  # (B, J_out*3, T')
        return x.transpose(1, 2).reshape(b, -1, self.shape.joints_out, 3)


class TemporalModel(_TemporalBase):
    """The sequence model: dilated valid convolutions (VideoPose3D ``TemporalModel``)."""

    def __init__(self, shape: TCNShape) -> None:
        super().__init__(shape, strided=False)

    def _residual(self, x: torch.Tensor, block: int) -> torch.Tensor:
        pad, shift = self.pad[block], self.shift[block]
        return x[:, :, pad + shift : x.shape[2] - pad + shift]


class TemporalModelOptimized1f(_TemporalBase):
    """Single-frame training variant: stride = width (VideoPose3D ``TemporalModelOptimized1f``);
    its state dict loads into :class:`TemporalModel` and back."""

    def __init__(self, shape: TCNShape) -> None:
        super().__init__(shape, strided=True)

    def _residual(self, x: torch.Tensor, block: int) -> torch.Tensor:
        w = self.shape.filter_widths[block]
        return x[:, :, self.shift[block] + w // 2 :: w]


def pad_sequence(x: torch.Tensor | np.ndarray, receptive_field: int, causal: bool = False):
    """Replicate the end frames along axis 0 so a valid model gives one output per frame:
    (rf-1)/2 on each side, or rf-1 on the left when causal (VideoPose3D pads with edge frames)."""
    total = receptive_field - 1
    left = total if causal else total // 2
    right = total - left
    if isinstance(x, np.ndarray):
        return np.concatenate([np.repeat(x[:1], left, 0), x, np.repeat(x[-1:], right, 0)])
    return torch.cat([x[:1].expand(left, *x.shape[1:]), x, x[-1:].expand(right, *x.shape[1:])])


# ----------------------------------------------------------------------- checkpoint import


def _numpy_globals() -> list:
    """What VideoPose3D's ``random_state`` (a numpy ``RandomState.get_state()`` tuple) needs,
    under the names numpy 1 and numpy 2 pickle them with; nothing that runs code."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    out: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar,
                 (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                 (multiarray.scalar, "numpy.core.multiarray.scalar")]  # fmt: skip
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]
    return out


def check_tensors(sd: dict) -> None:
    """ValueError naming the first entry of ``sd`` that is not a tensor holding its elements:
    non-contiguous (a stride-0 tensor of a few stored bytes claims any shape) or backed by
    less storage than its shape needs."""
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} is a {type(t).__name__}, not a tensor")
        if not t.is_contiguous():
            raise ValueError(f"{name}: a {tuple(t.shape)} tensor with strides {t.stride()} "
                             "(not contiguous: its elements are not all stored)")  # fmt: skip
        need = (t.storage_offset() + t.numel()) * t.element_size()
        have = t.untyped_storage().nbytes()
        if have < need:
            raise ValueError(f"{name}: a {tuple(t.shape)} tensor needs {need} bytes, its "
                             f"storage holds {have}")  # fmt: skip


def _conv_shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, int, int]:
    shape = tuple(sd[key].shape)
    if len(shape) != 3:
        raise ValueError(f"{key} has shape {shape}; a Conv1d weight has 3 dimensions")
    return shape


def shape_from_state_dict(sd: dict[str, torch.Tensor], causal: bool = False,
                          in_features: int = 2) -> TCNShape:  # fmt: skip
    """The architecture of a VideoPose3D state dict, read off its weight shapes (and checked
    against :class:`TCNShape`'s bounds: nothing is allocated for it yet)."""
    needed = ("expand_conv.weight", "shrink.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not a VideoPose3D state dict: no {', '.join(missing)}")
    channels, width_in, w0 = _conv_shape(sd, "expand_conv.weight")
    widths = [int(w0)]
    while f"layers_conv.{2 * (len(widths) - 1)}.weight" in sd:
        if len(widths) >= MAX_BLOCKS:
            raise ValueError(f"more than {MAX_BLOCKS} blocks (layers_conv.*); VideoPose3D "
                             "models have at most 5")  # fmt: skip
        widths.append(_conv_shape(sd, f"layers_conv.{2 * (len(widths) - 1)}.weight")[-1])
    return TCNShape(joints_in=int(width_in) // in_features,
                    joints_out=int(sd["shrink.weight"].shape[0]) // 3,
                    filter_widths=tuple(widths), channels=int(channels), dropout=0.25,
                    causal=causal, in_features=in_features)  # fmt: skip


def model_from_state_dict(sd: dict[str, torch.Tensor], causal: bool = False) -> TemporalModel:
    """A :class:`TemporalModel` (eval mode) holding ``sd``; BatchNorm's ``num_batches_tracked``
    may be missing (checkpoints of PyTorch < 0.4.1). Tensors and shapes are checked
    (:func:`check_tensors`, :class:`TCNShape`'s bounds) before the model is built."""
    sd = {str(k).removeprefix("module."): v for k, v in sd.items()}
    check_tensors(sd)
    model = TemporalModel(shape_from_state_dict(sd, causal))
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"VideoPose3D state dict does not fit: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")  # fmt: skip
    return model.eval()


def load_videopose3d(path: str | os.PathLike, key: str = "model_pos", causal: bool = False
                     ) -> TemporalModel:  # fmt: skip
    """A VideoPose3D checkpoint's ``key`` model (``model_pos`` or ``model_traj``) in eval mode:
    forward (B, T, 17, 2) -> (B, T - rf + 1, 17, 3), screen-normalised 2D in, metres out (the
    published models: filter widths 3,3,3,3,3, 1024 channels). Never unpickles code: a file
    holding anything but tensors, containers, numbers, strings and numpy arrays is refused."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError's message runs over many lines
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln),
                   first[0] if first else type(e).__name__)  # fmt: skip
        raise ValueError(f"{path}: not a plain VideoPose3D checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(key), dict):
        have = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: no {key!r} state dict in the checkpoint (has {have})")
    try:
        return model_from_state_dict(ckpt[key], causal)
    except ValueError as e:  # shapes out of bounds, stride-0 or short tensors, misfits
        raise ValueError(f"{path}: {key}: {e}") from None
