"""The pose head and every lifting method on CUDA: trained through the fine-tuning loop on the
GPU, predicting there, restored there and on the CPU. tests/finetune/heads/test_lift_device.py
runs the same lifting fits with device=cpu in CI."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gpu_shards import NEEDS_CUDA, write_splits

from finetune.clips import read_splits
from finetune.heads.lift.base import METHOD_NAMES, QUIET, LiftData, get_method

pytestmark = NEEDS_CUDA
TINY = {
    "tcn": dict(filter_widths=(1, 1), channels=16, batch_size=32, steps=3),
    "vaegan": dict(width=32, latent=8, disc_width=16, batch_size=32, steps=3),
    "cyclic": dict(width=32, decoder_width=16, blocks=1, batch_size=32, steps=3,
                   decoder_weight=1.0, symmetry_weight=1.0, skip=True),
    "selfcorrect": dict(width=16, hidden=8, layers=1, window=8, batch_size=4,
                        projector_width=16, projector_steps=3, steps=3, correction_weight=1.0),
    "hrnet": dict(steps=2, batch_size=4, image_size=32, width=32, decoder_width=16,
                  predict_batch=16, heatmap_weight=1.0),
}  # fmt: skip
CPU_VS_GPU_MM = 1.0
"""Largest |prediction on CUDA - the same weights on the CPU| allowed, mm (TF32 convolutions
and cuDNN's LSTM round differently; predictions are hundreds of mm)."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("gpu_heads"), size=32)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_lifting_method_trains_predicts_and_restores_on_cuda(name, shards):
    method = get_method(name)
    config = method.config(**TINY[name], device="cuda")
    data = LiftData(shards, read_splits(shards, **method.read(config)))
    fitted = method.fit(data, config, QUIET)
    assert all(math.isfinite(r["loss"]) for r in fitted.losses)
    weights = fitted.state_dict()
    assert all(w.is_cuda for w in weights.values())
    with torch.no_grad():
        want = fitted.predict("val", data.splits["val"])
        again = method.restore(config, weights).predict("val", data.splits["val"])
        on_cpu = method.restore(dataclasses.replace(config, device="cpu"),
                                {k: v.cpu() for k, v in weights.items()})  # fmt: skip
        cpu = on_cpu.predict("val", data.splits["val"])
    assert all(w.device.type == "cpu" for w in on_cpu.state_dict().values())
    assert all(isinstance(p, np.ndarray) and np.isfinite(p).all() for p in want)
    assert all(np.array_equal(a, b) for a, b in zip(want, again, strict=True))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(want, cpu, strict=True))
    assert worst < CPU_VS_GPU_MM, worst


def test_the_pose_head_trains_and_predicts_on_cuda():
    """The probe and full fine-tuning through the loop (accelerate's device: the GPU), then the
    trained regressor predicting on the GPU as on the CPU."""
    from finetune.heads.pose.config import FullConfig, ProbeConfig
    from finetune.heads.pose.model import PosePredictor
    from finetune.heads.pose.train import Windows, fit_full, fit_probe
    from finetune.loop import Trainer
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    assert Trainer("t").device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(512, 64, generator=gen)
    targets = (features[:, :51] * 0.1).view(-1, 17, 3)  # a linear map the probe can learn
    head, history = fit_probe(features, targets, ProbeConfig(steps=60, batch=128), seed=0)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    torch.manual_seed(0)
    encoder = PoseBERT(debug_cpu().model)
    S, V, T = 6, 2, 8
    windows = Windows(torch.randint(0, 256, (S, V, T, 3, 32, 32), generator=gen, dtype=torch.uint8),
                      None, torch.randn(S, V, T, 17, 3, generator=gen) * 0.2)  # fmt: skip
    model, history = fit_full(encoder, windows, FullConfig(steps=5, windows=2, views=2, frames=4),
                              seed=0)  # fmt: skip
    assert all(math.isfinite(r["loss"]) for r in history)
    frames = windows.frames[:2]
    cpu = PosePredictor(model).predict(frames)
    gpu = PosePredictor(model.cuda()).predict(frames)
    assert gpu.device.type == "cpu" and gpu.shape == (2, V, T, 17, 3)
    assert float((gpu - cpu).abs().max()) < CPU_VS_GPU_MM
