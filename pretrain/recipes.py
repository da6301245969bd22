"""Named pretraining recipes: functions returning a full :class:`RunConfig`.

Each differs from :func:`base` by a few lines. ``posebert pretrain --recipe NAME --set k=v``
applies overrides on top. CPU recipes are what CI and the demo run; the cluster recipes are
the method at full size (ResNet-50, 224 px, bf16, ZeRO-2) for 8-GPU nodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from pretrain.config import DataConfig, RunConfig
from pretrain.engine.deepspeed_config import EngineConfig, OptimizerConfig
from pretrain.engine.loop import TrainConfig
from pretrain.engine.schedules import LRSchedule
from pretrain.model import BackboneConfig, EncoderConfig, MaskConfig, PoseBERTConfig
from pretrain.model.augment import ColorAugmentConfig
from pretrain.model.quantizer import QuantizerConfig
from pretrain.objectives import ContrastiveConfig, NegativeConfig

replace = dataclasses.replace


def base() -> RunConfig:
    """The method's defaults: ResNet-50, 12-layer 768-wide encoder, 30% span masking."""
    return RunConfig(recipe="base")


def debug_cpu() -> RunConfig:
    """Seconds on a laptop CPU: a 0.4M-parameter backbone, 2 layers, 32 px, 20 steps. For
    tests and CI; the loss must fall, nothing more."""
    cfg = base()
    model = PoseBERTConfig(
        backbone=BackboneConfig(name="test_resnet", channels_last=False),
        encoder=EncoderConfig(width=64, depth=2, heads=4, ffn_mult=2, dropout=0.0,
                              attention_dropout=0.0, conv_kernel=7, conv_groups=4),  # fmt: skip
        mask=MaskConfig(prob=0.3, span=2),
        proj_dim=32,
        feature_dropout=0.0,
    )
    return replace(
        cfg,
        recipe="debug_cpu",
        data=DataConfig(num_workers=0, views=2, frames=8, size=32),
        model=model,
        objective=ContrastiveConfig(temperature=0.1, negatives=NegativeConfig(num=8)),
        engine=EngineConfig(micro_batch_per_rank=4, optimizer=OptimizerConfig(lr=2e-3),
                            lr_schedule=LRSchedule(warmup_steps=2)),  # fmt: skip
        train=TrainConfig(max_steps=20, checkpoint_every=10),
    )


def demo_cpu() -> RunConfig:
    """Minutes on 2 CPU cores over the embedded shards: ResNet-18 at 64 px, 4 layers,
    GT-pose negatives, all four views as positives, background mask. Sized for two processes
    (``posebert demo``): 2 windows x 4 views x 8 frames per rank, 128 frames per step."""
    cfg = base()
    model = PoseBERTConfig(
        backbone=BackboneConfig(name="resnet18", channels_last=False, background_mask=True),
        encoder=EncoderConfig(width=128, depth=4, heads=4, ffn_mult=2, dropout=0.1,
                              conv_kernel=7, conv_groups=8),  # fmt: skip
        mask=MaskConfig(prob=0.3, span=3),
        proj_dim=64,
    )
    return replace(
        cfg,
        recipe="demo_cpu",
        data=DataConfig(num_workers=1, frames=8, size=64),
        model=model,
        objective=ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose", num=32)),
        engine=EngineConfig(micro_batch_per_rank=2, optimizer=OptimizerConfig(lr=1e-3),
                            lr_schedule=LRSchedule(warmup_steps=20)),  # fmt: skip
        train=TrainConfig(max_steps=300, checkpoint_every=100),
    )


