"""`posebert finetune lift`: the runner end to end (rows saved one by one, a rerun continues,
outputs), and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.heads.lift import run
from finetune.heads.lift.base import METHOD_NAMES, LiftConfig, LiftMethod, get_method
from posebert.cli import main

QUICK = ["--set", "steps=15", "--set", "channels=16", "--set", "batch_size=32"]


def test_cli_trains_scores_saves_and_continues(lift_shards, tmp_path, capsys):
    out = tmp_path / "tcn"
    args = ["finetune", "lift", "--method", "tcn", "--shards", str(lift_shards), "--out",
            str(out), "--rows", "rf1", *QUICK]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "lift.json").read_text())
    assert result["protocol"]["heldout"] == ["val", "test"]
    scores = result["rows"]["rf1"]["scores"]
    for split in ("val", "test"):
        assert "all" in scores[split] and len(scores[split]) == 2  # all + the clip's action
        assert 0 < scores[split]["all"]["p_mpjpe"] <= scores[split]["all"]["mpjpe"] < 2000
    assert "--rows rf1" in result["rows"]["rf1"]["command"]
    assert "| rf1 |" in (out / "lift.md").read_text()
    assert (out / "lift.png").stat().st_size > 10_000
    assert (out / "rows" / "rf1.safetensors").stat().st_size > 1_000
    capsys.readouterr()
    assert main([*args, "--rows", "rf1,rf27"]) == 0  # rf1 kept, rf27 trained
    printed = capsys.readouterr().out
    assert "rf1: done already" in printed and "rf27: training" in printed
    assert set(json.loads((out / "lift.json").read_text())["rows"]) == {"rf1", "rf27"}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_row_of_every_method_is_a_valid_config_and_a_valid_rows_name(name):
    method = get_method(name)
    for row, changes in method.rows.items():
        assert "," not in row  # --rows splits on commas
        method.config(**changes)


def test_rows_and_fields_are_checked_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown row.*'nope'.*choose from rf1"):
        run.run_lift("tcn", tmp_path, tmp_path / "o", rows="nope")
    with pytest.raises(ValueError, match="wobble: unknown field"):
        run.run_lift("tcn", tmp_path, tmp_path / "o", overrides=["wobble=1"])


class _Diverged:
    losses = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}]

    def predict(self, split, sequences):
        return [np.zeros((s.frames, 17, 3)) for s in sequences]

    def state_dict(self):
        return {}


def test_a_diverged_row_is_refused_and_nothing_saved(lift_shards, tmp_path, monkeypatch):
    method = LiftMethod("fake", LiftConfig, {"only": {}}, lambda data, cfg, progress: _Diverged())
    monkeypatch.setattr(run, "get_method", lambda name: method)
    with pytest.raises(ValueError, match="row 'only': non-finite loss at step 2"):
        run.run_lift("fake", lift_shards, tmp_path / "o")
    assert not (tmp_path / "o" / "rows" / "only.json").exists()
