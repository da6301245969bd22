"""Resume on another world size: the global batch, the optimizer state and the data stream.

A run requeued by Slurm often gets another number of nodes. Resuming then keeps what defines
the optimization and re-divides the rest:

- the global batch (micro batch x gradient accumulation x ranks) stays the checkpoint's: the
  accumulation is recomputed for the new world size (2 ranks x 2 -> 4 ranks x 1 or 1 rank x 4);
  a world size that cannot keep it is refused, naming the sizes that can;
- the optimizer state: without ZeRO it is one file every rank loads whatever the world size;
  ZeRO-1/2 partitions are written in DeepSpeed's elastic layout (``elastic_checkpoint``, set by
  :func:`pretrain.engine.deepspeed_config.to_deepspeed_json`) and every rank merges all the old
  partitions and takes its new one (fp32 master weights, Adam's moments and step), each file
  loaded with the safe loader (every ZeRO-1/2 resume goes this way, the same world size too:
  DeepSpeed's own elastic restore would pad the 0-d step tensors of torch's Adam like
  partitions); ZeRO-3 and bf16 without ZeRO are refused with one line;
- the data: the reader recomputes which samples the old ranks consumed and splits the rest of
  the epoch across the new ones (:meth:`data_shards.read.ShardReader.resplit`);
- the global RNGs (dropout) are seeded from (seed, step, rank): a different world has different
  ranks, so there is no saved state to restore.

DeepSpeed refuses to load ZeRO optimizer states under another data-parallel size (its universal
checkpoint converts them, but unpickles every file with ``weights_only=False``); the merge here
uses the elastic restore that DeepSpeed's ZeRO-1/2 optimizer implements for that purpose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pretrain.engine import dist
from pretrain.engine.checkpoint import (
    DS_TAG,
    CheckpointCorrupt,
    CheckpointManager,
    CheckpointRef,
    ResumeMismatch,
)
from pretrain.engine.deepspeed_config import EngineConfig
from pretrain.engine.runstate import seed_everything


def saved_world(ref: CheckpointRef) -> int:
    world = ref.meta.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointCorrupt(f"{ref.path}/manifest.json: world_size {world!r} is not a count")
    return world


def engine_for(ref: CheckpointRef, cfg: EngineConfig, world_size: int) -> EngineConfig:
    """``cfg`` with the gradient accumulation that keeps the checkpoint's global batch on
    ``world_size`` ranks; ResumeMismatch when none does or the optimizer state cannot be
    re-divided."""
    old = saved_world(ref)
    engine = ref.meta.get("config", {}).get("engine", {})
    micro, accum = engine.get("micro_batch_per_rank"), engine.get("grad_accum")
    if old == world_size:
        return cfg
    if cfg.zero_stage == 3:
        raise ResumeMismatch(
            f"world_size: checkpoint written by {old} ranks, this run has {world_size}; ZeRO-3 "
            "optimizer partitions are not re-divided here (resume on "
            f"{old} ranks, or train with zero_stage <= 2)"
        )
    if cfg.zero_stage == 0 and cfg.precision == "bf16":
        raise ResumeMismatch(
            f"world_size: checkpoint written by {old} ranks, this run has {world_size}; bf16 "
            "without ZeRO keeps partitioned fp32 weights DeepSpeed cannot re-divide (resume on "
            f"{old} ranks, or train with zero_stage 1 or 2)"
        )
    if not all(isinstance(v, int) and v >= 1 for v in (micro, accum)):
        raise CheckpointCorrupt(f"{ref.path}/manifest.json: engine batch settings unreadable")
    if micro != cfg.micro_batch_per_rank:
        return cfg  # check_compatible names engine.micro_batch_per_rank
    global_batch = micro * accum * old
    new_accum, rest = divmod(global_batch, micro * world_size)
    if rest or new_accum < 1:
        fits = [w for w in range(1, global_batch // micro + 1) if global_batch // micro % w == 0]
        raise ResumeMismatch(
            f"world_size: checkpoint written by {old} ranks with a global batch of "
            f"{global_batch} ({micro} per rank x {accum} accumulation x {old}); {world_size} "
            f"ranks cannot keep it (world sizes that can: {', '.join(map(str, fits))})"
        )
    return dataclasses.replace(cfg, grad_accum=new_accum)


def check_global_batch(ref: CheckpointRef, meta: Mapping[str, Any]) -> None:
    """ResumeMismatch unless this run's global batch (``meta``) is the checkpoint's."""

    def global_batch(m: Mapping[str, Any]) -> int | None:
        e = m.get("config", {}).get("engine", {})
        values = (e.get("micro_batch_per_rank"), e.get("grad_accum"), m.get("world_size"))
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        return values[0] * values[1] * values[2] if ok else None

    saved, ours = global_batch(ref.meta), global_batch(meta)
    if saved != ours:
        raise ResumeMismatch(
            f"global batch: checkpoint {ref.path.name} has {saved}, this run {ours}"
        )


def may_change(ref: CheckpointRef | None, world_size: int) -> tuple[str, ...]:
    """Config fields a resume of ``ref`` on ``world_size`` ranks may change besides the usual."""
    if ref is None or saved_world(ref) == world_size:
        return ()
    return ("engine.grad_accum",)


def load(ckpt: CheckpointManager, engine: Any, ref: CheckpointRef) -> dict[str, Any]:
    """Collective: load ``ref`` into ``engine``, whatever world size wrote it; returns the
    client state. ZeRO-1/2: module weights and client state come from DeepSpeed's loader and
    the optimizer partitions are merged and divided here (DeepSpeed's own elastic restore
    mangles the 0-d step tensors of torch's Adam); everything else: ``ckpt.load``."""
    zero = getattr(engine, "zero_optimization", None)  # not there: a plain engine
    stage = engine.zero_optimization_stage() if zero is not None and zero() else 0
    if stage not in (1, 2):
        return ckpt.load(engine, ref)  # no ZeRO: any world size; ZeRO-3: the same one
    client_state = ckpt.load(engine, ref, optimizer=False)
    if not _load_zero_partitions(engine, ref):  # DeepSpeed's rigid layout, same world size
        return ckpt.load(engine, ref)
    return client_state


def _load_zero_partitions(engine: Any, ref: CheckpointRef) -> bool:
    """Merge every saved partition and take this rank's; False (nothing changed) for a
    checkpoint in DeepSpeed's rigid layout written by this world size."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        BASE_OPTIMIZER_STATE_STEP,
        OPTIMIZER_STATE_DICT,
    )

    names = engine._get_mp_rank_zero_checkpoint_names(
        load_dir=str(ref.path), tag=DS_TAG, mp_rank=0, dp_world_size=saved_world(ref),
        bf16_mode=engine.bfloat16_enabled(),
    )  # fmt: skip
    states = []
    for name in names:
        state = engine.checkpoint_engine.load(name, map_location="cpu")  # the safe loader
        if not isinstance(state, Mapping) or OPTIMIZER_STATE_DICT not in state:
            raise CheckpointCorrupt(f"{name}: no optimizer state")
        states.append(state[OPTIMIZER_STATE_DICT])
    if any(isinstance(s.get(BASE_OPTIMIZER_STATE), Mapping) for s in states):
        if saved_world(ref) == dist.get_world_size():
            return False
        raise ResumeMismatch(
            f"{names[0]}: ZeRO partitions in DeepSpeed's rigid layout (written by an older "
            f"version of this engine) cannot be re-divided; resume on {saved_world(ref)} ranks "
            "once to write an elastic checkpoint"
        )
    opt = engine.optimizer
    opt._load_global_state(states[0])
    # torch's Adam keeps its step count as a 0-d tensor per (flat) parameter, which DeepSpeed's
    # elastic restore would pad like a partition: restored here, after the checks that every
    # old rank agrees; DeepSpeed's restore also wants a group step, which torch's Adam has not
    scalars = _take_scalars(states, names)
    no_group_step = BASE_OPTIMIZER_STATE_STEP not in states[0]
    for state in states if no_group_step else []:
        state[BASE_OPTIMIZER_STATE_STEP] = None
    opt._restore_elastic_base_optimizer_state(states)
    for group in opt.optimizer.param_groups if no_group_step else []:
        group.pop("step", None)
    for (g, key), value in scalars.items():
        opt.optimizer.state[opt.optimizer.param_groups[g]["params"][0]][key] = value
    opt._restore_from_elastic_fp32_weights(states)
    opt._link_all_hp_params()
    return True


def _take_scalars(states: list[Any], names: list[str]) -> dict[tuple[int, str], Any]:
    """Remove the 0-d tensors (Adam's step) from every rank's per-group optimizer state; the
    value per (group, key), the same on every rank or CheckpointCorrupt."""
    import torch
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE

    out: dict[tuple[int, str], Any] = {}
    for name, state in zip(names, states, strict=True):
        for g, group in enumerate(state[BASE_OPTIMIZER_STATE]):
            for key in [k for k, v in group.items() if torch.is_tensor(v) and v.ndim == 0]:
                value = group.pop(key)
                first = out.setdefault((g, key), value)
                if not torch.equal(first, value):
                    raise CheckpointCorrupt(f"{name}: optimizer {key} {value.item()} differs "
                                            f"from rank 0's {first.item()}")  # fmt: skip
    return {k: v.clone() for k, v in out.items()}


def reseed(seed: int, step: int, rank: int) -> None:
    """The global RNGs of ``rank`` after a world-size change at ``step``."""
    seed_everything(seed, rank, step)
