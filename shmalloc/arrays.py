"""Hand a numpy array to another process in one copy: ``share_array()`` and ``SharedArray``.

    handle = share_array(mgr, array)     # producer: one copy into an array object of the arena
    queue.put(handle)                    # a few hundred bytes, whatever the array's size
    a = handle.open()                    # consumer: the same array, zero-copy and writable
    ...
    handle.free()                        # whoever is done with it last

A thin layer on the arena's objects (shmalloc.objects): share_array() is ``mgr.empty()`` and one
copy; a ``SharedArray`` is the arena's name, the address of the array's data block, the shape,
the dtype (numpy's array-protocol description, so structured dtypes survive), the memory order
and the object it belongs to. Opening it in another process attaches to the arena (once per
process) and returns a writable ndarray over the same memory: writes through it are seen by every
process that opened it. (``mgr.put``/``mgr.get`` hand out read-only values instead.)

Lifetime: the producer holds the array until it ends or frees it; ``persist=True`` keeps it
until ``free()``; ``open(adopt=True)`` makes the opening process hold it too, until it ends or
frees it. An array opened is never freed under its live views. A pickled SharedArray carries an
``ObjectRef``: it keeps the array alive in transit (a queue, a pipe, a Pool result), even if the
producer ends, and the unpickled handle holds it while the handle lives. Once the array is gone,
``open`` raises ``InvalidAddress``.

numpy is an optional extra (``pip install shmalloc[numpy]``); it is imported on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import encoding, objects
from .errors import InvalidAddress, ObjectNotFound
from .manager import MemoryManager, attachment_of
from .objects import ObjectRef

__all__ = ["SharedArray", "share_array"]

_attached: dict[str, MemoryManager] = {}  # arenas opened by handles in this process, by name


def _attach(name: str) -> MemoryManager:
    # no lock (a signal handler or a fork child must never wait on one): two racing attaches
    # both succeed, and the later one is kept
    mgr = _attached.get(name)
    if mgr is None or mgr.closed:
        mgr = _attached[name] = MemoryManager.attach(name)
    return mgr


@dataclass(frozen=True)
class SharedArray:
    """A small, picklable handle to an ndarray held in an array object of an arena."""

    arena: str
    address: int  # the array's data block
    shape: tuple[int, ...]
    dtype: Any  # numpy.lib.format.dtype_to_descr(): '<f8', or a list for structured dtypes
    order: str  # 'C' or 'F'
    object: int = 0  # the object's header address
    object_id: int = 0

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
        """The array, zero-copy: a writable ndarray over the arena. ``mgr`` defaults to the
        arena attached by name (once per process); ``adopt=True`` makes this process hold the
        array until it ends or frees it (so it outlives the producer)."""
        encoding.numpy()
        a = attachment_of(self._manager(mgr))
        arr = objects.open_array(a, self.object, self.object_id, writable=True)
        if adopt:
            objects.own(a, self.object, self.object_id)
        return arr

    def __reduce__(self) -> tuple[Any, ...]:
        # the ObjectRef takes a transit ticket when pickled; the receiver's handle keeps it
        ref = ObjectRef(objects.attachment(self.arena), self.object, self.object_id, 0, None)
        fields = (self.arena, self.address, self.shape, self.dtype, self.order)
        return (_received, (*fields, self.object, self.object_id, ref))

    def asarray(self, mgr: MemoryManager | None = None) -> Any:
        """The array, zero-copy (``open()`` under numpy's name)."""
        return self.open(mgr)

    def free(self, mgr: MemoryManager | None = None) -> int:
        """Free the array (from any process); return its data block's size. Arrays opened on it
        keep its memory until they are released; opening it again fails."""
        m = self._manager(mgr)
        size = m.size_of(self.address)
        try:  # a reference that this process does not count as a holder: it only names it
            m.delete(ObjectRef(attachment_of(m), self.object, self.object_id, 0, None))
        except ObjectNotFound:
            raise InvalidAddress(self.address, "the array was freed already") from None
        return size


def _received(
    arena: str,
    address: int,
    shape: tuple[int, ...],
    dtype: Any,
    order: str,
    obj: int,
    oid: int,
    ref: ObjectRef,
) -> SharedArray:
    """Unpickle a SharedArray: the handle holds the reference it arrived with while it lives."""
    handle = SharedArray(arena, address, shape, dtype, order, obj, oid)
    object.__setattr__(handle, "_ref", ref)
    return handle


def share_array(mgr: MemoryManager, array: Any, *, persist: bool = False) -> SharedArray:
    """Copy ``array`` (anything ``numpy.asarray`` takes) into a new array object of ``mgr``, once,
    and return a handle that any process turns back into the same array without copying.

    A C- or Fortran-contiguous array keeps its memory order; any other is stored C-contiguous.
    Arrays of Python objects cannot be shared (their items are pointers into this process)."""
    np = encoding.numpy()
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(
            f"cannot share an array of dtype {a.dtype}: it holds Python objects, which live in "
            "this process; convert it to a numeric, bytes or structured dtype first"
        )
    order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
    dest, ref = mgr.empty(a.shape, a.dtype, order=order)
    np.copyto(dest, a, casting="no")
    address = objects.data_address(attachment_of(mgr), ref)
    del dest
    objects.own(attachment_of(mgr), ref.address, ref.id)  # held until this process ends or free()
    if persist:
        objects.hold(attachment_of(mgr), ref)  # held until free()
    return SharedArray(
        mgr.name,
        address,
        tuple(a.shape),
        np.lib.format.dtype_to_descr(a.dtype),
        order,
        ref.address,
        ref.id,
    )
