"""``data.decode``: where pretraining decodes its JPEG frames. ``gpu`` is refused in one line on
a machine without CUDA; its code path (the workers hand over checked JPEG bytes, the training
process decodes each batch on its device) runs here on the CPU, through the real entry point,
with only that refusal switched off: the losses are the CPU path's, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_sample

from data_shards.write import write_split
from pretrain.config import DataConfig

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
ONE_LINE = "data.decode=gpu needs a CUDA device; this machine has none"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
DRIVER = """
import sys
from pretrain.cli import resolve_config
from pretrain.config import DataConfig
from pretrain.run import run_pretrain
if sys.argv[2] == "--anywhere":  # data.decode=gpu's code on the CPU: only the refusal is off
    DataConfig.check_device = lambda self, cuda=None: None
sys.exit(run_pretrain(resolve_config("debug_cpu", sys.argv[3:]), sys.argv[1]))
"""


def test_the_mode_picks_the_readers_frames_and_the_check_needs_cuda_for_gpu():
    assert DataConfig().decode == "cpu" and DataConfig().reader_config(4, 0).frames == "decode"
    gpu = DataConfig(decode="gpu")
    assert gpu.reader_config(4, 0).frames == "jpeg"
    gpu.check_device(cuda=True)
    DataConfig().check_device(cuda=False)
    with pytest.raises(ValueError) as e:
        gpu.check_device(cuda=False)
    assert str(e.value) == ONE_LINE
    with pytest.raises(ValueError, match="decode"):
        DataConfig(decode="tpu")


@NO_CUDA
def test_decode_gpu_is_refused_at_start_in_one_line_and_printed_anywhere(tmp_path, capsys):
    from posebert.cli import main

    args = ["pretrain", "--recipe", "debug_cpu", "--out", str(tmp_path / "run"),
            "--set", "data.decode=gpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"posebert pretrain: error: {ONE_LINE}"]
    assert not (tmp_path / "run").exists()
    assert main([*args, "--print-config"]) == 0  # a login node prints and submits GPU configs
    assert json.loads(capsys.readouterr().out)["data"]["decode"] == "gpu"
    assert main([*args[:-1], "data.decode=tpu"]) == 2
    assert "data.decode" in capsys.readouterr().err


@NO_CUDA
def test_run_pretrain_refuses_decode_gpu_before_anything_starts(tmp_path):
    from pretrain.recipes import debug_cpu
    from pretrain.run import run_pretrain

    cfg = debug_cpu()
    cfg = type(cfg)(**{**cfg.__dict__, "data": DataConfig(decode="gpu")})
    with pytest.raises(ValueError, match=ONE_LINE):
        run_pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def drive(out: Path, anywhere: bool, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(out),
                           "--anywhere" if anywhere else "--cpu", *overrides],
                          capture_output=True, text=True, timeout=600, env=ENV)  # fmt: skip


def losses(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_decode_gpu_code_path_on_the_cpu_gives_the_cpu_paths_losses(tmp_path):
    """debug_cpu over 32 px shards (its size: no resize) for 4 steps, frames decoded by the
    workers (PIL) and by the training process (torchvision, the device path): the same curve
    exactly, and the same frames/s accounting. Then the CPU run resumes with data.decode=gpu
    (the mode may change on resume: the stream and the model are the same)."""
    samples = [make_sample(key=f"k{i}", seed=i, views=2, frames=8, size=(32, 32))
               for i in range(8)]  # fmt: skip
    write_split(tmp_path, "train", samples, {}, {})
    common = (f"data.train={tmp_path / 'train'}", "train.max_steps=4", "train.progress=false",
              "train.tensorboard=false", "train.checkpoint_every=4")  # fmt: skip
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    r = drive(cpu, False, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = drive(gpu, True, *common, "data.decode=gpu")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(cpu), losses(gpu)
    assert len(a) == len(b) == 4
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert all(x["frames_per_s"] > 0 for x in b)  # counted from the JPEG lists
    assert json.loads((gpu / "config.json").read_text())["config"]["run"]["data"]["decode"] == "gpu"
    r = drive(cpu, True, *common[:1], "train.max_steps=6", *common[2:], "data.decode=gpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(losses(cpu)) == 6 and "resumed from" in (r.stdout + r.stderr)
