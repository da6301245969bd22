"""Embedding a split over several ranks: the rows equal one process's, row for row."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample

import finetune.evaluation.evaluate as evaluate
from data_shards.write import write_split
from finetune.evaluation.cache import embed_split_cached
from finetune.evaluation.embed import (
    Embeddings,
    RawPixels,
    embed_split,
    embed_split_part,
    merge_parts,
)

ROOT = Path(__file__).resolve().parents[2]
V, T = 2, 4
ACTIONS = ["walk", "run", "jump", "walk", "run", "jump", "sit"]  # 7 samples: uneven ranks
AREA = "Evaluation cache: SIGKILL and several ranks"  # of docs/reliability.md
RANKS = "a split embedded by several ranks (gloo, or meeting in the cache folder)"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = [make_sample(key=f"{a}-w{i}", views=V, frames=T, size=(32, 32), seed=i, action=a)
               for i, a in enumerate(ACTIONS)]  # fmt: skip
    write_split(root, "train", samples, {}, {})
    return root / "train"


def _model():
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    torch.manual_seed(0)
    return PoseBERT(debug_cpu().model)


def assert_same_rows(a: Embeddings, b: Embeddings, atol: float = 0.0) -> None:
    for name, x in a.columns().items():
        y = getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        if name == "vectors" and atol:
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


RANK_SCRIPT = """
import sys
from pathlib import Path
from pretrain.engine import dist
from finetune.evaluation.cache import embed_split_cached
from finetune.evaluation.embed import embed_split, RawPixels
env = dist.init_distributed(backend="gloo", timeout_s=60)
split, out = sys.argv[1], Path(sys.argv[2])
cached, folder = embed_split_cached(RawPixels(4), split, out / "cache", batch_size=2,
                                    progress=False)  # parts in the folder, barriers
