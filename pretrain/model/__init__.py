"""PoseBERT model: plain nn.Modules, each component owning its config (no DeepSpeed inside).

Stages: ``encode_frames`` (timm backbone + projection) -> ``mask`` (span masking, True =
masked) -> ``encode_sequence`` (relative-position transformer) -> ``project`` (context and
target vectors, optionally through a Gumbel product quantizer).
"""

from pretrain.model.augment import ColorAugmentConfig, color_augment
from pretrain.model.backbone import BackboneConfig, FrameEncoder, load_weights, read_state_dict
from pretrain.model.encoder import Encoder, EncoderConfig
from pretrain.model.masking import MaskConfig, span_mask
from pretrain.model.posebert import PoseBERT, PoseBERTConfig, PoseBERTOutput
from pretrain.model.quantizer import (
    GumbelProductQuantizer,
    QuantizerConfig,
    QuantizerOutput,
    gumbel_temperature,
)

__all__ = [
    "BackboneConfig",
    "ColorAugmentConfig",
    "Encoder",
    "EncoderConfig",
    "FrameEncoder",
    "GumbelProductQuantizer",
    "MaskConfig",
    "PoseBERT",
    "PoseBERTConfig",
    "PoseBERTOutput",
    "color_augment",
    "QuantizerConfig",
    "QuantizerOutput",
    "gumbel_temperature",
    "load_weights",
    "read_state_dict",
    "span_mask",
]
