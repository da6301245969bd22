"""Bad input: each fault is skipped with one warning naming shard
and key, counted, and costs nothing else; past the error budget the reader raises."""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from conftest import make_sample

from data_shards.read import ErrorBudgetExceeded, ReaderConfig, ShardReader
from data_shards.skeleton import NUM_JOINTS
from data_shards.write import WriterConfig, write_split

AREA = "Shards and the reader"  # of docs/reliability.md (tests/faultlog.py)
ALL = [f"k{i:04d}" for i in range(12)]
SHARD1 = "shard-000001.tar"  # holds k0004 .. k0007


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """12 samples in three shards of 4."""
    root = tmp_path_factory.mktemp("pristine")
    samples = [make_sample(key=k, seed=i, views=1, frames=2, size=(16, 16))
               for i, k in enumerate(ALL)]
    write_split(root, "train", samples, {}, {}, WriterConfig(max_samples=4))
    return root / "train"


@pytest.fixture
def split(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "train")


def rehash(split):
    """Make the manifest's hashes those of the files as they are now. The faults of most tests
    here are in samples a writer produced (a consistent manifest that lies only about the
    content), which is what reaches the per-sample checks; a file changed behind the manifest's
    back (bit rot) is refused whole, and has its own test."""
    from data_shards.manifest import Manifest, sha256_file

    m = Manifest.load(split)
    for info in m.shards:
        path = split / info.name
        if path.is_file():
            info.sha256, info.bytes = sha256_file(path), path.stat().st_size
    m.save(split)


def read_all(split, rehash_first=True, **kw):
    if rehash_first:
        rehash(split)
    kw = {"batch_size": 1, "shuffle": False, "drop_last": False, **kw}
    reader = ShardReader(ReaderConfig(str(split), **kw), 0, 1)
    return [k for b in reader for k in b["keys"]], reader


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("data_shards.")]


def members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_members(path, items):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_member(path, name, data):
    """Replace member ``name`` (None: remove it; a new name: add it after the sample's last)."""
    items = members(path)
    names = [n for n, _ in items]
    if name in names:
        i = names.index(name)
        items[i:i + 1] = [] if data is None else [(name, data)]
    else:
        key = name.split(".")[0]
        last = max(i for i, n in enumerate(names) if n.startswith(key + "."))
        items.insert(last + 1, (name, data))
    write_members(path, items)


def member_offsets(path):
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def meta_with(**changes):
    meta = json.loads(make_sample(key="k0005", seed=5, views=1, frames=2, size=(16, 16))
                      .meta.to_json())
    meta.update(changes)
    return json.dumps(meta).encode()


NAN_POSE = np.zeros((2, NUM_JOINTS, 3), np.float32)
NAN_POSE[1, 3, 0] = np.nan

