"""Streaming reader: round trip, determinism, splitting over ranks x workers, exact resume."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import make_sample

from data_shards.read import (
    Plan,
    ReaderConfig,
    ReaderError,
    ShardReader,
    dist_from_env,
    measure_read_throughput,
)
from data_shards.transforms import SelectViews, TemporalCrop
from data_shards.write import WriterConfig, write_split


def write(root, n=30, per_shard=7, split="train", edit=None, **kw):
    samples = [make_sample(key=f"k{i:04d}", seed=i, **kw) for i in range(n)]
    for s in samples:
        if edit:
            edit(s)
    write_split(root, split, samples, source={"test": True}, generator={},
                config=WriterConfig(max_samples=per_shard))
    return root / split, samples


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """30 samples in shards of 7, 7, 7, 7, 2."""
    d, _ = write(tmp_path_factory.mktemp("shards"), views=2, frames=2, size=(16, 16))
    return d


def read(split, rank=0, world_size=1, **kw):
    reader = ShardReader(ReaderConfig(str(split), **kw), rank, world_size)
    return [b["keys"] for b in reader], reader


def flat(batches):
    return [k for b in batches for k in b]


ALL = [f"k{i:04d}" for i in range(30)]
AREA = "Shards and the reader"  # of docs/reliability.md (tests/faultlog.py)
RANKS = "2 ranks x {0, 2} loader workers, fork or spawn, RANK wrong or unset in the environment"


@pytest.mark.fault(AREA, "`pipe:` or another URL given as a split (webdataset would run it as a "
                   "command)", injected="ReaderConfig('pipe:touch marker')")  # fmt: skip
def test_config_is_validated(observed):
    with pytest.raises(ValueError, match="URL") as err:
        ReaderConfig("pipe:touch marker")
    observed(f"{type(err.value).__name__}: {err.value}")
    with pytest.raises(ValueError, match="batch_size"):
        ReaderConfig("x", batch_size=0)
    with pytest.raises(ValueError, match="frames"):
        ReaderConfig("x", frames="png")
    assert ReaderConfig("x").splits == ("x",)


def test_round_trip_equals_source(tmp_path):
    d, samples = write(tmp_path, n=5, per_shard=2, views=2, frames=3, size=(32, 24))
    reader = ShardReader(ReaderConfig(str(d), batch_size=2, shuffle=False, drop_last=False), 0, 1)
    batches = list(reader)
    assert [len(b["keys"]) for b in batches] == [2, 2, 1]
    got = {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    for s in samples:
        b, i = got[s.key]
        assert b["frames"].dtype == torch.uint8 and b["frames"].shape[1:] == (2, 3, 3, 24, 32)
        frames = b["frames"][i].permute(0, 1, 3, 4, 2).numpy().astype(int)  # (V, T, H, W, 3)
        assert np.abs(frames - s.frames).max() <= 8  # JPEG of smooth images
        assert b["masks"].dtype == torch.bool and np.array_equal(b["masks"][i].numpy(), s.masks)
        assert np.array_equal(b["pose3d"][i].numpy(), s.pose3d)
        assert np.array_equal(b["pose2d"][i].numpy(), s.pose2d)
        assert np.array_equal(b["K"][i].numpy(), s.K)
        assert np.array_equal(b["Rt"][i].numpy(), s.Rt.astype(np.float32))
        assert b["meta"][i] == s.meta
    assert reader.errors["bad_samples"] == 0 and reader.epoch == 1


def test_parts_absent_from_the_split_are_absent_from_the_batch(tmp_path):
    def strip(s):
        s.meta.has.update(masks=False, cameras=False)
        s.masks = s.K = s.Rt = None

    d, _ = write(tmp_path, n=4, per_shard=4, edit=strip)
    b = next(iter(ShardReader(ReaderConfig(str(d), batch_size=2, float_dtype="float64"), 0, 1)))
    assert {"frames", "pose3d", "pose2d"} <= set(b) and not {"masks", "K", "Rt"} & set(b)
    assert b["pose3d"].dtype == torch.float64


def test_frame_and_mask_options(split):
    b = next(iter(ShardReader(ReaderConfig(str(split), frames="jpeg", masks=False), 0, 1)))
    assert "frames" not in b and "masks" not in b
    assert len(b["jpegs"]) == 8 and b["jpegs"][0][1][0][:2] == b"\xff\xd8"  # [b][v][t]
    b = next(iter(ShardReader(ReaderConfig(str(split), frames="off"), 0, 1)))
    assert "frames" not in b and "jpegs" not in b and "pose3d" in b


def test_order_is_a_function_of_seed_and_epoch(split):
    kw = dict(batch_size=4, shuffle_buffer=6)
    a, reader = read(split, **kw)
    b, _ = read(split, **kw)
    assert a == b and sorted(flat(a)) != flat(a)
    e1 = [x["keys"] for x in reader]  # the reader moved on to epoch 1 by itself
    assert reader.epoch == 2 and e1 != a and len(set(flat(e1))) == len(flat(a)) == 28
    other, _ = read(split, seed=1, **kw)
    assert other != a
    plain, _ = read(split, shuffle=False, drop_last=False, batch_size=4)
    assert flat(plain) == ALL


def read_ranks(split, world_size, **kw):
    """Every rank's batches and reader (one after the other: forking from threads is unsafe)."""
    return [read(split, rank, world_size, **kw) for rank in range(world_size)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "workers,method,env,drop_last",
    [(0, None, "unset", True), (0, None, "unset", False), (2, "fork", "decoy", True),
     (2, "fork", "unset", False)],
)
@pytest.mark.fault(AREA, RANKS, injected="ranks 0 and 1 of 2 read 30 samples with RANK and "
                   "WORLD_SIZE unset, or set to a decoy 0 of 1")  # fmt: skip
