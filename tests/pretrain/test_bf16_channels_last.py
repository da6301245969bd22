"""bf16 and channels-last, the GPU recipes' settings, through the real entry point on the CPU
(DeepSpeed runs bf16 there too). Both used to fail before the first step with DeepSpeed 0.19.8:
channels-last weights at ``deepspeed.initialize`` (it broadcasts every parameter viewed as
bytes), bf16 at the first BatchNorm (DeepSpeed now keeps buffers fp32, the weights were bf16).
tests/gpu/test_gpu_pretrain.py runs the same on CUDA under ZeRO 0, 2 and 3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import torch
from conftest import make_sample

from data_shards.write import write_split
from pretrain.engine.deepspeed_config import EngineConfig, to_deepspeed_json
from pretrain.model.backbone import BackboneConfig, FrameEncoder

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}


def test_buffers_follow_the_parameters_dtype_under_bf16_and_fp16():
    assert "data_types" not in to_deepspeed_json(EngineConfig(), 1)
    for precision in ("bf16", "fp16"):
        ds = to_deepspeed_json(EngineConfig(precision=precision), 1)
        assert ds["data_types"] == {"buffer_dtype": precision}


def test_the_normalisation_is_float32_whatever_the_engine_casts():
    enc = FrameEncoder(BackboneConfig(name="test_resnet", channels_last=True)).eval()
    frames = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    want = enc.preprocess(frames).to(torch.bfloat16)
    got = enc.to(torch.bfloat16).preprocess(frames)  # buffers and all, as the engine does
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_bf16_channels_last_pretraining_runs_on_the_cpu(tmp_path):
    samples = [make_sample(key=f"k{i}", seed=i, views=2, frames=8, size=(40, 40))
               for i in range(8)]  # fmt: skip
    write_split(tmp_path, "train", samples, {}, {})
    sets = [f"data.train={tmp_path / 'train'}", "engine.precision=bf16", "engine.zero_stage=2",
            "model.backbone.channels_last=true", "train.max_steps=3", "train.progress=false",
            "train.tensorboard=false"]  # fmt: skip
    args = [sys.executable, "-m", "posebert", "pretrain", "--recipe", "debug_cpu", "--out",
            str(tmp_path / "run"), *(a for s in sets for a in ("--set", s))]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    curve = [rec["loss"] for rec in map(json.loads, lines) if "loss" in rec]
    assert len(curve) == 3 and all(math.isfinite(x) for x in curve)
