"""Where the lifting methods train and predict (``--set device=auto|cpu|cuda``), through the one
fine-tuning loop's :class:`finetune.loop.Trainer`. Here on the CPU; tests/gpu/test_gpu_heads.py
runs the same fits with ``device=cuda``. (When the field came, the CPU default was checked by
hand against the commit before: predictions, weights and losses of all five methods equal bit
for bit.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from data_shards.configtools import to_dict
from finetune.clips import read_splits
from finetune.heads.lift import run
from finetune.heads.lift.base import METHOD_NAMES, QUIET, LiftConfig, LiftData, get_method
from finetune.loop import OptimConfig, Part, Trainer, resolve_device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
CPU = torch.device("cpu")
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
"""Seconds per method; tests/gpu/test_gpu_heads.py fits the same rows on CUDA."""


def test_the_device_is_a_checked_field():
    assert LiftConfig().device == "auto"
    with pytest.raises(ValueError, match=r"LiftConfig\.device: invalid value 'tpu' \(choose"):
        LiftConfig(device="tpu")
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@NO_CUDA
def test_cuda_without_a_gpu_is_one_line_before_anything_is_read(tmp_path, capsys):
    from posebert.cli import main

    with pytest.raises(ValueError) as e:
        resolve_device("cuda")
    assert str(e.value) == "device=cuda needs a CUDA device; this machine has none"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer("t", device="cuda")
    args = ["finetune", "lift", "--method", "cyclic", "--shards", str(tmp_path / "none"),
            "--out", str(tmp_path / "out"), "--set", "device=cuda"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "device=cuda needs a CUDA device" in err[0]


def test_the_trainer_puts_modules_and_steps_on_its_device():
    trainer = Trainer("t", device="cpu")
    model = trainer.prepare(nn.Linear(3, 1))
    assert trainer.device == CPU and next(model.parameters()).device == CPU
    x = torch.randn(16, 3)
    history = trainer.fit(lambda i: {"loss": model(x.to(trainer.device)).pow(2).mean()},
                          Part(model.parameters(), OptimConfig(lr=0.1)), steps=5)  # fmt: skip
    assert history[-1]["loss"] < history[0]["loss"]


def test_a_row_saved_on_another_device_or_before_the_field_is_done_already():
    config = to_dict(get_method("cyclic").config(device="cpu"))
    older = {k: v for k, v in config.items() if k != "device"}
    assert run._same_row(older, config) and run._same_row({**config, "device": "cuda"}, config)
    assert not run._same_row({**older, "steps": 1}, config) and not run._same_row(None, config)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_fits_restores_and_predicts_on_the_device_it_is_given(name, lift_shards):
    """The code the GPU test runs with device=cuda: the fitted model(s) stay on the training
    device, predictions come back as numpy on the CPU, a restored row lands on its config's
    device and predicts what the fitted one did."""
    method = get_method(name)
    config = method.config(**TINY[name], device="cpu")
    data = LiftData(lift_shards, read_splits(lift_shards, **method.read(config)))
    fitted = method.fit(data, config, QUIET)
    weights = fitted.state_dict()
    assert all(w.device == CPU for w in weights.values())
    restored = method.restore(config, {k: v.clone() for k, v in weights.items()})
    assert all(w.device == CPU for w in restored.state_dict().values())
    with torch.no_grad():
        want = fitted.predict("val", data.splits["val"])
        got = restored.predict("val", data.splits["val"])
    assert all(isinstance(p, np.ndarray) and np.isfinite(p).all() for p in want)
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    other = dataclasses.replace(config, device="auto")  # where a row restores by default
    on = method.restore(other, weights).state_dict()
    assert {w.device.type for w in on.values()} == {resolve_device("auto").type}
