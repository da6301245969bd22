"""The kinds of damage the shard fuzzer makes (:mod:`fuzz_shards`), and the seeded spec list.

Each kind is ``fn(edit, spec) -> detail``: it changes the shard bytes, the manifest or the files
of a split held by a :class:`fuzz_mutations.Edit`, drawing every choice from the edit's rng
(seeded by the spec), and says in one line what it did. The kinds that damage tar bytes are
here; those that damage the split's files and its manifest are in :mod:`fuzz_manifests`.
"""

from __future__ import annotations

import random
import tarfile

from fuzz_manifests import LIES, RAW, manifest_lie, manifest_raw, shard_file
from fuzz_mutations import (
    BLOCK,
    KEYS,
    Edit,
    Pristine,
    fix_checksum,
    object_npy,
    pack,
    payload,
    regular,
)

# ------------------------------------------------------------------------------ tar bytes

FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "mtime": (136, 148),
          "chksum": (148, 156), "type": (156, 157), "linkname": (157, 257),
          "magic": (257, 265), "uname": (265, 297), "prefix": (345, 500)}  # fmt: skip


def truncate_at_block(e: Edit, spec: dict) -> str:
    name, at = spec["shard"], spec["at"]
    e.set(name, e.shards[name][:at])
    return f"{name} cut at {at} (block {at // BLOCK})"


def truncate(e: Edit, spec: dict) -> str:
    name = e.shard()
    at = e.rng.randrange(len(e.shards[name]))
    e.set(name, e.shards[name][:at])
    return f"{name} cut at {at}"


def header_flip(e: Edit, spec: dict) -> str:
    name = e.shard()
    m = e.member(name)
    buf = bytearray(e.shards[name])
    field = e.rng.choice([*FIELDS, "any", "any"])
    lo, hi = FIELDS.get(field, (0, BLOCK))
    flips = []
    for _ in range(e.rng.choice((1, 1, 1, 2, 3))):
        at, bit = e.rng.randrange(lo, hi), e.rng.randrange(8)
        buf[m.header + at] ^= 1 << bit
        flips.append(f"{at}.{bit}")
    if spec["variant"] == "checksum fixed":
        fix_checksum(buf, m.header)
    e.set(name, bytes(buf))
    return f"{name} {m.name} header {field} bits {','.join(flips)}"


def payload_flip(e: Edit, spec: dict) -> str:
    name = e.shard()
    buf = bytearray(e.shards[name])
    if spec["variant"] == "padding":  # after the last member's data: end-of-archive blocks
        last = e.p.members[name][-1]
        at = e.rng.randrange(last.data + last.size, len(buf))
        what = "padding"
    else:
        m = e.member(name)
        at = m.data + e.rng.randrange(m.size)
        what = m.name
        e.weak.add(m.name.split(".")[0])
    bit = e.rng.randrange(8)
    buf[at] ^= 1 << bit
    e.set(name, bytes(buf))
    return f"{name} {what} byte {at} bit {bit}"


def _octal(n: int, width: int = 12) -> bytes:
    return f"{n:0{width - 1}o}".encode() + b"\0"


def _base256(n: int, width: int = 12) -> bytes:
    return bytes([0xFF if n < 0 else 0x80]) + (n % 256 ** (width - 1)).to_bytes(width - 1, "big")


SIZES = {
    "zero": lambda m, r: _octal(0),
    "smaller": lambda m, r: _octal(max(0, m.size - r.randint(1, 600))),
    "larger": lambda m, r: _octal(m.size + r.randint(1, 3000)),
    "over the member limit": lambda m, r: _octal(64 * 1024**2 + 1),
    "8 GiB octal": lambda m, r: b"77777777777\0",
    "2**62 base-256": lambda m, r: _base256(2**62),
    "-1 base-256": lambda m, r: _base256(-1),
    "-2**80 base-256": lambda m, r: b"\xff" + b"\x00" * 11,
    "not octal": lambda m, r: b"9999999999x\0",
}


