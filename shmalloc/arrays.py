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

The block belongs to the producer like any allocation, and the producer may end right after
sharing: the block is pinned (``MemoryManager.retain``) in every process that holds it, so no
collection frees it under a reader.

* An opened array pins its block for as long as the array or any view of it (slices, ``.T``,
  memoryviews, arrays built on it) is alive; the last one to go releases the reference.
* A handle received from another process (unpickled: through a queue, a pipe, a Pool result)
  pins its block for as long as that handle object lives, so a pool worker's result survives the
  worker's end until the receiver opens it.

When the producer has ended and the last pin goes, the block is freed at once. Otherwise it
lives until ``free()``, until a consumer takes it over (``open(adopt=True)``) and ends, or, with
``persist=True``, until ``free()`` only. A handle whose block was freed is a dangling address: an
open may fail with ``InvalidAddress``. A pin costs one entry of the arena's reference table (4096
entries, one per process and block) while it lives.

numpy is an optional extra (``pip install shmalloc[numpy]``); it is imported on first use.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

from .errors import ShmallocError
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


def _unpin(mgr: MemoryManager, address: int, pid: int) -> None:
    """Drop the reference a pin took (a finalizer: it must not raise)."""
    if os.getpid() != pid or mgr.closed:
        return  # a fork child's copy of the parent's pin, or the process detached: not ours
    try:
        mgr.release(address)
    except (ShmallocError, ValueError) as e:
        warnings.warn(
            f"the block at {address:#x} of arena {mgr.name!r} was freed while an array or handle "
            f"still pinned it ({e}); free() it only once every array over it is gone",
            ResourceWarning,
            stacklevel=1,
        )


def _pin(
    mgr: MemoryManager, address: int, holder: object
) -> weakref.finalize[[MemoryManager, int, int], object]:
    """Hold a reference on the block until ``holder`` is garbage (at exit, the reference dies
    with the process)."""
    mgr.retain(address)
    fin = weakref.finalize(holder, _unpin, mgr, address, os.getpid())
    fin.atexit = False
    return fin


def _root(array: Any) -> Any:
    """The ndarray every view of ``array`` keeps alive: numpy points each view's ``base`` at the
    first array made over the buffer (the one made by frombuffer)."""
    np = _numpy()
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


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
        dtype = np.lib.format.descr_to_dtype(self.dtype)
        array = _over(mgr, self.address, self.shape, dtype, self.order)
        _pin(mgr, self.address, _root(array))
        return array

    def __reduce__(self) -> tuple[Any, ...]:
        return (_received, (self.arena, self.address, self.shape, self.dtype, self.order))

    def asarray(self, mgr: MemoryManager | None = None) -> Any:
        """The array, zero-copy (``open()`` under numpy's name)."""
        return self.open(mgr)

    def free(self, mgr: MemoryManager | None = None) -> int:
        """Free the block (from any process); return its size. Arrays opened on it must no
        longer be used."""
        pin = self.__dict__.get("_pin")
        if pin is not None:
            pin.detach()  # the free drops every reference, this handle's too
        return self._manager(mgr).deallocate(self.address)


def _received(
    arena: str, address: int, shape: tuple[int, ...], dtype: Any, order: str
) -> SharedArray:
    """Unpickle a handle: pin its block while this handle object lives, so that it survives its
    producer's end (a pool worker's result) until this process opens it. Best effort: a handle
    whose block or arena is gone still unpickles (open() then says what is wrong)."""
    handle = SharedArray(arena, address, shape, dtype, order)
    try:
        pin = _pin(_attach(arena), address, handle)
    except (ShmallocError, OSError, ValueError):
        return handle  # dangling already, or the arena is gone: nothing to pin
    object.__setattr__(handle, "_pin", pin)  # frozen: a private attribute outside the fields
    return handle


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
