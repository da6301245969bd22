"""The one fine-tuning loop: optimiser config, schedule, parts, logging, non-finite refusal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from finetune.loop import NonFiniteLoss, OptimConfig, Part, Trainer
from pretrain.engine.schedules import LRSchedule


def regression(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    return x, y


def test_fit_learns_logs_and_follows_the_schedule(tmp_path):
    x, y = regression()
    trainer = Trainer("toy", log_dir=tmp_path / "log", log_every=10, tensorboard=True)
    model = trainer.prepare(nn.Linear(4, 1))
    optim = OptimConfig(kind="adam", lr=0.2, schedule=LRSchedule(warmup_steps=5))

    def step(i: int) -> dict:
        rows = torch.arange(i * 32, i * 32 + 32) % len(x)
        return {"loss": (model(x[rows]).squeeze(-1) - y[rows]).pow(2).mean(), "extra": 1.5}

    history = trainer.fit(step, Part(model.parameters(), optim), steps=100)
    assert [r["step"] for r in history] == [*range(0, 100, 10), 99]
    assert history[-1]["loss"] < 0.01 * history[0]["loss"]
    assert not model.training  # eval mode after the run
    for r in history:
        assert r["lr"] == pytest.approx(optim.schedule.lr(r["step"], 0.2, 100))
        assert r["extra"] == 1.5
    lines = [json.loads(s) for s in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in history]
    assert any((tmp_path / "log" / "tensorboard").iterdir())


def test_param_groups_scale_the_rate_and_clipping_applies():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    trainer = Trainer("groups")
    seen = []

    def step(i: int) -> dict:
        return {"loss": 1e6 * (a.sum() + b.sum())}

    optim = OptimConfig(kind="adamw", lr=0.1, clip_norm=1.0, schedule=LRSchedule(decay="constant"))
    part = Part([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], optim)
    history = trainer.fit(lambda i: (seen.append(i), step(i))[1], part, steps=3)
    assert seen == [0, 1, 2] and history[0]["lr"] == pytest.approx(0.1)
    # Adam's first step moves each parameter by ~lr whatever the gradient; b 10 times further
    assert torch.allclose(1 - a.detach(), torch.full((3,), 0.3), atol=1e-2)
    assert torch.allclose(1 - b.detach(), torch.full((3,), 3.0), atol=1e-1)


def test_two_parts_step_in_order_each_on_its_own_loss():
    gen_w, disc_w = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    trainer = Trainer("gan")

    def step(i: int) -> dict:
        fake = gen_w * 1.0
        # the generator's loss also reaches the discriminator: its part must not see that
        return {"loss": (disc_w * fake - 1).pow(2).sum() + (gen_w - 1).pow(2).sum(),
                "disc": (disc_w - 2).pow(2).sum() + 0 * fake.detach().sum()}  # fmt: skip

    parts = [Part([gen_w], OptimConfig(kind="adam", lr=0.1)),
             Part([disc_w], OptimConfig(kind="adam", lr=0.1), loss="disc")]  # fmt: skip
    history = trainer.fit(step, parts, steps=200)
    assert gen_w.item() == pytest.approx(0.6, abs=0.05)  # argmin of (2g - 1)^2 + (g - 1)^2
    assert disc_w.item() == pytest.approx(2.0, abs=0.1)  # zero-grad per part: no leak
    assert "lr_disc" in history[0]


def test_non_finite_loss_stops_the_run_naming_step_and_terms():
    w = nn.Parameter(torch.ones(1))
    trainer = Trainer("probe 10%")

    def step(i: int) -> dict:
        return {"loss": w.sum() * (float("nan") if i == 3 else 1.0)}

    with pytest.raises(NonFiniteLoss, match=r"probe 10%: non-finite loss at step 3 \(loss=nan"):
        trainer.fit(step, Part([w], OptimConfig()), steps=10)


def test_optim_config_is_validated():
    for bad in ({"lr": 0}, {"weight_decay": -1}, {"betas": (1.0, 0.9)}, {"clip_norm": -1}):
        with pytest.raises(ValueError):
            OptimConfig(**bad)
    with pytest.raises(ValueError, match="steps"):
        Trainer("x").fit(lambda i: {}, Part([nn.Parameter(torch.ones(1))], OptimConfig()), 0)
