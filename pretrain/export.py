"""`posebert export`: a run's PoseBERT encoder as ``model.safetensors`` + ``config.json``.

The exported directory loads without DeepSpeed (:func:`load_encoder`) for evaluation and
fine-tuning. The checkpoint is verified against its manifest (sizes and sha256) before any
byte of it is unpickled, and read with ``torch.load(weights_only=True)`` (ZeRO-3's
consolidation too: DeepSpeed's own ``zero_to_fp32`` would unpickle with ``weights_only=False``).

An encoder directory is input from elsewhere: :func:`load_encoder` checks its config (JSON,
every field within the bounds documented beside it, ``input.size`` at most
:data:`pretrain.config.MAX_IMAGE_SIZE`), reads the safetensors file, refuses NaN or infinite
weights and weights that do not fit the config; every failure is one :class:`EncoderError`
line naming the file. The fine-tuned heads' loaders (:func:`finetune.heads.pose.load_head`,
:func:`finetune.heads.future.load_model`) read their files with the same helpers
(:func:`read_json`, :func:`encoder_config`, :func:`read_weights`, :func:`fit`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from data_shards.configtools import from_dict, to_dict
from data_shards.manifest import fsync_path
from data_shards.untrusted import MAX_JSON_DEPTH, brief, json_depth_ok
from pretrain.config import MAX_IMAGE_SIZE
from pretrain.engine.checkpoint import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointManager,
    load_file_safely,
    verify,
)
from pretrain.model import PoseBERT, PoseBERTConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_PREFIX = "model."  # PretrainTask keeps PoseBERT as .model
MAX_JSON_BYTES = 1024**2
"""Largest model config file read (the ones written here are a few KB)."""


class EncoderError(ValueError):
    """An exported encoder (or the checkpoint it is made from, or a fine-tuned head saved with
    one) that cannot be used; the one-line message names the file."""


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def _checkpoint_dir(run: Path, step: int | None) -> Path:
    manager = CheckpointManager(run)
    if step is None:
        ref, problems = manager.resolve()
        for problem in problems:  # a newer checkpoint skipped: say so, the export is older
            log.warning("checkpoint: %s", problem)
        if ref is None:
            raise FileNotFoundError(f"{run}: no checkpoint to export")
        return ref.path
    path = manager.root / f"step_{step}"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    verify(path)
    return path


@contextlib.contextmanager
def _safe_torch_load() -> Iterator[None]:
    """Route ``torch.load`` to the safe loader while DeepSpeed's ``zero_to_fp32`` runs (it
    asks for ``weights_only=False``)."""
    real = torch.load

    def safe(f: Any, map_location: Any = None, weights_only: Any = None, **kwargs: Any) -> Any:
        return load_file_safely(f, map_location, **kwargs)

    torch.load = safe
    try:
        yield
    finally:
        torch.load = real


def _model_state(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 3:  # parameters are partitioned: DeepSpeed's own consolidation
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with _safe_torch_load():
                return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="deepspeed")
        except (OSError, CheckpointError):
            raise
        except Exception as e:  # content that verified but is not a ZeRO-3 checkpoint
            why = f"{type(e).__name__}: {_first_line(e)}"
            raise CheckpointCorrupt(f"{ckpt}: cannot consolidate ZeRO-3 files ({why})") from None
    path = ckpt / "deepspeed" / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no deepspeed/mp_rank_00_model_states.pt")
    state = load_file_safely(path)
    module = state.get("module") if isinstance(state, dict) else None
    tensors = isinstance(module, dict) and all(isinstance(v, torch.Tensor) for v in module.values())
    if not tensors:
        raise CheckpointCorrupt(f"{path}: no 'module' state dict of tensors")
    return module


def _no_backbone_file(model: Any) -> Any:
    """A model config without its backbone weights file: the exported or checkpointed weights
    hold the backbone, so the file is neither needed nor read (it may not exist here)."""
    if isinstance(model, dict) and isinstance(model.get("backbone"), dict):
        return {**model, "backbone": {**model["backbone"], "weights": None}}
    return model


def _run_config(config_file: Path) -> tuple[PoseBERTConfig, int, dict[str, Any]]:
    """(model config, ZeRO stage, the run's config) of a pretraining run's ``config.json``."""
    try:
        resolved = json.loads(config_file.read_text())["config"]
        run_config = resolved.get("run", resolved)  # the engine may nest the run's own config
        zero_stage = int(run_config["engine"]["zero_stage"])
        model_cfg = from_dict(PoseBERTConfig, _no_backbone_file(run_config["model"]), "model")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"no {e}" if isinstance(e, KeyError) else _first_line(e)
        raise EncoderError(f"{config_file}: not a pretraining run's config ({why})") from None
    return model_cfg, zero_stage, run_config


def export_encoder(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   step: int | None = None) -> Path:  # fmt: skip
    """Write the encoder of ``run_dir``'s checkpoint (latest valid, or ``step``) to ``out_dir``.
    A checkpoint that will not load raises :class:`CheckpointCorrupt` naming the file."""
    run = Path(run_dir)
    config_file = run / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run}: no config.json (is this a pretraining run directory?)")
    model_cfg, zero_stage, run_config = _run_config(config_file)
    ckpt = _checkpoint_dir(run, step)
    state = _model_state(ckpt, zero_stage)
    weights = {k[len(_PREFIX):]: v.float().contiguous() for k, v in state.items()
               if k.startswith(_PREFIX)}  # fmt: skip
    where = ckpt / "deepspeed"
    check_finite(weights, where)
    fit(PoseBERT(model_cfg), weights, where)  # refuses missing, unexpected or mis-shaped keys
    size = (run_config.get("data") or {}).get("size")  # frames were resized to this
    source = {"source_run": str(run.resolve()), "checkpoint": ckpt.name,
              "recipe": run_config.get("recipe")}  # fmt: skip
    return save_encoder(weights, model_cfg, out_dir, size, **source)


def save_encoder(weights: dict[str, torch.Tensor], model_cfg: PoseBERTConfig,
                 out_dir: str | os.PathLike, size: int | None, **about) -> Path:  # fmt: skip
    """Write an encoder directory: ``model.safetensors`` (``weights``, a PoseBERT state dict)
    and ``config.json`` (the model config, the input ``size`` frames are resized to, ``about``).
    Both are written in full to temp files before either replaces its target, so a failed
    write (a full disk: an ``OSError`` naming the file) leaves an earlier export as it was."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in weights.items()}
    meta = {"model": to_dict(model_cfg), "input": {"size": size}, **about}
    _write_together(out, {WEIGHTS: save(tensors, metadata={"format": "pt"}),
                          CONFIG: (json.dumps(meta, indent=1) + "\n").encode()})  # fmt: skip
    return out


def _write_together(out: Path, files: dict[str, bytes]) -> None:
    """Every file to a temp name (fsynced), then each renamed over its target; on an error
    the temp files are removed and an ``OSError`` names the file that failed."""
    temps: list[Path] = []
    current = out
    try:
        for name, data in files.items():
            current = out / name
            temps.append(out / f".{name}.tmp{os.getpid()}")
            with open(temps[-1], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in zip(files, temps, strict=True):
            current = out / name
            os.replace(tmp, current)
        fsync_path(out)
    except OSError as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(current)) from None


def check_finite(weights: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """:class:`EncoderError` naming ``where`` and the first tensor holding NaN or inf."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise EncoderError(f"{where}: tensor {name} holds {bad} NaN or infinite values")


def fit(model: torch.nn.Module, weights: dict[str, torch.Tensor],
        where: str | os.PathLike) -> None:  # fmt: skip
    """Load ``weights`` into ``model`` strictly; :class:`EncoderError` naming ``where`` and the
    first missing, unexpected or mis-shaped tensor otherwise."""
    own = model.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    shapes = [f"{k} is {tuple(weights[k].shape)}, the config says {tuple(own[k].shape)}"
              for k in sorted(own.keys() & weights.keys())
              if weights[k].shape != own[k].shape]  # fmt: skip
    problems = ([f"{len(missing)} missing ({missing[0]})"] if missing else []) + (
        [f"{len(unexpected)} unexpected ({unexpected[0]})"] if unexpected else []) + (
        [f"{len(shapes)} mis-shaped ({shapes[0]})"] if shapes else [])  # fmt: skip
    if problems:
        raise EncoderError(f"{where}: weights do not fit the model config: "
                           + "; ".join(problems))  # fmt: skip
    model.load_state_dict(weights)


def read_json(file: str | os.PathLike) -> Any:
    """The parsed content of a JSON file from elsewhere: :class:`EncoderError` naming it when
    it is over :data:`MAX_JSON_BYTES` (never read further), not UTF-8 JSON or nested deeper
    than :data:`data_shards.untrusted.MAX_JSON_DEPTH`."""
    with open(file, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)  # the file may grow after a stat: read no more
    if len(data) > MAX_JSON_BYTES:
        raise EncoderError(f"{file}: more than the {MAX_JSON_BYTES:,} bytes a model config "
                           "may hold")  # fmt: skip
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise EncoderError(f"{file}: not valid JSON ({_first_line(e)})") from None
    if not json_depth_ok(value):
        raise EncoderError(f"{file}: nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def check_fields(meta: Any, known: tuple[str, ...], required: tuple[str, ...],
                 file: str | os.PathLike, what: str) -> dict[str, Any]:  # fmt: skip
    """``meta`` when it is a JSON object holding every ``required`` field and no field outside
    ``known``; :class:`EncoderError` naming the file (``what`` it should be) and the first
    unknown or missing field otherwise (a field name that is not an identifier is quoted, so
    it cannot forge a line)."""
    if not isinstance(meta, dict):
        raise EncoderError(f"{file}: not {what}'s JSON object")
    unknown = sorted(set(meta) - set(known))
    missing = [k for k in required if k not in meta]
    if unknown:
        key = unknown[0] if unknown[0].isidentifier() else brief(unknown[0])
        raise EncoderError(f"{file}: {key}: unknown field (fields: {', '.join(known)})")
    if missing:
        raise EncoderError(f"{file}: no {missing[0]!r} (fields: {', '.join(known)})")
    return meta


def encoder_config(model: Any, file: str | os.PathLike, path: str = "model") -> PoseBERTConfig:
    """The encoder config in section ``path`` of ``file``, every field within the bounds
    documented beside it; :class:`EncoderError` naming the file and the field otherwise. A
    backbone weights path in it is dropped (:func:`_no_backbone_file`)."""
    if not isinstance(model, dict):
        raise EncoderError(f"{file}: {path} is {type(model).__name__}, not a mapping")
    try:
        return from_dict(PoseBERTConfig, _no_backbone_file(model), path)
    except ValueError as e:
        raise EncoderError(f"{file}: {_first_line(e)}") from None


def read_encoder_config(path: str | os.PathLike) -> tuple[PoseBERTConfig, int | None]:
    """(model config, input size) of an exported encoder's ``config.json``, every value
    checked; :class:`EncoderError` naming the file otherwise. A backbone weights path in it is
    dropped (:func:`_no_backbone_file`)."""
    file = Path(path) / CONFIG
    meta = read_json(file)
    model = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(model, dict):
        raise EncoderError(f"{file}: no 'model' section (write one with posebert export)")
    cfg = encoder_config(model, file)
    section = meta.get("input")
    if section is not None and not isinstance(section, dict):
        raise EncoderError(f"{file}: input is {brief(section)}, not a mapping")
    return cfg, check_input_size((section or {}).get("size"), file, "input.size")


def check_input_size(size: Any, file: str | os.PathLike, name: str) -> int | None:
    """``size`` (the side frames are resized to, or None) when it is one of 1 ..
    :data:`pretrain.config.MAX_IMAGE_SIZE` pixels; :class:`EncoderError` naming the file and
    the field ``name`` otherwise."""
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool)
                                 and 1 <= size <= MAX_IMAGE_SIZE):  # fmt: skip
        raise EncoderError(f"{file}: {name} {brief(size)} is not a side of 1..{MAX_IMAGE_SIZE} "
                           "pixels or null")  # fmt: skip
    return size


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The finite tensors of a safetensors file; :class:`EncoderError` naming it otherwise
    (cut short, not safetensors, NaN or infinite values)."""
    try:
        weights = load_file(os.fspath(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise EncoderError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    check_finite(weights, path)
    return weights


def load_encoder(path: str | os.PathLike) -> PoseBERT:
    """An exported encoder (eval mode), without DeepSpeed; one :class:`EncoderError` line
    naming the file when its config or weights cannot be used."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not an exported encoder, no {name} "
                                    "(write one with posebert export)")  # fmt: skip
    cfg, _ = read_encoder_config(path)
    weights = read_weights(path / WEIGHTS)
    model = PoseBERT(cfg)
    fit(model, weights, path / WEIGHTS)
    return model.eval()
