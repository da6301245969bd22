"""Pretraining on CUDA through the real entry point (``python -m posebert pretrain``): bf16 and
channels-last under ZeRO 0, 2 and 3 (the loss finite and falling, a checkpoint resumed giving
the uninterrupted run's next-step loss), ``data.decode=gpu``, and NCCL with one process per
GPU. Tiny random shards made here; the debug_cpu recipe's tiny model at 32 px."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_shards import NEEDS_CUDA, TWO_GPUS, write_splits

pytestmark = [*NEEDS_CUDA, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                reason="deepspeed is not installed")]  # fmt: skip
ENV = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"PYTHONUNBUFFERED": "1"}
GPU_RUN = ("engine.precision=bf16", "model.backbone.channels_last=true", "train.progress=false",
           "train.tensorboard=false")  # fmt: skip
NEXT_STEP_RTOL = 1e-3
"""The resumed run's first loss against the uninterrupted run's at that step: the same weights,
batch and RNG states, but a new process may pick other cuDNN / reduction kernels (bf16)."""


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("gpu_pretrain")) / "train"  # 40 px -> 32


def pretrain(out: Path, train: Path, *sets: str, nproc: int = 1) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "posebert", "pretrain", "--recipe", "debug_cpu", "--out",
            str(out), "--nproc-per-node", str(nproc), "--set", f"data.train={train}"]  # fmt: skip
    args += [a for s in (*GPU_RUN, *sets) for a in ("--set", s)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def falls(curve: list[float], n: int = 4) -> bool:
    return sum(curve[-n:]) / n < sum(curve[:n]) / n


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_bf16_channels_last_under_zero_trains_checkpoints_and_resumes(train, tmp_path, zero):
    a, b = tmp_path / "a", tmp_path / "b"
    steps = ("train.max_steps=12", "train.checkpoint_every=4", f"engine.zero_stage={zero}")
    pretrain(a, train, *steps)
    curve = losses(a)
    assert len(curve) == 12 and all(math.isfinite(x) for x in curve) and falls(curve), curve
    config = json.loads((a / "config.json").read_text())["config"]
    assert config["engine"]["precision"] == "bf16" and config["engine"]["zero_stage"] == zero
    assert config["run"]["model"]["backbone"]["channels_last"] is True
    ckpt = a / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_12", "step_4", "step_8"]
    shutil.copytree(a, b)  # the same run, killed after its step-8 checkpoint
    shutil.rmtree(b / "checkpoints" / "step_12")
    (b / "checkpoints" / "latest").write_text("step_8\n")
    r = pretrain(b, train, *steps)
    assert "resumed from" in r.stdout + r.stderr
    resumed = losses(b)
    assert len(resumed) == 12 and resumed[:8] == curve[:8]
    assert math.isclose(resumed[8], curve[8], rel_tol=NEXT_STEP_RTOL), (resumed[8], curve[8])
    assert all(math.isfinite(x) for x in resumed[8:])


def test_decode_on_the_gpu_trains_like_decode_on_the_cpu(train, tmp_path):
    """nvJPEG's frames differ from PIL's by about a level: the first loss (same init, batch and
    masks) within 1%, both curves finite and falling."""
    steps = ("train.max_steps=12", "train.checkpoint_every=12")
    pretrain(tmp_path / "cpu", train, *steps)
    pretrain(tmp_path / "gpu", train, *steps, "data.decode=gpu")
    cpu, gpu = losses(tmp_path / "cpu"), losses(tmp_path / "gpu")
    assert all(math.isfinite(x) for x in cpu + gpu) and falls(cpu) and falls(gpu)
    assert math.isclose(cpu[0], gpu[0], rel_tol=1e-2), (cpu[0], gpu[0])


@pytest.mark.multigpu
@TWO_GPUS
def test_nccl_two_processes_zero2_with_negatives_gathered_across_ranks(train, tmp_path):
    """--nproc-per-node 2 on CUDA: NCCL (the dist module's choice with GPUs), one GPU per rank,
    cosine negatives all-gathered with their gradient across the ranks."""
    run = tmp_path / "run"
    pretrain(run, train, "train.max_steps=12", "train.checkpoint_every=12",
             "engine.zero_stage=2", "objective.negatives.kind=cosine", nproc=2)  # fmt: skip
    curve = losses(run)
    assert len(curve) == 12 and all(math.isfinite(x) for x in curve) and falls(curve), curve
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
