"""Damage to the files of a split and to its manifest, for the shard fuzzer (:mod:`fuzz_kinds`
holds the kinds that damage tar bytes, and the spec list): shard files swapped for FIFOs,
symlinks, directories; manifests whose fields lie about type or range, or whose bytes are not
JSON at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

from fuzz_mutations import Edit

# ------------------------------------------------------------------- files of the split


def _fifo(path) -> None:
    _remove(path)
    os.mkfifo(path)


def _remove(path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _symlink(target):
    def make(path):
        _remove(path)
        path.symlink_to(target)

    return make


def shard_file(e: Edit, spec: dict) -> str:
    name, v = e.shard(), spec["variant"]
    other = e.rng.choice([n for n in e.p.names if n != name])
    entry = next(s for s in e.manifest["shards"] if s["name"] == name)
    if v == "fifo":
        e.fs.append((name, _fifo))
    elif v == "symlink to /dev/zero":
        e.fs.append((name, _symlink("/dev/zero")))
    elif v.startswith("symlink to another shard"):
        e.fs.append((name, _symlink(other)))
        if v.endswith("hash"):
            entry["sha256"] = hashlib.sha256(e.shards[other]).hexdigest()
    elif v == "symlink out of the split, same bytes":
        e.fs.append((f"../outside-{name}", lambda p: p.write_bytes(e.shards[name])))
        e.fs.append((name, _symlink(f"../outside-{name}")))
    elif v == "directory":
        e.fs.append((name, lambda p: (_remove(p), p.mkdir())))
    elif v == "missing":
        e.fs.append((name, _remove))
    elif v == "empty":
        e.set(name, b"")
    elif v == "stray fifo":
        e.fs.append(("shard-000777.tar", _fifo))
    else:  # "stray copy"
        e.fs.append(("shard-000777.tar", lambda p: p.write_bytes(e.shards[name])))
    return f"{name} {v}"


# ------------------------------------------------------------------------------ manifests


def _set(path: tuple, value):
    def edit(d: dict, r: random.Random) -> None:
        *head, last = path
        for step in head:
            d = d[step]
        d[last] = value

    return edit


def _shard_field(field: str, value):
    def edit(d: dict, r: random.Random) -> None:
        s = r.choice(d["shards"])
        if value is _DELETE:
            s.pop(field, None)
        else:
            s[field] = value(s) if callable(value) else value
        if field == "samples" and is_plain_count(s.get("samples")):
            s.pop("actions", None)  # keep the other checks quiet: only the count lies
            d.pop("samples", None)

    return edit


def is_plain_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_DELETE = object()


def _swap(*fields: str):
    def edit(d: dict, r: random.Random) -> None:
        a, b = r.sample(d["shards"], 2)
        for f in fields:
            if f.startswith("-"):
                for s in d["shards"]:
                    s.pop(f[1:], None)
            else:
                a[f], b[f] = b[f], a[f]

    return edit


def _deep(n: int):
    def edit(d: dict, r: random.Random) -> None:
        v: object = {}
        for _ in range(n):
            v = {"x": v}
        d["source"] = v

    return edit


def _drop_shard(d: dict, r: random.Random) -> None:
    d["shards"].pop(r.randrange(len(d["shards"])))
    d.pop("samples", None)


LIES = {
    "count +1": _shard_field("samples", lambda s: s["samples"] + 1),
    "count -1": _shard_field("samples", lambda s: s["samples"] - 1),
    "count 0": _shard_field("samples", 0),
    "count 10**12": _shard_field("samples", 10**12),
    "count 2**16 (the most a shard may list)": _shard_field("samples", 2**16),
    "count 2**16 + 1": _shard_field("samples", 2**16 + 1),
    "count 10**12, bytes to match": lambda d, r: _shard_field("samples", 10**12)(d, r) or [
        s.__setitem__("bytes", 1024 * s["samples"]) for s in d["shards"] if s["samples"] > 2],
    "count -1 (negative)": _shard_field("samples", -1),
    "count as text": _shard_field("samples", "2"),
    "count as float": _shard_field("samples", 2.0),
    "count true": _shard_field("samples", True),
    "count null": _shard_field("samples", None),
    "count missing": _shard_field("samples", _DELETE),
    "bytes +1": _shard_field("bytes", lambda s: s["bytes"] + 1),
    "bytes 10**18": _shard_field("bytes", 10**18),
    "bytes negative": _shard_field("bytes", -1),
    "sha256 of another shard": _swap("sha256"),
    "sha256 uppercase": _shard_field("sha256", lambda s: s["sha256"].upper()),
    "sha256 short": _shard_field("sha256", lambda s: s["sha256"][:63]),
    "sha256 empty": _shard_field("sha256", ""),
    "sha256 zeros": _shard_field("sha256", "0" * 64),
    "names swapped": _swap("name"),
    "names swapped with their hashes": _swap("name", "sha256", "bytes"),
    "names and hashes swapped, no first keys": _swap("name", "sha256", "bytes", "-first_key"),
    "name of a missing file": _shard_field("name", "shard-000555.tar"),
    "name with ../": _shard_field("name", "../train/shard-000000.tar"),
    "name absolute": _shard_field("name", "/etc/passwd"),
    "name the manifest": _shard_field("name", "manifest.json"),
    "name hidden": _shard_field("name", ".shard.tar"),
    "name empty": _shard_field("name", ""),
    "name with NUL": _shard_field("name", "shard-\x00.tar"),
    "name listed twice": lambda d, r: d["shards"].__setitem__(1, dict(d["shards"][0])),
    "first key of another shard": _swap("first_key"),
    "first key missing": _shard_field("first_key", _DELETE),
    "first key non-printable": _shard_field("first_key", "k\x1b[2J"),
    "actions renamed": _shard_field("actions", lambda s: {"jump": s["samples"]}),
    "actions sum off": _shard_field("actions", {"walk": 7}),
    "actions negative": _shard_field("actions", {"walk": -1, "run": 3}),
    "actions a list": _shard_field("actions", ["walk"]),
    "shard entry a string": lambda d, r: d["shards"].__setitem__(0, "shard-000000.tar"),
    "shard entry unknown field": _shard_field("evil", 1),
    "shards not a list": _set(("shards",), {"a": 1}),
    "shards empty": lambda d, r: (d.__setitem__("shards", []), d.pop("samples", None)),
    "one shard unlisted": _drop_shard,
    "total off": _set(("samples",), 7),
    "views 1": _set(("views",), 1),
    "views 3": _set(("views",), 3),
    "views 0": _set(("views",), 0),
    "views 10**9": _set(("views",), 10**9),
    "frames 3": _set(("frames",), 3),
    "frames as text": _set(("frames",), "2"),
    "image size swapped": _set(("image_size",), [16, 24]),
    "image size 0": _set(("image_size",), [0, 16]),
    "image size huge": _set(("image_size",), [4096, 4096]),
    "image size 3 numbers": _set(("image_size",), [24, 16, 3]),
    "fps 0": _set(("fps",), 0),
    "fps text": _set(("fps",), "50"),
    "has one part off": _set(("has", "det2d"), False),
    "has unknown part": _set(("has", "depth"), True),
    "has a list": _set(("has",), ["frames"]),
    "split name an object": _set(("split",), {"x": 1}),
    "schema version 2": _set(("schema_version",), 2),
    "unknown field": _set(("evil",), True),
    "source nested 40 deep": _deep(40),
    "generator a list": _set(("generator",), [1, 2]),
    "created_by a number": _set(("created_by",), 5),
}


def manifest_lie(e: Edit, spec: dict) -> str:
    LIES[spec["variant"]](e.manifest, e.rng)
    return spec["variant"]


def _text(e: Edit) -> str:
    return json.dumps(e.manifest, indent=1)


RAW = {
    "cut short": lambda e: _text(e)[: e.rng.randrange(len(_text(e)))].encode(),
    "empty": lambda e: b"",
    "not UTF-8": lambda e: b"\xff\xfe" + _text(e).encode("utf-16-le"),
    "UTF-8 BOM": lambda e: b"\xef\xbb\xbf" + _text(e).encode(),
    "null": lambda e: b"null",
    "a list": lambda e: b"[" + _text(e).encode() + b"]",
    "nested 100k deep": lambda e: b"[" * 100_000 + b"]" * 100_000,
    "NaN count": lambda e: _text(e).replace('"samples": 2', '"samples": NaN', 1).encode(),
    "1e400 fps": lambda e: _text(e).replace('"fps": 50.0', '"fps": 1e400').encode(),
    "5000-digit count": lambda e: _text(e).replace('"samples": 2', '"samples": 1' + "0" * 5000,
                                                   1).encode(),  # fmt: skip
    "key given twice": lambda e: _text(e).replace('"views": 2', '"views": 2, "views": 9').encode(),
    "trailing garbage": lambda e: _text(e).encode() + b"\n}{garbage",
}


def manifest_raw(e: Edit, spec: dict) -> str:
    v = spec["variant"]
    if v == "fifo":
        e.fs.append(("manifest.json", _fifo))
    elif v == "directory":
        e.fs.append(("manifest.json", lambda p: (_remove(p), p.mkdir())))
    elif v == "symlink to /dev/zero":
        e.fs.append(("manifest.json", _symlink("/dev/zero")))
    elif v == "missing":
        e.fs.append(("manifest.json", _remove))
    elif v == "sparse 64 MiB + 1":
        e.fs.append(("manifest.json", lambda p: os.truncate(p, 64 * 1024**2 + 1)))
    else:
        e.manifest_raw = RAW[v](e)
    return v
