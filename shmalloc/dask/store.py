"""The worker's data in the host arena: a MutableMapping that Dask's SpillBuffer uses as its fast
(in-memory) part, or that replaces a worker's plain dict when it does not spill.

A numpy array that a task made in the arena (the plugin's ``numpy_size``: shmalloc.npalloc's
handler is numpy's while tasks run) goes in when it is stored, whatever its size from
``min_size``, without a copy: the object's buffer is the array's own memory (``lend``). Any
other value worth sharing (numpy arrays, pandas objects, bytes, of at least ``min_size`` bytes)
moves into the arena (``mgr.put``, one copy) at once when it is stored if it has at least
``eager_size`` bytes and this worker made it, so that every transfer of it is a reference and
the copy is paid by its maker, off the transfers' path. Else (a smaller value, or one fetched
from a worker of another host, whose copy would lengthen that transfer for a value no peer may
ask for) it moves the first time a worker of the same host asks for it (``share``, called by
serialize.py): a value nobody else on the host asks for costs no copy. From then on the store
keeps the ObjectRef and a zero-copy view (``mgr.get``) in place of the value, and that view is
what tasks read; the worker's private copy goes with the store's reference to it. A value that
arrived by reference from another worker of the host is kept as it came, without a copy.
Deleting a key (a release, or the SpillBuffer moving it to disk) drops the reference and the
view: the arena frees the object once no other worker holds it.

Accounting: ``weight(key, value)`` is what SpillBuffer's LRU counts as this worker's managed
memory: the size of what this worker put in the arena, and nearly nothing for what it got by
reference (its producer counts it), so the workers of a host count each object once.
``owned_bytes`` is that total, which the plugin adds to the worker's private memory.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from typing import Any

from dask.sizeof import sizeof

from ..manager import MemoryManager
from ..npalloc import ArenaAllocator
from ..objects import ObjectRef

__all__ = ["REF_WEIGHT", "ArenaStore", "adopt_arrived", "note_arrived"]

REF_WEIGHT = 200  # what a value received by reference weighs: about its pickled reference

# values unpickled from references (serialize.py), by id, until a store adopts them
_arrived: dict[int, tuple[weakref.ref[Any], ObjectRef]] = {}
_arrived_lock = threading.Lock()


def note_arrived(value: Any, ref: ObjectRef) -> None:
    """Remember that ``value`` is the view of ``ref``, so that a store adopts it without a copy
    (values that take no weak reference, e.g. bytes, are simply stored again)."""
    key = id(value)
    try:
        wr = weakref.ref(value, functools.partial(_forget, key))
    except TypeError:
        return
    with _arrived_lock:
        _arrived[key] = (wr, ref)


def _forget(key: int, _wr: object = None) -> None:
    with _arrived_lock:
        _arrived.pop(key, None)


def adopt_arrived(value: Any, pop: bool) -> ObjectRef | None:
    """The reference ``value`` arrived with, if it did (and forget it when ``pop``)."""
    with _arrived_lock:
        entry = _arrived.get(id(value))
        if entry is None or entry[0]() is not value:
            return None
        if pop:
            del _arrived[id(value)]
        return entry[1]


def _shareable_size(value: Any) -> int:
    """The size of ``value`` if the store may put it in the arena, else 0."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    mod = type(value).__module__.partition(".")[0]
    if mod == "numpy":
        dtype = getattr(value, "dtype", None)
        return 0 if dtype is None or dtype.hasobject else int(getattr(value, "nbytes", 0))
    if mod == "pandas":
        return int(sizeof(value))
    return 0


class ArenaStore(MutableMapping[Hashable, Any]):
    """{task key: value} of one worker, values worth sharing living in the host arena."""

    def __init__(
        self,
        mgr: MemoryManager,
        *,
        min_size: int = 64 * 1024,
        eager_size: float = 1 << 20,
        fetched: Callable[[Hashable], bool] = lambda key: False,
        allocator: ArenaAllocator | None = None,
    ) -> None:
        self.mgr = mgr
        self.allocator = allocator  # the handler tasks allocate through, if any: its arrays lend
        self.fetched = fetched  # is the value being stored under key one fetched from a peer?
        self.min_size = min_size
        self.eager_size = max(eager_size, min_size)
        self._values: dict[Hashable, Any] = {}
        self._refs: dict[Hashable, ObjectRef] = {}
        self._owned: dict[Hashable, int] = {}  # bytes this worker put, by key
        self.owned_bytes = 0
        self.lent = 0  # values that went into the arena without a copy
        self.bytes_copied = 0  # bytes that went in by a copy (mgr.put)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ accounting

    def weight(self, key: Hashable, value: Any) -> float:
        """SpillBuffer's weight of a value about to be stored (see the module's docstring)."""
        if adopt_arrived(value, pop=False) is not None:
            return REF_WEIGHT
        try:
            return float(sizeof(value))
        except Exception:  # noqa: BLE001 -- Dask's safe_sizeof does the same
            return 1e6

    def ref(self, key: Hashable) -> ObjectRef | None:
        """The arena reference of the value stored under ``key``, if it lives in the arena."""
        return self._refs.get(key)

    def share(self, key: Hashable, value: Any) -> ObjectRef | None:
        """The arena reference of ``key`` if ``value`` is what is stored under it, moving it
        into the arena now if it is worth sharing and not there yet; None otherwise."""
        with self._lock:
            if key not in self._values or self._values[key] is not value:
                return None
            ref = self._refs.get(key)
            if ref is not None or _shareable_size(value) < self.min_size:
                return ref
            self._put(key, value)
            return self._refs.get(key)

    def _put(self, key: Hashable, value: Any) -> None:
        """Move ``value`` (stored under ``key``) into the arena (under the lock): lent if it is
        an array made there (it stays the stored value, read-only now), else copied."""
        ref = None if self.allocator is None else self.allocator.lend(value)
        if ref is not None:
            self.lent += 1
        else:
            try:
                ref = self.mgr.put(value)
            except MemoryError:
                return  # the arena is full: keep it in the process, as plain Dask would
            self.bytes_copied += ref.nbytes
            self._values[key] = self.mgr.get(ref)
        self._refs[key] = ref
        self._owned[key] = ref.nbytes
        self.owned_bytes += ref.nbytes

    # ------------------------------------------------------------ the mapping

    def __setitem__(self, key: Hashable, value: Any) -> None:
        ref = adopt_arrived(value, pop=True)
        with self._lock:
            self._pop(key)
            self._values[key] = value
            if ref is not None:
                self._refs[key] = ref
                return
            size = _shareable_size(value)
            if size >= self.eager_size and not self.fetched(key):
                self._put(key, value)
            elif size >= self.min_size and self.allocator and self.allocator.owns(value):
                self._put(key, value)  # made in the arena: lent, no copy

    def _pop(self, key: Hashable) -> Any:
        value = self._values.pop(key, None)
        self._refs.pop(key, None)
        self.owned_bytes -= self._owned.pop(key, 0)
        return value

    def __getitem__(self, key: Hashable) -> Any:
        return self._values[key]

    def __delitem__(self, key: Hashable) -> None:
        with self._lock:
            if key not in self._values:
                raise KeyError(key)
            self._pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def in_arena(self) -> int:
        """How many of the values live in the arena."""
        return len(self._refs)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._refs.clear()
            self._owned.clear()
            self.owned_bytes = 0