def test_ranks_and_workers_read_each_sample_once(split, monkeypatch, workers, method, env,
                                                  drop_last, observed):  # fmt: skip
    if env == "decoy":  # workers that looked at the environment would all read rank 0's part
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
    else:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    results = read_ranks(split, 2, batch_size=4, num_workers=workers, start_method=method,
                         drop_last=drop_last)
    per_rank = [batches for batches, _ in results]
    assert [len(b) for b in per_rank] == [len(reader) for _, reader in results]
    keys = [flat(b) for b in per_rank]
    assert not set(keys[0]) & set(keys[1])
    assert sum(map(len, keys)) == len(set(keys[0]) | set(keys[1]))
    if drop_last:  # 15 per rank -> 3 full batches of 4; 6 of 30 samples dropped
        assert [len(b) for b in per_rank] == [3, 3]
        assert all(len(x) == 4 for x in itertools.chain(*per_rank))
    else:
        assert sorted(keys[0] + keys[1]) == ALL
    observed(f"batches per rank {[len(b) for b in per_rank]}, samples {len(keys[0])} + "
             f"{len(keys[1])}, in both {len(set(keys[0]) & set(keys[1]))}")  # fmt: skip


@pytest.mark.fault(AREA, RANKS, injected="rank 1 of 2 read with 2 spawned, then 2 forked "
                   "workers, RANK=0 WORLD_SIZE=1 in the environment")  # fmt: skip
@pytest.mark.timeout(90)
def test_spawned_workers_read_what_forked_ones_do(split, monkeypatch, observed):
    """Spawned workers get rank and world size from the dataset, not from the environment."""
    monkeypatch.setenv("RANK", "0")  # a decoy: rank 1 must not read rank 0's part
    monkeypatch.setenv("WORLD_SIZE", "1")
    kw = dict(batch_size=4, num_workers=2)
    spawned, _ = read(split, 1, 2, start_method="spawn", **kw)
    forked, _ = read(split, 1, 2, start_method="fork", **kw)
    assert spawned == forked and len(spawned) == 3
    observed(f"spawned workers: {len(spawned)} batches, {len(flat(spawned))} samples, the same "
             f"as forked: {spawned == forked}")  # fmt: skip


@pytest.mark.fault(AREA, "fewer shards than ranks x workers",
                   injected="16 samples in 2 shards, read by 2 ranks x 2 workers")  # fmt: skip
@pytest.mark.timeout(60)
def test_fewer_shards_than_ranks_x_workers(tmp_path, observed):
    d, _ = write(tmp_path, n=16, per_shard=8)
    results = read_ranks(d, 2, batch_size=2, num_workers=2, start_method="fork")
    assert [len(batches) for batches, _ in results] == [4, 4]
    assert sorted(flat(results[0][0] + results[1][0])) == [f"k{i:04d}" for i in range(16)]
    observed(f"batches per rank {[len(batches) for batches, _ in results]}, "
             f"{len(set(flat(results[0][0] + results[1][0])))} of 16 samples")  # fmt: skip


@pytest.mark.fault(AREA, "fewer samples than ranks x workers x batch",
                   injected="6 samples read by rank 0 of 2 with 2 workers and batches of "
                   "4")  # fmt: skip
def test_too_few_samples_is_a_clear_error_at_start(tmp_path, observed):
    d, _ = write(tmp_path, n=6, per_shard=8)
    with pytest.raises(ReaderError, match="too few.*rank 1 worker 1") as err:
        ShardReader(ReaderConfig(str(d), batch_size=4, num_workers=2), 0, 2)
    observed(f"{type(err.value).__name__}: {err.value}")


@pytest.mark.parametrize("total,world,batch,workers,drop_last",
                         list(itertools.product([7, 30, 64], [1, 2, 3], [1, 4], [1, 2, 3],
                                                [True, False])))
