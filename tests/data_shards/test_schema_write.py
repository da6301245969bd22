import io
import json
import os
import tarfile

import numpy as np
import pytest
from conftest import make_sample

from data_shards import schema
from data_shards.manifest import Manifest, ManifestError
from data_shards.verify import verify
from data_shards.write import SplitWriter, WriterConfig, write_split

AREA = "Writing and verifying"  # of docs/reliability.md (tests/faultlog.py)


def test_encode_decode_round_trip():
    s = make_sample()
    raw = schema.encode_sample(s)
    raw = {k: (v if isinstance(v, bytes) else v) for k, v in raw.items()}
    d = schema.decode_sample(raw)
    assert np.abs(d.frames.astype(int) - s.frames).max() <= 8  # JPEG of smooth images
    assert (d.masks == s.masks).all()
    for name in ("pose3d", "pose2d", "K", "Rt"):
        assert np.array_equal(getattr(d, name), getattr(s, name).astype(getattr(d, name).dtype))
    assert d.meta == s.meta


def test_unknown_members_are_never_decoded():
    raw = schema.encode_sample(make_sample())
    raw["evil.pyd"] = b"\x80\x04not really a pickle"
    assert schema.decode_sample(raw).key == raw["__key__"]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.pop(schema.POSE3D), schema.POSE3D),
        (lambda r: r.__setitem__("v01.t002.jpg", b"garbage"), "v01.t002.jpg"),
        (lambda r: r.__setitem__(schema.META, b"{not json"), schema.META),
        (
            lambda r: r.__setitem__(schema.POSE3D, _npy(np.full((4, 17, 3), np.nan, np.float32))),
            schema.POSE3D,
        ),
        (
            lambda r: r.__setitem__(schema.POSE2D, _npy(np.zeros((2, 4, 16, 2), np.float32))),
            schema.POSE2D,
        ),
        (lambda r: r.__setitem__(schema.POSE3D, _npy(np.zeros((4, 17, 3)))), schema.POSE3D),
        (lambda r: r.__setitem__(schema.META, _meta_with(r, schema_version=99)), schema.META),
    ],
    ids=["missing", "bad-jpeg", "bad-json", "nan-pose", "wrong-shape", "wrong-dtype", "version"],
)
def test_bad_samples_raise_naming_the_field(mutate, field):
    raw = schema.encode_sample(make_sample())
    mutate(raw)
    with pytest.raises(schema.SampleError) as info:
        schema.decode_sample(raw)
    assert info.value.field == field and raw["__key__"] in str(info.value)


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _meta_with(raw, **changes):
    d = json.loads(raw[schema.META])
    d.update(changes)
    return json.dumps(d).encode()


def test_object_array_member_is_refused():
    raw = schema.encode_sample(make_sample())
    raw[schema.POSE3D] = _npy(np.array([{"a": 1}], dtype=object))
    with pytest.raises(schema.SampleError, match="not a plain .npy"):
        schema.decode_sample(raw)


def test_make_key_has_no_dots():
    assert schema.make_key("h36m", "S1", "Walking 1.54138969") == "h36m-S1-Walking_1_54138969"


def test_writer_rolls_shards_writes_manifest_and_is_deterministic(tmp_path):
    samples = [make_sample(key=f"k-{i:03d}", seed=i, action="ab"[i % 2]) for i in range(7)]
    m = write_split(tmp_path / "a", "train", samples, {"src": 1}, {}, WriterConfig(max_samples=3))
    assert [s.samples for s in m.shards] == [3, 3, 1]
    assert m.actions == {"a": 4, "b": 3} and m.samples == 7
    assert Manifest.load(tmp_path / "a" / "train") == m
    write_split(tmp_path / "b", "train", samples, {"src": 1}, {}, WriterConfig(max_samples=3))
    for s in m.shards:
        a = (tmp_path / "a" / "train" / s.name).read_bytes()
        assert a == (tmp_path / "b" / "train" / s.name).read_bytes()
    assert verify(tmp_path / "a", progress=False) == []


@pytest.mark.fault(
    AREA,
    "a split that already exists, written again without and with --overwrite",
    injected="write_split twice into the same folder",
)
def test_existing_split_is_kept_unless_overwrite(tmp_path, observed):
    write_split(tmp_path, "val", [make_sample()], {}, {})
    before = (tmp_path / "val" / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite") as err:
        write_split(tmp_path, "val", [make_sample(seed=5)], {}, {})
    assert (tmp_path / "val" / "manifest.json").read_text() == before
    observed(f"{type(err.value).__name__}: {err.value}")
    write_split(tmp_path, "val", [make_sample(seed=5)], {}, {}, WriterConfig(overwrite=True))
    assert (tmp_path / "val" / "manifest.json").read_text() != before
    replaced = (tmp_path / "val" / "manifest.json").read_text() != before
    observed(f"--overwrite: manifest replaced: {replaced}, files {sorted(os.listdir(tmp_path))}")


@pytest.mark.fault(
    AREA,
    "the sample source raises midway (renderer dies, Ctrl-C)",
    injected="a generator that yields one sample, then raises RuntimeError",
)
def test_failed_write_leaves_no_split(tmp_path, observed):
    def gen():
        yield make_sample()
        raise RuntimeError("renderer died")

    with pytest.raises(RuntimeError) as err:
        write_split(tmp_path, "train", gen(), {}, {})
    assert list(tmp_path.iterdir()) == []
    observed(f"{type(err.value).__name__}: {err.value}; files left: {os.listdir(tmp_path)}")


@pytest.mark.fault(
    AREA,
    "a sample of another layout (V, T, size, parts) than the split's first",
    injected="a 5-frame sample written after a 4-frame one",
)
def test_writer_rejects_mixed_layouts(tmp_path, observed):
    with SplitWriter(tmp_path, "train") as w:
        w.write(make_sample(frames=4))
        with pytest.raises(ValueError, match="layout") as err:
            w.write(make_sample(key="other", frames=5))
    observed(f"{type(err.value).__name__}: {err.value}")


def _damage(split_dir, how):
    shard = split_dir / "shard-000000.tar"
    data = shard.read_bytes()
    if how == "truncate-512":  # at a block boundary: tar and webdataset accept it silently
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        cut = members[len(members) // 2].offset
        shard.write_bytes(data[:cut])
    elif how == "flip":
        shard.write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])
    elif how == "stray":
        (split_dir / "shard-999999.tar").write_bytes(data)
    elif how == "missing":
        shard.unlink()
    elif how == "manifest":
        (split_dir / "manifest.json").write_text("{")


@pytest.mark.fault(
    AREA,
    "`shards verify` on a copy with a shard cut at a block, a flipped byte, a stray or missing "
    "shard, an unreadable manifest",
    injected="each done to a split of 4 samples in 2 shards",
)
@pytest.mark.parametrize("how", ["truncate-512", "flip", "stray", "missing", "manifest"])
def test_verify_fails_loudly_on_damage(tmp_path, how, observed):
    samples = [make_sample(key=f"k-{i}", seed=i) for i in range(4)]
    write_split(tmp_path, "train", samples, {}, {}, WriterConfig(max_samples=2))
    _damage(tmp_path / "train", how)
    problems = verify(tmp_path, progress=False)
    assert problems, how
    assert all(p.split == "train" for p in problems)
    observed(f"{len(problems)} problem(s): " + " / ".join(map(str, problems)))


def test_manifest_errors_are_clear(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        Manifest.load(tmp_path)
