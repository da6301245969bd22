"""The rest of an epoch on another world size: no sample repeated, none skipped."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import make_sample

from data_shards.read import ReaderConfig, ReaderError, ShardReader
from data_shards.resplit import Remaining, remaining_after
from data_shards.stages import Plan, shuffle
from data_shards.write import WriterConfig, write_split

N = 96


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """96 samples in shards of 10 (the last one 6)."""
    root = tmp_path_factory.mktemp("resplit")
    samples = [
        make_sample(key=f"k{i:04d}", seed=i, views=1, frames=1, size=(8, 8)) for i in range(N)
    ]
    write_split(root, "train", samples, source={"test": True}, generator={},
                config=WriterConfig(max_samples=10))  # fmt: skip
    return root / "train"


def readers(split, world, workers=0, **kw):
    cfg = ReaderConfig(str(split), batch_size=4, shuffle_buffer=6, num_workers=workers,
                       frames="off", **kw)  # fmt: skip
    return [ShardReader(cfg, r, world) for r in range(world)]


def take(reader, batches):
    """The keys of the next ``batches`` batches, leaving the iterator where a checkpoint would."""
    out = []
    it = iter(reader)
    for batch in itertools.islice(it, batches):
        out += batch["keys"]
    return out


def rest_of_epoch(reader):
    epoch = reader.epoch
    out = []
    for batch in reader:
        out += batch["keys"]
    assert reader.epoch == epoch + 1
    return out


def test_remaining_maps_segment_positions_to_the_epoch():
    r = Remaining(20).without([3, 4, 5, 10, 19])
    assert len(r) == 15
    assert [r.position(v) for v in range(15)] == [
        0,
        1,
        2,
        6,
        7,
        8,
        9,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        18,
    ]
    assert r.positions(2, 8) == [2, 6, 7, 8, 9, 11]
    assert r.epoch_range(2, 8) == (2, 12)
    assert r.holes(2, 12, base=2) == ((1, 4), (8, 9))
    assert len(r.without([0, 1, 2])) == 12 and len(r.without([])) == 15


@pytest.mark.parametrize("bufsize", [1, 6])
def test_replayed_shuffle_is_the_stream_of_positions(bufsize):
    """What the reader's shuffle stage hands out, replayed on positions, is a permutation."""
    plan = Plan(N, 2, 0, 4, 1, True)
    out = list(shuffle(Remaining(N).positions(*plan.worker_range(0, 1)), bufsize, [0, 0, 48]))
    assert sorted(out) == list(range(48, 96)) and (bufsize == 1) == (out == sorted(out))


AREA = "Shards and the reader"  # of docs/reliability.md (tests/faultlog.py)
ELASTIC = "a reader's mid-epoch state resumed on another world size"


@pytest.mark.fault(AREA, ELASTIC, injected="the states of 1, 2 or 4 ranks after some batches "
                   "given to resplit() of 1 to 4 new ranks, with and without loader "
                   "workers")  # fmt: skip
@pytest.mark.parametrize(
    "old, new, workers_old, workers_new, batches",
    [
        (2, 1, 0, 0, 5),
        (2, 4, 0, 0, 3),
        (2, 3, 0, 0, 4),
        (4, 2, 0, 0, 2),
        (2, 1, 2, 1, 5),
        (1, 2, 0, 2, 7),
    ],  # fmt: skip
)
def test_epoch_continues_on_another_world_size(split, old, new, workers_old, workers_new, batches,
                                               observed):  # fmt: skip
    before = readers(split, old, workers_old)
    seen = [k for r in before for k in take(r, batches)]
    states = [r.state_dict() for r in before]
    after = readers(split, new, workers_new)
    for r in after:
        r.resplit(states)
        assert r.epoch == 0 and len(r.history) == 1
    rest = [k for r in after for k in rest_of_epoch(r)]
    assert not set(seen) & set(rest), "a sample was read twice"
    assert len(set(rest)) == len(rest)
    # drop_last: the new ranks leave out less than a batch each of what was left
    left = N - len(seen)
    assert left - new * 4 < len(rest) <= left
    assert all(sum(r.errors.values()) == 0 for r in after)
    # the next epoch is whole again, on the new world size
    nxt = [k for r in after for k in rest_of_epoch(r)]
    assert len(set(nxt)) == len(nxt) == N // (new * 4) * new * 4
    observed(f"{old} -> {new} ranks after {len(seen)} of {N}: {len(rest)} more, "
             f"{len(set(seen) & set(rest))} read twice; next epoch {len(nxt)}")  # fmt: skip


