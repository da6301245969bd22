"""The pretraining task: PoseBERT and the contrastive objective as one module the engine trains.

``forward(batch, step) -> (loss, metrics)`` is the only contract with the engine. All of the
task's randomness (masks, negatives, Gumbel noise) comes from one generator seeded by (seed,
step, rank), so a resumed run draws exactly what an uninterrupted one would; dropout uses the
global RNG, whose state the engine checkpoints.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pretrain.engine.runstate import step_generator
from pretrain.model import PoseBERT, PoseBERTConfig
from pretrain.objectives import (
    CollapseMonitor,
    ContrastiveConfig,
    GatherFn,
    contrastive_loss,
    identity_gather,
)
from pretrain.objectives.contrastive import FRAME_TERM_WITH_CODES

log = logging.getLogger(__name__)


class PretrainTask(nn.Module):
    """PoseBERT + InfoNCE over masked frames. ``gather`` concatenates tensors from all ranks
    (the engine passes its all-gather; the default keeps everything on one process)."""

    def __init__(
        self,
        model: PoseBERTConfig,
        objective: ContrastiveConfig,
        seed: int = 0,
        rank: int = 0,
        gather: GatherFn = identity_gather,
    ):
        super().__init__()
        self.model = PoseBERT(model)
        self.objective = objective
        self.seed, self.rank, self.gather = seed, rank, gather
        self.collapse = CollapseMonitor()
        self.quantized = model.quantizer.enabled
        if self.quantized and objective.frame_weight > 0:
            raise ValueError(FRAME_TERM_WITH_CODES)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator(self.seed, step, self.rank)
        out = self.model(batch, generator, step=step)
        loss, metrics = contrastive_loss(
            out.context,
            out.targets,
            out.mask,
            self.objective,
            generator=generator,
            pose3d=batch.get("pose3d"),
            diversity=out.diversity_loss,
            gather=self.gather,
            rank=self.rank,
            quantized=self.quantized,
        )
        metrics.update({k: float(v) for k, v in out.quantizer_stats.items()})
        warning = self.collapse.update(metrics)
        if warning and self.rank == 0:
            log.warning("step %d: %s", step, warning)
        return loss, metrics
