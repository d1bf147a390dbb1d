"""Large numpy arrays made in the arena, and put without a copy.

    alloc = ArenaAllocator(mgr, threshold=1 << 20)
    with alloc.active():          # numpy's handler for this thread's context (NEP 49)
        y = np.sqrt(x) + 1        # y's data (>= threshold bytes) is a block of the arena
    ref = alloc.lend(y)           # an object whose buffer IS y's memory: nothing is copied
    mgr.get(ref)                  # elsewhere: the same memory, read-only

numpy (1.22 and later) lets a program replace the functions that allocate array data: a
``PyDataMem_Handler`` in a capsule named ``mem_handler``, made current by ``PyDataMem_SetHandler``
in the current context (a ``contextvars`` variable: per thread, per asyncio task). numpy stores
the handler in each array it allocates and frees the array's data with it, wherever the array
dies. The handler's functions are C (native/npalloc.c): a request of at least ``threshold``
bytes gets a plain block of the arena owned by this process, smaller ones and those the arena
cannot serve (full, a process limit) go to numpy's own handler. They run without the GIL, from
any thread.

``lend(arr)`` publishes an object whose one buffer is such a block, for an array that starts at
the block and is contiguous: the same object ``put`` would make, but without allocating and
copying. The array stays valid: the object is LENT (native/objects.c), held by this process for
the array's sake until numpy frees the array (then the hold goes instead of the block) or the
process ends (collection drops it). The array is made read-only, since its memory is shared from
then on (views taken before keep their flags: do not write through them).

The capsule keeps the arena's handle and mapping alive (and so does every array made through
it): the arena cannot be closed in this process while one of them lives (close raises
BufferError, as with any view). numpy's C-API table is read through ctypes, so numpy's headers
are needed neither at build time nor after: PyDataMem_SetHandler and PyDataMem_GetHandler are
its entries 304 and 305, fixed since numpy 1.22.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib
from collections.abc import Iterator
from typing import Any

from . import _binding as C
from . import encoding
from .access import mapped
from .attachment import check_int
from .errors import InvalidAddress
from .manager import MemoryManager, attachment_of
from .objects import ObjectRef, _critical, _held_ref
from .tracking import slot_for

__all__ = ["DEFAULT_THRESHOLD", "ArenaAllocator", "handler_name"]

DEFAULT_THRESHOLD = 1 << 20  # smaller arrays stay in numpy's own memory

_SET_HANDLER, _GET_HANDLER = 304, 305  # entries of numpy's C-API table (numpy >= 1.22)
_CAPSULE_NAME = b"mem_handler"

_api = ctypes.PyDLL(None)  # the interpreter's C API, typed here (not ctypes.pythonapi's, shared)
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_GetName.argtypes = [ctypes.py_object]
_api.PyCapsule_GetName.restype = ctypes.c_char_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_SetContext.argtypes = [ctypes.py_object, ctypes.c_void_p]
_api.PyCapsule_SetContext.restype = ctypes.c_int
_api.Py_IncRef.argtypes = [ctypes.py_object]


class _NumpyApi:
    """numpy's PyDataMem_SetHandler and PyDataMem_GetHandler, and its handler_name()."""

    def __init__(self) -> None:
        encoding.numpy()  # ImportError saying how to install it
        try:
            core = "numpy._core"  # numpy 2
            umath = importlib.import_module(f"{core}._multiarray_umath")
        except ImportError:
            core = "numpy.core"  # numpy 1.22 to 1.26
            umath = importlib.import_module(f"{core}._multiarray_umath")
        table_capsule = umath._ARRAY_API
        table = _api.PyCapsule_GetPointer(table_capsule, _api.PyCapsule_GetName(table_capsule))
        entries = ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))
        proto = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)
        self.set = proto(entries[_SET_HANDLER])
        self.get = ctypes.PYFUNCTYPE(ctypes.py_object)(entries[_GET_HANDLER])
        self.handler_name = importlib.import_module(f"{core}.multiarray").get_handler_name
        self.default = contextvars.Context().run(self.get)  # the variable's default: numpy's


_numpy_api: _NumpyApi | None = None


def _numpy() -> _NumpyApi:
    global _numpy_api
    if _numpy_api is None:
        _numpy_api = _NumpyApi()
    return _numpy_api


