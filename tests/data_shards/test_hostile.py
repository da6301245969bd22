"""Faults and hostile input (issue 16): every bad shard, manifest or argument ends in one line
naming the file and the problem; nothing is unpickled, decoded or allocated on a header's word;
nothing already written is lost and nothing is left half-written."""

from __future__ import annotations

import argparse
import builtins
import errno
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import make_sample
from PIL import JpegImagePlugin
from test_bad_input import members, read_all, rehash, warnings_of, write_members

from data_shards.cli import cmd_verify
from data_shards.manifest import Manifest, ManifestError, atomic_write_bytes
from data_shards.verify import verify
from data_shards.write import SplitWriter, WriterConfig, write_split

KEYS = [f"k{i:04d}" for i in range(6)]  # two per shard: shard-00000{i // 2}.tar
READER, WRITING = "Shards and the reader", "Writing and verifying"  # docs/reliability.md areas
MANIFEST = (
    'a manifest with samples "15", a negative count or size, NUL in a name, an unknown '
    "field, a bad sha256, actions that do not add up, nesting 100k deep"
)
MEMBERS = ".pyd / .pickle members, members not declared by meta.json, a key repeated in the split"


def shard_of(key: str) -> str:
    return f"shard-{int(key[1:5]) // 2:06d}.tar"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    samples = [make_sample(key=k, seed=i, views=1, frames=2, size=(16, 16))
               for i, k in enumerate(KEYS)]  # fmt: skip
    write_split(root, "train", samples, {}, {}, WriterConfig(max_samples=2))
    return root / "train"


@pytest.fixture
def split(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "train")


def set_member(split, name, data):
    """Replace (or add, after its sample's last member) member ``name`` of its shard."""
    path = split / shard_of(name)
    items = members(path)
    names = [n for n, _ in items]
    if name in names:
        items[names.index(name)] = (name, data)
    else:
        key = name.split(".")[0]
        last = max(i for i, n in enumerate(names) if n.startswith(key + "."))
        items.insert(last + 1, (name, data))
    write_members(path, items)


def member(split, name):
    return dict(members(split / shard_of(name)))[name]


