"""`posebert finetune lift`: the runner end to end (rows saved one by one, a rerun continues,
outputs, per-row logs, rows loaded back), its refusals, and what every method shares (frozen
configs, ``--set help``, ``restore``)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from finetune.clips import read_splits
from finetune.heads.lift import run
from finetune.heads.lift.base import (
    METHOD_NAMES,
    FitLog,
    LiftConfig,
    LiftData,
    LiftMethod,
    get_method,
)
from finetune.loop import Part
from posebert.cli import main
from pretrain.engine.metrics import read_metrics

QUICK = ["--set", "steps=15", "--set", "channels=16", "--set", "batch_size=32"]
AREA = "Lifting heads and the ablation"  # of docs/reliability.md (tests/faultlog.py)


@pytest.mark.fault(
    AREA,
    "`finetune lift` run again on its output folder, with more rows, then with a changed config",
    injected="the same command with --rows rf1,rf27, then with --set steps=16",
)
def test_cli_trains_scores_saves_and_continues(lift_shards, tmp_path, capsys, observed):
    out = tmp_path / "tcn"
    args = ["finetune", "lift", "--method", "tcn", "--shards", str(lift_shards), "--out",
            str(out), "--rows", "rf1", *QUICK]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "lift.json").read_text())
    assert result["protocol"]["heldout"] == ["val", "test"]
    scores = result["rows"]["rf1"]["scores"]
    for split in ("val", "test"):
        assert "all" in scores[split] and len(scores[split]["per_action"]) == 1  # the clip's
        assert 0 < scores[split]["all"]["p_mpjpe"] <= scores[split]["all"]["mpjpe"] < 2000
    assert "--rows rf1" in result["rows"]["rf1"]["command"]
    assert "| rf1 |" in (out / "lift.md").read_text()
    assert (out / "lift.png").stat().st_size > 10_000
    assert (out / "rows" / "rf1.safetensors").stat().st_size > 1_000
    records = read_metrics(out / "rows" / "rf1" / "metrics.jsonl")  # the row's training log
    assert [r["step"] for r in records] == [0, 14] and {"loss", "loss_3d", "lr"} <= set(records[0])
    assert any((out / "rows" / "rf1" / "tensorboard").iterdir())
    assert result["stage"] == "lift" and result["rows"]["rf1"]["method"] == "tcn"
    loaded = run.load_row(out, "rf1")  # predicts what the fitted row scored
    splits = read_splits(lift_shards)
    with torch.no_grad():
        again = {s: run.score_split(loaded, s, splits[s]) for s in ("val", "test")}
    assert again == scores
    capsys.readouterr()
    assert main([*args, "--rows", "rf1,rf27"]) == 0  # rf1 kept, rf27 trained
    printed = capsys.readouterr().out
    observed(" / ".join(line.strip() for line in printed.splitlines() if "rf1:" in line
                        or "rf27:" in line))  # fmt: skip
    assert "rf1: done already" in printed and "rf27: training" in printed
    assert set(json.loads((out / "lift.json").read_text())["rows"]) == {"rf1", "rf27"}
    assert main([*args, "--set", "steps=16"]) == 0  # a changed config trains the row again
    printed = capsys.readouterr().out
    observed("changed config: " + " / ".join(line.strip() for line in printed.splitlines()
                                              if "rf1:" in line))  # fmt: skip
    assert "rf1: training" in printed
    assert [r["step"] for r in read_metrics(out / "rows" / "rf1" / "metrics.jsonl")] == [0, 15]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_row_of_every_method_is_a_valid_config_and_a_valid_rows_name(name):
    method = get_method(name)
    for row, changes in method.rows.items():
        assert "," not in row  # --rows splits on commas
        method.config(**changes)


@pytest.mark.fault(
    AREA,
    "an unknown `--rows` name or `--set` field for `finetune lift`",
    injected="run_lift on an empty folder with rows='nope', then with wobble=1",
)
def test_rows_and_fields_are_checked_before_reading(tmp_path, observed):
    with pytest.raises(ValueError, match="unknown row.*'nope'.*choose from rf1") as rows:
        run.run_lift("tcn", tmp_path, tmp_path / "o", rows="nope")
    with pytest.raises(ValueError, match="wobble: unknown field") as field:
        run.run_lift("tcn", tmp_path, tmp_path / "o", overrides=["wobble=1"])
    observed(str(rows.value))
    observed(str(field.value))


def _diverging_fit(data: LiftData, config: LiftConfig, log: FitLog):
    """A fit whose loss turns NaN at step 2, through the one loop like every method."""
    weight = torch.nn.Parameter(torch.ones(()))
    step = lambda i: {"loss": weight * (float("nan") if i == 2 else 1.0)}  # noqa: E731
    log.trainer(config).fit(step, Part([weight], config.optim), 5)
    raise AssertionError("the loop should have refused the NaN")


@pytest.mark.fault(
    AREA,
    "a lifting row whose loss turns NaN",
    injected="a fake method whose loss is multiplied by NaN at step 2, through the shared loop",
)
def test_a_diverged_row_is_refused_and_nothing_saved(lift_shards, tmp_path, monkeypatch, observed):
    method = LiftMethod("fake", LiftConfig, {"only": {}}, _diverging_fit, restore=None)
    monkeypatch.setattr(run, "get_method", lambda name: method)
    with pytest.raises(ValueError, match="row 'only': non-finite loss at step 2") as err:
        run.run_lift("fake", lift_shards, tmp_path / "o")
    assert not (tmp_path / "o" / "rows" / "only.json").exists()
    observed(f"{err.value}; row saved: {(tmp_path / 'o' / 'rows' / 'only.json').exists()}")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_configs_are_frozen(name):
    config = get_method(name).config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0


def test_set_help_lists_every_field_with_its_doc(tmp_path, capsys):
    args = ["finetune", "lift", "--method", "tcn", "--shards", str(tmp_path), "--out",
            str(tmp_path / "o"), "--set", "help"]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "row 'rf243': {'filter_widths': (3, 3, 3, 3, 3)}" in printed
    fields = [line.strip() for line in printed.splitlines() if " = " in line]
    assert "optim.lr = 0.003  # Peak learning rate" in fields
    assert "optim.schedule.decay = 'exponential'" in " ".join(fields)
    names = {f.split(" = ")[0] for f in fields}
    assert names >= {"seed", "steps", "labels", "log_every", "filter_widths", "optim.amsgrad"}
    assert all("  # " in f for f in fields), [f for f in fields if "  # " not in f]


TINY = {
    "tcn": dict(filter_widths=(3,), channels=16, batch_size=16, steps=3, semi=True,
                labels=0.5, warmup=0.0),
    "vaegan": dict(width=32, disc_width=16, batch_size=32, steps=3),
    "cyclic": dict(width=32, decoder_width=16, blocks=1, batch_size=32, steps=3,
                   decoder_weight=1.0, symmetry_weight=1.0, skip=True),
    "selfcorrect": dict(width=16, hidden=8, layers=1, window=8, batch_size=4,
                        projector_width=16, projector_steps=3, steps=3, correction_weight=1.0),
    "hrnet": dict(steps=2, batch_size=4, image_size=32, width=32, decoder_width=16,
                  predict_batch=16, heatmap_weight=1.0),
}  # fmt: skip


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_a_restored_row_predicts_exactly_what_the_fitted_one_did(name, lift_shards, tmp_path):
    from safetensors.torch import load_file, save_file

    method = get_method(name)
    config = method.config(**TINY[name])
    data = LiftData(lift_shards, read_splits(lift_shards, **method.read(config)))
    fitted = method.fit(data, config, FitLog("test", tmp_path / "log"))
    assert read_metrics(tmp_path / "log" / "metrics.jsonl")[-1]["step"] == config.steps - 1
    if name == "selfcorrect":  # its second optimisation logs beside the first
        assert (tmp_path / "log" / "projector" / "metrics.jsonl").is_file()
    save_file({k: v.contiguous() for k, v in fitted.state_dict().items()}, tmp_path / "w.st")
    restored = method.restore(config, load_file(tmp_path / "w.st"))
    with torch.no_grad():
        for split in ("val", "test"):
            want = fitted.predict(split, data.splits[split])
            got = restored.predict(split, data.splits[split])
            assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)), split
