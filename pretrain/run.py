"""One rank of a pretraining run: reader, task and engine from a :class:`RunConfig`."""

from __future__ import annotations

import logging
import os

from data_shards.read import ShardReader
from pretrain.config import RunConfig
from pretrain.engine import dist, preflight
from pretrain.engine.loop import exit_code_for, train
from pretrain.engine.runstate import seed_everything
from pretrain.objectives import check_pose_labels
from pretrain.task import PretrainTask

log = logging.getLogger(__name__)


def run_pretrain(cfg: RunConfig, out_dir: str | os.PathLike) -> int:
    """Train this rank (rank and world size from torchrun / deepspeed / srun variables);
    returns the process exit code (0 done, 75 requeue, 65 too many non-finite losses, ...)."""
    cfg.data.check_device()  # data.decode=gpu on a machine without CUDA: one line, now
    env = dist.DistEnv.from_environ()
    seed = cfg.train.seed
    reader_cfg = cfg.data.reader_config(cfg.engine.micro_batch_per_rank, seed)
    preflight.check_start(env, reader_cfg)  # allocation and data, before anything starts
    reader = ShardReader(reader_cfg, env.rank, env.world_size)
    # a gt_pose sampler on shards without 3D labels fails here, not mid-run
    check_pose_labels(cfg.objective.negatives, bool(reader.layout.has.get("pose3d")),
                      cfg.data.train)  # fmt: skip
    if cfg.model.backbone.background_mask and not reader.layout.has.get("masks"):
        raise ValueError(f"model.backbone.background_mask: {cfg.data.train} has no masks")
    views = min(cfg.data.views or reader.layout.views, reader.layout.views)
    if cfg.objective.frame_weight > 0 and views < 2:
        raise ValueError(f"objective.frame_weight: {cfg.data.train} gives {views} view per "
                         "sample; the frame term needs 2 or more")  # fmt: skip
    seed_everything(seed, 0)  # the same initial weights on every rank and every run
    task = PretrainTask(cfg.model, cfg.objective, seed=seed, rank=env.rank,
                        gather=dist.all_gather_with_grad)  # fmt: skip
    try:
        result = train(task, reader, cfg.train, cfg.engine, out_dir, cfg.to_json())
    except Exception as e:  # one line naming the problem; the exit code tells SLURM what to do
        log.error("rank %d: %s: %s", env.rank, type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return exit_code_for(e)
    return result.exit_code
