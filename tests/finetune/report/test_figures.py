"""The report's drawings: 3D skeletons, forecast strips, training curves, the embedding map."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from report_helpers import STANDING_MM, future_arrays, pose_arrays, world_to_camera

from data_shards.skeleton import BONES, JOINT_INDEX
from finetune.report import curves, embedding_map, skeletons
from finetune.report.html import figure_png


def _drawn(png: bytes) -> float:
    """Share of pixels that are not white (something was drawn)."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return float((pixels < 250).mean())


def test_camera_to_display_puts_the_head_up_and_the_depth_away():
    cam = world_to_camera(STANDING_MM)  # OpenCV: y down
    display = skeletons.camera_to_display(cam)
    head, ankle = JOINT_INDEX["head"], JOINT_INDEX["r_ankle"]
    assert display[head, 2] > 0 > display[ankle, 2]  # z up
    np.testing.assert_allclose(display, STANDING_MM)  # this camera looks along world +y


def test_pose_figure_draws_truth_and_prediction_from_two_views():
    fig = skeletons.pose_figure(pose_arrays(3))
    axes = fig.axes
    assert len(axes) == 3 * len(skeletons.VIEWS)
    assert all(len(ax.lines) == 2 * len(BONES) for ax in axes)  # truth + prediction
    colours = {line.get_color() for line in axes[0].lines}
    assert colours == {skeletons.TRUE_COLOUR, skeletons.PRED_COLOUR}
    assert "MPJPE 69 mm" in axes[0].get_title()  # |(40, 40, 40)| = 69.3 mm per joint
    assert _drawn(figure_png(fig)) > 0.005


def test_pose_figure_leaves_out_missing_joints_and_caps_the_columns():
    arrays = pose_arrays(6)
    arrays["pred"][0, JOINT_INDEX["l_wrist"]] = np.nan
    fig = skeletons.pose_figure(arrays)
    assert len(fig.axes) == skeletons.MAX_POSES * 2
    assert len(fig.axes[0].lines) == 2 * len(BONES) - 1  # the forearm to the NaN wrist


def test_strip_columns_follow_the_horizons_the_samples_reach():
    # 50 fps: 80 ms is frame 4 -> index 3; 1000 ms is frame 50 -> index 49
    cols = skeletons.strip_columns(50, 50.0, [80, 160, 320, 400, 560, 1000])
    assert cols == [3, 7, 15, 19, 27, 49]
    assert skeletons.strip_columns(20, 50.0, [80, 160, 1000]) == [3, 7]  # 1000 ms: beyond
    even = skeletons.strip_columns(50, 50.0)
    assert even[-1] == 49 and len(even) == skeletons.MAX_COLUMNS and even == sorted(even)
    assert skeletons.strip_columns(3, 50.0) == [0, 1, 2]


def test_forecast_figure_shows_seed_then_truth_and_forecast():
    arrays = future_arrays(2, seed_frames=10, horizon=50)
    fig = skeletons.forecast_figure(arrays, [80, 400, 1000])
    assert len(fig.axes) == 2 * (2 + 3)  # per row: first and last seed frame, 3 horizons
    first, last = fig.axes[0], fig.axes[4]
    assert {line.get_color() for line in first.lines} == {skeletons.SEED_COLOUR}
    assert first.get_title() == "seed -180 ms" and last.get_title().startswith("+1000 ms: ")
    assert len(last.lines) == 2 * len(BONES)
    # the forecast drifts 150 mm along each axis by the last frame: 150 sqrt(3) = 260 mm
    assert last.get_title() == "+1000 ms: 260 mm"
    assert _drawn(figure_png(fig)) > 0.005


def _log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_read_log_keeps_numbers_and_skips_a_cut_line(tmp_path):
    path = _log(tmp_path / "metrics.jsonl", [
        {"step": 1, "loss": 3.0, "lr": 1e-4, "skipped": False, "accuracy": None, "tag": "x"},
        {"step": 2, "loss": 2.5, "lr": 2e-4, "skipped": False, "accuracy": 0.5, "tag": "x"},
    ], tail='{"step": 3, "loss": 2.')  # fmt: skip
    series = curves.read_log(path)
    assert set(series) == {"loss", "lr", "accuracy"}  # no bool, no text, no step
    np.testing.assert_array_equal(series["loss"], [[1, 2], [3.0, 2.5]])
    assert np.isnan(series["accuracy"][1, 0]) and series["accuracy"][1, 1] == 0.5


