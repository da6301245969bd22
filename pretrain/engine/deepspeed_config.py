"""Our engine config -> DeepSpeed's JSON: the one place batch size and precision are decided.

(Named ``deepspeed_config`` so that nothing here shadows the ``deepspeed`` package.)

``train_batch_size`` is always derived (micro batch x accumulation x world size), never typed
twice. No ``scheduler`` section is generated: the loop sets the learning rate of every step from
:class:`pretrain.engine.schedules.LRSchedule`, a pure function of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pretrain.engine.schedules import LRSchedule

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam(W) hyper-parameters; the peak learning rate of the schedule is ``lr``."""

    name: Literal["adamw", "adam"] = "adamw"
    """'adamw' (decoupled weight decay) or 'adam' (L2 added to the gradient)."""
    lr: float = 5e-4
    """Peak learning rate (after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's moment decay rates."""
    eps: float = 1e-6
    """Adam's denominator epsilon."""
    weight_decay: float = 0.01
    """Weight decay (decoupled for 'adamw')."""
    impl: Literal["torch", "deepspeed"] = "torch"
    """'torch': torch.optim.Adam(W) (no JIT-built op, same maths on CPU and GPU);
    'deepspeed': DeepSpeed's FusedAdam (GPU; built on first use)."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam"):
            raise ValueError(f"name: {self.name!r} is not one of ['adamw', 'adam']")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: two values in [0, 1) expected, got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.impl not in ("torch", "deepspeed"):
            raise ValueError(f"impl: {self.impl!r} is not one of ['torch', 'deepspeed']")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the task is trained: ZeRO stage, precision, batch, clipping, optimizer, schedule."""

    micro_batch_per_rank: int = 8
    """Samples per forward pass on each rank; the reader's ``batch_size`` must equal it (at most
    4096: every sample holds V x T frames)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    zero_stage: int = 0
    """ZeRO stage 0 (data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """'fp32', 'bf16' (GPU clusters; also runs on CPU) or 'fp16' (dynamic loss scaling)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    """Adam(W) settings."""
    lr_schedule: LRSchedule = dataclasses.field(default_factory=LRSchedule)
    """Warm-up + cosine learning rate, evaluated by the loop every step."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this."""
    overlap_comm: bool = False
    """ZeRO: overlap gradient reduction with the backward pass (GPU clusters)."""

    def __post_init__(self) -> None:
        checks = {
            "micro_batch_per_rank": 1 <= self.micro_batch_per_rank <= 4096,
            "grad_accum": self.grad_accum >= 1,
            "zero_stage": self.zero_stage in (0, 1, 2, 3),
            "precision": self.precision in PRECISIONS,
            "grad_clip": self.grad_clip >= 0,
            "fp16_initial_scale_power": 0 <= self.fp16_initial_scale_power <= 32,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        for name, cls in (("optimizer", OptimizerConfig), ("lr_schedule", LRSchedule)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name}: expected {cls.__name__}, got {getattr(self, name)!r}")

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks."""
        return self.micro_batch_per_rank * self.grad_accum * world_size


def to_deepspeed_json(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for ``cfg`` on ``world_size`` ranks (pure; JSON-serialisable)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    opt = cfg.optimizer
    params: dict[str, Any] = dict(
        lr=opt.lr, betas=list(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    if opt.impl == "torch":
        params["torch_adam"] = True
    if opt.name == "adam":
        params["adam_w_mode"] = False
    ds: dict[str, Any] = {
        "train_batch_size": cfg.global_batch(world_size),
        "train_micro_batch_size_per_gpu": cfg.micro_batch_per_rank,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW" if opt.name == "adamw" else "Adam", "params": params},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.fp16_initial_scale_power,
        },
        "steps_per_print": None,  # our loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    if cfg.precision != "fp32":
        # Buffers in the parameters' dtype, as module.bfloat16() / .half() did: DeepSpeed 0.19
        # keeps them fp32 unless told, and a bf16 BatchNorm refuses fp32 running statistics
        # ("expected scalar type BFloat16 but found Float" at the first step of every recipe
        # whose backbone has BatchNorm: all of them).
        ds["data_types"] = {"buffer_dtype": cfg.precision}
    if cfg.zero_stage > 0:
        ds["zero_optimization"]["overlap_comm"] = cfg.overlap_comm
    if cfg.zero_stage in (1, 2):  # partitions a resume on another world size can re-divide
        ds["zero_optimization"]["elastic_checkpoint"] = True
    return ds


def check_consistent(ds: dict[str, Any], world_size: int) -> None:
    """Raise if a DeepSpeed config's batch sizes disagree (micro x accum x world = global)."""
    micro = ds["train_micro_batch_size_per_gpu"]
    accum = ds["gradient_accumulation_steps"]
    if ds["train_batch_size"] != micro * accum * world_size:
        raise ValueError(
            f"train_batch_size {ds['train_batch_size']} != micro {micro} x accum {accum} x "
            f"world {world_size}"
        )