def size_field(e: Edit, spec: dict) -> str:
    name = e.shard()
    m = e.member(name)
    buf = bytearray(e.shards[name])
    h, variant = m.header, spec["variant"]
    if variant.startswith("sparse"):  # old GNU sparse: 'S', real size at 483
        buf[h + 156] = ord("S")
        buf[h + 483 : h + 495] = _octal(6 * 1024**3)
        buf[h + 482] = 1 if variant == "sparse, extended" else 0
    else:
        buf[h + 124 : h + 136] = SIZES[variant](m, e.rng)
    fix_checksum(buf, h)
    e.set(name, bytes(buf))
    return f"{name} {m.name} size {bytes(buf[h + 124 : h + 136])!r} type {chr(buf[h + 156])}"


def _pax(records: dict[str, str | bytes]) -> bytes:
    """pax extended header records (each starts with its own length, that length included)."""
    out = b""
    for k, v in records.items():
        body = b" " + k.encode() + b"=" + (v if isinstance(v, bytes) else v.encode()) + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n += 1
        out += str(n).encode() + body
    return out


def _ext_header(kind: bytes, data: bytes, claim: int | None = None) -> bytes:
    """An extended header block ('x' pax, 'L' GNU long name) and its data blocks; ``claim``
    overrides the size its header states."""
    info = tarfile.TarInfo("././@PaxHeader" if kind == b"x" else "././@LongLink")
    info.type, info.size = kind, len(data)
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT if kind == b"L" else tarfile.USTAR_FORMAT))
    if claim is not None:
        block[124:136] = _octal(claim) if 0 <= claim < 8**11 else _base256(claim)
        fix_checksum(block, 0)
    pad = -len(data) % BLOCK
    return bytes(block) + data + b"\0" * pad


EXTENDED = {
    "pax size huge": lambda k: (b"x", _pax({"size": str(2**70)}), None),
    "pax size negative": lambda k: (b"x", _pax({"size": "-5"}), None),
    "pax size not a number": lambda k: (b"x", _pax({"size": "12ab"}), None),
    "pax path traversal": lambda k: (b"x", _pax({"path": f"../../{k}.meta.json"}), None),
    "pax path of another member": lambda k: (b"x", _pax({"path": f"{k}.pose3d.npy"}), None),
    "pax record length wrong": lambda k: (b"x", b"99999 path=x\n", None),
    "pax record length zero": lambda k: (b"x", b"0 path=x\n", None),
    "pax binary path": lambda k: (b"x", _pax({"hdrcharset": "BINARY", "path": b"\xff\xfe.x"}),
                                  None),  # fmt: skip
    "pax gnu sparse map": lambda k: (b"x", _pax({"GNU.sparse.realsize": str(2**40),
                                                 "GNU.sparse.map": "0,5,9999999999999,1"}),
                                     None),  # fmt: skip
    "pax header claims 1 GiB": lambda k: (b"x", _pax({"mtime": "1"}), 2**30),
    "gnu long name": lambda k: (b"L", f"{k}.meta.json".encode() + b"\0", None),
    "gnu long name claims 8 GiB": lambda k: (b"L", b"x.meta.json\0", 8 * 1024**3),
    "gnu long name claims -1": lambda k: (b"L", b"x.meta.json\0", -1),
}


def extended_header(e: Edit, spec: dict) -> str:
    name = e.shard()
    m = e.member(name)
    kind, data, claim = EXTENDED[spec["variant"]](e.rng.choice(KEYS))
    buf = e.shards[name]
    e.set(name, buf[: m.header] + _ext_header(kind, data, claim) + buf[m.header :])
    return f"{name} before {m.name}"


# ------------------------------------------------------------------ members moved or added


def _sample_span(items: list[tuple[str, bytes]], key: str) -> tuple[int, int]:
    at = [i for i, (n, _) in enumerate(items) if n.split(".")[0] == key]
    return at[0], at[-1] + 1