def test_plan_ranges_partition_the_epoch(total, world, batch, workers, drop_last):
    plans = [Plan(total, world, r, batch, workers, drop_last) for r in range(world)]
    ranges = [p.worker_range(w) for p in plans for w in range(workers)]
    positions = [i for lo, hi in ranges for i in range(lo, hi)]
    assert len(positions) == len(set(positions))  # no sample twice
    if any(not p.batch_sizes(w) for p in plans for w in range(workers)):
        with pytest.raises(ReaderError, match="too few"):
            plans[0].check()
        return
    plans[0].check()
    if not drop_last:
        assert sorted(positions) == list(range(total))
    else:
        counts = {sum(len(p.batch_sizes(w)) for w in range(workers)) for p in plans}
        assert len(counts) == 1 and total - len(positions) < world * batch
        assert all(s == batch for p in plans for w in range(workers) for s in p.batch_sizes(w))


@pytest.mark.fault(AREA, "a reader stopped mid-epoch and its state restored into a new one, or "
                   "into another rank's reader", injected="state_dict after 1, 2, 4 and 5 of 5 "
                   "batches, through JSON, loaded by a new reader (0 and 2 workers)")  # fmt: skip
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", [0, 2])
def test_restored_state_yields_exactly_the_rest(split, workers, observed):
    kw = dict(batch_size=3, shuffle_buffer=5, num_workers=workers, start_method="fork")
    cfg = ReaderConfig(str(split), **kw)
    full = ShardReader(cfg, 1, 2)
    epoch0 = [b for b in full]
    epoch1 = [b["keys"] for b in full]
    assert len(epoch0) == 5
    left = []
    for stop in (1, 2, 4, 5):
        first = ShardReader(cfg, 1, 2)
        for i, _ in enumerate(first):
            if i + 1 == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))
        second = ShardReader(cfg, 1, 2)
        second.load_state_dict(state)
        rest = list(second)
        left.append(len(rest))
        assert [b["keys"] for b in rest] == [b["keys"] for b in epoch0[stop:]]
        for got, want in zip(rest, epoch0[stop:], strict=True):
            assert torch.equal(got["frames"], want["frames"])
        assert [b["keys"] for b in second] == epoch1  # and the next epoch is unchanged
    with pytest.raises(ReaderError, match="rank=1") as err:
        ShardReader(cfg, 0, 2).load_state_dict(state)
    observed(f"batches left after 1, 2, 4, 5 of 5: {left}; rank 0 given rank 1's state: "
             f"{err.value}")  # fmt: skip


def test_set_epoch_restarts_only_a_new_epoch(split):
    reader = ShardReader(ReaderConfig(str(split), batch_size=4), 0, 1)
    first = next(iter(reader))["keys"]
    reader.set_epoch(0)  # same epoch: keeps the position
    assert next(iter(reader))["keys"] != first
    reader.set_epoch(3)
    reader.set_epoch(0)
    assert next(iter(reader))["keys"] == first


def test_transforms_are_seeded_and_consistent(split):
    cfg = ReaderConfig(str(split), batch_size=4, transforms=(SelectViews(1), TemporalCrop(1)))
    a = next(iter(ShardReader(cfg, 0, 1)))
    b = next(iter(ShardReader(cfg, 0, 1)))
    assert a["frames"].shape == (4, 1, 1, 3, 16, 16) and a["pose3d"].shape[1] == 1
    assert torch.equal(a["frames"], b["frames"]) and a["meta"] == b["meta"]
    for i, key in enumerate(a["keys"]):
        src = make_sample(key=key, seed=int(key[1:]), views=2, frames=2, size=(16, 16))
        v = int(a["meta"][i].views[0].camera[3:])
        t = a["meta"][i].frames[0]
        assert np.array_equal(a["pose2d"][i, 0, 0].numpy(), src.pose2d[v, t])
        assert np.array_equal(a["masks"][i, 0, 0].numpy(), src.masks[v, t])


def test_dist_from_env():
    assert dist_from_env({}) == (0, 1)
    assert dist_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert dist_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == (2, 3)
    with pytest.raises(ValueError):
        dist_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_measure_read_throughput_runs(split):
    result = measure_read_throughput(str(split), num_workers=0, batch_size=4)
    assert result["frames"] == 28 * 2 * 2 and result["frames_per_cpu_s"] > 0


def test_resize_keeps_labels_consistent_with_pixels():
    from conftest import make_sample

    from data_shards.camera import project
    from data_shards.transforms import Resize

    s = make_sample(size=(32, 24))
    Rt = s.Rt[0]
    s.pose2d[0, 0] = project(s.pose3d[0], s.K[0, 0], Rt[:, :3], Rt[:, 3])  # labels = projection
    r = Resize(16)(s, np.random.default_rng(0))
    assert r.frames.shape == (2, 4, 16, 16, 3) and r.masks.shape == (2, 4, 16, 16)
    assert r.meta.image_size == (16, 16)
    expected = project(s.pose3d[0], r.K[0, 0], Rt[:, :3], Rt[:, 3])
    assert np.allclose(r.pose2d[0, 0], expected, atol=1e-3)
