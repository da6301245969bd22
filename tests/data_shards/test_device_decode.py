"""``data.decode=gpu``'s decoder run on the CPU through the same code (``device="cpu"``): the
frames it makes from the reader's jpeg mode against the ones the workers make with PIL.

Measured here (torch 2.14, torchvision 0.29, Pillow 13): torchvision's CPU decoder gives PIL's
pixels exactly; the deferred resize differs from PIL's by at most 1 level on 0.25% of the pixels
of photographs when shrinking, by at most 2 levels on up to 9% when enlarging. The tolerances
below are those numbers with a little room; the GPU's decoder (nvJPEG) is checked against the
same PIL path in tests/gpu/test_gpu_decode.py."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from conftest import make_sample
from PIL import Image

from data_shards.device_decode import FrameDecodeError, decode_batch, decode_frames
from data_shards.read import ReaderConfig, ShardReader
from data_shards.schema import decode_jpeg, encode_jpeg
from data_shards.transforms import Resize, SelectViews, TemporalCrop
from data_shards.write import write_split
from pretrain.engine.stream import frames_in, to_device

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_decode")
    samples = [make_sample(key=f"k{i:02d}", seed=i, views=3, frames=6, size=(40, 40))
               for i in range(8)]  # fmt: skip
    write_split(root, "train", samples, {}, {})
    return root / "train"


def read_both(split, transforms, **kw):
    """(batches of the CPU path, batches of the jpeg mode) of one epoch, same settings."""
    cfg = dict(batch_size=4, transforms=transforms, **kw)
    cpu = list(ShardReader(ReaderConfig(str(split), **cfg), 0, 1))
    jpeg = list(ShardReader(ReaderConfig(str(split), frames="jpeg", **cfg), 0, 1))
    return cpu, jpeg


@pytest.mark.parametrize("size", [None, 40, 24])
def test_jpeg_mode_decoded_here_gives_the_frames_the_workers_give(split, size):
    """Same samples, same per-sample random views and frames, same labels; the frames equal
    exactly without a resize, within the resize tolerance with one."""
    transforms = (SelectViews(2), TemporalCrop(4)) + ((Resize(size),) if size else ())
    cpu, jpeg = read_both(split, transforms)
    assert len(cpu) == len(jpeg) == 2
    for a, b in zip(cpu, jpeg, strict=True):
        assert "frames" not in b and len(b["jpegs"][0]) == 2 and len(b["jpegs"][0][0]) == 4
        assert frames_in(b) == frames_in(a) == 4 * 2 * 4
        got = to_device(b, CPU)  # what the training loop does with every batch
        assert "jpegs" not in got and a["keys"] == got["keys"]
        for name in ("pose2d", "K", "Rt", "pose3d", "masks", "index"):
            assert torch.equal(a[name], got[name]), name
        f, g = a["frames"], got["frames"]
        assert g.dtype == torch.uint8 and g.device == CPU and g.shape == f.shape
        diff = (f.int() - g.int()).abs()
        if size in (None, 40):  # no resize: the same decoder, bit for bit
            assert int(diff.max()) == 0
        else:
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def photographs() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        image = getattr(data, name)()
        out += [np.asarray(Image.fromarray(image).resize((s, s), Image.BILINEAR))
                for s in (64, 128, 224)]  # fmt: skip
    return out


@pytest.mark.parametrize("kind", ["shrink", "enlarge"])
def test_the_deferred_resize_is_pils_within_a_level_or_two(kind):
    """decode + resize on the device path against decode_jpeg + PIL's bilinear resize."""
    worst, changed, pixels = 0, 0, 0
    for image in photographs():
        jpeg = encode_jpeg(image, 90)
        side = image.shape[0]
        sizes = [s for s in (16, 32, 48, 100, 150) if s < side] if kind == "shrink" else [
            s for s in (100, 150, 224, 256) if s > side]  # fmt: skip
        for s in sizes:
            pil = np.asarray(Image.fromarray(decode_jpeg(jpeg)).resize((s, s), Image.BILINEAR))
            got = decode_frames([[[jpeg]]], (s, s), CPU)[0, 0, 0].permute(1, 2, 0).numpy()
            diff = np.abs(pil.astype(int) - got.astype(int))
            worst, changed, pixels = max(worst, diff.max()), changed + (diff > 0).sum(), (
                pixels + diff.size)  # fmt: skip
    if kind == "shrink":
        assert worst <= 1 and changed / pixels < 0.005
    else:
        assert worst <= 2 and changed / pixels < 0.1