def reorder(e: Edit, spec: dict) -> str:
    name, v, r = e.shard(), spec["variant"], e.rng
    items = e.items(name)
    keys = list(dict.fromkeys(n.split(".")[0] for n, _ in items))
    if v == "swap two members":
        i, j = r.sample(range(len(items)), 2)
        items[i], items[j] = items[j], items[i]
        detail = f"{items[j][0]} <-> {items[i][0]}"
    elif v == "swap samples":
        a, b = _sample_span(items, keys[0]), _sample_span(items, keys[1])
        items = items[b[0] : b[1]] + items[a[0] : a[1]] + items[b[1] :]
        detail = f"{keys[1]} before {keys[0]}"
    elif v == "shuffle a sample":
        lo, hi = _sample_span(items, k := r.choice(keys))
        part = items[lo:hi]
        r.shuffle(part)
        items[lo:hi], detail = part, k
    elif v == "member into another sample":
        i = r.randrange(len(items))
        moved = items.pop(i)
        items.insert(r.randrange(len(items) + 1), moved)
        detail = moved[0]
    elif v == "reverse the shard":
        items, detail = items[::-1], ""
    else:  # "sample to another shard": swap the second samples of two shards
        other = r.choice([n for n in e.p.names if n != name])
        theirs = e.items(other)
        k1, k2 = keys[1], list(dict.fromkeys(n.split(".")[0] for n, _ in theirs))[1]
        a, b = _sample_span(items, k1), _sample_span(theirs, k2)
        mine = items[a[0] : a[1]]
        items[a[0] : a[1]] = theirs[b[0] : b[1]]
        theirs[b[0] : b[1]] = mine
        e.set(other, pack(theirs))
        detail = f"{k1} <-> {other} {k2}"
    e.set(name, pack(items))
    return f"{name} {detail}".strip()


def _pick_sample(e: Edit) -> tuple[str, list, str, tuple[int, int]]:
    """A random shard of the edit, its members, one of its sample keys and that sample's span."""
    name = e.shard()
    items = e.items(name)
    k = e.rng.choice(list(dict.fromkeys(n.split(".")[0] for n, _ in items)))
    return name, items, k, _sample_span(items, k)


def duplicate(e: Edit, spec: dict) -> str:
    v, r = spec["variant"], e.rng
    name, items, k, (lo, hi) = _pick_sample(e)
    if v == "member twice":
        i = r.randrange(lo, hi)
        items.insert(i + 1, items[i])
        detail = items[i][0]
    elif v == "sample twice in a row":
        items[hi:hi] = items[lo:hi]
        detail = k
    elif v == "sample again at the end":
        items += items[lo:hi]
        detail = k
    elif v == "sample into another shard":
        other = r.choice([n for n in e.p.names if n != name])
        e.set(other, pack(e.items(other) + items[lo:hi]))
        return f"{k} of {name} appended to {other}"
    else:  # "shard listed twice": a copy under a new name, listed with its true hash
        copy_name = "shard-000099.tar"
        e.shards[copy_name] = e.shards[name]
        e.changed.add(copy_name)
        entry = dict(next(s for s in e.manifest["shards"] if s["name"] == name))
        entry["name"] = copy_name
        e.manifest["shards"].append(entry)
        e.manifest["samples"] = e.manifest.get("samples", 0) + entry["samples"]
        return f"{name} also listed as {copy_name}"
    e.set(name, pack(items))
    return f"{name} {detail}"


def extra_member(e: Edit, spec: dict) -> str:
    v, r = spec["variant"], e.rng
    name, items, k, (_, hi) = _pick_sample(e)
    junk = r.randbytes(r.randrange(1, 2000))
    new = {
        "unknown extension": (f"{k}.foo", junk),
        "no extension": (k, junk),
        "new key with junk": ("k9999.meta.json", junk),
        "empty member": (f"{k}.empty", b""),
        "1 MiB member": (f"{k}.bin", r.randbytes(1 << 20)),
        "view beyond V": (f"{k}.v02.t000.jpg", dict(items)[f"{k}.v00.t000.jpg"]),
        "frame beyond T": (f"{k}.v00.t007.jpg", dict(items)[f"{k}.v00.t000.jpg"]),
        "schema name, junk bytes": (f"{k}.{r.choice(['pose3d.npy', 'meta.json'])}", junk),
    }[v]
    if v == "schema name, junk bytes":  # replaces the member of that name
        items = [(n, new[1] if n == new[0] else d) for n, d in items]
    else:
        items.insert(hi if v != "new key with junk" else len(items), new)
    e.set(name, pack(items))
    return f"{name} {new[0]} ({len(new[1])} bytes)"


