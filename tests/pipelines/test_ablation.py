"""`posebert ablation`: the variants' settings, and one quick variant end to end."""

from __future__ import annotations

import json

import pytest

from pipelines import ablation


def _sets(stage) -> dict[str, str]:
    pairs = [a.removeprefix("--set=").split("=", 1) for a in stage.args if a.startswith("--set=")]
    return dict(pairs)


def test_each_variant_switches_on_its_levers_only(tmp_path):
    stages = {s.name: s for s in ablation.plan(tmp_path, list(ablation.VARIANTS), False, 2)}
    base = _sets(stages["baseline: pretrain"])
    assert base["model.backbone.background_mask"] == "false" and base["model.mask.span"] == "1"
    assert base["data.train"] == str(tmp_path / "shards" / "train")
    assert not any(k.startswith("model.augment") for k in base)
    bg = _sets(stages["background-mask: pretrain"])
    assert bg["model.backbone.background_mask"] == "true" and bg["model.mask.span"] == "1"
    span = _sets(stages["span-mask: pretrain"])
    assert span["model.mask.span"] == "3" and span["model.backbone.background_mask"] == "false"
    aug = _sets(stages["augment: pretrain"])
    assert float(aug["model.augment.brightness"]) > 0 and aug["model.mask.span"] == "1"
    swap = _sets(stages["appearance-swap: pretrain"])
    assert swap["data.train"] == str(tmp_path / "shards-app" / "train")
    assert swap["data.views"] == "4"
    every = _sets(stages["all: pretrain"])
    assert every == {**base, **aug, **swap, "model.backbone.background_mask": "true",
                     "model.mask.span": "3"}
    for variant in ablation.VARIANTS:  # both held-out sets, one shared cache
        slug = variant.lstrip("+")
        for split in ablation.HELDOUT:
            args = stages[f"{slug}: retrieval on {split}"].args
            assert args[args.index("--queries") + 1] == split
            assert args[args.index("--cache") + 1] == str(tmp_path / "cache")


def test_appearance_shards_only_when_a_variant_needs_them(tmp_path):
    names = [s.name for s in ablation.plan(tmp_path, ["baseline", "+span-mask"], True, 1)]
    assert "shards-appearance-swap" not in names
    names = [s.name for s in ablation.plan(tmp_path, ["all"], True, 1)]
    assert "shards-appearance-swap" in names


def test_unknown_variant_is_one_line():
    with pytest.raises(ValueError, match="unknown variant.*'nope'.*choose from baseline"):
        ablation.parse_variants("baseline,nope")
    assert ablation.parse_variants("all,all,baseline") == ["all", "baseline"]


def test_quick_variant_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "ab"
    assert ablation.run_ablation(out, "baseline", quick=True, nproc=1) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert set(result["heldout"]) == {"val", "test"}
    assert result["heldout"]["val"]["clips"] == ["run"]
    assert result["heldout"]["test"]["clips"] == ["dance_b"]
    for h in result["heldout"].values():
        oracle, chance = h["reference"]["oracle"], h["reference"]["chance"]
        assert oracle["gap_closed"] == pytest.approx(1) and chance["gap_closed"] == 0
        model = h["variants"]["baseline"]
        assert oracle["mpjpe_top1"] <= model["mpjpe_top1"] and model["probe_mpjpe"] > 0
    text = (out / "ablation.md").read_text()
    assert text.count("| baseline |") == 2 and "raw pixels 16x16" in text
    assert "--set=model.mask.span=1" in text
    assert (out / "ablation.png").stat().st_size > 10_000
    capsys.readouterr()
    assert ablation.run_ablation(out, "baseline", quick=True, nproc=1) == 0
    assert capsys.readouterr().out.count("done already") == 5
    with pytest.raises(ValueError, match="other settings"):
        ablation.run_ablation(out, "baseline", quick=False, nproc=1)
