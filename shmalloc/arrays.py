"""Hand a numpy array to another process in one copy: ``share_array()`` and ``SharedArray``.

    handle = share_array(mgr, array)     # producer: one copy into a block of the arena
    queue.put(handle)                    # a few hundred bytes, whatever the array's size
    a = handle.open()                    # consumer: the same array, zero-copy (mgr.ndarray)
    ...
    handle.free()                        # whoever is done with it last

A ``SharedArray`` is the arena's name, the block's address, the shape, the dtype (numpy's
array-protocol description, so structured dtypes survive) and the memory order. Opening it in
another process attaches to the arena (once per process) and returns an ndarray over the block:
writes through it are seen by every process that opened it.

The block belongs to the producer like any allocation: if the producer ends before the block is
freed, the arena's collector reclaims it unless a consumer took it over (``open(adopt=True)``)
or the producer shared it with ``persist=True`` (then only ``free()`` releases it). A handle is
valid until its block is freed; after that, an open may fail with ``InvalidAddress`` or, if the
space was reused, see other data, like any dangling address.

numpy is an optional extra (``pip install shmalloc[numpy]``); it is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .manager import MemoryManager

__all__ = ["SharedArray", "share_array"]

_ALIGN = 64  # a cache line: what numpy's SIMD loops like best

_attached: dict[str, MemoryManager] = {}  # arenas opened by handles in this process, by name


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "shmalloc.arrays needs numpy, an optional extra: pip install 'shmalloc[numpy]'"
        ) from None
    return numpy


def _attach(name: str) -> MemoryManager:
    """The arena ``name``, attached once per process. No Python lock (a fork child or a signal
    handler could wait forever on one held by a thread that does not exist or that it
    interrupted): two threads that race here both attach, and the one that comes second keeps
    the first one's manager and closes its own."""
    mgr = _attached.get(name)
    if mgr is None or mgr.closed:
        new = MemoryManager.attach(name)
        mgr = _attached.get(name)
        if mgr is None or mgr.closed:
            _attached[name] = mgr = new
        else:
            new.close()
    return mgr


def _over(mgr: MemoryManager, address: int, shape: tuple[int, ...], dtype: Any, order: str) -> Any:
    """The ndarray over a block: mgr.ndarray, transposed for Fortran order."""
    if order == "F":  # the transpose of the C-ordered array of reversed shape
        return mgr.ndarray(address, shape[::-1], dtype).T
    return mgr.ndarray(address, shape, dtype)


@dataclass(frozen=True)
class SharedArray:
    """A small, picklable handle to an ndarray held in a block of an arena."""

    arena: str
    address: int
    shape: tuple[int, ...]
    dtype: Any  # numpy.lib.format.dtype_to_descr(): '<f8', or a list for structured dtypes
    order: str  # 'C' or 'F'

    def _manager(self, mgr: MemoryManager | None) -> MemoryManager:
        if mgr is None:
            return _attach(self.arena)
        if mgr.name != self.arena:
            raise ValueError(
                f"this array lives in arena {self.arena!r}, not {mgr.name!r}; pass that arena's "
                "manager, or none to attach to it"
            )
        return mgr

    def open(self, mgr: MemoryManager | None = None, *, adopt: bool = False) -> Any:
        """The array, zero-copy: an ndarray over the block. ``mgr`` defaults to the arena
        attached by name (once per process); ``adopt=True`` makes this process the block's owner
        (it then outlives the producer, until this process ends or frees it)."""
        np = _numpy()
        mgr = self._manager(mgr)
        if adopt:
            mgr.adopt(self.address)
        return _over(
            mgr, self.address, self.shape, np.lib.format.descr_to_dtype(self.dtype), self.order
        )

    def asarray(self, mgr: MemoryManager | None = None) -> Any:
        """The array, zero-copy (``open()`` under numpy's name)."""
        return self.open(mgr)

    def free(self, mgr: MemoryManager | None = None) -> int:
        """Free the block (from any process); return its size. Arrays opened on it must no
        longer be used."""
        return self._manager(mgr).deallocate(self.address)


def share_array(mgr: MemoryManager, array: Any, *, persist: bool = False) -> SharedArray:
    """Copy ``array`` (anything ``numpy.asarray`` takes) into a new block of ``mgr``, once, and
    return a handle that any process turns back into the same array without copying.

    A C- or Fortran-contiguous array keeps its memory order; any other is stored C-contiguous.
    Arrays of Python objects cannot be shared (their items are pointers into this process)."""
    np = _numpy()
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(
            f"cannot share an array of dtype {a.dtype}: it holds Python objects, which live in "
            "this process; convert it to a numeric, bytes or structured dtype first"
        )
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    address = mgr.allocate(max(a.nbytes, 1), align=_ALIGN)
    try:
        handle = SharedArray(
            mgr.name, address, tuple(a.shape), np.lib.format.dtype_to_descr(a.dtype), order
        )
        np.copyto(_over(mgr, address, handle.shape, a.dtype, order), a, casting="no")
        if persist:
            mgr.persist(address)
    except BaseException:
        mgr.deallocate(address)
        raise
    return handle