def meta_of(split, key, **changes):
    meta = json.loads(member(split, f"{key}.meta.json"))
    meta.update(changes)
    return json.dumps(meta).encode()


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF) claims another size."""
    b, i = bytearray(jpeg), 2
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(b[i + 2 : i + 4], "big")
    b[i + 5 : i + 7], b[i + 7 : i + 9] = height.to_bytes(2, "big"), width.to_bytes(2, "big")
    return bytes(b)


def npy_claiming(shape, dtype="<f4") -> bytes:
    """A .npy header claiming ``shape`` with no data behind it."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling this creates the file
        return (open, (self.path, "w"))


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Sizes of the JPEGs decoded; a decode of anything but a 16 x 16 frame fails the test
    (instead of allocating half a gigabyte)."""
    sizes, load = [], JpegImagePlugin.JpegImageFile.load

    def spy(self):
        sizes.append(self.size)
        if self.size != (16, 16):
            raise AssertionError(f"decoded a {self.size} JPEG")
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    return sizes


# ------------------------------------------------------------------ verify goes on to the end

FAULTS = {
    "k0000": ("v00.t000.jpg", "huge image"),  # 60000 x 60000: PIL's DecompressionBombError
    "k0001": ("pose3d.npy", "header claims shape"),  # 64 TiB: MemoryError in np.load
    "k0002": ("meta.json", "nested too deeply"),  # 200k deep: RecursionError in json
    "k0003": ("meta.json", "has must map parts"),  # a list: AttributeError
    "k0004": ("meta.json", "image_size must be"),  # negative: ValueError from np.empty
}


@pytest.mark.fault(WRITING, "`shards verify` on a shard with a 60000x60000 JPEG, a 64 TiB .npy, "
                   "200k-deep meta.json, `has` a list, a negative image_size",
                   injected="each written into one sample's member, the manifest "
                   "rehashed")  # fmt: skip
def test_verify_reports_every_problem_one_line_each_and_goes_on(split, capsys, decoded_sizes,
                                                                observed):  # fmt: skip
    jpeg = member(split, "k0000.v00.t000.jpg")
    set_member(split, "k0000.v00.t000.jpg", with_jpeg_size(jpeg, 60000, 60000))
    set_member(split, "k0001.pose3d.npy", npy_claiming((1 << 40, 16)))
    set_member(split, "k0002.meta.json", b"[" * 200_000 + b"]" * 200_000)
    set_member(split, "k0003.meta.json", meta_of(split, "k0003", has=["frames"]))
    set_member(split, "k0004.meta.json", meta_of(split, "k0004", image_size=[-16, 16]))
    rehash(split)
    problems = verify(split, progress=False)
    assert sorted(p.key for p in problems) == sorted(FAULTS)  # k0005 is fine, nothing else
    for p in problems:
        field, needle = FAULTS[p.key]
        assert p.shard == shard_of(p.key) and p.what.startswith(f"{field}: ")
        assert needle in p.what and "\n" not in str(p)
    assert all(size == (16, 16) for size in decoded_sizes)
    code = cmd_verify(argparse.Namespace(root=str(split), no_decode=False))
    assert code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(FAULTS) + 1 and lines[-1].startswith("verify: 5 problem(s)")
    for key in FAULTS:
        assert sum(f"train/{shard_of(key)} key {key}: " in line for line in lines) == 1
    observed(f"exit {code}, {len(lines)} lines, last: {lines[-1]}")
    for line in lines[:-1]:
        observed(line)


@pytest.mark.fault(WRITING, "a flipped bit in a shard's end-of-archive padding (every sample "
                   "still decodes)", injected="one bit of the shard's last 100 bytes flipped; a "
                   "second read of a file to hash it fails the test")  # fmt: skip
def test_verify_hashes_each_shard_in_the_same_read_as_its_samples(split, monkeypatch, observed):
    import data_shards.verify as verify_module

    def second_read(path):
        raise AssertionError(f"{path} read a second time to hash it")

    monkeypatch.setattr(verify_module, "sha256_file", second_read)
    assert verify(split, progress=False) == []
    data = bytearray((split / shard_of("k0002")).read_bytes())
    data[-100] ^= 1  # in the end-of-archive padding: every sample still decodes
    (split / shard_of("k0002")).write_bytes(bytes(data))
    (p,) = verify(split, progress=False)
    assert (p.shard, p.what) == (shard_of("k0002"), "sha256 differs from the manifest")
    observed(f"verify: {p}")


# ------------------------------------------------------------- frame size from the JPEG header


@pytest.mark.fault(READER, "a frame whose JPEG header claims 13000x13000 (PIL's decompression "
                   "bomb check is at 60000x60000)", injected="the SOF header of k0003's frame "
                   "rewritten; decoding any frame but 16x16 fails the test")  # fmt: skip
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Image.open's, true
def test_an_oversized_frame_is_refused_from_its_header_never_decoded(split, caplog,
                                                                     decoded_sizes,
                                                                     observed):  # fmt: skip
    jpeg = member(split, "k0003.v00.t001.jpg")
    set_member(split, "k0003.v00.t001.jpg", with_jpeg_size(jpeg, 13000, 13000))
    rehash(split)
    (p,) = verify(split, progress=False)
    assert (p.shard, p.key) == (shard_of("k0003"), "k0003")
    assert p.what.startswith("v00.t001.jpg: size 13000x13000, expected 16x16")
    keys, reader = read_all(split, rehash_first=False)
    assert keys == [k for k in KEYS if k != "k0003"] and reader.errors["bad_samples"] == 1
    (line,) = warnings_of(caplog)
    assert "k0003" in line and "13000x13000" in line
    assert decoded_sizes and all(size == (16, 16) for size in decoded_sizes)
    observed(f"reader: bad_samples={reader.errors['bad_samples']}: {line}")
    observed(f"verify: {p}; sizes decoded: {sorted(set(decoded_sizes))}")


# ------------------------------------------------- members no reader reads, keys seen twice


@pytest.mark.fault(WRITING, MEMBERS, injected="a pickle .pyd and .pickle member, an undeclared "
                   "det2d.npy, sample k0000 copied into the last shard; the manifest "
                   "rehashed")  # fmt: skip
def test_verify_names_unknown_and_undeclared_members_and_repeated_keys(split, tmp_path,
                                                                        observed):  # fmt: skip
    marker = tmp_path / "marker"
    set_member(split, "k0001.pyd", pickle.dumps(_Marker(marker)))
    set_member(split, "k0002.pickle", pickle.dumps(_Marker(marker)))
    set_member(split, "k0003.det2d.npy", member(split, "k0003.pose3d.npy"))  # has.det2d: false
    again = [(n, d) for n, d in members(split / shard_of("k0000")) if n.startswith("k0000.")]
    write_members(split / shard_of("k0005"), members(split / shard_of("k0005")) + again)
    rehash(split)
    found = {(p.shard, p.key, p.what.split(":")[0]) for p in verify(split, progress=False)}
    assert (shard_of("k0001"), "k0001", "member .pyd") in found
    assert (shard_of("k0002"), "k0002", "member .pickle") in found
    assert (shard_of("k0003"), "k0003", "member .det2d.npy") in found
    assert (shard_of("k0005"), "k0000", f"key repeated (also in {shard_of('k0000')})") in found
    assert (shard_of("k0005"), "", "3 samples, manifest says 2") in found
    assert len(found) == 5 and not marker.exists()
    listed = "; ".join(f"{shard} {key}: {what}" for shard, key, what in sorted(found))
    observed(f"verify: {len(found)} problems, marker created: {marker.exists()}: {listed}")


@pytest.mark.fault(WRITING, MEMBERS, injected="write_split given the same sample twice")
def test_the_writer_refuses_a_repeated_key_and_leaves_nothing(tmp_path, observed):
    sample = make_sample(key="same", views=1, frames=2, size=(16, 16))
    with pytest.raises(ValueError, match="'same' written twice") as err:
        write_split(tmp_path, "train", [sample, sample], {}, {})
    assert list(tmp_path.iterdir()) == []
    observed(f"writer: {err.value}; files left: {len(list(tmp_path.iterdir()))}")


@pytest.mark.fault(READER, "a pickle payload under a schema name (pose3d.npy, meta.json, .jpg) or "
                   "as .pyd / .pth", injected="the member of k0003 replaced or added: a pickle "
                   "whose unpickling creates a marker file; the manifest rehashed")  # fmt: skip
@pytest.mark.parametrize("name", ["k0003.pose3d.npy", "k0003.meta.json", "k0003.v00.t000.jpg",
                                  "k0003.pyd", "k0003.pth"])  # fmt: skip
def test_the_reader_never_unpickles_whatever_member_holds_the_pickle(split, tmp_path, name,
                                                                      observed):  # fmt: skip
    marker, probe = tmp_path / "marker", tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe))).close()  # the payload works ...
    assert probe.exists()
    set_member(split, name, pickle.dumps(_Marker(marker)))
    keys, reader = read_all(split)
    assert not marker.exists()  # ... but nothing runs it
    schema_member = not name.endswith((".pyd", ".pth"))
    assert ("k0003" in keys) != schema_member and reader.errors["bad_samples"] == schema_member
    problems = verify(split, progress=False)
    assert not marker.exists()
    observed(f"{name}: k0003 delivered: {'k0003' in keys}, bad_samples="
             f"{reader.errors['bad_samples']}, verify problems {len(problems)}, marker created: "
             f"{marker.exists()}")  # fmt: skip


# ---------------------------------------------------------------------------- manifests


def _edit(d, path, value):
    *head, last = path
    for step in head:
        d = d[step]
    d[last] = value


MANIFEST_FAULTS = {
    "samples as text": (("shards", 0, "samples"), "15", "shards[0].samples"),
    "negative count": (("shards", 1, "samples"), -2, "shards[1].samples"),
    "negative bytes": (("shards", 1, "bytes"), -1, "shards[1].bytes"),
    "NUL in a name": (("shards", 2, "name"), "shard-\x00.tar", "shards[2].name"),
    "hidden name": (("shards", 2, "name"), "../train/x.tar", "shards[2].name"),
    "bad sha256": (("shards", 0, "sha256"), "abc", "shards[0].sha256"),
    "actions off": (("shards", 0, "actions"), {"walk": 5}, "shards[0].actions"),
    "total off": (("samples",), 7, "samples"),
    "views zero": (("views",), 0, "views"),
    "size negative": (("image_size",), [16, -16], "image_size"),
    "size huge": (("image_size",), [16, 60000], "image_size"),
    "fps text": (("fps",), "fast", "fps"),
    "has list": (("has",), ["frames"], "has"),
    "unknown field": (("evil",), 1, "'evil'"),
    "source deep": (("source",), json.loads("[" * 100 + "]" * 100), "source"),
}


@pytest.mark.fault(WRITING, MANIFEST, injected="one field of manifest.json edited (15 kinds)")
@pytest.mark.parametrize("case", list(MANIFEST_FAULTS))
def test_a_bad_manifest_field_is_one_line_naming_file_and_field(split, case, observed):
    path, value, field = MANIFEST_FAULTS[case]
    d = json.loads((split / "manifest.json").read_text())
    _edit(d, path, value)
    (split / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as info:
        Manifest.load(split)
    message = str(info.value)
    assert message.startswith(f"{split / 'manifest.json'}: {field}")
    assert "\n" not in message and "\x00" not in message
    (p,) = verify(split, progress=False)  # verify reports it as one problem
    assert p.shard == "manifest.json" and field in p.what
    observed(f"{type(info.value).__name__}: {message}")


@pytest.mark.fault(WRITING, MANIFEST, injected="the manifest's source replaced by 100k nested "
                   "lists")  # fmt: skip
def test_a_manifest_nested_100k_deep_is_one_line(split, observed):
    text = (split / "manifest.json").read_text()
    deep = "[" * 100_000 + "]" * 100_000
    (split / "manifest.json").write_text(text.replace('"source": {}', f'"source": {deep}'))
    with pytest.raises(ManifestError, match=r"manifest.json: unreadable manifest \(nested") as e:
        Manifest.load(split)
    observed(f"{type(e.value).__name__}: {e.value}")


@pytest.mark.fault(READER, "a manifest count below the shard's real count (hashes intact)",
                   injected="shard 1 listed with 1 sample instead of 2, the totals "
                   "adjusted")  # fmt: skip
def test_a_manifest_count_below_the_shards_is_an_error_not_obeyed(split, caplog, observed):
    d = json.loads((split / "manifest.json").read_text())
    d["shards"][1]["samples"], d["shards"][1]["actions"] = 1, {"walk": 1}
    d["samples"] = 5
    (split / "manifest.json").write_text(json.dumps(d))  # the hashes still match the files
    keys, reader = read_all(split, rehash_first=False)
    assert keys == [k for k in KEYS if k != "k0003"]
    assert reader.errors["bad_shards"] == 1 and reader.errors["lost_samples"] == 0
    (line,) = warnings_of(caplog)
    assert shard_of("k0003") in line and "more samples than the manifest's 1" in line
    (p,) = verify(split, progress=False)
    assert (p.shard, p.what) == (shard_of("k0003"), "2 samples, manifest says 1")
    observed(f"reader: bad_shards={reader.errors['bad_shards']}, {len(keys)} of 6 delivered: "
             f"{line}; verify: {p}")  # fmt: skip


# ----------------------------------------------------------------------- synth and writers


@pytest.mark.fault(WRITING, "`shards synth --frames 200` (longer than the clips)",
                   injected="build_splits with 200-frame windows of clips of 64 and 40 "
                   "frames")  # fmt: skip
def test_synth_windows_longer_than_a_clip_are_one_line_and_leave_nothing(tmp_path, observed):
    from data_shards.synth import SynthConfig, build_splits

    out = tmp_path / "out"
    config = SynthConfig(views=1, frames=200, size=16)
    with pytest.raises(ValueError) as info:
        build_splits(out, config, splits={"train": ("walk", "spin"), "val": ("run",)},
                     progress=False)  # fmt: skip
    message = str(info.value)
    assert "window of 200 frames" in message and "walk (64), run (40)" in message
    assert "spin" not in message and "--frames 40 or less" in message and "\n" not in message
    assert not out.exists()
    observed(f"{type(info.value).__name__}: {message}; output created: {out.exists()}")


@pytest.mark.fault(WRITING, "a split with no samples", injected="write_split given no sample")
def test_a_split_without_samples_is_one_error_and_leaves_nothing(tmp_path, observed):
    with pytest.raises(ValueError, match="'val': no samples were written") as err:
        write_split(tmp_path, "val", iter(()), {}, {})
    assert list(tmp_path.iterdir()) == []
    observed(f"{err.value}; files left: {len(list(tmp_path.iterdir()))}")


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: the first write past it fails with ENOSPC,
    later ones (a close flushing again) with a second, distinguishable ENOSPC."""

    def __init__(self, path, room: int):
        self.f, self.room, self.failures = io.FileIO(path, "wb"), room, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            self.failures += 1
            again = " (again)" if self.failures > 1 else ""
            raise OSError(errno.ENOSPC, f"No space left on device{again}")
        self.room -= len(data)
        return self.f.write(data)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def fill_disk(monkeypatch, room: int, names: str) -> None:
    """Files whose name ends with ``names``, opened for writing, live on a full disk (whoever
    opens them: this module, webdataset)."""
    real_open = builtins.open

    def opener(path, mode="r", *args, **kwargs):
        if mode == "wb" and str(path).endswith(names):
            return io.BufferedWriter(_FullDisk(path, room))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opener)


