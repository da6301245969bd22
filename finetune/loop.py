"""The one fine-tuning loop: every head (the pose probe and full fine-tuning, Pose-GPT, the
lifting methods, the self-correction projector) trains through :func:`fit`.

A head keeps only its model and its loss. It hands the loop

- one :class:`Part` per optimiser: the parameters, an :class:`OptimConfig` (optimiser,
  learning rate, weight decay, gradient clipping and the learning-rate schedule of
  :mod:`pretrain.engine.schedules`) and the name of the loss term it minimises;
- a step function ``step(i) -> {name: value}`` that draws batch ``i`` and returns the loss
  terms (scalar tensors) and anything else worth logging (floats).

The loop owns the rest, the same way for every head: one accelerate ``Accelerator`` (CPU, one
GPU, or several processes under ``accelerate launch``; batches go to :attr:`Trainer.device`),
the learning rate of every step written into the optimiser as a pure function of the step (so
a rerun is the same run), zero-grad / backward / clip / step per part in order (a GAN's
generator, then its discriminator), training mode during the run and eval mode after, the
progress bar, one JSON line per logged step with TensorBoard scalars
(``LOG_DIR/metrics.jsonl``, ``LOG_DIR/tensorboard``: the layout of a pretraining run, read by
``posebert report``), and the refusal of a non-finite loss, which stops the run with one line
naming the head, the step and the terms before anything of it is saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pretrain.engine.metrics import MetricsLogger
from pretrain.engine.schedules import LRSchedule

Terms = dict[str, Any]
"""What a step returns: loss terms (scalar tensors) and other logged values (floats)."""

DEVICES = ("auto", "cpu", "cuda")
"""Where a run trains: ``auto`` (accelerate's choice: the local GPU when torch sees one, else
the CPU), ``cpu`` or ``cuda``."""


def resolve_device(name: str, auto: torch.device | None = None) -> torch.device:
    """The torch device of a :data:`DEVICES` name; ``auto`` is ``auto`` when given (the
    accelerator's device), else the current GPU when torch sees one, else the CPU. ``cuda`` on
    a machine without CUDA is one ValueError line."""
    if name not in DEVICES:
        raise ValueError(f"device {name!r}: choose from {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ValueError("device=cuda needs a CUDA device; this machine has none")
    if name == "cpu":
        return torch.device("cpu")
    if auto is not None and (name == "auto" or auto.type == "cuda"):
        return auto
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


class NonFiniteLoss(ValueError):
    """A loss term turned NaN or infinite; the run stops and nothing of it is saved."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One optimiser and its learning-rate schedule."""

    kind: Literal["adamw", "adam"] = "adamw"
    """``adamw`` (decoupled weight decay) or ``adam``."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Weight decay (decoupled with ``adamw``, L2 in the gradient with ``adam``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's decay rates of the first and second moment estimates."""
    amsgrad: bool = False
    """Use the AMSGrad variant (the maximum of past second moments)."""
    clip_norm: float = 0.0
    """Clip the gradient norm of the part's parameters to this (0: no clipping)."""
    schedule: LRSchedule = dataclasses.field(default_factory=LRSchedule)
    """Warm-up and decay (:class:`pretrain.engine.schedules.LRSchedule`) over the run."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ValueError("weight_decay and clip_norm must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.kind == "adamw" else torch.optim.Adam
        return cls(groups, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas,
                   amsgrad=self.amsgrad)  # fmt: skip


@dataclasses.dataclass
class Part:
    """Parameters trained by one optimiser, minimising the step's term ``loss``."""

    params: Iterable[nn.Parameter] | Sequence[dict]
    """Parameters, or param groups whose optional ``lr_scale`` multiplies the schedule's rate
    (e.g. a head learning ten times faster than its encoder)."""
    optim: OptimConfig
    loss: str = "loss"


def _groups(params: Iterable[nn.Parameter] | Sequence[dict]) -> list[dict]:
    items = list(params)
    if items and isinstance(items[0], dict):
        return [{"lr_scale": 1.0, **g, "params": list(g["params"])} for g in items]
    return [{"params": [p for p in items if p.requires_grad], "lr_scale": 1.0}]


def _value(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


class Trainer:
    """One fine-tuning run: build it, move the model with :meth:`prepare`, then :meth:`fit`."""

    def __init__(self, name: str, log_dir: str | os.PathLike | None = None,
                 progress: bool = False, log_every: int = 25,
                 tensorboard: bool = True, device: str = "auto") -> None:  # fmt: skip
        from accelerate import Accelerator

        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.name, self.log_every, self.progress = name, log_every, progress
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.tensorboard = tensorboard
        self.accelerator = Accelerator()  # one per process, whatever ``device`` says
        self._device = resolve_device(device, self.accelerator.device)
        if self._device != self.accelerator.device and self.accelerator.num_processes > 1:
            raise ValueError(f"{name}: device={device} differs from the device accelerate "
                             f"gave this process ({self.accelerator.device}); leave it 'auto' "
                             "under accelerate launch")  # fmt: skip
        self._modules: list[nn.Module] = []

    @property
    def device(self) -> torch.device:
        """Where the run's modules and batches go (:data:`DEVICES`; ``auto``: accelerate's)."""
        return self._device

    def _placed(self, obj: Any) -> Any:
        if self._device == self.accelerator.device:
            return self.accelerator.prepare(obj)  # accelerate places it
        return self.accelerator.prepare(obj, device_placement=[False])

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` on the run's device (wrapped for several processes); trained by
        :meth:`fit` (train mode during, eval mode after)."""
        prepared = self._placed(module.to(self._device))
        self._modules.append(prepared)
        return prepared

    def unwrap(self, module: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(module)

    def fit(self, step_fn: Callable[[int], Terms], parts: Part | Sequence[Part],
            steps: int) -> list[dict[str, float]]:  # fmt: skip
        """Run ``steps`` optimiser steps; returns the logged records (``step`` and every term,
        at step 0, every ``log_every`` steps and the last step). Raises :class:`NonFiniteLoss`
        naming the step and its terms when a loss turns non-finite."""
        if steps < 1:
            raise ValueError(f"{self.name}: steps must be >= 1, got {steps}")
        parts = [parts] if isinstance(parts, Part) else list(parts)
        optimisers = [self._placed(p.optim.build(_groups(p.params))) for p in parts]
        main = self.accelerator.is_main_process
        history: list[dict[str, float]] = []
        for m in self._modules:
            m.train()
        logger = MetricsLogger(self.log_dir, main, 0, steps, tensorboard=self.tensorboard,
                               progress=self.progress, desc=self.name)  # fmt: skip
        started = time.perf_counter()
        with logger:
            for step in range(steps):
                rates = self._set_rates(parts, optimisers, step, steps)
                terms = step_fn(step)
                self._check(terms, step)
                for part, opt in zip(parts, optimisers, strict=True):
                    opt.zero_grad(set_to_none=True)
                    self.accelerator.backward(terms[part.loss])
                    if part.optim.clip_norm > 0:
                        params = [p for g in opt.param_groups for p in g["params"]]
                        self.accelerator.clip_grad_norm_(params, part.optim.clip_norm)
                    opt.step()
                if step % self.log_every == 0 or step == steps - 1:
                    record = {"step": step, **{k: _value(v) for k, v in terms.items()}, **rates,
                              "time_s": round(time.perf_counter() - started, 3)}  # fmt: skip
                    history.append(record)
                    logger.log(record)
                logger.advance()
        for m in self._modules:
            m.eval()
        return history

    def _set_rates(self, parts: list[Part], optimisers: list, step: int, steps: int
                   ) -> dict[str, float]:  # fmt: skip
        rates = {}
        for i, (part, opt) in enumerate(zip(parts, optimisers, strict=True)):
            lr = part.optim.schedule.lr(step, part.optim.lr, steps)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            rates["lr" if i == 0 else f"lr_{part.loss}"] = lr
        return rates

    def _check(self, terms: Terms, step: int) -> None:
        values = {k: _value(v) for k, v in terms.items()}
        if all(math.isfinite(v) for v in values.values()):
            return
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise NonFiniteLoss(f"{self.name}: non-finite loss at step {step} ({shown}); nothing "
                            "of this run was saved (try a lower learning rate)")  # fmt: skip
