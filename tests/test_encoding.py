"""How values become streams: a plain numpy array takes the array header (no pickle), bytes a
marker byte, scalars and flat containers of them marshal's format, anything else pickle 5; all
come back equal, arrays as read-only views over the arena, through put/get and through a Queue."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

import shmalloc
from shmalloc import MemoryManager, encoding

ARRAYS = {
    "float64": np.arange(1000.0),
    "small int32": np.arange(10, dtype=np.int32),
    "big-endian int16": np.arange(3000, dtype=">i2"),
    "bool": np.arange(2000) % 3 == 0,
    "complex": np.arange(500) * (1 + 2j),
    "datetime64": np.arange(300).astype("datetime64[ns]"),
    "unicode": np.array(["a", "bcd", "é"] * 200),
    "bytes": np.array([b"xy", b"z"] * 600),
    "fortran 2-D": np.asfortranarray(np.arange(2400.0).reshape(40, 60)),
    "0-d": np.array(7.5),
    "empty": np.zeros((0, 5)),
    "structured": np.zeros(100, dtype=[("id", "<i4"), ("xy", ">f8", (2,))]),
    "void": np.zeros(200, dtype="V8"),
}

PICKLED = {
    "object dtype": np.array([1, "a", None], dtype=object),
    "not contiguous": np.arange(4000.0)[::2],
    "a subclass": np.ma.masked_array(np.arange(2000.0), mask=np.arange(2000) % 2 == 0),
    "dict of arrays": {"a": np.arange(2000.0), "b": [1, 2]},
}


@pytest.mark.parametrize("name", ARRAYS)
def test_plain_arrays_skip_pickle_and_come_back_equal(mgr: MemoryManager, name: str) -> None:
    a = ARRAYS[name]
    stream, bufs = encoding.encode(a)
    assert stream[0] == 0, "not the array header"
    assert len(bufs) == (a.nbytes >= encoding.INLINE_BELOW)
    back = mgr.get(mgr.put(a))
    _same(back, a)
    assert not back.flags.writeable
    assert back.flags.f_contiguous == a.flags.f_contiguous
    del back


@pytest.mark.parametrize("name", PICKLED)
def test_other_values_are_pickled(mgr: MemoryManager, name: str) -> None:
    value = PICKLED[name]
    stream, _ = encoding.encode(value)
    assert stream[:1] == b"\x80", "not a pickle stream"
    back = mgr.get(mgr.put(value))
    assert type(back) is type(value)
    if isinstance(value, dict):
        _same(back["a"], value["a"])
        assert back["b"] == value["b"]
    else:
        _same(np.asarray(back), np.asarray(value))
    del back


class Tagged(bytes):
    """A bytes subclass: pickled, so that it comes back as itself."""


@pytest.mark.parametrize("size", [0, 1, 100, 10 * 1024, 1 << 20])
def test_bytes_skip_pickle_and_come_back_equal(mgr: MemoryManager, size: int) -> None:
    """bytes (a record) take byte 1 and their bytes, whatever their size; a bytearray or a
    bytes subclass is pickled (it must come back as itself)."""
    value = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream, bufs = encoding.encode(value)
    assert stream[:1] == b"\x01" and stream[1:] == value and not bufs
    q = shmalloc.Queue(arena=mgr)
    q.put(value)
    for back in (mgr.get(mgr.put(value)), q.get()):
        assert type(back) is bytes and back == value
    del q
    for other in (bytearray(value), Tagged(value)):
        stream, _ = encoding.encode(other)
        assert stream[:1] == b"\x80", "not a pickle stream"
        back = mgr.get(mgr.put(other))
        assert type(back) is type(other) and back == other


class Level(int):
    """An int subclass: pickled, so that it comes back as itself."""


MARSHALLED = {
    "float": 9.5,
    "negative zero": -0.0,
    "nan": float("nan"),
    "int of 64 bits": -(1 << 63),
    "bool": True,
    "none": None,
    "complex": 1 - 2.5j,
    "str with a lone surrogate": "caf\u00e9 \ud800",
    "tuple": (7, "job", 2.5, None, False),
    "empty tuple": (),
    "list": [1, 2.0, "three"],
    "dict": {"id": 3, 4: "four", None: 1.5},
}

NOT_MARSHALLED = {
    "int subclass": Level(3),
    "numpy scalar": np.float64(2.5),
    "nested tuple": (1, (2, 3)),
    "tuple with bytes": (1, b"x"),
    "list with a bytearray": [bytearray(b"ab")],
    "dict with a tuple key": {(1, 2): 3},
    "set": {1, 2},
    "int beyond 64 bits": 1 << 64,
    "str over 1 KiB": "x" * 1100,
    "list of one str many times": ["y" * 300] * 10,  # marshal would write it 10 times
    "dict of 200 items": {i: float(i) for i in range(200)},
}


def _alike(a: Any, b: Any) -> bool:
    """Same types all the way down, and the same values (a NaN is its own like)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_alike(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_alike(a[k], b[k]) for k in a)
    return repr(a) == repr(b)