BAD_SAMPLES = {
    "corrupt jpeg": ("k0005.v00.t001.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
    "truncated jpeg": ("k0005.v00.t000.jpg", "cut"),
    "missing member": ("k0005.pose3d.npy", None),
    "bad json": ("k0005.meta.json", b'{"source": "test", oops'),
    "nan pose": ("k0005.pose3d.npy", npy(NAN_POSE)),
    "wrong shape": ("k0005.pose3d.npy", npy(np.zeros((2, NUM_JOINTS, 2), np.float32))),
    "wrong dtype": ("k0005.pose2d.npy", npy(np.zeros((1, 2, NUM_JOINTS, 2), np.float64))),
    "schema version": ("k0005.meta.json", meta_with(schema_version=99)),
    "other layout": ("k0005.meta.json", meta_with(image_size=[8, 8])),
}


@pytest.mark.fault(AREA, "a corrupt or cut JPEG, a missing member, bad meta.json, NaN in pose3d, "
                   "wrong shape or dtype, another schema version or layout (a faulty writer)",
                   injected="one member of sample k0005 replaced, cut or removed; the manifest "
                   "rehashed to match")  # fmt: skip
@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_a_bad_sample_is_skipped_once_and_counted(split, caplog, case, observed):
    name, data = BAD_SAMPLES[case]
    if data == "cut":
        data = dict(members(split / SHARD1))[name][:200]
    edit_member(split / SHARD1, name, data)
    keys, reader = read_all(split)
    assert keys == [k for k in ALL if k != "k0005"]
    assert reader.errors["bad_samples"] == 1 and reader.errors["bad_shards"] == 0
    (line,) = warnings_of(caplog)
    assert SHARD1 in line and "k0005" in line
    observed(f"bad_samples={reader.errors['bad_samples']}, {len(keys)} of 12 delivered: {line}")


def cut_inside_member(path):
    _, data_at = member_offsets(path)["k0005.pose3d.npy"]
    return data_at + 10


def cut_at_header(path):
    """Offset of k0006's first header: a 512-byte boundary, where tar sees a complete file."""
    return min(at for name, (at, _) in member_offsets(path).items() if name.startswith("k0006."))


def garble_header(path):
    at = cut_at_header(path)
    with open(path, "r+b") as f:
        f.seek(at + 100)
        f.write(b"\x07" * 60)  # mode, uid, gid, size, mtime: the checksum no longer matches
    return None


@pytest.mark.fault(AREA, "a shard cut inside a member, cut at a 512-byte header boundary (tar and "
                   "webdataset accept that silently), or with a garbled tar header",
                   injected="os.truncate inside k0005's pose3d payload or at k0006's header, or "
                   "60 bytes of k0006's header overwritten; the manifest rehashed")  # fmt: skip
@pytest.mark.parametrize("fault,lost", [(cut_inside_member, 3), (cut_at_header, 2),
                                         (garble_header, 2)])
def test_a_broken_shard_loses_only_its_unreadable_rest(split, caplog, fault, lost, observed):
    path = split / SHARD1
    cut = fault(path)
    if cut is not None:
        os.truncate(path, cut)
    keys, reader = read_all(split)
    assert keys == ALL[:8 - lost] + ALL[8:]
    assert reader.errors["bad_shards"] == 1 and reader.errors["lost_samples"] == lost
    (line,) = warnings_of(caplog)
    assert SHARD1 in line and f"{lost} samples lost" in line
    observed(f"bad_shards={reader.errors['bad_shards']}, "
             f"lost_samples={reader.errors['lost_samples']}: {line}")  # fmt: skip


@pytest.mark.fault(AREA, "an empty shard, random bytes, or a missing shard file",
                   injected="the shard file emptied, replaced by 5000 random bytes, "
                   "or deleted")  # fmt: skip
@pytest.mark.parametrize("content", [b"", os.urandom(5000), None], ids=["empty", "random",
                                                                        "missing"])
def test_an_unreadable_shard_is_skipped(split, caplog, content, observed):
    if content is None:
        os.remove(split / SHARD1)
    else:
        (split / SHARD1).write_bytes(content)
    keys, reader = read_all(split)
    assert keys == ALL[:4] + ALL[8:]
    assert reader.errors["bad_shards"] == 1 and reader.errors["lost_samples"] == 4
    (line,) = warnings_of(caplog)
    assert SHARD1 in line
    observed(f"bad_shards={reader.errors['bad_shards']}, "
             f"lost_samples={reader.errors['lost_samples']}: {line}")  # fmt: skip


@pytest.mark.fault(AREA, "a few bits of one pose flipped behind the manifest's back (bit rot)",
                   injected="one byte of a pose3d.npy payload XORed with 0x40, the manifest "
                   "left as written")  # fmt: skip
def test_bit_rot_behind_the_manifest_loses_the_whole_shard_before_any_sample(split, caplog,
                                                                             observed):  # fmt: skip
    """A few bits of one pose flipped, the manifest untouched: the hash check refuses the shard
    before a sample of it is decoded (a flipped mantissa would give plausible wrong poses)."""
    data = bytearray((split / SHARD1).read_bytes())
    at = data.index(b"pose3d.npy")  # the member's header; its payload follows the next 512
    data[at + 600] ^= 0x40
    (split / SHARD1).write_bytes(bytes(data))
    keys, reader = read_all(split, rehash_first=False)
    assert keys == ALL[:4] + ALL[8:]
    assert reader.errors["bad_shards"] == 1 and reader.errors["lost_samples"] == 4
    (line,) = warnings_of(caplog)
    assert SHARD1 in line and "sha256 does not match the manifest" in line
    observed(f"bad_shards={reader.errors['bad_shards']}, "
             f"lost_samples={reader.errors['lost_samples']}: {line}")  # fmt: skip


@pytest.mark.fault(AREA, "a FIFO in place of a shard file (open() would block forever)",
                   injected="the shard file replaced by os.mkfifo")  # fmt: skip
def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(split, caplog, observed):
    os.remove(split / SHARD1)
    os.mkfifo(split / SHARD1)
    keys, reader = read_all(split, rehash_first=False)  # would block in open() forever
    assert keys == ALL[:4] + ALL[8:] and reader.errors["bad_shards"] == 1
    assert "not a regular file" in warnings_of(caplog)[0]
    observed(f"bad_shards={reader.errors['bad_shards']}: {warnings_of(caplog)[0]}")


@pytest.mark.fault(AREA, "a 1 MB shard with a GNU sparse member claiming 6 GB (tarfile would "
                   "allocate it)", injected="k0004.meta.json's header rewritten as GNU sparse "
                   "with a real size of 6 GiB, its checksum fixed")  # fmt: skip
def test_a_sparse_member_claiming_gigabytes_is_refused_without_reading_it(split, caplog,
                                                                         observed):  # fmt: skip
    """A GNU sparse member whose real size is 6 GB (a few bytes stored)."""
    from data_shards.tario import MAX_MEMBER_BYTES

    items = members(split / SHARD1)
    with tarfile.open(split / SHARD1, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in items:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    raw = bytearray((split / SHARD1).read_bytes())
    first = raw.index(b"k0004.meta.json")
    raw[first + 156] = ord("S")  # type flag: GNU sparse
    size = oct(6 * 1024**3)[2:].rjust(11, "0").encode() + b"\0"
    raw[first + 483 : first + 495] = size  # realsize field of the old GNU header
    chk = sum(raw[first : first + 148]) + 8 * 32 + sum(raw[first + 156 : first + 512])
    raw[first + 148 : first + 156] = oct(chk)[2:].rjust(6, "0").encode() + b"\0 "
    (split / SHARD1).write_bytes(bytes(raw))
    keys, reader = read_all(split)
    assert keys == ALL[:4] + ALL[8:] and reader.errors["bad_shards"] == 1
    line = warnings_of(caplog)[0]
    assert "k0004.meta.json" in line and ("sparse" in line or str(MAX_MEMBER_BYTES) in line)
    observed(f"bad_shards={reader.errors['bad_shards']}: {line}")


@pytest.mark.fault(AREA, "a .tar in the split's folder that the manifest does not list",
                   injected="a copy of shard 1 saved as shard-000099.tar")  # fmt: skip
def test_a_shard_not_in_the_manifest_is_never_read(split, caplog, observed):
    shutil.copy(split / SHARD1, split / "shard-000099.tar")
    keys, reader = read_all(split)
    assert keys == ALL and reader.errors["unlisted_shards"] == 1
    (line,) = warnings_of(caplog)
    assert "shard-000099.tar" in line
    observed(f"unlisted_shards={reader.errors['unlisted_shards']}, {len(keys)} of 12 delivered: "
             f"{line}")  # fmt: skip


@pytest.mark.fault(AREA, "a shard file swapped for another",
                   injected="shard 2 renamed over shard 1 (manifest unchanged)")  # fmt: skip
def test_a_shard_swapped_for_another_is_refused(split, caplog, observed):
    os.replace(split / "shard-000002.tar", split / SHARD1)
    keys, reader = read_all(split)
    assert keys == ALL[:4] and reader.errors["bad_shards"] == 2  # shard 2 is now missing too
    observed(f"bad_shards={reader.errors['bad_shards']}, delivered {keys[0]}..{keys[-1]}: "
             + " / ".join(warnings_of(caplog)))  # fmt: skip


class _Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling this creates the file
        return (open, (self.path, "w"))


@pytest.mark.fault(AREA, "a .pyd / .pickle / .pkl / .pth / .pt member whose unpickling creates a "
                   "marker file", injected="the member added to sample k0005; the payload first "
                   "shown to work with pickle.loads")  # fmt: skip
@pytest.mark.parametrize("ext", ["pyd", "pickle", "pkl", "pth", "pt"])
def test_pickle_members_are_never_unpickled(split, tmp_path, ext, observed):
    marker, probe = tmp_path / "marker", tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe))).close()  # the payload works ...
    assert probe.exists()
    edit_member(split / SHARD1, f"k0005.{ext}", pickle.dumps(_Marker(marker)))
    keys, reader = read_all(split, num_workers=0)
    assert keys == ALL and not marker.exists()  # ... but the reader never runs it
    observed(f".{ext}: {len(keys)} of 12 delivered, errors {sum(reader.errors.values())}, "
             f"marker created: {marker.exists()}")  # fmt: skip