PICKLE_AS = {"ext pyd": ".pyd", "ext pickle": ".pickle", "ext pkl": ".pkl", "ext pth": ".pth",
             "ext pt": ".pt", "as pose3d.npy": ".pose3d.npy", "as meta.json": ".meta.json",
             "as a frame": ".v00.t000.jpg", "as masks.npy": ".masks.npy",
             "object array as pose3d.npy": ".pose3d.npy", "new key, pyd only": ".pyd"}  # fmt: skip


def pickled(e: Edit, spec: dict) -> str:
    name, v = e.shard(), spec["variant"]
    items = e.items(name)
    k = e.rng.choice(list(dict.fromkeys(n.split(".")[0] for n, _ in items)))
    data = object_npy(e.marker) if v.startswith("object") else payload(e.marker)
    member = ("evil" if v.startswith("new key") else k) + PICKLE_AS[v]
    names = [n for n, _ in items]
    if member in names:
        items[names.index(member)] = (member, data)
    else:
        items.insert(_sample_span(items, k)[1], (member, data))
    e.set(name, pack(items))
    return f"{name} {member}"


BAD_NAMES = {
    "dot-dot": lambda n: f"../{n}",
    "absolute": lambda n: f"/tmp/posebert-fuzz-escape/{n}",
    "dot-slash": lambda n: f"./{n}",
    "inner dot-dot": lambda n: f"x/../../{n}",
    "over 100 chars (pax path)": lambda n: "d" * 120 + "/" + n,
    "newline": lambda n: n.replace(".", "\n.", 1),
    "trailing slash": lambda n: n + "/",
    "backslash": lambda n: "..\\" + n,
    "non-ascii": lambda n: n.replace("k", "\u212a", 1),  # KELVIN SIGN
}


def bad_name(e: Edit, spec: dict) -> str:
    name, v = e.shard(), spec["variant"]
    items = e.items(name)
    i = e.rng.randrange(len(items))
    old = items[i][0]
    new = BAD_NAMES[v](old)
    if e.rng.random() < 0.5:  # renamed: the sample loses that member
        items[i] = (new, items[i][1])
        how = "renamed"
    else:
        items.insert(i + 1, (new, items[i][1]))
        how = "added"
    e.set(name, pack(items))
    return f"{name} {how} {new!r}"


SPECIAL = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "char device": tarfile.CHRTYPE,
           "block device": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE, "directory": tarfile.DIRTYPE,
           "contiguous file": tarfile.CONTTYPE}  # fmt: skip


def special_member(e: Edit, spec: dict) -> str:
    name, v, r = e.shard(), spec["variant"], e.rng
    items = e.items(name)
    i = r.randrange(len(items))
    target = r.choice(["/etc/passwd", "../../../etc/passwd", items[r.randrange(len(items))][0]])
    replace = r.random() < 0.5
    new = items[i][0] if replace else items[i][0].split(".")[0] + ".link"
    if v == "contiguous file":  # a regular file by another type flag: read as one
        info = regular(new, len(items[i][1]))
        info.type = SPECIAL[v]
        entry = (info, items[i][1])
    else:
        info = regular(new, 0)
        info.type, info.linkname = SPECIAL[v], target
        info.devmajor, info.devminor = 1, 5
        entry = info
    if replace:
        items[i] = entry
    else:
        items.insert(i + 1, entry)
    e.set(name, pack(items))
    return f"{name} {'replaced' if replace else 'added'} {new} -> {target}"


# ------------------------------------------------------------------------------ the specs