@pytest.mark.fault(AREA, ELASTIC, injected="2 ranks -> 3 ranks -> 1 rank within one epoch, and "
                   "the 3-rank segment saved and resumed on 3 ranks")  # fmt: skip
def test_two_changes_in_one_epoch_and_a_saved_segment_resumes_exactly(split, observed):
    a = readers(split, 2)
    seen = [k for r in a for k in take(r, 3)]
    b = readers(split, 3)
    for r in b:
        r.resplit([x.state_dict() for x in a])
    seen += [k for r in b for k in take(r, 2)]
    mid = [r.state_dict() for r in b]
    assert all(len(s["history"]) == 1 for s in mid)
    # the same world size again: an exact resume of the segment, history and all
    again = readers(split, 3)
    for r, s in zip(again, mid, strict=True):
        r.load_state_dict(s)
    tail_again = [rest_of_epoch(r) for r in again]
    tail = [rest_of_epoch(r) for r in readers_after(split, mid)]
    assert tail == tail_again
    # and a second change within the epoch
    c = readers(split, 1)
    c[0].resplit(mid)
    assert len(c[0].history) == 2
    segments = len(c[0].history)
    rest = rest_of_epoch(c[0])
    assert not set(seen) & set(rest) and len(set(seen)) == len(seen)
    assert N - len(seen) - 4 < len(rest) <= N - len(seen)
    observed(f"2 -> 3 -> 1 ranks: {len(seen)} + {len(rest)} of {N} samples, "
             f"{len(set(seen) & set(rest))} read twice, {segments} segments of "
             "history")  # fmt: skip


def readers_after(split, states):
    out = readers(split, len(states))
    for r, s in zip(out, states, strict=True):
        r.load_state_dict(s)
    return out


@pytest.mark.fault(AREA, "a reader state of another stream (seed, rank order, a cursor past the "
                   "data)", injected="resplit() given seed-0 states by a seed-1 reader, the "
                   "ranks' states reversed, a history cursor of 99")  # fmt: skip
def test_a_state_of_other_data_or_settings_is_refused(split, tmp_path, observed):
    states = [r.state_dict() for r in readers(split, 2)]
    with pytest.raises(ReaderError, match="seed=0, this reader 1") as seed:
        readers(split, 1, seed=1)[0].resplit(states)
    with pytest.raises(ReaderError, match="rank 1 of 2, expected 0 of 2") as order:
        readers(split, 1)[0].resplit(states[::-1])
    bad = [dict(s, history=[dict(world_size=2, workers=1, cursors=[[99], [0]])]) for s in states]
    with pytest.raises(ValueError, match=r"history\[0\].cursors\[0\]\[0\]: expected 0..48") as cur:
        readers(split, 1)[0].resplit(bad)
    for err in (seed, order, cur):
        observed(f"{type(err.value).__name__}: {err.value}")


def test_little_left_moves_on_to_the_next_epoch(split):
    a = readers(split, 2)
    for r in a:
        take(r, 11)  # 88 of 96: 8 left, too few for 3 ranks x batches of 4
    b = readers(split, 3)
    for r in b:
        r.resplit([x.state_dict() for x in a])
        assert r.epoch == 1 and r.history == []


def test_the_replay_validates_the_history():
    kw = dict(seed=0, epoch=0, batch_size=4, drop_last=True, bufsize=6)
    assert len(remaining_after([], N, **kw)) == N
    with pytest.raises(ValueError, match=r"history\[0\].world_size"):
        remaining_after([dict(world_size=0, workers=1, cursors=[])], N, **kw)
    with pytest.raises(ValueError, match=r"history\[0\].cursors: expected 2 lists"):
        remaining_after([dict(world_size=2, workers=1, cursors=[[1]])], N, **kw)
    got = remaining_after([dict(world_size=2, workers=1, cursors=[[8], [0]])], N, **kw)
    assert len(got) == N - 8 and np.all(got.excluded[:, 1] <= 48)