@pytest.mark.parametrize(("key", "group"), [
    ("loss", "loss"), ("loss_contrastive", "loss"), ("task_loss", "loss"), ("loss_d", "loss"),
    ("accuracy", "accuracy and negative purity"), ("negative_purity",
                                                   "accuracy and negative purity"),
    ("perplexity", "codebook perplexity"), ("code_perplexity", "codebook perplexity"),
    ("sim_positive", "cosine similarity"), ("lr", "learning rate"), ("lr_loss_d", "loss"),
    ("frames_per_s", "frames per second"), ("time_s", "seconds"), ("epoch", "counters"),
    ("reader_bad_samples", "counters"), ("skipped_steps", "counters"),
    ("mpjpe_mm", "training error (mm)"), ("share", "scheduled sampling"), ("grad_norm", "other"),
])  # fmt: skip
def test_series_are_grouped_by_what_they_measure(key, group):
    assert curves.group_of(key) == group


def test_curves_figure_plots_every_series_of_every_log(tmp_path):
    pretrain = [{"step": s, "loss": 3 - s / 10, "loss_contrastive": 3 - s / 10,
                 "accuracy": s / 20, "negative_purity": 0.9, "perplexity": 40 - s,
                 "lr": 1e-4 * s, "frames_per_s": 90.0, "time_s": 1.2, "epoch": 0}
                for s in range(1, 11)]  # fmt: skip
    logs = {"pretrain": curves.read_log(_log(tmp_path / "a.jsonl", pretrain))}
    fig = curves.curves_figure(logs, "pretrain")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 7  # loss, accuracy, perplexity, lr, frames/s, seconds, counters
    assert sum(len(ax.lines) for ax in visible) == len(logs["pretrain"])
    rows = {name: curves.read_log(_log(tmp_path / f"{name}.jsonl", [
        {"step": s, "loss": 1 / (s + 1), "lr": 1e-3, "time_s": s / 10} for s in range(5)]))
        for name in ("probe 10%", "full 100%")}  # fmt: skip
    fig = curves.curves_figure(rows, "pose")
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    assert [line.get_label() for line in loss.lines] == ["probe 10%: loss", "full 100%: loss"]
    with pytest.raises(ValueError, match="no numeric series"):
        curves.curves_figure({"empty": {}}, "empty")


def test_embedding_map_separates_actions_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(0, 1, (40, 16)), rng.normal(8, 1, (40, 16))])
    actions = np.array(["walk"] * 40 + ["run"] * 40)
    xy, method = embedding_map.project_2d(vectors, method="pca")
    assert method == "pca" and xy.shape == (80, 2) and xy.dtype == np.float32
    assert abs(xy[:40, 0].mean() - xy[40:, 0].mean()) > 10  # the first axis splits them
    again, _ = embedding_map.project_2d(vectors, method="pca")
    np.testing.assert_array_equal(xy, again)  # SVD signs fixed: the same map every time
    png = embedding_map.write_embedding_map(vectors, actions, tmp_path, "val")
    assert _drawn(png.read_bytes()) > 0.005
    data = embedding_map.read_embedding_map(tmp_path)
    assert data["xy"].shape == (80, 2) and data["split"] == "val"
    assert sorted(set(data["action"].tolist())) == ["run", "walk"]


def test_embedding_map_keeps_a_seeded_subset_of_large_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(embedding_map, "MAX_POINTS", 50)
    vectors = np.random.default_rng(1).normal(size=(120, 4))
    embedding_map.write_embedding_map(vectors, np.array(["a"] * 120), tmp_path, "val")
    assert embedding_map.read_embedding_map(tmp_path)["xy"].shape == (50, 2)