def cluster_resnet50_224() -> RunConfig:
    """The full method on 8-GPU nodes: ResNet-50 at 224 px (shards written with --size 224),
    bf16, ZeRO-2, cosine negatives gathered across ranks. 64 windows x 4 views x 16 frames per
    GPU step = 4,096 frames; at ~6,000 frames/s per H100 about 0.7 s per step."""
    cfg = base()
    return replace(
        cfg,
        recipe="cluster_resnet50_224",
        data=DataConfig(train="shards/train", num_workers=8, shuffle_buffer=256),
        model=PoseBERTConfig(backbone=BackboneConfig(name="resnet50", channels_last=True)),
        objective=ContrastiveConfig(negatives=NegativeConfig(kind="cosine", num=100)),
        engine=EngineConfig(micro_batch_per_rank=64, zero_stage=2, precision="bf16",
                            optimizer=OptimizerConfig(lr=5e-4, impl="deepspeed"),
                            lr_schedule=LRSchedule(warmup_steps=2000)),  # fmt: skip
        train=TrainConfig(max_steps=100_000, checkpoint_every=1000),
    )


# ------------------------------------------------------------- levers against appearance


STRONG_AUGMENT = ColorAugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4, color_cast=0.3,
                                    channel_shuffle=0.5)  # fmt: skip
"""Colour jitter of the ``augment`` lever (drawn per window and per view)."""


def _lever_background_mask(cfg: RunConfig, on: bool) -> RunConfig:
    backbone = replace(cfg.model.backbone, background_mask=on)
    return replace(cfg, model=replace(cfg.model, backbone=backbone))


def _lever_augment(cfg: RunConfig, on: bool) -> RunConfig:
    augment = STRONG_AUGMENT if on else ColorAugmentConfig()
    return replace(cfg, model=replace(cfg.model, augment=augment))


def _lever_span_mask(cfg: RunConfig, on: bool) -> RunConfig:
    return replace(cfg, model=replace(cfg.model, mask=replace(cfg.model.mask, span=3 if on else 1)))


def _lever_appearance_swap(cfg: RunConfig, on: bool) -> RunConfig:
    """The shards are the lever (``shards synth --appearances-per-sample 2``: each camera in two
    appearances, 2V views); the config draws V of them per sample, so a step sees as many
    frames as without it and the positives include the same instant in other clothing."""
    return cfg


def _lever_motion_augment(cfg: RunConfig, on: bool) -> RunConfig:
    """The shards are the lever (``shards synth --mirror --speeds 0.8,1.25``: mirrored and
    time-warped copies of the train clips)."""
    return cfg


def _lever_same_window_negatives(cfg: RunConfig, on: bool) -> RunConfig:
    """Half the distractors from the anchor's own window (same clothing, background and body,
    other poses): appearance cannot tell them from the anchor."""
    negatives = replace(cfg.objective.negatives, same_window=0.5 if on else 0.0)
    return replace(cfg, objective=replace(cfg.objective, negatives=negatives))


def _lever_frame_contrast(cfg: RunConfig, on: bool) -> RunConfig:
    """Every frame, not only the masked ones, must pick the same instant's other views among
    the distractors (``objective.frame_weight``; Sermanet et al. 2018's multi-view
    time-contrastive loss on the frame latents)."""
    return replace(cfg, objective=replace(cfg.objective, frame_weight=1.0 if on else 0.0))


def _negatives_kind(kind: str) -> Callable[[RunConfig, bool], RunConfig]:
    """A switch to ``kind`` negatives (off: the recipe's kind, untouched)."""

    def switch(cfg: RunConfig, on: bool) -> RunConfig:
        if not on:
            return cfg
        negatives = replace(cfg.objective.negatives, kind=kind)
        return replace(cfg, objective=replace(cfg.objective, negatives=negatives))

    return switch


CPU_QUANTIZER = QuantizerConfig(enabled=True, groups=2, entries=320, dim=64,
                                temperature=(2.0, 0.5, 0.995), logit_init="unit")  # fmt: skip
"""The ``quantizer`` switch: wav2vec 2.0's product quantizer (2 codebooks of 320 entries), its
Gumbel temperature decayed from 2 to 0.5 over about 280 steps (the CPU runs' length) instead
of wav2vec's 400k, and logits of unit variance at the start: with wav2vec 2.0's unit-normal
projection the codebooks collapsed to 3-4 of the 640 entries within 26 steps (docs/results.md,
"The seed's comparison")."""


