"""Pose-GPT future 3D pose prediction (``posebert finetune future``): config and recipes, the
model and its features, training through :mod:`finetune.loop`, and the forecasting protocol
beside zero- and constant-velocity baselines."""

from finetune.clips import Clip
from finetune.heads.future.config import (
    HORIZONS_MS,
    RECIPES,
    FutureConfig,
    horizon_frames,
    sampling_share,
)
from finetune.heads.future.model import (
    CONFIG,
    FEATURES,
    WEIGHTS,
    PoseGPT,
    augment,
    feature_pose_mm,
    forecast,
    load_model,
    pose_features,
    rollout,
    save_model,
)
from finetune.heads.future.run import (
    METHODS,
    constant_velocity,
    eval_windows,
    evaluate,
    forecast_windows,
    hold_out,
    run_future,
    zero_velocity,
)
from finetune.heads.future.train import (
    next_frame_loss,
    random_windows,
    rollout_loss,
    scheduled_inputs,
    train,
)

__all__ = ["CONFIG", "FEATURES", "HORIZONS_MS", "METHODS", "RECIPES", "WEIGHTS", "Clip",
           "FutureConfig", "PoseGPT", "augment", "constant_velocity", "eval_windows", "evaluate",
           "feature_pose_mm", "forecast", "forecast_windows", "hold_out", "horizon_frames",
           "load_model", "next_frame_loss", "pose_features", "random_windows", "rollout",
           "rollout_loss", "run_future", "sampling_share", "save_model", "scheduled_inputs",
           "train", "zero_velocity"]  # fmt: skip