def test_scalars_and_flat_containers_of_them_are_marshalled(mgr: MemoryManager) -> None:
    """Their stream is byte 2 and marshal's format (made and read in C by Queue's put and get,
    in Python by encode/decode); each comes back as the same types and values whichever way."""
    q = shmalloc.Queue(arena=mgr)
    for name, value in MARSHALLED.items():
        stream, bufs = encoding.encode(value)
        assert stream[:1] == b"\x02" and not bufs, name
        q.put(value)  # C's half
        q.put(value, timeout=10)  # the Python half
        backs = [mgr.get(mgr.put(value)), q.get(), q.get(timeout=10)]
        assert all(_alike(back, value) for back in backs), (name, backs)
    for name, value in NOT_MARSHALLED.items():
        stream, _ = encoding.encode(value)
        assert stream[:1] == b"\x80", f"{name}: not a pickle stream"
        q.put(value)
        assert _alike(q.get(), value) and _alike(mgr.get(mgr.put(value)), value), name
    q.put(["z" * 100_000] * 1000)  # 100 MB if each were written out: one string, pickled
    back = q.get()
    assert len(back) == 1000 and back[0] is back[999] and back[0] == "z" * 100_000
    del q


def test_arrays_through_a_queue(mgr: MemoryManager) -> None:
    q = shmalloc.Queue(arena=mgr)
    for a in ARRAYS.values():
        q.put(a)
    for a in ARRAYS.values():
        back = q.get()
        _same(back, a)
        del back
    del q


def test_empty_is_an_array_object_too(mgr: MemoryManager) -> None:
    arr, ref = mgr.empty((30, 40), np.dtype([("a", "<u2"), ("b", "f4")]), order="F")
    arr["a"] = np.arange(1200).reshape(30, 40)
    del arr
    back = mgr.get(ref)
    assert back.dtype.names == ("a", "b") and back.flags.f_contiguous
    assert back["a"][29, 39] == 1199
    del back


def test_a_damaged_header_raises_and_never_reads_past_its_buffer() -> None:
    stream, bufs = encoding.encode(np.arange(1000.0))
    cut = bytearray(stream)
    cut[-8:] = (10**6).to_bytes(8, "little")  # a shape far larger than the buffer
    with pytest.raises(ValueError):
        encoding.decode(bytes(cut), bufs)
    with pytest.raises((ValueError, TypeError, pickle.UnpicklingError, UnicodeDecodeError)):
        encoding.decode(bytes(stream[:3]) + b"\xff" * 4, bufs)


def _same(got: Any, want: Any) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.hasobject:
        assert got.tolist() == want.tolist()
    else:
        assert got.tobytes(order="A") == want.tobytes(order="A")