def _switch_quantizer(cfg: RunConfig, on: bool) -> RunConfig:
    return replace(cfg, model=replace(cfg.model, quantizer=CPU_QUANTIZER if on else
                                      QuantizerConfig()))  # fmt: skip


LEVERS: dict[str, Callable[[RunConfig, bool], RunConfig]] = {
    "background-mask": _lever_background_mask,
    "augment": _lever_augment,
    "appearance-swap": _lever_appearance_swap,
    "span-mask": _lever_span_mask,
    "same-window-negatives": _lever_same_window_negatives,
    "motion-augment": _lever_motion_augment,
    "frame-contrast": _lever_frame_contrast,
    "uniform-negatives": _negatives_kind("uniform"),
    "cosine-negatives": _negatives_kind("cosine"),
    "quantizer": _switch_quantizer,
}
"""Switches of ``posebert pretrain --levers`` and the ablation: the levers against appearance
shortcuts (GUIDE 6, docs/results.md "Ablation"), the negatives' kind and the product
quantizer. Name -> ``(config, on) -> config``."""


BEST_LEVERS = ("background-mask", "augment", "appearance-swap", "span-mask")
"""The best variant the ablation measured (docs/results.md "Ablation": these four on, 18% /
14% of the chance -> oracle gap closed on the two held-out sets, against 8% with the
background mask alone); ``posebert demo`` and ``gpu_pose_resnet50`` pretrain with it."""


def with_levers(cfg: RunConfig, levers: Sequence[str]) -> RunConfig:
    """``cfg`` with every lever off, then the named ones on (``posebert pretrain --levers``)."""
    unknown = sorted(set(levers) - set(LEVERS))
    if unknown:
        raise ValueError(f"unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}")
    for name, switch in LEVERS.items():
        cfg = switch(cfg, name in levers)
    return cfg


def gpu_pose_resnet50() -> RunConfig:
    """The pose-sensitive recipe at full size on one GPU: ResNet-50 at 128 px, every lever
    against appearance shortcuts on (background mask, colour jitter per view and window, span
    masking, GT-pose negatives) over appearance-swapped shards (``posebert shards synth
    --appearances-per-sample 2``, so 4 of the 8 views of a sample are drawn: the positives of a
    frame include the same instant in other clothing and background). 16 windows x 4 views x
    16 frames = 1,024 frames per step, 30,000 steps (about 30M frames, many passes over
    the embedded clips' train frames). For 224 px, render the shards with ``--size 224``.
    Expected cost in docs/pretraining.md."""
    cfg = replace(
        base(),
        recipe="gpu_pose_resnet50",
        data=DataConfig(train="runs/shards-app/train", num_workers=8, shuffle_buffer=256,
                        views=4),  # fmt: skip
        model=PoseBERTConfig(backbone=BackboneConfig(name="resnet50", channels_last=True)),
    )
    return replace(
        with_levers(cfg, BEST_LEVERS),
        objective=ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose", num=100)),
        engine=EngineConfig(micro_batch_per_rank=16, precision="bf16",
                            optimizer=OptimizerConfig(lr=5e-4),
                            lr_schedule=LRSchedule(warmup_steps=1000)),  # fmt: skip
        train=TrainConfig(max_steps=30_000, checkpoint_every=1000),
    )


def demo_cpu_quick() -> RunConfig:
    """``posebert demo --quick``: demo_cpu for 10 steps on 2 views, one checkpoint."""
    cfg = demo_cpu()
    return replace(cfg, recipe="demo_cpu_quick", data=replace(cfg.data, views=2),
                   train=replace(cfg.train, max_steps=10, checkpoint_every=10))  # fmt: skip


RECIPES: dict[str, Callable[[], RunConfig]] = {
    f.__name__: f
    for f in (base, debug_cpu, demo_cpu, demo_cpu_quick, cluster_resnet50_224, gpu_pose_resnet50)
}


def get_recipe(name: str) -> RunConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]()
