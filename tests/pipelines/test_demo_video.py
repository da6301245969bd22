"""The demo's video chain: its stages in order, how the in-place detection counts as done, and
the rows it adds to the results table."""

from __future__ import annotations

import json

from pipelines import chain, demo


def test_the_demo_ends_with_detect_lift_render_and_predict(tmp_path):
    stages = demo.plan(tmp_path, quick=False, nproc=2)
    assert [s.name for s in stages][-4:] == ["detect", "lift-detected", "render-video",
                                              "predict"]  # fmt: skip
    by = {s.name: s for s in stages}
    assert by["detect"].args == ["shards", "detect", str(tmp_path / "shards"), "--workers", "2"]
    lift = by["lift-detected"].args
    assert lift[lift.index("--input") + 1] == "detected" and "rf27" in lift
    assert by["render-video"].args[2] == "dance_b" and "--set=fps=50" in by["render-video"].args
    predict = by["predict"].args
    assert predict[:2] == ["predict", str(tmp_path / "dance_b.mp4")]
    assert predict[predict.index("--lifter") + 1] == str(tmp_path / "lift-detected")
    assert by["predict"].done == tmp_path / "predict" / "dance_b.json"
    quick = {s.name: s for s in demo.plan(tmp_path, quick=True, nproc=2)}
    assert "--set=max_frames=40" in quick["render-video"].args
    assert "--set=steps=100" in quick["lift-detected"].args


def test_detection_is_done_when_every_split_carries_det2d(tmp_path):
    done = chain.SplitsCarry(tmp_path, "det2d")
    assert not done.exists()  # no splits at all
    for split, has in (("train", True), ("test", False), (".val.tmp123", False)):
        (tmp_path / split).mkdir()
        (tmp_path / split / "manifest.json").write_text(json.dumps({"has": {"det2d": has}}))
    assert not done.exists()
    (tmp_path / "test" / "manifest.json").write_text(json.dumps({"has": {"det2d": True}}))
    assert done.exists()  # a writer's hidden, unfinished split does not count
    assert "carries det2d" in str(done)


def test_the_video_rows_of_the_results_table():
    v = {"clip": "dance_b", "frames": 127, "size": [640, 360], "fps": 50.0,
         "detection_rate": 0.85, "frames_scored": 108, "lifter": "tcn rf27", "mpjpe": 272.2,
         "p_mpjpe": 173.9, "mean_pose": {"mpjpe": 279.0, "p_mpjpe": 214.5},
         "detector_2d_px": {"median": 18.0}}  # fmt: skip
    rows = demo.video_rows(v)
    assert rows[0].startswith("| video 3D (dance_b, 640x360, 50 fps) | tcn rf27, trained on "
                              "detected 2D | 272.2 | 173.9 | person found in 85% of 127")
    assert rows[1].startswith("| video 3D (dance_b, 640x360, 50 fps) | mean pose | 279.0 | 214.5")
    assert demo.video_rows(v | {"mpjpe": None, "p_mpjpe": None, "mean_pose": None}) == [
        "| video 3D (dance_b, 640x360, 50 fps) | tcn rf27, trained on detected 2D | n/a | n/a "
        "| person found in 85% of 127 frames, 108 scored; detector 2D median 18 px |"]


def test_the_demo_pretrains_the_ablations_best_variant(tmp_path):
    """One definition: the demo's pretraining resolves to exactly the ablation's `all` row
    (every lever, the appearance-swapped train split, 4 of its 8 views)."""
    from pipelines import ablation
    from pretrain.cli import resolve_config
    from pretrain.recipes import BEST_LEVERS, LEVERS

    def config(stage):
        args = stage.args
        sets = [a.removeprefix("--set=") for a in args if a.startswith("--set=")]
        return resolve_config(args[args.index("--recipe") + 1], sets,
                              args[args.index("--levers") + 1])  # fmt: skip

    stages = {s.name: s for s in demo.plan(tmp_path, quick=False, nproc=2)}
    best = {s.name: s for s in ablation.plan(tmp_path, ["all"], False, 2)}
    assert ablation.VARIANTS["all"] == BEST_LEVERS and set(BEST_LEVERS) < set(LEVERS)
    assert config(stages["pretrain"]) == config(best["all: pretrain"])
    assert config(stages["pretrain"]).data.train == str(tmp_path / "shards-app" / "train")
    assert stages["shards-appearance-swap"].args == best["shards-appearance-swap"].args
    assert "--appearances-per-sample" in stages["shards-appearance-swap"].args
    plain = [s.name for s in demo.plan(tmp_path, quick=False, nproc=2, levers=("span-mask",))]
    assert "shards-appearance-swap" not in plain


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path, capsys):
    from pipelines import ablation

    out = tmp_path / "demo"
    assert demo.run_demo(out, quick=True, nproc=1, dry_run=True) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(demo.plan(out, quick=True, nproc=1)) and not out.exists()
    assert all(": $ posebert " in line for line in printed)
    assert ablation.run_ablation(tmp_path / "ab", "baseline,all", dry_run=True) == 0
    printed = capsys.readouterr().out
    assert "all: pretrain: $ posebert pretrain" in printed and not (tmp_path / "ab").exists()
