"""Pretraining objectives: the contrastive task, its negative samplers and collapse checks.

Plain functions of tensors: nothing here knows about DeepSpeed or process groups; negatives
drawn across ranks come through a ``gather`` function the engine passes in.
"""

from pretrain.objectives.collapse import CollapseConfig, CollapseMonitor, collapse_warning
from pretrain.objectives.contrastive import ContrastiveConfig, contrastive_loss
from pretrain.objectives.negatives import (
    CandidatePool,
    GatherFn,
    NegativeConfig,
    NegativeSample,
    check_pose_labels,
    identity_gather,
    make_pool,
    mpjpe,
    mpjpe_root_relative,
    sample_negatives,
)

__all__ = [
    "CandidatePool",
    "CollapseConfig",
    "CollapseMonitor",
    "ContrastiveConfig",
    "GatherFn",
    "NegativeConfig",
    "NegativeSample",
    "check_pose_labels",
    "collapse_warning",
    "contrastive_loss",
    "identity_gather",
    "make_pool",
    "mpjpe",
    "mpjpe_root_relative",
    "sample_negatives",
]