def test_grey_and_rgb_jpegs_decode_as_pil_does():
    rgb = make_sample(size=(24, 16)).frames[0, 0]
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buf, format="JPEG", quality=90)
    for jpeg in (encode_jpeg(rgb), buf.getvalue()):
        got = decode_frames([[[jpeg]]], (24, 16), CPU)[0, 0, 0].permute(1, 2, 0).numpy()
        assert np.array_equal(got, decode_jpeg(jpeg, (24, 16)))


def test_a_frame_no_decoder_can_read_stops_naming_its_sample_and_frame():
    """Its header is fine (the workers let it through); its data ends early."""
    frames = make_sample(views=2, frames=3, size=(16, 16)).frames
    good = [[encode_jpeg(frames[v, t]) for t in range(3)] for v in range(2)]
    bad = [list(row) for row in good]
    bad[1][2] = bad[1][2][: len(bad[1][2]) // 2]
    with pytest.raises(FrameDecodeError, match=r"sample 'k7', v01\.t002\.jpg: cannot be decoded"):
        decode_frames([good, bad], (16, 16), CPU, keys=["k6", "k7"])


def test_a_batch_of_several_sizes_is_refused(split):
    _, batches = read_both(split, ())
    batch = dict(batches[0])
    batch["meta"] = [*batch["meta"][:-1], dataclasses.replace(batch["meta"][-1], image_size=(8, 8))]
    with pytest.raises(ValueError, match="several image sizes"):
        decode_batch(batch, CPU)


# --------------------------------------------- the header check in the workers (hostile frames)


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF) claims another size."""
    b, i = bytearray(jpeg), 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(b[i + 2 : i + 4], "big")
    b[i + 5 : i + 7], b[i + 7 : i + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(b)


@pytest.fixture
def decoded(monkeypatch):
    """Every JPEG decode, by PIL or torchvision, as (library, size); the workers must make none
    in jpeg mode (a decoder handed a 13000 x 13000 header would allocate 500 MB)."""
    import torchvision.io
    from PIL import JpegImagePlugin

    seen, load, tv = [], JpegImagePlugin.JpegImageFile.load, torchvision.io.decode_jpeg

    def pil_spy(self):
        seen.append(("PIL", self.size))
        return load(self)

    def tv_spy(data, *args, **kwargs):
        seen.append(("torchvision", len(data) if isinstance(data, list) else 1))
        return tv(data, *args, **kwargs)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", pil_spy)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", tv_spy)
    return seen


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Image.open's, true
def test_a_13000_pixel_frame_is_refused_from_its_header_in_jpeg_mode(tmp_path, caplog, decoded):
    """frames="jpeg" (data.decode=gpu) decodes nothing in the workers, but checks each frame's
    header exactly as the CPU path does before decoding: the sample is a counted bad sample,
    named in one warning, and its frame never reaches a (GPU) decoder."""
    samples = [make_sample(key=f"k{i}", seed=i, views=1, frames=2, size=(16, 16))
               for i in range(4)]  # fmt: skip
    hostile = samples[2]
    hostile.jpegs = [[encode_jpeg(f) for f in view] for view in hostile.frames]
    hostile.jpegs[0][1] = with_jpeg_size(hostile.jpegs[0][1], 13000, 13000)
    write_split(tmp_path, "train", samples, {}, {})
    reader = ShardReader(ReaderConfig(str(tmp_path / "train"), batch_size=1, shuffle=False,
                                      drop_last=False, frames="jpeg"), 0, 1)  # fmt: skip
    batches = list(reader)
    assert [b["keys"][0] for b in batches] == ["k0", "k1", "k3"]
    assert reader.errors["bad_samples"] == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("data_shards.")]
    assert "k2" in line and "v00.t001.jpg: size 13000x13000, expected 16x16" in line
    assert decoded == []  # nothing decoded in the reader
    frames = [to_device(b, CPU)["frames"] for b in batches]  # the others decode as usual
    assert all(f.shape == (1, 1, 2, 3, 16, 16) for f in frames)
    assert [lib for lib, _ in decoded] == ["torchvision"] * 3  # one batched call per batch
