from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from data_shards.configtools import ConfigError, apply_overrides, from_dict, parse_value, to_dict


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    kind: Literal["conv", "rotary"] = "conv"
    rates: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    lr: float = 1e-3
    weights: str | None = None


def test_round_trip_and_int_to_float():
    cfg = Outer(Inner(3, "rotary", (0.1, 0.2)), lr=2e-4, weights="w.safetensors")
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert from_dict(Outer, {"lr": 1}).lr == 1.0


def test_overrides_are_typed_and_validated():
    cfg = apply_overrides(Outer(), ["inner.depth=4", "inner.kind=rotary", "lr=0.01",
                                    "inner.rates=[0.3, 0.4]", "weights=none"])  # fmt: skip
    assert cfg == Outer(Inner(4, "rotary", (0.3, 0.4)), 0.01, None)


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.width=3", "inner.width: unknown field"),
        ("inner.depth=four", "inner.depth: expected int"),
        ("inner.depth=0", "inner: depth must be >= 1"),
        ("inner.kind=absolute", "inner.kind: 'absolute' is not one of"),
        ("nodots", "expected key=value"),
        ("inner.rates=[1]", "inner.rates: expected 2 values"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Outer(), [override])
    assert str(info.value).startswith(message) or message in str(info.value)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("True") is True
    assert parse_value("resnet50") == "resnet50" and parse_value("[1,2]") == [1, 2]


def test_every_recipe_builds_and_round_trips():
    from data_shards.configtools import from_dict, to_dict
    from pretrain.config import RunConfig
    from pretrain.recipes import RECIPES

    for name, recipe in RECIPES.items():
        cfg = recipe()
        assert cfg.recipe == name
        assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_gpu_pose_recipe_switches_on_every_appearance_lever():
    from pretrain.recipes import gpu_pose_resnet50

    cfg = gpu_pose_resnet50()
    assert cfg.model.backbone.name == "resnet50" and cfg.model.backbone.background_mask
    assert cfg.model.mask.span > 1 and cfg.data.views == 4
    augment = cfg.model.augment
    assert min(augment.brightness, augment.contrast, augment.saturation) > 0
    assert cfg.objective.negatives.kind == "gt_pose" and cfg.engine.precision == "bf16"


def test_describe_lists_nested_fields_with_their_docs_and_help_exits(capsys):
    from data_shards.configtools import describe, resolve
    from pretrain.recipes import debug_cpu

    lines = describe(debug_cpu())
    depth = next(line for line in lines if line.startswith("model.encoder.depth = "))
    assert depth.startswith("model.encoder.depth = 2  # ")
    with pytest.raises(SystemExit) as stop:
        resolve(debug_cpu(), ["help"], "pretrain")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("fields of pretrain") and "  data.train = " in out
    assert resolve(debug_cpu(), ["train.max_steps=3"]).train.max_steps == 3


def test_from_recipe_applies_flags_then_overrides():
    from data_shards.configtools import from_recipe
    from finetune.heads.pose import RECIPES

    cfg = from_recipe(RECIPES, "quick", ["probe.steps=7"], "finetune pose", modes=("probe",),
                      label_fractions=None)  # fmt: skip
    assert cfg.modes == ("probe",) and cfg.probe.steps == 7 and cfg.full.steps == 5
    assert cfg.label_fractions == RECIPES["quick"]().label_fractions  # None: the recipe's
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; choose from default"):
        from_recipe(RECIPES, "nope", [])
