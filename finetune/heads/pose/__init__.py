"""The 3D pose regression head on a pretrained encoder (``posebert finetune pose``): config and
recipes, the head's modules, training through :mod:`finetune.loop`, the run and its report."""

from finetune.heads.pose.config import RECIPES, FullConfig, PoseConfig, ProbeConfig
from finetune.heads.pose.model import PoseHead, PosePredictor, PoseRegressor, load_head
from finetune.heads.pose.run import run_pose, scan_split, score
from finetune.heads.pose.train import Windows, fit_full, fit_probe, load_windows

__all__ = ["RECIPES", "FullConfig", "PoseConfig", "PoseHead", "PosePredictor", "PoseRegressor",
           "ProbeConfig", "Windows", "fit_full", "fit_probe", "load_head", "load_windows",
           "run_pose", "scan_split", "score"]  # fmt: skip
