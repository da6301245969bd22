"""``data.decode=gpu`` on a GPU: nvJPEG's frames against the CPU path's (PIL), the deferred
resize on the device against the same function on the CPU, the CPU fallback for frames nvJPEG
does not take, and a frame nobody can decode named. tests/data_shards/test_device_decode.py
runs the same code with device="cpu" in CI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from gpu_shards import NEEDS_CUDA, write_splits
from PIL import Image

from data_shards.device_decode import FrameDecodeError, decode_batch, decode_frames, resize_like_pil
from data_shards.read import ReaderConfig, ShardReader
from data_shards.schema import encode_jpeg
from data_shards.transforms import Resize, SelectViews, TemporalCrop

pytestmark = NEEDS_CUDA
MEAN_LEVELS = 2.0
"""Largest mean |nvJPEG - libjpeg-turbo| per frame allowed, in 8-bit levels: torchvision's own
test of its GPU decoder against its CPU one (test_image.py, test_decode_jpeg_cuda)."""


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("gpu_decode"), views=3, frames=6) / "train"


@pytest.mark.parametrize("size", [None, 24])
def test_nvjpeg_batches_match_the_cpu_path(train, size):
    transforms = (SelectViews(2), TemporalCrop(4)) + ((Resize(size),) if size else ())
    cfg = dict(batch_size=4, transforms=transforms)
    cpu = list(ShardReader(ReaderConfig(str(train), **cfg), 0, 1))
    jpeg = list(ShardReader(ReaderConfig(str(train), frames="jpeg", **cfg), 0, 1))
    for a, b in zip(cpu, jpeg, strict=True):
        got = decode_batch(b, "cuda")
        f = got["frames"]
        assert f.is_cuda and f.dtype == torch.uint8 and f.shape == a["frames"].shape
        assert got["keys"] == a["keys"] and torch.equal(got["pose2d"], a["pose2d"])
        diff = (f.cpu().float() - a["frames"].float()).abs()
        per_frame = diff.flatten(3).mean(-1)  # (B, V, T, 3)
        assert float(per_frame.max()) < MEAN_LEVELS, float(per_frame.max())


def test_the_resize_on_the_gpu_is_the_cpus():
    frames = torch.randint(0, 256, (8, 3, 64, 48), dtype=torch.uint8)
    for size in ((32, 32), (24, 40), (100, 90)):
        cpu = resize_like_pil(frames, size)
        gpu = resize_like_pil(frames.cuda(), size)
        assert gpu.is_cuda and gpu.shape == cpu.shape
        assert int((gpu.cpu().int() - cpu.int()).abs().max()) <= 1  # a rounding at .5 apart


def test_a_cmyk_frame_is_decoded_anyway_and_a_broken_one_named():
    rgb = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=90)
    cmyk, plain = buf.getvalue(), encode_jpeg(rgb)
    got = decode_frames([[[plain, cmyk]]], (16, 16), "cuda")
    want = decode_frames([[[plain, cmyk]]], (16, 16), "cpu")  # torchvision's libjpeg-turbo
    assert got.is_cuda and got.shape == (1, 1, 2, 3, 16, 16)
    assert float((got.cpu().float() - want.float()).abs().mean()) < MEAN_LEVELS
    broken = plain[: len(plain) // 2]
    with pytest.raises(FrameDecodeError, match=r"sample 's1', v00\.t001\.jpg"):
        decode_frames([[[plain, plain]], [[plain, broken]]], (16, 16), "cuda", keys=["s0", "s1"])
