"""`posebert export` and exported encoders under bad input: damaged or hostile encoder folders,
checkpoints rewritten behind their manifest, a full disk. Every failure is one line naming the
file; nothing already written is lost. No DeepSpeed run: checkpoints are committed by the real
commit code around torch files."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from diskfull import fill_disk
from safetensors.torch import load_file, save_file

from data_shards.configtools import to_dict
from pretrain.engine import checkpoint as ck
from pretrain.export import CONFIG, WEIGHTS, EncoderError, load_encoder, save_encoder
from pretrain.model import PoseBERT
from pretrain.recipes import debug_cpu

MODEL_FILE = "deepspeed/mp_rank_00_model_states.pt"
ENCODER = (
    "an encoder folder: config not JSON or not an object, unknown field, depth=100000, too many "
    "weights, input.size=20000; safetensors cut or empty; NaN or inf; a missing or mis-shaped "
    "tensor"
)
EXPORT = "`posebert export`: a checkpoint rewritten behind its manifest, none valid, a NaN weight"


@pytest.fixture(scope="module")
def model() -> PoseBERT:
    torch.manual_seed(0)
    return PoseBERT(debug_cpu().model)


@pytest.fixture
def encoder(tmp_path, model) -> Path:
    return save_encoder(model.state_dict(), model.cfg, tmp_path / "encoder", size=32)


def _edit_config(enc: Path, edit) -> None:
    meta = json.loads((enc / CONFIG).read_text())
    edit(meta)
    (enc / CONFIG).write_text(json.dumps(meta))


def _edit_weights(enc: Path, edit) -> None:
    weights = load_file(str(enc / WEIGHTS))
    edit(weights)
    save_file(weights, str(enc / WEIGHTS))


def _poison(weights: dict, value: float) -> None:
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name][0] = value


DAMAGE = {
    "json": (lambda e: (e / CONFIG).write_text('{"model": '), CONFIG, "not valid JSON"),
    "not-a-mapping": (lambda e: (e / CONFIG).write_text("[1, 2]"), CONFIG, "no 'model' section"),
    "depth": (lambda e: _edit_config(e, lambda m: m["model"]["encoder"].update(depth=100000)),
              CONFIG, "EncoderConfig.depth: invalid value 100000 (1..128)"),
    "width-x-depth": (lambda e: _edit_config(e, lambda m: m["model"]["encoder"].update(
        depth=128, width=8192, heads=8, conv_groups=8)), CONFIG, "more than the"),
    "unknown-field": (lambda e: _edit_config(e, lambda m: m["model"].update(extra=1)), CONFIG,
                      "model.extra: unknown field"),
    "input-size": (lambda e: _edit_config(e, lambda m: m["input"].update(size=20000)), CONFIG,
                   "input.size 20000 is not a side of 1..1024"),
    "input-size-text": (lambda e: _edit_config(e, lambda m: m["input"].update(size="32")),
                        CONFIG, "input.size '32'"),
    "truncated": (lambda e: (e / WEIGHTS).write_bytes((e / WEIGHTS).read_bytes()[:5000]),
                  WEIGHTS, "not a readable safetensors file"),
    "empty": (lambda e: (e / WEIGHTS).write_bytes(b""), WEIGHTS, "not a readable safetensors"),
    "nan": (lambda e: _edit_weights(e, lambda w: _poison(w, float("nan"))), WEIGHTS,
            "holds 1 NaN or infinite values"),
    "inf": (lambda e: _edit_weights(e, lambda w: _poison(w, float("inf"))), WEIGHTS,
            "holds 1 NaN or infinite values"),
    "missing": (lambda e: _edit_weights(e, lambda w: w.pop(sorted(w)[0])), WEIGHTS,
                "1 missing"),
    "mis-shaped": (lambda e: _edit_weights(e, lambda w: w.update(
        {sorted(w)[0]: torch.zeros(3, 3)})), WEIGHTS, "1 mis-shaped"),
}  # fmt: skip


@pytest.mark.fault(
    "Evaluation", ENCODER, injected="the exported config.json or model.safetensors edited"
)
@pytest.mark.parametrize("name", DAMAGE)
def test_a_damaged_encoder_is_one_line_naming_the_file(encoder, name, observed):
    load_encoder(encoder)  # intact: loads
    damage, file, needle = DAMAGE[name]
    damage(encoder)
    with pytest.raises(EncoderError) as err:
        load_encoder(encoder)
    message = str(err.value)
    assert message.startswith(f"{encoder / file}: ") and needle in message, message
    assert "\n" not in message
    observed(f"{type(err.value).__name__}: {message}")


@pytest.mark.fault(
    "Evaluation", ENCODER, injected="`posebert evaluate retrieval` on an encoder of depth 100000"
)
def test_evaluate_on_a_damaged_encoder_exits_2_in_one_line(encoder, tmp_path, capsys, observed):
    from conftest import make_sample

    from data_shards.write import write_split
    from posebert.cli import main

    for split in ("train", "val"):
        write_split(tmp_path / "shards", split, [make_sample(key=f"{split}0", size=(16, 16))],
                    {}, {})  # fmt: skip
    _edit_config(encoder, lambda m: m["model"]["encoder"].update(depth=100000))
    code = main(["evaluate", "retrieval", "--encoder", str(encoder), "--shards",
                 str(tmp_path / "shards"), "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(encoder / CONFIG) in err, err
    observed(f"exit {code}: {err}")


@pytest.mark.fault(
    "Evaluation",
    "a backbone weights path written into an exported encoder's config.json",
    injected="model.backbone.weights set to a path that does not exist",
)
def test_a_backbone_weights_path_in_the_config_is_not_read(encoder, model, observed):
    """The exported weights hold the backbone; a path in a config made elsewhere is not
    opened (here it does not even exist)."""
    _edit_config(encoder, lambda m: m["model"]["backbone"].update(weights="/nonexistent/w.pth"))
    loaded = load_encoder(encoder)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    same = sum(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    observed(f"loaded: {same} of {len(loaded.state_dict())} tensors from the exported weights, "
             f"backbone weights path {loaded.cfg.backbone.weights}")  # fmt: skip


# ----------------------------------------------------------------------------- export


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run(tmp_path: Path, model: PoseBERT, zero_stage: int = 0, files: dict | None = None,
         legacy: bool = False) -> Path:  # fmt: skip
    """A run directory: config.json and one committed checkpoint (step 2) holding ``files``
    (default: the model states of ``model``)."""
    run = tmp_path / "run"
    config = {"recipe": "debug_cpu", "engine": {"zero_stage": zero_stage},
              "model": to_dict(model.cfg), "data": {"size": 32}}  # fmt: skip
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"world_size": 1, "config": {"run": config}}))
    if files is None:
        files = {MODEL_FILE: {"module": {f"model.{k}": v for k, v in model.state_dict().items()}}}
    tmp = run / "checkpoints" / "step_2.tmp"
    (tmp / "deepspeed").mkdir(parents=True)
    for rel, payload in files.items():
        torch.save(payload, tmp / rel, _use_new_zipfile_serialization=not legacy)
    manifest = dict(format=ck.FORMAT, step=2, tag=ck.DS_TAG, meta={"world_size": 1},
                    files=ck._hash_unreported(tmp, {}))  # fmt: skip
    ck._commit(tmp, run / "checkpoints" / "step_2", manifest)
    return run


def _export(run: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    from posebert.cli import main

    code = main(["export", "--run", str(run), "--out", str(out), *extra])
    return code, capsys.readouterr().err.strip()


@pytest.mark.fault(
    "Pretraining",
    EXPORT,
    injected="a legacy torch file whose unpickling creates a marker file, committed with its "
    "manifest (ZeRO-0 and ZeRO-3 layouts)",
)
@pytest.mark.parametrize("zero_stage, rel", [
    (0, MODEL_FILE), (3, "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt")])  # fmt: skip
def test_export_of_a_file_that_will_not_load_is_one_line(tmp_path, model, capsys, zero_stage,
                                                         rel, observed):  # fmt: skip
    """A file rewritten with its manifest, in torch's legacy format (which the manifest's
    static scan does not read): the loader refuses it, naming it; the payload never runs.
    ZeRO-3 goes through DeepSpeed's zero_to_fp32, which loads with weights_only=False."""
    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(_Marker(str(marker)))) and marker.exists()
    marker.unlink()
    run = _run(tmp_path, model, zero_stage, {rel: {"x": _Marker(str(marker))}}, legacy=True)
    code, err = _export(run, tmp_path / "out", capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{run / 'checkpoints' / 'step_2' / rel}: cannot be loaded safely" in err
    assert "weights_only" not in err and not marker.exists()
    assert not (tmp_path / "out" / WEIGHTS).exists()
    observed(f"exit {code}: {err}; marker created: {marker.exists()}")


@pytest.mark.fault(
    "Pretraining",
    EXPORT,
    injected="the only checkpoint's model file rewritten (zip, global io.open) with its manifest",
)
def test_export_with_no_valid_checkpoint_is_one_line(tmp_path, model, capsys, observed):
    run = _run(tmp_path, model)
    evil = run / "checkpoints" / "step_2" / MODEL_FILE
    torch.save({"x": _Marker(str(tmp_path / "pwned"))}, evil)
    manifest = json.loads((evil.parents[1] / "manifest.json").read_text())
    manifest["files"][MODEL_FILE] = {"size": evil.stat().st_size, "sha256": ck.sha256_file(evil)}
    (evil.parents[1] / "manifest.json").write_text(json.dumps(manifest))
    for extra in ((), ("--step", "2")):
        code, err = _export(run, tmp_path / "out", capsys, *extra)
        held = f"{io.open.__module__}.open"  # io.open up to Python 3.11, _io.open from 3.12
        assert code == 2 and len(err.splitlines()) == 1 and f"{evil}: holds {held}" in err, err
        observed(f"{' '.join(('export', *extra))}: exit {code}: {err}")


@pytest.mark.fault(
    "Pretraining", EXPORT, injected="one NaN in target_proj.weight of the checkpoint's model"
)
def test_export_refuses_nan_weights(tmp_path, model, capsys, observed):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state["model.target_proj.weight"][0, 0] = float("nan")
    run = _run(tmp_path, model, files={MODEL_FILE: {"module": state}})
    code, err = _export(run, tmp_path / "out", capsys)
    assert code == 2 and "tensor target_proj.weight holds 1 NaN" in err, err
    observed(f"exit {code}: {err}")


@pytest.mark.fault(
    "Pretraining",
    "ENOSPC during `posebert export`",
    injected="a second export into the same folder on a full disk (tests/diskfull.py)",
)
def test_export_on_a_full_disk_exits_74_and_keeps_the_previous_export(tmp_path, model, capsys,
                                                                      monkeypatch,
                                                                      observed):  # fmt: skip
    run, out = _run(tmp_path, model), tmp_path / "out"
    code, err = _export(run, out, capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == [CONFIG, WEIGHTS]
    fill_disk(monkeypatch, out)
    code, err = _export(run, out, capsys)
    assert code == 74 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and str(out / WEIGHTS) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file either
    observed(f"exit {code}: {err}; folder {sorted(p.name for p in out.iterdir())}, unchanged: "
             f"{ {p.name: p.read_bytes() for p in out.iterdir()} == before}")  # fmt: skip
    monkeypatch.undo()
    loaded = load_encoder(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