gathered = embed_split(RawPixels(8), split, batch_size=2, progress=False)  # all_gather_object
(out / f"cached{env.rank}.npz").write_bytes(cached.to_bytes())
(out / f"gathered{env.rank}.npz").write_bytes(gathered.to_bytes())
(out / f"folder{env.rank}.txt").write_text(str(folder))
dist.shutdown()
"""


@pytest.mark.fault(AREA, RANKS, injected="2 gloo ranks under launch_local: the cached path "
                   "(parts in the folder) and the all_gather path")  # fmt: skip
def test_two_gloo_ranks_equal_one_process(split, tmp_path, observed):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    prog = ("import sys\nfrom pretrain.engine.launch import launch_local\n"
            f"sys.exit(launch_local(2, [sys.executable, {str(script)!r}, {str(split)!r}, "
            f"{str(tmp_path)!r}]))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, timeout=120)
    assert p.returncode == 0
    pixels = embed_split(RawPixels(4), split, batch_size=3, progress=False)
    pixels8 = embed_split(RawPixels(8), split, batch_size=3, progress=False)
    assert len(pixels) == len(ACTIONS) * V * T
    for rank in (0, 1):
        assert_same_rows(Embeddings.from_bytes((tmp_path / f"cached{rank}.npz").read_bytes()),
                         pixels)  # fmt: skip
        assert_same_rows(Embeddings.from_bytes((tmp_path / f"gathered{rank}.npz").read_bytes()),
                         pixels8)  # fmt: skip
    folder = Path((tmp_path / "folder0.txt").read_text())
    assert folder == Path((tmp_path / "folder1.txt").read_text())
    assert not list((folder / "parts").glob("*"))  # merged, then removed
    cached, again = embed_split_cached(RawPixels(4), split, tmp_path / "cache", progress=False)
    assert again == folder  # one process reads the file the two ranks wrote
    assert_same_rows(cached, pixels)
    diff = float(np.abs(cached.vectors - pixels.vectors).max())
    observed(f"exit {p.returncode}; {len(cached)} rows, largest difference to one process {diff}; "
             f"parts left {len(list((folder / 'parts').glob('*')))}")  # fmt: skip


@pytest.mark.fault(AREA, RANKS, injected="3 ranks as threads with explicit rank/world_size "
                   "and no torch.distributed")  # fmt: skip
def test_ranks_meet_in_the_cache_folder_without_a_process_group(split, tmp_path, observed):
    """Explicit rank/world_size and no torch.distributed: the parts meet as files."""
    out: dict[int, Embeddings] = {}

    def rank(r: int) -> None:
        out[r], _ = embed_split_cached(RawPixels(4), split, tmp_path, batch_size=2, rank=r,
                                       world_size=3, progress=False, timeout_s=60)  # fmt: skip

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    single = embed_split(RawPixels(4), split, batch_size=3, progress=False)
    assert sorted(out) == [0, 1, 2]
    for emb in out.values():
        assert_same_rows(emb, single)
    with pytest.raises(ValueError, match="embed_split_cached") as err:
        embed_split(RawPixels(4), split, rank=1, world_size=2)
    diff = max(float(np.abs(e.vectors - single.vectors).max()) for e in out.values())
    observed(f"ranks {sorted(out)}: {[len(e) for e in out.values()]} rows each, largest "
             f"difference to one process {diff}; embed_split with a rank: {err.value}")  # fmt: skip


@pytest.mark.fault(AREA, RANKS, injected="3 rank parts merged in reverse order and with "
                   "repeats")  # fmt: skip
def test_parts_merge_by_manifest_position_not_arrival(split, observed):
    parts = [embed_split_part(RawPixels(4), split, r, 3, batch_size=2, progress=False)
             for r in range(3)]  # fmt: skip
    assert [len(s) for _, s in parts] == [3, 2, 2]
    single = embed_split(RawPixels(4), split, progress=False)
    assert_same_rows(merge_parts(parts[::-1]), single)  # arrival order does not matter
    assert_same_rows(merge_parts([parts[0], *parts, parts[1]]), single)  # repeats kept once
    assert list(dict.fromkeys(single.keys)) == [f"{a}-w{i}" for i, a in enumerate(ACTIONS)]
    merged = merge_parts(parts[::-1])
    in_order = list(merged.keys) == list(single.keys)
    observed(f"parts of {[len(s) for _, s in parts]} samples merged in reverse: {len(merged)} "
             f"rows, keys in the manifest's order: {in_order}")  # fmt: skip


@pytest.mark.fault(AREA, RANKS, injected="a PoseBERT's rows embedded as 2 rank shares in "
                   "batches of 2 vs one process in batches of 3")  # fmt: skip
def test_encoder_parts_equal_one_process(split, observed):
    """A PoseBERT's rows, embedded as 2 rank shares (batches of 2) vs one process (of 3)."""
    model = _model()
    parts = [embed_split_part(model, split, r, 2, batch_size=2, progress=False) for r in (0, 1)]
    single = embed_split(model, split, batch_size=3, progress=False)
    # other batch sizes: the encoder's float sums may round differently in the last bit
    assert_same_rows(merge_parts(parts), single, atol=1e-5)
    diff = float(np.abs(merge_parts(parts).vectors - single.vectors).max())
    observed(f"{len(single)} rows; largest difference to one process {diff:.1e}")


@pytest.mark.fault(AREA, "2 loader workers (batches arrive round robin)",
                   injected="embed_split with num_workers=2 vs 0")  # fmt: skip
def test_loader_workers_keep_manifest_order(split, observed):
    """With 2 loader workers batches arrive round robin; rows still follow the manifest."""
    plain = embed_split(RawPixels(4), split, batch_size=2, progress=False)
    workers = embed_split(RawPixels(4), split, batch_size=2, num_workers=2, progress=False)
    assert_same_rows(workers, plain)
    observed(f"{len(workers)} rows, keys in the same order: "
             f"{list(workers.keys) == list(plain.keys)}")  # fmt: skip


def _ranks_in_threads(split, cache, world: int, timeout_s: float = 60) -> dict:
    out: dict = {}

    def rank(r: int) -> None:
        try:
            out[r] = embed_split_cached(RawPixels(4), split, cache, batch_size=2, rank=r,
                                        world_size=world, progress=False,
                                        timeout_s=timeout_s)[0]  # fmt: skip
        except BaseException as e:  # reported to the test
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return out


@pytest.mark.fault(AREA, "rank 0 dies after every rank wrote its part; then its part is found "
                   "cut to 100 bytes without a checksum", injected="merge_parts raises "
                   "KeyboardInterrupt on rank 0 (2 s timeout); rank 0's part cut, its .sha256 "
                   "removed")  # fmt: skip
