"""The prediction-samples contract between the heads and the report (finetune.report.samples)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from report_helpers import future_arrays, pose_arrays

from finetune.report.samples import read_samples, samples_path, write_samples


def test_pose_samples_round_trip(tmp_path):
    arrays = pose_arrays(3)
    path = write_samples(tmp_path, "pose", **arrays)
    assert path == tmp_path / "pose-samples.npz" == samples_path(tmp_path, "pose")
    assert [p.name for p in tmp_path.iterdir()] == ["pose-samples.npz"]  # no temp file left
    back = read_samples(tmp_path, "pose")
    np.testing.assert_array_equal(back["pred"], arrays["pred"])
    np.testing.assert_array_equal(back["true"], arrays["true"])
    assert back["action"].tolist() == ["walk", "run", "jump"]
    assert back["label"] == "pretrained full 100%" and isinstance(back["label"], str)


def test_future_samples_round_trip_with_optional_fields(tmp_path):
    arrays = future_arrays(2, seed_frames=10, horizon=50)
    write_samples(tmp_path, "future", **arrays, action=["walk", "run"], label="pose-gpt")
    back = read_samples(tmp_path, "future")
    assert back["seed"].shape == (2, 10, 17, 3) and back["pred"].shape == (2, 50, 17, 3)
    assert back["fps"] == 50.0 and isinstance(back["fps"], float)
    assert back["action"].tolist() == ["walk", "run"] and back["label"] == "pose-gpt"


def test_absent_samples_read_as_none(tmp_path):
    assert read_samples(tmp_path, "pose") is None


@pytest.mark.parametrize(("stage", "change", "message"), [
    ("pose", {"pred": np.zeros((3, 16, 3))}, r"'pred' must be \(N, 17, 3\)"),
    ("pose", {"true": np.zeros((2, 17, 3))}, "pred .* != true"),
    ("pose", {"action": np.array(["a", "b"])}, r"'action' must be \(3,\)"),
    ("pose", {"label": None}, "need 'label'"),
    ("future", {"fps": 0.0}, "'fps' > 0"),
    ("future", {"pred": np.zeros((2, 49, 17, 3))}, "disagree"),
    ("future", {"seed": None}, "need 'seed'"),
    ("nope", {}, "unknown samples stage"),
])  # fmt: skip
def test_contract_violations_are_one_line_errors(tmp_path, stage, change, message):
    arrays = pose_arrays(3) if stage == "pose" else future_arrays(2)
    arrays = {k: v for k, v in {**arrays, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        write_samples(tmp_path, stage, **arrays)
    assert not samples_path(tmp_path, stage).exists()


def test_a_file_breaking_the_contract_is_refused_on_reading(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, pred=np.zeros((2, 17, 3)))  # no 'true'
    samples_path(tmp_path, "pose").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="pose-samples.npz: pose samples need 'true'"):
        read_samples(tmp_path, "pose")
    buf = io.BytesIO()
    np.savez(buf, pred=np.array([{"a": 1}], dtype=object))  # would need pickle: never loaded
    samples_path(tmp_path, "pose").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="pose-samples.npz"):
        read_samples(tmp_path, "pose")
    samples_path(tmp_path, "pose").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a samples file"):
        read_samples(tmp_path, "pose")