@pytest.mark.fault(WRITING, "a full disk (ENOSPC) in atomic_write_bytes",
                   injected="the temp file opened on a file object with 10 bytes of "
                   "room")  # fmt: skip
def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_the_first_error(
    tmp_path, monkeypatch, observed
):
    target = tmp_path / "result.json"
    target.write_text("old")
    fill_disk(monkeypatch, room=10, names=".tmp" + str(os.getpid()))
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 100)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and "again" not in str(info.value)
    assert str(target) in str(info.value)
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    observed(f"OSError: {info.value}; target holds {target.read_text()!r}, files "
             f"{[p.name for p in tmp_path.iterdir()]}")  # fmt: skip


@pytest.mark.fault(WRITING, "a full disk (ENOSPC) while writing a shard or the manifest of a split "
                   "that replaces an existing one", injected="the .tar or the manifest's temp "
                   "file opened on a file object with 0 or 15,000 bytes of room")  # fmt: skip
@pytest.mark.parametrize("where,room", [("shard", 0), ("shard", 15_000), ("manifest", 0)])
def test_a_split_written_on_a_full_disk_leaves_no_temp_dir_and_keeps_the_old_split(
    tmp_path, monkeypatch, where, room, observed
):
    samples = [make_sample(key=k, seed=i, views=1, frames=2, size=(16, 16))
               for i, k in enumerate(KEYS)]  # fmt: skip
    old = write_split(tmp_path, "train", samples[:2], {}, {})
    fill_disk(monkeypatch, room, ".tar" if where == "shard" else f".tmp{os.getpid()}")
    with pytest.raises(OSError) as info:
        write_split(tmp_path, "train", samples, {}, {}, WriterConfig(max_samples=2,
                                                                     overwrite=True))  # fmt: skip
    assert info.value.errno == errno.ENOSPC and "again" not in str(info.value)
    name = "manifest.json" if where == "manifest" else ".tar"
    assert name in str(info.value)  # the file that could not be written
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["train"]  # no .train.tmpPID
    assert Manifest.load(tmp_path / "train") == old and verify(tmp_path, progress=False) == []
    observed(f"OSError: {info.value}; left: {[p.name for p in tmp_path.iterdir()]}, old split "
             f"{Manifest.load(tmp_path / 'train').samples} samples")  # fmt: skip


@pytest.mark.fault(WRITING, "a SplitWriter left without close()",
                   injected="one sample written, the with block left without close")  # fmt: skip
def test_a_writer_left_without_close_leaves_nothing(tmp_path, observed):
    with SplitWriter(tmp_path, "train") as w:
        w.write(make_sample(views=1, frames=2, size=(16, 16)))
    assert list(tmp_path.iterdir()) == []
    observed(f"files left: {len(list(tmp_path.iterdir()))}")