@pytest.mark.fault(AREA, "a .npy member holding an object array (pickle inside)",
                   injected="k0005.pose3d.npy saved from an object array whose unpickling "
                   "creates a marker file")  # fmt: skip
def test_an_object_npy_is_rejected_unpickled(split, tmp_path, caplog, observed):
    marker, buf = tmp_path / "marker", io.BytesIO()
    np.save(buf, np.array([_Marker(marker)], dtype=object), allow_pickle=True)
    edit_member(split / SHARD1, "k0005.pose3d.npy", buf.getvalue())
    keys, reader = read_all(split)
    assert "k0005" not in keys and reader.errors["bad_samples"] == 1 and not marker.exists()
    observed(f"bad_samples={reader.errors['bad_samples']}, marker created: {marker.exists()}: "
             + " / ".join(warnings_of(caplog)))  # fmt: skip


@pytest.mark.fault(AREA, "more bad samples than the reader's error_budget",
                   injected="three meta.json members of shard 1 made invalid; read with "
                   "error_budget 3, then 2")  # fmt: skip
def test_past_the_error_budget_the_reader_raises(split, observed):
    for name in ("k0004.meta.json", "k0005.meta.json", "k0006.meta.json"):
        edit_member(split / SHARD1, name, b"{")
    keys, reader = read_all(split, error_budget=3)
    assert len(keys) == 9 and reader.errors["bad_samples"] == 3
    with pytest.raises(ErrorBudgetExceeded, match="error_budget=2") as err:
        read_all(split, error_budget=2)
    observed(f"budget 3: bad_samples={reader.errors['bad_samples']}, {len(keys)} delivered; "
             f"budget 2: {type(err.value).__name__}: {err.value}")  # fmt: skip


