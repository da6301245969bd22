"""`posebert export`: a run's PoseBERT encoder as ``model.safetensors`` + ``config.json``.

The exported directory loads without DeepSpeed (:func:`load_encoder`) for evaluation and
fine-tuning. The checkpoint is verified against its manifest (sizes and sha256) before any
byte of it is unpickled, and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_shards.configtools import from_dict, to_dict
from data_shards.manifest import atomic_write_text
from pretrain.engine.checkpoint import CheckpointManager, load_file_safely, verify
from pretrain.model import PoseBERT, PoseBERTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_PREFIX = "model."  # PretrainTask keeps PoseBERT as .model


def _checkpoint_dir(run: Path, step: int | None) -> Path:
    manager = CheckpointManager(run)
    if step is None:
        ref, _ = manager.resolve()
        if ref is None:
            raise FileNotFoundError(f"{run}: no checkpoint to export")
        return ref.path
    path = manager.root / f"step_{step}"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    verify(path)
    return path


def _model_state(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:  # parameters are partitioned: DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
    files = sorted(ckpt.glob("deepspeed/mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_00_model_states.pt")
    return load_file_safely(files[0])["module"]


def export_encoder(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None) -> Path:  # fmt: skip
    """Write the encoder of ``run_dir``'s checkpoint (latest valid, or ``step``) to ``out_dir``."""
    run = Path(run_dir)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run}: no config.json (is this a pretraining run directory?)")
    resolved = json.loads(config_file.read_text())["config"]
    run_config = resolved.get("run", resolved)  # the engine may nest the run's own config
    ckpt = _checkpoint_dir(run, step)
    state = _model_state(ckpt, int(run_config["engine"]["zero_stage"]))
    weights = {k[len(_PREFIX):]: v.float().contiguous() for k, v in state.items()
               if k.startswith(_PREFIX)}  # fmt: skip
    model_cfg = from_dict(PoseBERTConfig, run_config["model"])
    PoseBERT(model_cfg).load_state_dict(weights)  # refuses missing or unexpected keys
    size = run_config.get("data", {}).get("size")  # frames were resized to this in training
    source = {"source_run": str(run.resolve()), "checkpoint": ckpt.name,
              "recipe": run_config.get("recipe")}  # fmt: skip
    return save_encoder(weights, model_cfg, out_dir, size, **source)


def save_encoder(weights: dict[str, torch.Tensor], model_cfg: PoseBERTConfig,
                 out_dir: str | os.PathLike, size: int | None, **about) -> Path:  # fmt: skip
    """Write an encoder directory: ``model.safetensors`` (``weights``, a PoseBERT state dict)
    and ``config.json`` (the model config, the input ``size`` frames are resized to, ``about``).
    Both files are replaced atomically; the weights first, so a config never names absent ones.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.float().contiguous() for k, v in weights.items()}, str(tmp),
              metadata={"format": "pt"})  # fmt: skip
    os.replace(tmp, out / WEIGHTS)
    meta = {"model": to_dict(model_cfg), "input": {"size": size}, **about}
    atomic_write_text(out / CONFIG, json.dumps(meta, indent=1) + "\n")
    return out


def load_encoder(path: str | os.PathLike) -> PoseBERT:
    """An exported encoder (eval mode), without DeepSpeed."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not an exported encoder, no {name} "
                                    "(write one with posebert export)")  # fmt: skip
    meta = json.loads((path / CONFIG).read_text())
    model = PoseBERT(from_dict(PoseBERTConfig, meta["model"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval()
