"""The sequence encoder is relative: THE SHIFT TEST, with a negative control, plus padding,
mask-embedding and config checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.model.encoder import POSITIONAL, Encoder, EncoderConfig

D, L, TOTAL = 32, 12, 40  # width, content length, padded sequence length


def _config(positional: str, **kw) -> EncoderConfig:
    # max_relative < L: distances inside the content are clipped too.
    base = dict(
        width=D,
        depth=2,
        heads=4,
        positional=positional,
        conv_kernel=5,
        conv_groups=4,
        max_relative=4,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return EncoderConfig(**{**base, **kw})


def _sharp(encoder: nn.Module) -> nn.Module:
    """Larger query/key weights than BERT's 0.02 init: attention far from uniform, so position
    terms (and any leak) show in the outputs instead of hiding under a flat softmax."""
    torch.manual_seed(0)
    for module in encoder.modules():
        if hasattr(module, "qkv"):
            nn.init.normal_(module.qkv.weight, std=0.3)
    return encoder.eval()


class AbsoluteEncoder(nn.Module):
    """Negative control: the same encoder plus a learned absolute position table added to the
    latents (what BERT has and this project must not)."""

    def __init__(self, cfg: EncoderConfig, max_len: int = TOTAL):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.table = nn.Parameter(torch.randn(max_len, cfg.width))

    def forward(self, latents, mask=None, padding=None):
        return self.encoder(latents + self.table[: latents.shape[1]], mask, padding)


def _embed(encoder: nn.Module, x: torch.Tensor, offset: int, fill: float = 0.0) -> torch.Tensor:
    """Outputs on x's tokens (1, L, D) when x sits at ``offset`` in a padded sequence of TOTAL
    frames (padding filled with ``fill``, marked as padding so it is never a key)."""
    seq = torch.full((1, TOTAL, D), fill)
    seq[:, offset : offset + L] = x
    padding = torch.ones(1, TOTAL, dtype=torch.bool)
    padding[:, offset : offset + L] = False
    with torch.no_grad():
        return encoder(seq, padding=padding)[:, offset : offset + L]


def _shift_error(encoder: nn.Module, k: int = 3, s: int = 17) -> float:
    """Largest difference between x's outputs at offset k and at offset k + s."""
    x = torch.randn(1, L, D, generator=torch.Generator().manual_seed(1))
    return (_embed(encoder, x, k) - _embed(encoder, x, k + s)).abs().max().item()


@pytest.mark.parametrize("positional", POSITIONAL)
def test_shift_test_encoder_is_relative(positional):
    encoder = _sharp(Encoder(_config(positional)))
    assert _shift_error(encoder) < 1e-4
    assert _shift_error(encoder, k=0, s=TOTAL - L) < 1e-4  # from one border to the other


@pytest.mark.parametrize("positional", POSITIONAL)
def test_shift_test_fails_with_an_absolute_table(positional):
    encoder = _sharp(AbsoluteEncoder(_config(positional)))
    assert _shift_error(encoder) > 1e-2  # the test can fail: it detects absolute positions


@pytest.mark.parametrize("positional", POSITIONAL)
def test_position_information_is_present(positional):
    """Relative, not position-blind: reversing the content changes more than the order."""
    encoder = _sharp(Encoder(_config(positional)))
    x = torch.randn(1, L, D)
    with torch.no_grad():
        forward, backward = encoder(x), encoder(x.flip(1)).flip(1)
    assert (forward - backward).abs().max() > 1e-3


@pytest.mark.parametrize("positional", POSITIONAL)
def test_padding_content_is_ignored(positional):
    encoder = _sharp(Encoder(_config(positional)))
    x = torch.randn(1, L, D)
    torch.testing.assert_close(_embed(encoder, x, 5), _embed(encoder, x, 5, fill=3.0))


def test_all_padding_row_stays_finite():
    encoder = Encoder(_config("relative")).eval()
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[0, :3] = False
    assert torch.isfinite(encoder(torch.randn(2, 6, D), padding=padding)).all()


def test_masked_frames_are_replaced_by_the_mask_embedding():
    torch.manual_seed(0)
    encoder = Encoder(_config("conv")).eval()
    x = torch.randn(2, L, D)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, 3:7] = True
    changed = x.clone()
    changed[mask] = torch.randn(int(mask.sum()), D)  # only masked content differs
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, mask), encoder(changed, mask))
        assert not torch.allclose(encoder(x), encoder(changed))


def test_mask_embedding_gets_gradient_and_dropout_trains():
    encoder = Encoder(_config("rotary", dropout=0.1, attention_dropout=0.1)).train()
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :4] = True
    encoder(torch.randn(2, L, D), mask).square().mean().backward()
    assert encoder.mask_embedding.grad.abs().sum() > 0


def test_post_norm_variant_runs():
    encoder = _sharp(Encoder(_config("conv", pre_norm=False)))
    assert encoder(torch.randn(2, L, D)).shape == (2, L, D)
    assert _shift_error(encoder) < 1e-4


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"heads": 5}, "heads"),
        ({"conv_groups": 5}, "conv_groups"),
        ({"positional": "absolute"}, "positional"),
        ({"dropout": 1.0}, "dropout"),
        ({"width": 24, "heads": 8, "positional": "rotary"}, "heads"),  # odd head width
    ],
)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=f"EncoderConfig.{field}"):
        EncoderConfig(**kw)


def test_bad_mask_shape():
    with pytest.raises(ValueError, match="mask must be bool"):
        Encoder(_config("conv"))(torch.randn(2, L, D), torch.zeros(2, L))