def test_parts_of_an_interrupted_run_are_reused_or_rebuilt(split, tmp_path, monkeypatch, observed):
    import finetune.evaluation.cache as cache_mod

    real = cache_mod.merge_parts

    def rank0_dies(parts):
        raise KeyboardInterrupt("rank 0 killed before merging")

    monkeypatch.setattr(cache_mod, "merge_parts", rank0_dies)
    first = _ranks_in_threads(split, tmp_path, 2, timeout_s=2)
    observed(f"first run: rank 0 {type(first[0]).__name__}, rank 1 {type(first[1]).__name__}: "
             f"{first[1]}")  # fmt: skip
    assert isinstance(first[0], KeyboardInterrupt) and isinstance(first[1], TimeoutError)
    monkeypatch.setattr(cache_mod, "merge_parts", real)
    (parts_dir,) = tmp_path.glob("*/parts")
    part0 = next(parts_dir.glob("*rank0-of-2.npz"))
    part0.write_bytes(part0.read_bytes()[:100])  # rank 0's part: cut, as if killed mid-write
    (parts_dir / (part0.name + ".sha256")).unlink()  # save_verified removes it first
    again = _ranks_in_threads(split, tmp_path, 2)
    single = embed_split(RawPixels(4), split, batch_size=3, progress=False)
    for emb in again.values():
        assert_same_rows(emb, single)
    assert not list(parts_dir.glob("*"))
    diff = max(float(np.abs(e.vectors - single.vectors).max()) for e in again.values())
    observed(f"rerun: {[len(e) for e in again.values()]} rows per rank, largest difference to "
             f"one process {diff}; parts left {len(list(parts_dir.glob('*')))}")  # fmt: skip


@pytest.mark.fault(AREA, RANKS, injected="`run_retrieval` on 2 ranks under launch_local vs "
                   "one process")  # fmt: skip
@pytest.mark.slow  # 2 ranks + 1 process, each importing the backbone libraries: ~60 s
def test_retrieval_under_two_ranks_equals_one_process(tmp_path, observed):
    import json

    from safetensors.torch import save_file

    from data_shards.configtools import to_dict
    from finetune.evaluation.retrieval import RetrievalConfig
    from pretrain.export import CONFIG, WEIGHTS

    for name, n in (("train", 7), ("val", 3)):
        samples = [make_sample(key=f"{name}{i}", views=V, frames=T, size=(32, 32),
                               seed=i + 10 * n, action=ACTIONS[i]) for i in range(n)]  # fmt: skip
        write_split(tmp_path / "shards", name, samples, {}, {})
    model = _model()
    enc = tmp_path / "encoder"
    enc.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(enc / WEIGHTS))
    (enc / CONFIG).write_text(json.dumps({"model": to_dict(model.cfg), "input": {"size": None}}))
    one = evaluate.run_retrieval(enc, tmp_path / "shards", tmp_path / "one",
                                 RetrievalConfig(gpu=False), progress=False)  # fmt: skip
    # what `posebert evaluate retrieval --nproc-per-node 2` runs on each rank (relaunch)
    rank = ("from finetune.evaluation.evaluate import run_retrieval\n"
            "from finetune.evaluation.retrieval import RetrievalConfig\n"
            f"r = run_retrieval({str(enc)!r}, {str(tmp_path / 'shards')!r}, "
            f"{str(tmp_path / 'two')!r}, RetrievalConfig(gpu=False), progress=False)\n"
            "import os; assert (r is None) == (os.environ['RANK'] != '0')\n")  # fmt: skip
    prog = ("import sys\nfrom pretrain.engine.launch import launch_local\n"
            f"sys.exit(launch_local(2, [sys.executable, '-c', {rank!r}]))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", prog], cwd=ROOT, timeout=300).returncode == 0
    two = json.loads((tmp_path / "two" / "retrieval.json").read_text())
    assert two["rows"]["model"]["mpjpe"] == pytest.approx(one["rows"]["model"]["mpjpe"])
    assert two["rows"]["raw pixels 16x16"] == one["rows"]["raw pixels 16x16"]
    assert two["rows"]["oracle"] == one["rows"]["oracle"]
    observed(f"model MPJPE on 2 ranks {two['rows']['model']['mpjpe']}, on one process "
             f"{one['rows']['model']['mpjpe']}")  # fmt: skip
