"""The evaluation cache under faults: files swapped between entries, tampered bytes, an older
format, a full disk; through the library and through `posebert evaluate retrieval`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample
from diskfull import fill_disk

from data_shards.write import write_split
from finetune.evaluation.cache import cache_key, embed_split_cached
from finetune.evaluation.embed import Embeddings, RawPixels, split_fingerprint
from finetune.evaluation.retrieval import RetrievalConfig, cached_index
from finetune.evaluation.store import CacheKeyError, checksum_path, save_verified

NPZ = "embeddings-l2norm.npz"
AREA = "Evaluation"  # of docs/reliability.md (tests/faultlog.py)
SWAPPED = ("cached embeddings swapped between two entries together with their checksums, or one "
           "byte flipped")  # fmt: skip
ACTIONS = ("walk", "run", "jump")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for split, n in (("train", 3), ("val", 2)):
        samples = [make_sample(key=f"{split}{i}", views=2, frames=4, size=(16, 16),
                               seed=i + 10 * n, action=ACTIONS[i]) for i in range(n)]  # fmt: skip
        write_split(root, split, samples, {}, {})
    return root


def _swap(a: Path, b: Path) -> None:
    """Exchange two cache files together with their checksums (both still verify)."""
    for x, y in ((a, b), (checksum_path(a), checksum_path(b))):
        tmp = x.with_name(x.name + ".swap")
        x.rename(tmp)
        y.rename(x)
        tmp.rename(y)


@pytest.mark.fault(AREA, SWAPPED, injected="the 4x4 and 8x8 raw-pixel entries' files and "
                   "checksums exchanged")  # fmt: skip
def test_swapped_cache_files_are_refused_naming_the_file(shards, tmp_path, observed):
    split, cache = shards / "train", tmp_path / "cache"
    four, f4 = embed_split_cached(RawPixels(4), split, cache, progress=False)
    _, f8 = embed_split_cached(RawPixels(8), split, cache, progress=False)
    again, _ = embed_split_cached(RawPixels(4), split, cache, progress=False)  # a hit
    np.testing.assert_array_equal(again.vectors, four.vectors)
    _swap(f4 / NPZ, f8 / NPZ)
    with pytest.raises(CacheKeyError) as err:
        embed_split_cached(RawPixels(4), split, cache, progress=False)
    message = str(err.value)
    assert message.startswith(f"{f4 / NPZ}: holds key embeddings embedder=raw_pixels-8-v1")
    assert "moved or swapped" in message and "\n" not in message
    observed(f"{type(err.value).__name__}: {message}")
    key = cache_key(RawPixels(8), split)
    assert Embeddings.load(f4 / NPZ).vectors.shape[1] == 3 * 8 * 8  # readable without a key
    with pytest.raises(CacheKeyError):
        Embeddings.load(f8 / NPZ, key)


@pytest.mark.fault(AREA, "a cache file of the older format (no key)",
                   injected="the entry's file replaced by 3 rows saved without a key")  # fmt: skip
def test_cache_file_of_the_older_format_is_rebuilt(shards, tmp_path, observed):
    split, cache = shards / "train", tmp_path / "cache"
    clean, folder = embed_split_cached(RawPixels(4), split, cache, progress=False)
    save_verified(folder / NPZ, clean.subset(np.arange(3)).to_bytes())  # no key, wrong rows
    rebuilt, _ = embed_split_cached(RawPixels(4), split, cache, progress=False)
    np.testing.assert_array_equal(rebuilt.vectors, clean.vectors)
    observed(f"rebuilt: {len(rebuilt)} rows (the old file held 3), equal to a clean run: "
             f"{np.array_equal(rebuilt.vectors, clean.vectors)}")  # fmt: skip


@pytest.mark.fault(AREA, "a FAISS index copied from another cache entry",
                   injected="entry A's index and checksum copied into entry B's "
                   "folder")  # fmt: skip
def test_index_from_another_cache_entry_is_refused(tmp_path, observed):
    rng = np.random.default_rng(0)
    gallery = Embeddings(
        vectors=rng.normal(size=(20, 4)).astype(np.float32),
        pose3d=np.zeros((20, 17, 3), np.float32), keys=np.array(["k"] * 20),
        clips=np.array(["c"] * 20), actions=np.array(["a"] * 20),
        cameras=np.array(["cam"] * 20), views=np.zeros(20, np.int64), frames=np.arange(20),
    )  # fmt: skip
    cfg = RetrievalConfig(gpu=False)
    a, b = tmp_path / "a", tmp_path / "b"
    cached_index(gallery, a, cfg, key="gallery A")
    assert cached_index(gallery, a, cfg, key="gallery A").ntotal == 20  # reused
    b.mkdir()
    for p in a.iterdir():
        shutil.copy(p, b / p.name)
    with pytest.raises(CacheKeyError, match="index-flat-l2.faiss: holds key index gallery A") as e:
        cached_index(gallery, b, cfg, key="gallery B")
    observed(f"{type(e.value).__name__}: {e.value}")


# ------------------------------------------------------------------- posebert evaluate


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from pretrain.export import save_encoder
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    torch.manual_seed(0)
    model = PoseBERT(debug_cpu().model)
    return save_encoder(model.state_dict(), model.cfg, tmp_path_factory.mktemp("enc"), size=None)


def _evaluate(encoder: Path, shards: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    from posebert.cli import main

    code = main(["evaluate", "retrieval", "--encoder", str(encoder), "--shards", str(shards),
                 "--out", str(out), "--k", "2", *extra])  # fmt: skip
    return code, capsys.readouterr().err.strip()


@pytest.mark.fault(AREA, SWAPPED, injected="`posebert evaluate retrieval` after the model's and "
                   "the random-init row's cached galleries were swapped, then after a "
                   "flip")  # fmt: skip
def test_evaluate_refuses_swapped_or_tampered_cache_in_one_line(encoder, shards, tmp_path,
                                                                capsys, observed):  # fmt: skip
    """The model's and the random-init row's cached gallery swapped (both verify): the model
    row used to be computed from the random-init rows, silently. A flipped byte used to be a
    ChecksumError traceback."""
    from finetune.evaluation.evaluate import RetrievalConfig, _embedders

    out = tmp_path / "out"
    code, err = _evaluate(encoder, shards, out, capsys)
    assert code == 0, err
    rows = _embedders(encoder, RetrievalConfig().seed, torch.device("cpu"))
    split = split_fingerprint(shards / "train")[:16]
    model, random_init = (out / "cache" / f"{rows[r].fingerprint[:16]}-{split}" / NPZ
                          for r in ("model", "random-init"))  # fmt: skip
    _swap(model, random_init)
    code, err = _evaluate(encoder, shards, out, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"posebert evaluate: error: {model}: holds key") and "swapped" in err
    observed(f"swapped: exit {code}: {err}")
    _swap(model, random_init)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    code, err = _evaluate(encoder, shards, out, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"{model}: sha256" in err, err
    observed(f"flipped: exit {code}: {err}")


@pytest.mark.fault(AREA, "ENOSPC during `posebert evaluate`",
                   injected="a second evaluation with a new --cache on a full disk "
                   "(tests/diskfull.py)")  # fmt: skip
def test_evaluate_on_a_full_disk_exits_74_and_keeps_earlier_results(
    encoder, shards, tmp_path, capsys, monkeypatch, observed
):
    out = tmp_path / "out"
    code, err = _evaluate(encoder, shards, out, capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fill_disk(monkeypatch, out)
    code, err = _evaluate(encoder, shards, out, capsys, "--cache", str(out / "cache2"))
    assert code == 74 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and str(out / "cache2") in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no temp file left behind
    observed(f"exit {code}: {err}; temp files left {len([p for p in out.rglob('*.tmp*')])}")