def handler_name(arr: Any = None) -> str | None:
    """The name of the handler that allocated ``arr``'s data (None: ``arr`` does not own its
    data), or of the current one; this module's is ``shmalloc_arena``."""
    name = _numpy().handler_name(arr) if arr is not None else _numpy().handler_name()
    return None if name is None else str(name)


def _capsule(handler: int, keep: object) -> Any:
    """A ``mem_handler`` capsule of the PyDataMem_Handler at ``handler``, owning ``keep`` (its
    context) and the handler, which its destructor frees."""
    name = C.np_capsule_name()  # a static string of the C core: it outlives any capsule
    capsule = _api.PyCapsule_New(handler, name, C.np_capsule_destructor())
    _api.Py_IncRef(keep)  # the destructor drops it
    if _api.PyCapsule_SetContext(capsule, id(keep)) != 0:
        raise RuntimeError("PyCapsule_SetContext failed")
    return capsule


class ArenaAllocator:
    """numpy's memory handler over one arena, for this process (see the module's docstring)."""

    def __init__(self, mgr: MemoryManager, threshold: int = DEFAULT_THRESHOLD) -> None:
        if not isinstance(mgr, MemoryManager):
            raise TypeError(f"mgr must be a MemoryManager, not {type(mgr).__name__}")
        threshold = check_int(threshold, "threshold")
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1 byte, got {threshold}")
        a = attachment_of(mgr)
        api = _numpy()
        h = a.handle()
        fallback = _api.PyCapsule_GetPointer(api.default, _CAPSULE_NAME)
        self.attachment = a
        self.threshold = threshold
        self._np = C.np_new(h, slot_for(a, None), threshold, fallback)
        keep = (h, mapped(a, 0, 1), api.default)  # the handle, the mapping (pinned), the fallback
        self.capsule = _capsule(C.np_handler(self._np), keep)

    # ------------------------------------------------------------ making it current

    def install(self) -> Any:
        """Make this handler numpy's in the current context; returns the one it replaces."""
        if self.capsule is None:
            raise ValueError("this arena allocator is closed")
        return _numpy().set(self.capsule)

    def close(self) -> None:
        """Drop this object's reference to the handler: the arena may close in this process once
        the arrays made through it are gone too (each keeps it)."""
        self.capsule = None

    @staticmethod
    def restore(previous: Any) -> None:
        """Make ``previous`` (what install returned) numpy's handler again."""
        _numpy().set(previous)

    @contextlib.contextmanager
    def active(self) -> Iterator[ArenaAllocator]:
        """``with alloc.active():`` numpy allocates through this handler in the block."""
        previous = self.install()
        try:
            yield self
        finally:
            self.restore(previous)

    # ------------------------------------------------------------ lending

    def owns(self, arr: Any) -> bool:
        """Is ``arr``'s data in memory this handler took from the arena?"""
        data = getattr(arr, "__array_interface__", None)
        return data is not None and C.np_address(self._np, data["data"][0]) is not None

    def lend(self, arr: Any) -> ObjectRef | None:
        """An object whose buffer is ``arr``'s memory, without a copy, if ``arr`` is a plain
        contiguous array whose data starts a block of this handler's not lent yet; else None
        (put it instead). ``arr`` is read-only from now on."""
        np = encoding.numpy()
        if type(arr) is not np.ndarray or arr.dtype.hasobject or not arr.nbytes:
            return None
        order = "C" if arr.flags.c_contiguous else "F" if arr.flags.f_contiguous else None
        if order is None or not self.owns(arr):
            return None
        stream = encoding.array_header(arr.dtype, arr.shape, order)
        a = self.attachment
        try:
            address, oid = C.np_lend(
                self._np, arr.__array_interface__["data"][0], stream, arr.nbytes
            )
        except (ValueError, InvalidAddress):  # a view inside a block, or one lent already
            return None
        arr.flags.writeable = False
        with _critical:
            return _held_ref(a, address, oid, len(stream) + arr.nbytes, None)

    def stats(self) -> C.NpStats:
        """Blocks given to numpy (ever, and alive), fallbacks, blocks lent (ever, and alive)."""
        return C.np_stats(self._np)
