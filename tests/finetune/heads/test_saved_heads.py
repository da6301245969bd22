"""Saved heads under bad input: a pose head (``load_head``) and a Pose-GPT (``load_model``) whose
JSON or safetensors file is damaged or hostile. Every failure is one line naming the file (a
ValueError, which the command line reports in one line with exit code 2), and sizes are checked
before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune.heads.future as fut
from data_shards.skeleton import NUM_JOINTS
from finetune.heads.future import FutureConfig
from finetune.heads.future.config import MAX_FRAMES
from finetune.heads.pose import PoseHead, PoseRegressor, load_head
from finetune.heads.pose.model import save_head
from pretrain.export import MAX_JSON_BYTES, EncoderError

FPS = 50.0
AREA = "Evaluation"  # of docs/reliability.md (tests/faultlog.py)
POSE_GPT = (
    "a Pose-GPT's future_model.json damaged like a pose head's, layers 100000, width 2^20, "
    "max_frames 10^12, fps -1 or NaN; its weights damaged as a pose head's"
)


@pytest.fixture(scope="module")
def regressor() -> PoseRegressor:
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    torch.manual_seed(0)
    encoder = PoseBERT(debug_cpu().model)
    head = PoseHead(encoder.cfg.encoder.width)
    head.set_statistics(torch.randn(16, encoder.cfg.encoder.width), torch.randn(16, NUM_JOINTS, 3))
    return PoseRegressor(encoder, head, normalize=True)


@pytest.fixture
def head(tmp_path, regressor) -> Path:
    meta = {"row": {"encoder": "pretrained", "mode": "probe"}, "input_size": 32}
    return save_head(tmp_path / "heads" / "row", regressor, meta).with_suffix("")


@pytest.fixture
def gpt(tmp_path) -> Path:
    cfg = FutureConfig(steps=2, width=32, heads=4, layers=1, horizons_ms=(80, 160))
    torch.manual_seed(0)
    fut.save_model(fut.PoseGPT(cfg, 18, FPS), cfg, FPS, tmp_path)
    return tmp_path


def _edit_json(file: Path, edit) -> None:
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def _edit_weights(file: Path, edit) -> None:
    weights = load_file(str(file))
    edit(weights)
    save_file(weights, str(file))


def _poison(weights: dict, value: float) -> None:
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name].view(-1)[0] = value


def _write(file: Path, text: str | bytes) -> None:
    (file.write_bytes if isinstance(text, bytes) else file.write_text)(text)


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:3000])


# damage common to both files: (what is done to the JSON or the weights, which, expected text)
COMMON = {
    "json": (lambda f: _write(f, '{"config": '), "json", "not valid JSON"),
    "binary": (lambda f: _write(f, b"\xff\xfe\x00garbage"), "json", "not valid JSON"),
    "huge": (lambda f: _write(f, " " * (MAX_JSON_BYTES + 1)), "json", "more than the 1,048,576"),
    "deep": (lambda f: _write(f, "[" * 200_000 + "]" * 200_000), "json", "not valid JSON"),
    "nested": (lambda f: _write(f, "[" * 40 + "]" * 40), "json", "nested more than 32"),
    "list": (lambda f: _write(f, "[1, 2]"), "json", "JSON object"),
    "unknown": (lambda f: _edit_json(f, lambda m: m.update(extra=1)), "json",
                "extra: unknown field"),
    "unknown-forged": (lambda f: _edit_json(f, lambda m: m.update({"x\nERROR fake": 1})), "json",
                       "'x\\nERROR fake': unknown field"),
    "truncated": (_cut, "weights", "not a readable safetensors file"),
    "empty": (lambda f: _write(f, b""), "weights", "not a readable safetensors file"),
    "nan": (lambda f: _edit_weights(f, lambda w: _poison(w, float("nan"))), "weights",
            "holds 1 NaN or infinite values"),
    "inf": (lambda f: _edit_weights(f, lambda w: _poison(w, float("-inf"))), "weights",
            "holds 1 NaN or infinite values"),
    "missing": (lambda f: _edit_weights(f, lambda w: w.pop(sorted(w)[0])), "weights",
                "1 missing"),
    "mis-shaped": (lambda f: _edit_weights(f, lambda w: w.update({sorted(w)[0]: torch.zeros(3)})),
                   "weights", "1 mis-shaped"),
    "unexpected": (lambda f: _edit_weights(f, lambda w: w.update(extra=torch.zeros(3))),
                   "weights", "1 unexpected (extra)"),
}  # fmt: skip

HEAD = {
    **COMMON,
    "missing-field": (lambda f: _edit_json(f, lambda m: m.pop("dim")), "json", "no 'dim'"),
    "depth": (lambda f: _edit_json(f, lambda m: m["encoder"]["encoder"].update(depth=100000)),
              "json", "EncoderConfig.depth: invalid value 100000 (1..128)"),
    "width-x-depth": (lambda f: _edit_json(f, lambda m: m["encoder"]["encoder"].update(
        depth=128, width=8192, heads=8, conv_groups=8)), "json", "more than the"),
    "encoder-unknown": (lambda f: _edit_json(f, lambda m: m["encoder"].update(x=1)), "json",
                        "encoder.x: unknown field"),
    "dim": (lambda f: _edit_json(f, lambda m: m.update(dim=10**9)), "json",
            "dim is 1000000000, not the encoder's width 64"),
    "joints": (lambda f: _edit_json(f, lambda m: m.update(joints=10**9)), "json",
               f"joints is 1000000000, not {NUM_JOINTS}"),
    "normalize": (lambda f: _edit_json(f, lambda m: m.update(normalize="yes")), "json",
                  "normalize is 'yes', not true or false"),
    "input-size": (lambda f: _edit_json(f, lambda m: m.update(input_size=20000)), "json",
                   "input_size 20000 is not a side of 1..1024"),
    "input-size-text": (lambda f: _edit_json(f, lambda m: m.update(input_size="32")), "json",
                        "input_size '32'"),
    "std": (lambda f: _edit_weights(f, lambda w: w["head.std"].zero_()), "weights",
            "head.std holds 64 values <= 0"),
}  # fmt: skip

GPT = {
    **COMMON,
    "missing-field": (lambda f: _edit_json(f, lambda m: m.pop("fps")), "json", "no 'fps'"),
    "config-list": (lambda f: _edit_json(f, lambda m: m.update(config=[1])), "json",
                    "config is [1], not a mapping"),
    "layers": (lambda f: _edit_json(f, lambda m: m["config"].update(layers=100000)), "json",
               "config: FutureConfig.layers: invalid value 100000 (1..64)"),
    "width": (lambda f: _edit_json(f, lambda m: m["config"].update(width=2**20)), "json",
              "FutureConfig.width: invalid value 1048576 (1..8192"),
    "width-x-layers": (lambda f: _edit_json(f, lambda m: m["config"].update(
        layers=64, width=8192, heads=8)), "json", "more than the 2,147,483,648 allowed"),
    "config-unknown": (lambda f: _edit_json(f, lambda m: m["config"].update(x=1)), "json",
                       "config.x: unknown field"),
    "max-frames": (lambda f: _edit_json(f, lambda m: m.update(max_frames=10**12)), "json",
                   f"max_frames 1000000000000 is not 11..{MAX_FRAMES}"),
    "max-frames-short": (lambda f: _edit_json(f, lambda m: m.update(max_frames=10)), "json",
                         "max_frames 10 is not 11.."),
    "max-frames-bool": (lambda f: _edit_json(f, lambda m: m.update(max_frames=True)), "json",
                        "max_frames True"),
    "fps": (lambda f: _edit_json(f, lambda m: m.update(fps=-1)), "json", "fps -1 is not"),
    "fps-nan": (lambda f: _write(f, f.read_text().replace('"fps": 50.0', '"fps": NaN')), "json",
                "fps nan is not a positive number"),
}  # fmt: skip


def _check(load, files: dict[str, Path], damage, which: str, needle: str) -> str:
    """Load, damage, load again: the error (returned) is one line naming the file."""
    load()  # intact: loads
    damage(files[which])
    with pytest.raises(EncoderError) as err:
        load()
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # the command line's one line, exit code 2
    assert message.startswith(f"{files[which]}: ") and needle in message, message
    assert "\n" not in message and len(message) < 400
    return f"{type(err.value).__name__}: {message}"


@pytest.mark.fault(
    AREA,
    "a pose head's .json invalid, binary, over 1 MiB, 200k deep, a list, unknown or missing "
    "fields, sizes of 10^9; its .safetensors cut, empty, NaN, -inf, a tensor missing, mis-shaped "
    "or unexpected, head.std all 0",
    injected="the saved head's file damaged one way per case (26 kinds)",
)  # fmt: skip
@pytest.mark.parametrize("name", HEAD)
def test_a_damaged_pose_head_is_one_line_naming_the_file(head, name, observed):
    damage, which, needle = HEAD[name]
    files = {"json": head.with_suffix(".json"), "weights": head.with_suffix(".safetensors")}
    observed(_check(lambda: load_head(head), files, damage, which, needle))


@pytest.mark.fault(AREA, POSE_GPT, injected="the saved model's file damaged one way per case")
@pytest.mark.parametrize("name", GPT)
def test_a_damaged_pose_gpt_is_one_line_naming_the_file(gpt, name, observed):
    damage, which, needle = GPT[name]
    files = {"json": gpt / fut.CONFIG, "weights": gpt / fut.WEIGHTS}
    observed(_check(lambda: fut.load_model(gpt), files, damage, which, needle))


def test_intact_files_load_back_the_same_model(head, regressor, gpt):
    predictor = load_head(head)
    frames = torch.randint(0, 255, (1, 2, 8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(predictor.model(frames, None), regressor.eval()(frames, None))
    model = fut.load_model(gpt)
    assert model.max_frames == 18 and model.fps == FPS and not model.training
    with pytest.raises(FileNotFoundError, match="not a saved Pose-GPT"):
        fut.load_model(gpt / "nope")


@pytest.mark.fault(AREA, "a backbone weights path written into a saved pose head's .json",
                   injected="encoder.backbone.weights set to a path beside the head")  # fmt: skip
def test_a_backbone_weights_path_in_a_pose_head_is_not_read(head, tmp_path, observed):
    """The saved weights hold the backbone: a path written into the JSON is never opened."""
    marker = tmp_path / "elsewhere.safetensors"
    _edit_json(head.with_suffix(".json"),
               lambda m: m["encoder"]["backbone"].update(weights=str(marker)))  # fmt: skip
    assert load_head(head).model.encoder.cfg.backbone.weights is None
    observed(f"loaded; backbone weights path {load_head(head).model.encoder.cfg.backbone.weights}, "
             f"file created: {marker.exists()}")  # fmt: skip


@pytest.mark.fault(AREA, POSE_GPT, injected="a PoseGPT built for MAX_FRAMES + 1 positions at "
                   "1000 fps")  # fmt: skip
def test_pose_gpt_positions_are_bounded_when_built(observed):
    """A horizon long enough at a high frame rate fails naming the bound, not in an allocation."""
    with pytest.raises(ValueError, match=f"not 1..{MAX_FRAMES}") as err:
        fut.PoseGPT(FutureConfig(width=32, layers=1), MAX_FRAMES + 1, 1000.0)
    observed(f"{type(err.value).__name__}: {err.value}")