KINDS = {  # kind: (function, weight, variants, rehash modes to draw from)
    "truncate at a 512-byte boundary": (truncate_at_block, 0, [""], ["hash"]),
    "truncate anywhere": (truncate, 4, [""], ["none", "hash"]),
    "header bit flip": (header_flip, 12, ["checksum fixed", "checksum fixed", "checksum stale"],
                        ["hash", "hash", "none"]),  # fmt: skip
    "payload bit flip": (payload_flip, 6, ["member", "member", "padding"], ["none"]),
    "payload bit flip, manifest rehashed": (payload_flip, 4, ["member"], ["hash"]),
    "member size in header": (size_field, 8, [*SIZES, "sparse", "sparse, extended"],
                              ["hash", "hash", "hash", "none"]),  # fmt: skip
    "pax / GNU extended header": (extended_header, 6, list(EXTENDED), ["hash", "hash", "none"]),
    "members reordered": (reorder, 6, ["swap two members", "swap samples", "shuffle a sample",
                                       "member into another sample", "reverse the shard",
                                       "sample to another shard"],
                          ["hash", "count", "none"]),  # fmt: skip
    "duplicated key": (duplicate, 5, ["member twice", "sample twice in a row",
                                      "sample again at the end", "sample into another shard",
                                      "shard listed twice"], ["hash", "count", "none"]),
    "extra member": (extra_member, 5, ["unknown extension", "no extension", "new key with junk",
                                       "empty member", "1 MiB member", "view beyond V",
                                       "frame beyond T", "schema name, junk bytes"],
                     ["hash", "count", "none"]),  # fmt: skip
    "pickle member": (pickled, 6, list(PICKLE_AS), ["hash", "hash", "count", "none"]),
    "member name ../ or absolute": (bad_name, 6, list(BAD_NAMES), ["hash", "count", "none"]),
    "special file member": (special_member, 6, list(SPECIAL), ["hash", "count", "none"]),
    "shard file replaced": (shard_file, 4, ["fifo", "symlink to /dev/zero",
                                            "symlink to another shard",
                                            "symlink to another shard, its hash",
                                            "symlink out of the split, same bytes",
                                            "directory", "missing", "empty", "stray fifo",
                                            "stray copy"], ["none"]),  # fmt: skip
    "manifest type / range lie": (manifest_lie, 12, list(LIES), ["none"]),
    "manifest bytes": (manifest_raw, 4, [*RAW, "fifo", "directory", "symlink to /dev/zero",
                                         "missing", "sparse 64 MiB + 1"], ["none"]),
}


def make_specs(p: Pristine, count: int, seed: int = 0, only: set[str] | None = None
               ) -> list[dict]:  # fmt: skip
    """``count`` specs: a cut at every 512-byte boundary of every shard (with the manifest's hash
    rewritten to the cut file, so only the sample count can tell), then seeded draws of the
    other kinds by weight (``only``: of these kinds)."""
    rng = random.Random(seed)
    cuts = "truncate at a 512-byte boundary"
    specs = [{"kind": cuts, "variant": "", "rehash": "hash", "shard": name, "at": at}
             for name in p.names for at in range(0, len(p.shards[name]), BLOCK)
             if only is None or cuts in only]  # fmt: skip
    if len(specs) > count:
        specs = rng.sample(specs, count)
    kinds = [k for k, (_, w, _, _) in KINDS.items() if w and (only is None or k in only)]
    weights = [KINDS[k][1] for k in kinds]
    while len(specs) < count:
        kind = rng.choices(kinds, weights)[0]
        _, _, variants, rehash = KINDS[kind]
        specs.append({"kind": kind, "variant": rng.choice(variants),
                      "rehash": rng.choice(rehash)})  # fmt: skip
    for i, spec in enumerate(specs):
        spec["id"], spec["seed"] = i, seed * 1_000_003 + i
    return specs


def apply(spec: dict, p: Pristine, split, marker: str) -> tuple[str, set[str]]:
    """Damage ``split`` (holding the pristine files) as ``spec`` says: (detail, keys whose
    content may differ undetectably: a payload flip under a rewritten hash)."""
    e = Edit(p, random.Random(spec["seed"]), marker)
    detail = KINDS[spec["kind"]][0](e, spec)
    e.write(split, spec["rehash"])
    weak = e.weak if spec["rehash"] != "none" and spec["kind"].startswith("payload") else set()
    return detail, weak
