"""How a value becomes an object's stream and buffers, and back.

Any value is pickled with protocol 5: each contiguous buffer of 1 KiB or more (``INLINE_BELOW``)
goes out of band, into a sealed block of its own, and the rest makes the stream. A plain numpy
array (a C- or Fortran-contiguous ``ndarray`` of a numeric, bytes or unstructured dtype), the
value users hand off most, skips pickle: its stream is a short header (dtype, order, shape) and
its data is its one buffer, or follows the header when small. Pickling an array costs some
15 µs of numpy's reduce protocol and dtype pickling whatever its size; the header costs one
``struct.pack``. Both readers build the same thing: a read-only ndarray over the arena's memory
(or, for a small one, over a private copy).

A ``bytes`` value, the records programs pass most, skips pickle too: its stream is byte 1 and
its bytes (pickling and unpickling 100 bytes cost more than the rest of a Queue's put and get).
So does a builtin scalar (an int up to 64 bits, float, complex, str, bool or None, of exactly
that type), or a tuple, list or dict of them (the messages, answers and small results), whose
stream takes at most 1 KiB: its stream is byte 2 and ``marshal``'s format (version 2), which
reads back the same types and values for a third to a half of pickle's cost (no pickler to make,
no memo). An object such a container holds twice comes back as two equal objects. Queue's C
half makes and reads these two kinds itself (native/fastcall.c decides which values are
marshalled).

An array stream starts with byte 0, a bytes stream with byte 1, a marshalled one with byte 2,
which no pickle stream does (they start with PROTO, 0x80).
"""

from __future__ import annotations

import functools
import marshal
import pickle
import struct
import sys
from collections.abc import Sequence
from typing import Any

from . import _binding as C

__all__ = ["INLINE_BELOW", "array_header", "decode", "encode", "numpy"]

INLINE_BELOW = 1024  # out-of-band buffers smaller than this go in the stream (one block)

_ARRAY = 0  # first byte of an array stream
_BYTES = C.BYTES_MARK  # first byte of a bytes stream (defined in native/fastcall.c, which
# makes and reads those streams in Queue.put and get); the bytes follow
_BYTES_MARK = bytes([_BYTES])
_MARSHAL = C.MARSHAL_MARK  # first byte of a marshalled value's stream (as _BYTES)
# byte 0, the dtype's length, order ('C' or 'F'), number of dimensions; then the dtype (its
# string, or its pickle where the string loses something: a structured dtype), then one
# little-endian int64 per dimension
_HEAD = struct.Struct("<BHcB")


def numpy() -> Any:
    """The numpy module, or ImportError saying how to install it."""
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "arrays in the arena need numpy, an optional extra: pip install 'shmalloc[numpy]'"
        ) from None
    return numpy


@functools.lru_cache(maxsize=256)  # the shapes a program hands off are few
def array_header(dtype: Any, shape: tuple[int, ...], order: str) -> bytes:
    """The stream of an array of ``dtype`` (a numpy dtype) and ``shape`` whose data is its one
    out-of-band buffer, or follows."""
    code = _dtype_code(dtype)
    head = _HEAD.pack(_ARRAY, len(code), order.encode(), len(shape))
    return head + code + struct.pack(f"<{len(shape)}q", *shape)


def _dtype_code(dtype: Any) -> bytes:
    code: bytes = dtype.str.encode("ascii")
    if dtype.names is not None or dtype.str[1] == "V" or dtype.metadata:
        code = pickle.dumps(dtype, protocol=5)  # starts with PROTO (0x80), a string never does
    return code


def _plain_array(obj: Any) -> str | None:
    """'C' or 'F' if the ndarray ``obj`` is one the array stream can carry, else None."""
    dt = obj.dtype
    if dt.hasobject or dt.itemsize == 0:
        return None  # Python objects, empty items: pickle says it all
    flags = obj.flags
    if flags.c_contiguous:
        return "C"
    return "F" if flags.f_contiguous else None


def encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """(stream, out-of-band buffers) of ``obj``; raises what pickle raises for a value it cannot
    pickle."""
    if type(obj) is bytes:
        return _BYTES_MARK + obj, []
    stream = C.marshal_stream(obj)  # (checked and written in one call: no thread between)
    if stream is not None:
        return stream, []
    np = sys.modules.get("numpy")  # never imported here for a value that cannot be an array
    order = _plain_array(obj) if np is not None and type(obj) is np.ndarray else None
    if order is not None:
        head = array_header(obj.dtype, obj.shape, order)
        raw = memoryview(obj.ravel(order="K").view("u1"))  # its bytes in memory order, no copy
        if raw.nbytes < INLINE_BELOW:
            return head + raw.tobytes(), []
        return head, [raw]
    bufs: list[memoryview] = []

    def out_of_band(pb: pickle.PickleBuffer) -> bool:
        """False: this buffer goes out of band, in a block of its own."""
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        if raw.nbytes < INLINE_BELOW or len(bufs) >= C.OBJECT_MAX_BUFFERS:
            return True
        bufs.append(raw)
        return False

    return pickle.dumps(obj, protocol=5, buffer_callback=out_of_band), bufs


def decode(stream: Any, buffers: Sequence[Any] = ()) -> Any:
    """The value of ``stream`` (bytes, or a memoryview this call may not keep) and its
    out-of-band ``buffers`` (views that the value may keep)."""
    first = stream[0] if len(stream) else None
    if first == _BYTES:
        return bytes(stream[1:])
    if first == _MARSHAL:
        return marshal.loads(stream[1:])
    if first != _ARRAY:
        return pickle.loads(stream, buffers=buffers)
    _, n, _, ndim = _HEAD.unpack_from(stream)
    end = _HEAD.size + n + 8 * ndim
    dtype, shape, order, count = _parse(bytes(stream[:end]))
    data = buffers[0] if buffers else bytes(stream[end:])
    return numpy().frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order)


@functools.lru_cache(maxsize=256)
def _parse(head: bytes) -> tuple[Any, tuple[int, ...], str, int]:
    """(dtype, shape, order, number of items) of an array header."""
    _, n, order, ndim = _HEAD.unpack_from(head)
    code = head[_HEAD.size : _HEAD.size + n]
    np = numpy()
    dtype = pickle.loads(code) if code[:1] == b"\x80" else np.dtype(code.decode("ascii"))
    shape = struct.unpack_from(f"<{ndim}q", head, _HEAD.size + n)
    count = 1
    for d in shape:
        count *= d
    return dtype, shape, order.decode(), count
