"""Reading what a file claims without trusting it: bounded before anything is allocated.

Helpers for the checks of shards and manifests (:mod:`data_shards.schema`,
:mod:`data_shards.manifest`): short one-line descriptions of hostile values and text, JSON nesting
walked without recursion, and ``.npy`` arrays whose header is checked against the bytes that
follow it (``np.load`` allocates what the header claims first, 64 TiB included).
"""

from __future__ import annotations

import io
import math

import numpy as np

MAX_JSON_DEPTH = 32
"""The deepest nesting of free-form JSON (``meta.extra``, a manifest's ``source``) accepted;
writers nest 4 levels at most, and a 200k-deep document only exhausts the recursion limit."""


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: one short line whatever a file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int = 400) -> str:
    """Text from a file (a sample key, a member name) as one printable line of at most ``limit``
    characters: a key holding a newline or terminal escapes must not forge or hide log lines."""
    text = " ".join(text.split())
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_depth_ok(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests at most ``limit`` containers deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def is_int(value: object) -> bool:
    """A whole number that is not a bool (JSON true is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def load_npy(data: bytes) -> np.ndarray:
    """A plain ``.npy`` array from its bytes, checked from the header before anything is
    allocated: ValueError unless its shape x dtype is exactly the bytes that follow the header
    (a 1 KB member can claim 64 TiB, which ``np.load`` would try to allocate first) and the
    dtype holds no objects (nothing is unpickled)."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f"npy format version {version[0]}.{version[1]} is not read")
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds objects (loading it would unpickle)")
    count, offset = math.prod(shape), buf.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise ValueError(f"header claims shape {brief(shape)} of {dtype} "
                         f"({count * dtype.itemsize} bytes), the member holds "
                         f"{len(data) - offset}")  # fmt: skip
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")  # writable
