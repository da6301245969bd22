"""Members a reader passes over (links, devices, directories) are named by verify (issue 16)."""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest
from test_bad_input import ALL, SHARD1, members, read_all
from test_repeats import pristine  # noqa: F401  (the fixture)

from data_shards.verify import verify_split

AREA = "Writing and verifying"  # of docs/reliability.md (tests/faultlog.py)


@pytest.mark.fault(AREA, "shard members that are not regular files (a link to /etc/passwd, a FIFO)",
                   injected="a symlink and a FIFO member added to shard 1, rehashed")
def test_verify_names_members_that_are_not_regular_files(pristine, tmp_path,  # noqa: F811
                                                         observed):  # fmt: skip
    split = shutil.copytree(pristine, tmp_path / "train")
    items = members(split / SHARD1)
    with tarfile.open(split / SHARD1, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k0007.evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        fifo = tarfile.TarInfo("k0007.pipe")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    keys, reader = read_all(split)  # hashes rewritten: the members are what a writer put there
    assert keys == ALL and sum(reader.errors.values()) == 0
    found = [p.what for p in verify_split(split, progress=False)]
    observed(f"reader: {len(keys)} delivered, no error; verify: {'; '.join(found)}")
    assert "member 'k0007.evil': symbolic link, not read" in found
    assert "member 'k0007.pipe': FIFO, not read" in found
