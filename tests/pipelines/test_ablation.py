"""`posebert ablation`: the variants' settings, and one quick variant end to end."""

from __future__ import annotations

import json

import pytest

from pipelines import ablation

AREA = "Lifting heads and the ablation"  # of docs/reliability.md (tests/faultlog.py)


def _config(stage):
    """The pretraining config a stage's command line resolves to (recipe, levers, --set)."""
    from pretrain.cli import resolve_config

    args = stage.args
    sets = [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
    levers = args[args.index("--levers") + 1] if "--levers" in args else None
    return resolve_config(args[args.index("--recipe") + 1], sets, levers)


def test_each_variant_switches_on_its_levers_only(tmp_path):
    stages = {s.name: s for s in ablation.plan(tmp_path, list(ablation.VARIANTS), False, 2)}
    base = _config(stages["baseline: pretrain"])
    assert not base.model.backbone.background_mask and base.model.mask.span == 1
    assert base.data.train == str(tmp_path / "shards" / "train")
    assert not base.model.augment.enabled
    bg = _config(stages["background-mask: pretrain"])
    assert bg.model.backbone.background_mask and bg.model.mask.span == 1
    span = _config(stages["span-mask: pretrain"])
    assert span.model.mask.span == 3 and not span.model.backbone.background_mask
    aug = _config(stages["augment: pretrain"])
    assert aug.model.augment.brightness > 0 and aug.model.mask.span == 1
    swap = _config(stages["appearance-swap: pretrain"])
    assert swap.data.train == str(tmp_path / "shards-app" / "train")
    assert swap.data.views == 4
    every = _config(stages["all: pretrain"])
    assert every.model.augment == aug.model.augment and every.data == swap.data
    assert every.model.backbone.background_mask and every.model.mask.span == 3
    assert every.objective.negatives.same_window == 0
    five = _config(stages["all+same-window-negatives: pretrain"])
    assert five.objective.negatives.same_window == 0.5 and five.data == every.data
    assert _config(stages["same-window-negatives: pretrain"]).objective.negatives.kind == "gt_pose"
    from pretrain.recipes import gpu_pose_resnet50

    assert every.model.augment == gpu_pose_resnet50().model.augment  # one definition
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


@pytest.mark.fault(AREA, "an unknown ablation variant", injected="--variants baseline,nope")
def test_unknown_variant_is_one_line(observed):
    with pytest.raises(
        ValueError, match="unknown variant.*'nope'.*choose from levers, compar"
    ) as err:
        ablation.parse_variants("baseline,nope")
    observed(str(err.value))
    assert ablation.parse_variants("all,all,baseline") == ["all", "baseline"]


@pytest.mark.fault(
    AREA,
    "`posebert ablation` run again, or on a folder holding a run with other settings",
    injected="run_ablation twice on the same folder, then once without --quick",
)
def test_quick_variant_end_to_end_and_rerun(tmp_path, capsys, observed):
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
    assert "--levers none" in text  # the baseline: every lever off
    assert result["protocol"]["queries"] == ["val", "test"] and result["stage"] == "ablation"
    assert (out / "ablation.png").stat().st_size > 10_000
    capsys.readouterr()
    code = ablation.run_ablation(out, "baseline", quick=True, nproc=1)
    assert code == 0
    again = capsys.readouterr().out
    assert again.count("done already") == 5
    observed(f"rerun: exit {code}, {again.count('done already')} stages done already")
    with pytest.raises(ValueError, match="other settings") as err:
        ablation.run_ablation(out, "baseline", quick=False, nproc=1)
    observed(f"other settings: {err.value}")


def test_steps_budgets_give_one_run_per_variant_and_budget(tmp_path):
    stages = {s.name: s for s in ablation.plan(tmp_path, ["all"], False, 2, (100, 1000))}
    for n in (100, 1000):
        cfg = _config(stages[f"all@{n}: pretrain"])
        assert cfg.train.max_steps == n and cfg.data.views == 4
        done = tmp_path / f"all@{n}" / "pretrain" / "checkpoints" / f"step_{n}"
        assert stages[f"all@{n}: pretrain"].done == done
    assert "all: pretrain" not in stages
    recipe_steps = _config(next(iter(ablation.plan(tmp_path, ["all"], False, 2)[2:3]))).train
    own = ablation.plan(tmp_path, ["all"], False, 2, (recipe_steps.max_steps,))[2]
    assert _config(own).train == recipe_steps  # the recipe's own budget adds no override
    assert own.name == "all: pretrain"  # ... and is the plain ablation's run of the variant
    assert ablation.parse_steps("1000,100,100") == (100, 1000) and ablation.parse_steps("") == ()
    for bad in ("0,100", "ten", ","):
        with pytest.raises(ValueError, match="--steps must be positive step counts"):
            ablation.parse_steps(bad)


def test_scaling_plot_and_table_from_budget_runs(tmp_path):
    """summarize + markdown + plot_scaling over fake retrieval results of two budgets."""
    budgets = (100, 300)

    def retrieval(model: float) -> dict:
        row = {"mpjpe": {"top1": model}, "p_mpjpe": {"top1": model / 2},
               "probe": {"mpjpe": model - 100}}  # fmt: skip
        ref = {"mpjpe": {"top1": 0.0}, "p_mpjpe": {"top1": 0.0}}
        rows = {"model": row, "random-init": row, "raw pixels 16x16": row,
                "oracle": ref | {"mpjpe": {"top1": 200.0}},
                "chance": ref | {"mpjpe": {"top1": 500.0}}}  # fmt: skip
        return {"rows": rows, "protocol": {"probe_mean_pose_mpjpe": 340.0}}

    for split in ablation.HELDOUT:
        (tmp_path / "shards" / split).mkdir(parents=True)
        (tmp_path / "shards" / split / "manifest.json").write_text(
            json.dumps({"source": {"clips": [f"{split}-clip"]}}))
        for n, model in zip(budgets, (450.0, 380.0), strict=True):
            d = tmp_path / ("all" if n == 300 else f"all@{n}") / f"retrieval-{split}"
            d.mkdir(parents=True)
            (d / "retrieval.json").write_text(json.dumps(retrieval(model)))
    stages = ablation.plan(tmp_path, ["all"], False, 2, budgets)
    results = ablation.summarize(tmp_path, ["all"], {s.name: s.command for s in stages},
                                 {"quick": False, "steps": list(budgets)}, budgets)  # fmt: skip
    assert results["steps"] == {"all@100": 100, "all@300": 300}
    val = results["heldout"]["val"]["variants"]
    assert val["all@300"]["gap_closed"] == pytest.approx(0.4)
    assert "| all@300 | 380.0 |" in ablation.markdown(results)
    fig = ablation.plot_scaling(results)
    assert [len(line.get_xdata()) for line in fig.axes[0].lines[:1]] == [2]


def test_comparison_group_is_negatives_by_mask_and_the_quantizer(tmp_path):
    chosen = ablation.parse_variants("comparison")
    assert chosen == list(ablation.GROUPS["comparison"])
    assert ablation.parse_variants(None) == list(ablation.GROUPS["levers"])
    assert ablation.parse_variants("all,levers")[0] == "all"  # once each, in order
    stages = {s.name: s for s in ablation.plan(tmp_path, chosen, False, 2)}
    seen = set()
    for variant in chosen:
        cfg = _config(stages[f"{variant}: pretrain"])
        kind = variant.split("+")[0]
        assert cfg.objective.negatives.kind == kind
        assert cfg.model.backbone.background_mask == ("+mask" in variant)
        assert cfg.model.quantizer.enabled == variant.endswith("quantizer")
        assert not cfg.model.augment.enabled and cfg.model.mask.span == 1
        seen.add((kind, cfg.model.backbone.background_mask, cfg.model.quantizer.enabled))
    assert len(seen) == 7
    q = _config(stages["gt_pose+mask+quantizer: pretrain"]).model
    assert q.quantizer.dim == 64 and q.quantizer.entries == 320


def test_shard_levers_pretrain_on_their_own_synth_made_once(tmp_path):
    chosen = ["all", "all+motion-augment", "+motion-augment", "+appearance-swap"]
    stages = ablation.plan(tmp_path, chosen, False, 2)
    synths = [s for s in stages if s.args[:2] == ["shards", "synth"]]
    assert [s.name for s in synths] == ["shards", "shards-appearance-swap",
                                        "shards-appearance-swap+motion-augment",
                                        "shards-motion-augment"]  # fmt: skip
    by = {s.name: s for s in stages}
    both = by["shards-appearance-swap+motion-augment"].args
    assert both[3] == str(tmp_path / "shards-app-motion")
    assert {"--mirror", "--speeds", "--appearances-per-sample"} <= set(both)
    for variant, root in (("all+motion-augment", "shards-app-motion"),
                          ("motion-augment", "shards-motion"), ("all", "shards-app")):
        cfg = _config(by[f"{variant}: pretrain"])
        assert cfg.data.train == str(tmp_path / root / "train")
        args = by[f"{variant}: retrieval on val"].args
        assert args[args.index("--shards") + 1] == str(tmp_path / "shards")  # plain gallery
