"""JPEG frames decoded where the model runs: ``posebert pretrain --set data.decode=gpu``.

CPU JPEG decoding cannot feed a GPU training ResNet-50 (GUIDE 7: about 700 frames/s per core
against several thousand per GPU). In this mode the loader workers do everything but the
decoding: they check each frame's header (format and size, exactly as
:func:`data_shards.schema.decode_jpeg` does before it decodes, so a frame claiming 13000 x 13000
pixels is a counted bad sample and never reaches a decoder), run the transforms and hand over
the bytes (the reader's ``frames="jpeg"``, ``batch["jpegs"][b][v][t]``). The training process
then turns them into the tensor the CPU path would have given, with :func:`decode_frames`:

1. one batched ``torchvision.io.decode_jpeg(..., device=device)`` call over the B x V x T frames
   (nvJPEG on a GPU; on the CPU torchvision's libjpeg-turbo, which gives exactly PIL's pixels);
2. the transforms' pixel work that was deferred. SelectViews and TemporalCrop already chose the
   views and frames in the workers (the JPEG lists follow the same per-sample random draws), and
   colour augmentation runs on the device in the model in both modes; what is left is
   :class:`data_shards.transforms.Resize`, which in jpeg mode scales the labels and sets
   ``meta.image_size`` but cannot touch bytes: the frames are resized here to that size with
   PIL's filter (bilinear, its support widened by the scale when shrinking: torch's
   ``antialias=True``), horizontal pass then vertical, each rounded to 8 bits as PIL does;
3. the (B, V, T, 3, H, W) uint8 layout of :func:`data_shards.transforms.collate`, on ``device``.

Measured against the CPU path (PIL) with torch 2.14 / torchvision 0.29 / Pillow 13 on the CPU:
decoding is bit-identical; shrinking (the usual case: shards at or above the training size)
differs by at most 1 level on 0.25% of the pixels of photographs; enlarging by at most 2 levels
on up to 9% (PIL's own integer arithmetic; torch's uint8 resize, meant to match PIL, differs as
much). nvJPEG is another decoder: torchvision's own test accepts a mean difference below 2
levels. A frame whose header is valid but whose data the device decoder refuses (a CMYK JPEG on
nvJPEG) is decoded on the CPU by the same library instead; one no decoder can read stops the run
with :class:`FrameDecodeError` naming the sample and the frame (the CPU path would have skipped
and counted it: ``posebert shards verify`` finds such frames before a run).

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a DeprecationWarning
on every call, silenced here); they still work, and this module is the one place to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from data_shards.schema import frame_member

RESIZE_CHUNK = 256
"""Frames resized per call: bounds the float32 copy (256 x 3 x 512 x 512 x 4 bytes = 800 MiB)."""


class FrameDecodeError(ValueError):
    """A frame that passed the header check but that no decoder could read."""


def decode_frames(
    jpegs: Sequence[Sequence[Sequence[bytes]]],
    size: tuple[int, int],
    device: torch.device | str,
    keys: Sequence[str] | None = None,
) -> torch.Tensor:
    """``jpegs[b][v][t]`` JPEG bytes of one size -> (B, V, T, 3, H, W) uint8 on ``device``,
    resized to ``size`` = (W, H) as :class:`data_shards.transforms.Resize` would (no-op when the
    frames already have it). ``keys`` name the samples in errors."""
    device = torch.device(device)
    B, V, T = len(jpegs), len(jpegs[0]), len(jpegs[0][0])
    flat = [data for sample in jpegs for row in sample for data in row]  # (B, V, T) order
    if len(flat) != B * V * T:
        raise ValueError(f"jpegs must be [B][V][T] with the same V, T per sample, got {B} "
                         f"samples and {len(flat)} frames")  # fmt: skip
    images = _decode_all(_as_tensors(flat), device, lambda i: _where(i, V, T, keys))
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"frames of several sizes in one batch: {sorted(shapes)}")
    frames = torch.stack(images)  # (N, 3, h, w)
    W, H = size
    if frames.shape[-2:] != (H, W):
        frames = torch.cat([resize_like_pil(chunk, (W, H))
                            for chunk in frames.split(RESIZE_CHUNK)])  # fmt: skip
    return frames.view(B, V, T, 3, H, W)


def decode_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """A reader batch of ``frames="jpeg"`` -> the same batch with ``frames`` (B, V, T, 3, H, W)
    uint8 on ``device`` in place of ``jpegs``, at the size ``meta`` says (after the transforms)."""
    sizes = {tuple(m.image_size) for m in batch["meta"]}
    if len(sizes) != 1:
        raise ValueError(f"samples of several image sizes in one batch: {sorted(sizes)}")
    out = {k: v for k, v in batch.items() if k != "jpegs"}
    out["frames"] = decode_frames(batch["jpegs"], sizes.pop(), device, batch.get("keys"))
    return out


def resize_like_pil(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> uint8 (N, 3, H, W), ``size`` = (W, H): PIL's ``BILINEAR`` resize
    (its support scaled by the factor when shrinking, pixel centres aligned), computed in
    float32 on the frames' device; horizontal pass first, each pass rounded half up and clipped
    to 8 bits as PIL does."""
    W, H = size
    x = frames.float()
    if x.shape[-1] != W:
        x = F.interpolate(x, size=(x.shape[-2], W), mode="bilinear", align_corners=False,
                          antialias=True).add_(0.5).floor_().clamp_(0, 255)  # fmt: skip
    if x.shape[-2] != H:
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False,
                          antialias=True).add_(0.5).floor_().clamp_(0, 255)  # fmt: skip
    return x.to(torch.uint8)


def _as_tensors(flat: list[bytes]) -> list[torch.Tensor]:
    """One host buffer holding every frame, and a 1-D uint8 view of each (no copy per frame)."""
    buffer = torch.frombuffer(bytearray(b"".join(flat)), dtype=torch.uint8)
    return list(buffer.split([len(data) for data in flat]))


def _decode_jpeg(data: Any, device: torch.device | None = None) -> Any:
    """torchvision's decode_jpeg to RGB (8 bits, EXIF orientation ignored, as PIL's path);
    without its warning that torchvision 0.29 deprecates image decoding for TorchCodec (once
    per call, every step)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=DeprecationWarning)
        if device is None:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


def _decode_all(data: list[torch.Tensor], device: torch.device, where) -> list[torch.Tensor]:
    try:
        return list(_decode_jpeg(data, device))
    except RuntimeError:  # find the frame(s) behind it; the others decode as before
        return [_decode_one(d, device, where(i)) for i, d in enumerate(data)]


def _decode_one(data: torch.Tensor, device: torch.device, where: str) -> torch.Tensor:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError as e:
        error = e
    if device.type != "cpu":  # a JPEG the device decoder does not support (CMYK on nvJPEG)
        try:
            return _decode_jpeg(data).to(device)
        except RuntimeError as e:
            error = e
    message = " ".join(str(error).split())[:300]
    raise FrameDecodeError(f"{where}: cannot be decoded ({message})")


def _where(i: int, V: int, T: int, keys: Sequence[str] | None) -> str:
    b, rest = divmod(i, V * T)
    key = keys[b] if keys is not None and b < len(keys) else f"#{b}"
    return f"sample {key!r}, {frame_member(*divmod(rest, T))}"