@pytest.mark.fault(AREA, "bad samples in two shards read by 2 loader workers, past the error "
                   "budget", injected="meta.json of k0001 and k0009 made invalid; 2 forked "
                   "workers, error_budget 1")  # fmt: skip
@pytest.mark.timeout(60)
def test_budget_and_counts_cross_worker_processes(split, observed):
    for name in ("k0001.meta.json", "k0009.meta.json"):
        shard = split / f"shard-00000{int(name[1:5]) // 4}.tar"
        edit_member(shard, name, b"{")
    keys, reader = read_all(split, num_workers=2, start_method="fork")
    assert sorted(keys) == [k for k in ALL if k not in ("k0001", "k0009")]
    assert reader.errors["bad_samples"] == 2
    with pytest.raises(ErrorBudgetExceeded) as err:
        read_all(split, num_workers=2, start_method="fork", error_budget=1)
    observed(f"2 workers: bad_samples={reader.errors['bad_samples']} counted across them; "
             f"budget 1: {type(err.value).__name__}: {err.value}")  # fmt: skip


@pytest.mark.fault(AREA, "bad input on one rank of two while training with drop_last",
                   injected="shard 1 cut at a header (2 samples lost) and one bad meta.json; 2 "
                   "ranks, batches of 2")  # fmt: skip
def test_equal_batches_per_rank_survive_bad_input(split, observed):
    os.truncate(split / SHARD1, cut_at_header(split / SHARD1))  # k0006, k0007 lost (rank 0)
    edit_member(split / "shard-000000.tar", "k0001.meta.json", b"{")
    rehash(split)
    out = []
    for rank in range(2):
        reader = ShardReader(ReaderConfig(str(split), batch_size=2, shuffle=False), rank, 2)
        out.append(list(reader))
    assert [len(b) for b in out] == [3, 3]
    assert all(len(b["keys"]) == 2 == b["pose3d"].shape[0] for b in out[0] + out[1])
    assert sum(b["padded"] for b in out[0]) == 1 and sum(b["padded"] for b in out[1]) == 2
    for batch in out[0] + out[1]:
        assert len(set(batch["keys"])) == 2  # repeats come from earlier batches
    observed(f"full batches per rank {[len(b) for b in out]}, padded samples per rank "
             f"{[sum(b['padded'] for b in o) for o in out]}")  # fmt: skip


@pytest.mark.fault(AREA, "a reader stopped mid-epoch after bad input, its state restored (0 and "
                   "2 workers, with and without drop_last padding)",
                   injected="state_dict after 3 and 5 batches of an epoch with a cut shard and a "
                   "bad sample, loaded by a new reader")  # fmt: skip
@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers,drop_last", [(0, False), (2, False), (0, True), (2, True)])
def test_resume_after_errors_counts_each_once(split, workers, drop_last, observed):
    os.truncate(split / SHARD1, cut_at_header(split / SHARD1))
    edit_member(split / "shard-000000.tar", "k0001.meta.json", b"{")
    rehash(split)
    cfg = ReaderConfig(str(split), batch_size=2, shuffle_buffer=3, num_workers=workers,
                       start_method="fork", drop_last=drop_last)
    full = ShardReader(cfg, 0, 1)
    whole = [(b["keys"], b["padded"]) for b in full]
    assert sum(p for _, p in whole) == (3 if drop_last else 0)
    for stop in (3, 5):
        first = ShardReader(cfg, 0, 1)
        head = [(b["keys"], b["padded"]) for b in itertools.islice(first, stop)]
        second = ShardReader(cfg, 0, 1)
        second.load_state_dict(first.state_dict())
        assert head + [(b["keys"], b["padded"]) for b in second] == whole
        assert second.errors == full.errors and full.errors["bad_samples"] == 1
    observed(f"{len(whole)} batches, {sum(p for _, p in whole)} padded; restored after 3 and 5 "
             f"batches: errors {({k: v for k, v in second.errors.items() if v})}")  # fmt: skip
