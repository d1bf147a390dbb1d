"""Reading and writing blocks: bounds checked by the C core, bytes moved by Python's mmap.

Every access first asks C for the block's usable size (``shm_block_size``: a live block of this
arena, its header's checksum intact, not sealed when writing), then slices this process's
mapping. The hot cases are one C call each: ``shm_block_span`` checks the block and the span of
a read, ``shm_block_write`` also copies a bytes object in; any failure there takes the checked
path below, which reports it. Nothing here takes a lock.
"""

from __future__ import annotations

from typing import Any

from . import _binding as C
from . import encoding
from .attachment import Attachment, check_int
from .errors import InvalidAddress, ProtectionViolation
from .sizes import count

__all__ = [
    "block_size",
    "checked_address",
    "ndarray",
    "read",
    "seal",
    "size_of",
    "span",
    "view",
    "write",
]


_span = C.block_span_raw
_write = C.block_write_raw
_TO_END = C.U64_MAX  # shm_block_span's n for "to the block's end"


def checked_address(address: object) -> int:
    """``address`` as an int (any ``operator.index`` value); InvalidAddress when it cannot be an
    offset into an arena."""
    address = check_int(address, "address")
    if not 0 <= address <= C.U64_MAX:
        raise InvalidAddress(address, "addresses are non-negative offsets into the arena")
    return address


def block_size(a: Attachment, address: int, for_write: int) -> int:
    """Usable bytes of the live block at ``address`` (``for_write``: refuse a sealed one)."""
    if address.__class__ is not int or not 0 <= address <= C.U64_MAX:
        address = checked_address(address)
    h = a.h
    r = C.block_size_raw(h if h is not None else a.handle(), address, for_write)
    if r < 0:
        C.raise_status(r, address)
    return r


def span(size: int, address: int, n: int | None, offset: int) -> tuple[int, int]:
    """The mapping's [start, end) for ``n`` bytes at ``offset`` of a block of ``size`` bytes."""
    offset = check_int(offset, "offset")
    if not 0 <= offset <= size:
        raise ValueError(
            f"offset {offset} is outside the block at {address:#x} ({count(size, 'usable byte')})"
        )
    if n is None:
        n = size - offset
    else:
        n = check_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0 (a number of bytes), got {n}")
        if offset + n > size:
            raise ValueError(
                f"{count(n, 'byte')} at offset {offset} cross the end of the block at {address:#x} "
                f"({count(size, 'usable byte')}); stay within size_of(address)"
            )
    start = address + offset
    return start, start + n


def mapped(a: Attachment, start: int, end: int) -> memoryview:
    """A view of [start, end) of this process's mapping (ValueError once closed)."""
    try:
        return a.mv[start:end]
    except ValueError:  # another thread closed the arena after the caller's checks
        raise a.closed_error() from None


def size_of(a: Attachment, address: int) -> int:
    """Usable size of the block at ``address`` (at least what was asked for)."""
    return block_size(a, address, 0)


def read(a: Attachment, address: int, n: int | None = None, offset: int = 0) -> bytes:
    """Copy ``n`` bytes (default: to the block's end) out of the block, from ``offset``."""
    if address.__class__ is int and offset.__class__ is int and (n is None or n.__class__ is int):
        try:  # the hot path: one C call checks the block and the span
            got = _span(a.h, address, offset, _TO_END if n is None else n, 0)
        except (OverflowError, TypeError):  # negative or huge values, or a closed arena
            got = -1
        if got >= 0:
            start = address + offset
            try:
                return a.mm[start : start + got]
            except ValueError:  # another thread closed the arena after the check
                raise a.closed_error() from None
    if address.__class__ is not int:
        address = checked_address(address)
    start, end = span(block_size(a, address, 0), address, n, offset)
    try:
        return a.mm[start:end]
    except ValueError:  # another thread closed the arena after the bounds check
        raise a.closed_error() from None


def write(a: Attachment, address: int, data: Any, offset: int = 0) -> int:
    """Copy a bytes-like ``data`` into the block at ``offset``; return the bytes written."""
    if data.__class__ is bytes and address.__class__ is int and offset.__class__ is int:
        try:  # the hot path: one C call checks the block and the span, and copies
            got = _write(a.h, address, offset, data, len(data))
        except (OverflowError, TypeError):  # negative or huge values, or a closed arena
            got = -1
        if got >= 0:
            return got
    try:
        src = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(
            f"data must be a contiguous bytes-like object, not {type(data).__name__}"
        ) from None
    if address.__class__ is not int:
        address = checked_address(address)
    start, end = span(block_size(a, address, 1), address, src.nbytes, offset)
    try:
        a.mv[start:end] = src
    except ValueError:  # another thread closed the arena after the bounds check
        raise a.closed_error() from None
    return end - start


def view(a: Attachment, address: int, n: int | None = None, offset: int = 0) -> memoryview:
    """A zero-copy memoryview of the block (read-only if the block is sealed)."""
    if address.__class__ is not int:
        address = checked_address(address)
    try:
        size, sealed = block_size(a, address, 1), False
    except ProtectionViolation:
        size, sealed = block_size(a, address, 0), True
    start, end = span(size, address, n, offset)
    v = mapped(a, start, end)
    return v.toreadonly() if sealed else v


def ndarray(a: Attachment, address: int, shape: int | tuple[int, ...], dtype: Any) -> Any:
    """A zero-copy numpy array over the block (needs the optional numpy extra)."""
    np = encoding.numpy()
    dt = np.dtype(dtype)
    one = hasattr(type(shape), "__index__")
    shp = tuple(check_int(d, "shape entry") for d in ((shape,) if one else shape))  # type: ignore[union-attr]
    items = 1
    for d in shp:
        if d < 0:
            raise ValueError(f"negative dimension in shape {shp}")
        items *= d
    v = view(a, address, items * dt.itemsize)
    return np.frombuffer(v, dtype=dt, count=items).reshape(shp)


def seal(a: Attachment, address: int) -> None:
    """Make the block immutable: later writes raise ProtectionViolation, views are read-only."""
    address = checked_address(address)
    block_size(a, address, 0)
    C.block_seal(a.handle(), address)
