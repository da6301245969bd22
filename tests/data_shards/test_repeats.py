"""A sample written twice is never delivered twice by the reader (issue 16)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_sample
from test_bad_input import ALL, SHARD1, members, read_all, write_members

from data_shards.manifest import Manifest, ManifestError, sha256_file
from data_shards.write import WriterConfig, write_split

AREA = "Shards and the reader"  # of docs/reliability.md (tests/faultlog.py)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """test_bad_input's split: 12 samples in three shards of 4."""
    root = tmp_path_factory.mktemp("repeats")
    samples = [make_sample(key=k, seed=i, views=1, frames=2, size=(16, 16))
               for i, k in enumerate(ALL)]  # fmt: skip
    write_split(root, "train", samples, {}, {}, WriterConfig(max_samples=4))
    return root / "train"


@pytest.mark.fault(AREA, "a sample written twice in its shard (a faulty writer)",
                   injected="k0005's members appended again at the end of shard 1, rehashed")
def test_a_sample_repeated_in_its_shard_ends_that_shard_counted(pristine, tmp_path, caplog,
                                                                observed):  # fmt: skip
    split = shutil.copytree(pristine, tmp_path / "train")
    items = members(split / SHARD1)
    again = [(n, d) for n, d in items if n.startswith("k0005.")]
    write_members(split / SHARD1, items + again)  # k0005 once more at the end
    keys, reader = read_all(split)  # the manifest rewritten to match: a faulty writer
    assert keys == ALL  # every sample once
    assert reader.errors["bad_shards"] == 1
    warned = [r.getMessage() for r in caplog.records if "appears twice" in r.getMessage()]
    observed(f"{len(keys)} delivered, bad_shards={reader.errors['bad_shards']}: {warned[0]}")
    assert "sample key 'k0005' appears twice" in warned[0]


@pytest.mark.fault(AREA, "a shard listed twice under another name (its samples twice)",
                   injected="a copy of shard 1 added to the manifest with its true hash")
def test_a_shard_listed_twice_under_another_name_is_refused(pristine, tmp_path, observed):
    split = shutil.copytree(pristine, tmp_path / "train")
    shutil.copy(split / SHARD1, split / "shard-000099.tar")
    doc = json.loads((split / "manifest.json").read_text())
    entry = dict(next(s for s in doc["shards"] if s["name"] == SHARD1), name="shard-000099.tar")
    entry["sha256"] = sha256_file(split / "shard-000099.tar")
    doc["shards"].append(entry)
    doc["samples"] += entry["samples"]
    (split / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"first_key: 'k0004' also begins 'shard-000001.tar'"
                       ) as err:  # fmt: skip
        Manifest.load(split)
    observed(f"ManifestError: {err.value}")
