"""Frame encoder: shapes, normalisation, channels-last, background mask, local weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pretrain.model.backbone import BackboneConfig, FrameEncoder

TINY = "resnet10t"


def _frames(n: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    masks[:, 8:24, 10:20] = True
    return frames, masks


def _encoder(**kw) -> FrameEncoder:
    torch.manual_seed(0)
    return FrameEncoder(BackboneConfig(name=TINY, **kw)).eval()


@pytest.mark.parametrize("name", [TINY, "test_convnext"])
def test_output_shape_any_timm_name(name):
    enc = FrameEncoder(BackboneConfig(name=name)).eval()
    frames, _ = _frames()
    with torch.no_grad():
        out = enc(frames)
    assert out.shape == (3, enc.num_features)
    assert torch.isfinite(out).all()


def test_normalisation_inside():
    enc = _encoder(channels_last=False)
    frames = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    x = enc.preprocess(frames)
    expected = torch.tensor([(1 - m) / s for m, s in zip(enc.cfg.mean, enc.cfg.std, strict=True)])
    torch.testing.assert_close(x[0, :, 0, 0], expected)


def test_channels_last_same_features():
    """The activations run channels-last (every convolution's output); the weights keep the
    default layout, so DeepSpeed can broadcast each one viewed as bytes (a channels-last bf16
    weight refused that: ``deepspeed.initialize`` failed for every channels-last recipe)."""
    frames, _ = _frames()
    cl, plain = _encoder(channels_last=True), _encoder(channels_last=False)
    plain.load_state_dict(cl.state_dict())
    assert cl.preprocess(frames).is_contiguous(memory_format=torch.channels_last)
    convs = [m for m in cl.model.modules() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, out: outputs.append(out))
    with torch.no_grad():
        torch.testing.assert_close(cl(frames), plain(frames), atol=1e-4, rtol=1e-4)
    assert len(outputs) == len(convs)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)
    for p in cl.bfloat16().parameters():  # what DeepSpeed's _broadcast_model does to each
        p.data.view(torch.uint8)


def test_background_mask_zeroes_background():
    frames, masks = _frames()
    enc = _encoder(background_mask=True)
    x = enc.preprocess(frames, masks)
    assert (x.permute(1, 0, 2, 3)[:, ~masks] == 0).all()  # background: exactly 0
    assert (x.permute(1, 0, 2, 3)[:, masks] != 0).float().mean() > 0.9  # person kept
    # The background no longer matters; without the option it does.
    other = frames.clone()
    other.permute(1, 0, 2, 3)[:, ~masks] = 7
    with torch.no_grad():
        torch.testing.assert_close(enc(frames, masks), enc(other, masks))
        plain = _encoder()
        assert not torch.allclose(plain(frames, masks), plain(other, masks))
    with pytest.raises(ValueError, match="no foreground masks"):
        enc(frames)


def test_safetensors_weights_round_trip(tmp_path):
    source = _encoder()
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = FrameEncoder(BackboneConfig(name=TINY, weights=str(path))).eval()
    frames, _ = _frames()
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames), source(frames))


def test_pth_with_classifier_head_and_wrapper(tmp_path):
    import timm

    torch.manual_seed(0)
    full = timm.create_model(TINY, pretrained=False, num_classes=10)  # an ImageNet-like file
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    loaded = FrameEncoder(BackboneConfig(name=TINY, weights=str(path), channels_last=False))
    conv = "conv1.0.weight"
    torch.testing.assert_close(loaded.model.state_dict()[conv], full.state_dict()[conv])


def test_missing_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="weights file not found.*nope.safetensors"):
        FrameEncoder(BackboneConfig(name=TINY, weights=str(path)))


def test_mismatched_weights_are_a_clear_error(tmp_path):
    state = _encoder().model.state_dict()
    state.pop("bn1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(ValueError) as err:
        FrameEncoder(BackboneConfig(name=TINY, weights=str(path)))
    msg = str(err.value)
    assert "1 missing (bn1.weight)" in msg
    assert "1 unexpected (extra.weight)" in msg
    assert "conv1.0.weight: file (1, 1, 1, 1)" in msg


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"name": "not_a_model"}, "name"),
        ({"weights": "w.txt"}, "weights"),
        ({"std": (0.1, 0.0, 0.1)}, "std"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"BackboneConfig.{field}"):
        BackboneConfig(**kw)


def test_frames_must_be_uint8():
    with pytest.raises(TypeError, match="uint8"):
        _encoder()(torch.zeros(1, 3, 32, 32))
