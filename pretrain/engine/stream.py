"""The reader as an endless stream of batches for the loop, invisible to the global RNG.

Epochs follow one another (``set_epoch`` before each). Fetching a batch never draws from the
global RNG: DataLoader draws a base seed whenever an iterator starts, and a resumed run starts
its iterator at another step than an uninterrupted one, while dropout must see the same RNG
state in both.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch


def frames_in(batch: Mapping[str, Any]) -> int:
    """Frames in a batch: B x V x T of a ``(B, V, T, C, H, W)`` frames tensor or of the
    ``jpegs[b][v][t]`` lists of the reader's jpeg mode, else samples."""
    frames = batch.get("frames")
    if isinstance(frames, torch.Tensor) and frames.ndim >= 4:
        return math.prod(frames.shape[:-3])
    jpegs = batch.get("jpegs")
    if isinstance(jpegs, list) and jpegs:
        return sum(len(row) for sample in jpegs for row in sample)
    if "keys" in batch:
        return len(batch["keys"])
    return next((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)), 0)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``; JPEG frames (the reader's jpeg mode, ``data.decode=
    gpu``) decoded there, batched, into the ``frames`` tensor the CPU path would have given
    (:func:`data_shards.device_decode.decode_batch`)."""
    if "jpegs" in batch and "frames" not in batch:
        from data_shards.device_decode import decode_batch

        batch = decode_batch(batch, device)
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def epochs(reader: Any) -> Iterator[dict[str, Any]]:
    """The reader's batches across epochs, forever (set_epoch before each)."""
    empty = 0
    while True:
        epoch = reader.epoch
        reader.set_epoch(epoch)
        n = 0
        for batch in reader:
            n += 1
            yield batch
        empty = empty + 1 if n == 0 else 0
        if empty > 1:  # one empty pass is normal: a checkpoint taken at the end of an epoch
            raise RuntimeError(f"the reader yields no batches (epoch {reader.epoch})")
        if reader.epoch == epoch:  # a reader that does not advance by itself
            reader.set_epoch(epoch + 1)


class BatchStream:
    """``next()``: the following batch on ``device``; ``frames`` counts frames handed out."""

    def __init__(self, reader: Any, device: torch.device):
        self.device, self.frames = device, 0
        self._batches = epochs(reader)

    def next(self) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            batch = next(self._batches)
        self.frames += frames_in(batch)
        return to_device(batch, self.device)
