"""MemoryManager: one POSIX shared-memory arena, shared by any number of processes.

The manager is a façade. Python holds no allocator state: every question goes to the C core,
which reads the segment. What is local to this process (the mapping, the handle, the slot) lives
in one :class:`~shmalloc.attachment.Attachment`; the methods below call the plain modules that act
on it (access, ownership, tracking, collection). Only allocate and deallocate, the hot pair, are
not Python methods: they are the C methods of the base class, ``C.Manager`` (native/halves.c),
which call the core in the common case and the Python halves below otherwise.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import _binding as C
from . import access, collection, events, lease, objects, ownership, process, tracking
from .attachment import Attachment, check_int, validate_name
from .errors import AlignmentError
from .events import Event
from .guard import MemoryGuard
from .objects import ObjectRef
from .stats import CheckReport, MemoryStats
from .tracking import MemoryBlock, ProcessInfo

__all__ = ["DEFAULT_CAPACITY", "MemoryManager", "attachment_of", "validate_name"]

DEFAULT_CAPACITY = 1 << 30
_alloc = C.alloc_raw
_free = C.free_raw
_FLAGS = C.ADDRESS_MASK + 1  # raw allocation results at or above this carry flag bits


class MemoryManager(C.Manager):
    """A shared-memory arena. ``MemoryManager()`` creates a new one with a unique name.

    Use :meth:`create` for a named arena and :meth:`attach` to join one from another process.
    Addresses are offsets into the arena, valid in every process attached to it.
    """

    _state: Attachment
    _owns_name: bool
    _threshold: int

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        name: str | None = None,
        collector: Callable[[Event], None] | None = None,
    ) -> None:
        """Create a new arena of ``capacity`` bytes (reserved lazily); ``name=None`` picks a
        unique name, and leaving a ``with`` block then destroys the arena too."""
        owns = name is None
        if name is None:
            name = f"shmalloc-{os.getpid()}-{secrets.token_hex(6)}"
        validate_name(name)
        self._setup(Attachment.create(name, check_int(capacity, "capacity"), 0o600), owns)
        self.set_collector(collector)

    @classmethod
    def _wrap(cls, state: Attachment, owns_name: bool) -> MemoryManager:
        m = cls.__new__(cls)
        m._setup(state, owns_name)
        return m

    def _setup(self, state: Attachment, owns_name: bool) -> None:
        self._state = state
        self._owns_name = owns_name
        self._threshold = collection.DEFAULT_THRESHOLD

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def with_capacity(cls, nbytes: int) -> MemoryManager:
        """A new arena of ``nbytes``: the same as ``MemoryManager(nbytes)``."""
        return cls(nbytes)

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int = DEFAULT_CAPACITY,
        *,
        mode: int = 0o600,
        cache_limit: int | None = None,
    ) -> MemoryManager:
        """Create the arena ``name``; ``FileExistsError`` if it exists. ``cache_limit``: see
        set_cache_limit() (default: 1/512 of the arena, at most 4 MiB; none below 32 MiB)."""
        validate_name(name)
        mode = check_int(mode, "mode")
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits from 0 to 0o777, got {mode:#o}")
        state = Attachment.create(name, check_int(capacity, "capacity"), mode)
        m = cls._wrap(state, owns_name=False)
        if cache_limit is not None:
            try:
                m.set_cache_limit(cache_limit)
            except BaseException:
                m.destroy()
                m.close()
                raise
        return m

    @classmethod
    def attach(cls, name: str, *, mode: int = 0o600) -> MemoryManager:
        """Join the existing arena ``name``; ``FileNotFoundError`` if there is none,
        ``NotAnArena`` if the segment is something else. ``PermissionError`` if another user
        owns it or its mode is wider than ``mode``: a wider ``mode`` (e.g. 0o660) accepts an
        arena shared across users on purpose."""
        mode = check_int(mode, "mode")
        if not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits from 0 to 0o777, got {mode:#o}")
        return cls._wrap(Attachment.open(validate_name(name), mode), owns_name=False)

    @property
    def name(self) -> str:
        """The arena's name: what other processes attach by."""
        return self._state.name

    @property
    def capacity(self) -> int:
        """The segment's size in bytes."""
        return self._state.capacity

    @property
    def closed(self) -> bool:
        """True once close() succeeded in this process."""
        return self._state.closed

    def close(self) -> None:
        """Detach this process. Its blocks stay until freed or collected.

        Raises BufferError (and stays open) while views into the arena are still alive.
        """
        self._state.close()

    def destroy(self) -> None:
        """Unlink the segment. Mappings already open (here and elsewhere) keep working until
        closed."""
        self._state.destroy()

    def __enter__(self) -> MemoryManager:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close; an arena this manager created with a generated name is destroyed first, so it
        never stays in /dev/shm, even when the close is refused. An exception in flight is never
        replaced: a failed close or destroy is added to its notes instead."""
        failed: list[Exception] = []
        if self._owns_name:
            try:
                self.destroy()
            except OSError as e:
                failed.append(e)
        try:
            self.close()
        except BufferError as e:
            failed.append(e)
        if failed and ev is None:
            raise failed[0]
        for failure in failed:
            assert ev is not None
            _note(ev, f"then leaving the `with` block of arena {self.name!r} failed: {failure}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryManager.attach, (self.name,))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<MemoryManager {self.name!r} {state}>"

    # ---------------------------------------------------------------- allocation

    # allocate(size, pid=None, *, align=None) and deallocate(address) are C methods (C.Manager,
    # native/halves.c): the common case is one core call there, and the rest comes here.

    def _allocate(self, size: int, pid: int | None = None, *, align: int | None = None) -> int:
        """allocate() whenever its C half does not call the core itself."""
        size = check_int(size, "size")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if align is None:
            align = 0
        else:
            align = check_int(align, "align")
            if not 0 < align <= C.U64_MAX:
                raise AlignmentError(align)
        st = self._state
        h = st.handle()
        slot = tracking.slot_for(st, pid)
        r = _alloc(h, min(size, C.U64_MAX), align, slot)
        return self._alloc_result(r, size, pid)

    def _alloc_result(self, r: int, size: int, pid: int | None) -> int:
        """Finish an allocation from its raw result: raise, or act on flags and send events."""
        st = self._state
        if r < 0:
            if r == C.ENOMEM or r == C.ENOSPC:
                available = C.stats_read(st.handle()).available
                st.emit(events.OOM, requested=size, available=available)
            C.raise_status(r)
        if r >= _FLAGS:
            r = collection.after_alloc_flags(st, r)
        if st.collector is not None:
            st.emit(events.ALLOCATED, address=r, size=size, pid=pid or process.current_pid())
        return r

    def _deallocate(self, address: int, r: int | None = None) -> int:
        """deallocate() with the core's answer ``r`` from its C half, or None if it did not call
        the core."""
        st = self._state
        if r is None:
            address = access.checked_address(address)  # InvalidAddress if it is no offset
            r = int(_free(st.handle(), address))
        if r < 0:
            C.raise_status(r, address)
        if st.collector is not None:
            st.emit(events.DEALLOCATED, address=address, size=r)
        return r

    def allocate_guarded(self, size: int, pid: int | None = None) -> MemoryGuard:
        """Allocate a block that is freed when the returned guard's ``with`` block ends."""
        return MemoryGuard(self, self.allocate(size, pid))

    # ---------------------------------------------------------------- access

    def size_of(self, address: int) -> int:
        """Usable size of the block at ``address`` (at least what was asked for)."""
        return access.size_of(self._state, address)

    def read(self, address: int, n: int | None = None, offset: int = 0) -> bytes:
        """Copy ``n`` bytes (default: to the block's end) out of the block, from ``offset``."""
        return access.read(self._state, address, n, offset)

    def write(self, address: int, data: Any, offset: int = 0) -> int:
        """Copy a bytes-like ``data`` into the block at ``offset``; return the bytes written."""
        return access.write(self._state, address, data, offset)

    def view(self, address: int, n: int | None = None, offset: int = 0) -> memoryview:
        """A zero-copy memoryview of the block (read-only if the block is sealed)."""
        return access.view(self._state, address, n, offset)

    def ndarray(self, address: int, shape: int | tuple[int, ...], dtype: Any) -> Any:
        """A zero-copy numpy array over the block (needs the optional numpy extra)."""
        return access.ndarray(self._state, address, shape, dtype)

    def seal(self, address: int) -> None:
        """Make the block immutable: later writes raise ProtectionViolation, views are
        read-only."""
        access.seal(self._state, address)

    # ---------------------------------------------------------------- ownership

    def adopt(self, address: int) -> None:
        """Make the calling process the block's owner (a consumer taking over a producer's
        block)."""
        ownership.adopt(self._state, address)

    def retain(self, address: int) -> None:
        """Hold a reference: the block outlives its owner while this process lives."""
        ownership.retain(self._state, address)

    def release(self, address: int) -> bool:
        """Drop a reference taken with retain(). Returns True if that freed an orphaned block."""
        return ownership.release(self._state, address)

    def persist(self, address: int) -> None:
        """Give the block no owner: it is never collected, only freed by deallocate()."""
        ownership.persist(self._state, address)

    def bind(self, name: str, address: int) -> None:
        """Name the block (any process can lookup() it) and make it persistent."""
        ownership.bind(self._state, name, address)

    def lookup(self, name: str) -> int:
        """The address bound to ``name``; KeyError if none."""
        return ownership.lookup(self._state, name)

    def unbind(self, name: str) -> None:
        """Remove a name; the block stays (persistent) until deallocated. KeyError if unbound."""
        ownership.unbind(self._state, name)

    def names(self) -> list[str]:
        """Every bound name, in directory order."""
        return ownership.names(self._state)

    # ---------------------------------------------------------------- objects

    def put(self, obj: Any, *, name: str | None = None) -> ObjectRef:
        """Store ``obj`` in the arena (pickle protocol 5; every out-of-band buffer of 1 KiB or
        more, e.g. a numpy array's data, in a sealed block of its own) and return a reference;
        with ``name``, also bind it (FileExistsError if the name is taken)."""
        return objects.put(self._state, obj, name)

    def get(self, ref_or_name: ObjectRef | str, *, timeout: float | None = None) -> Any:
        """The object back, in any process: buffers as read-only zero-copy views over the arena
        (numpy arrays stay numpy arrays), alive while the value or any view of it lives. With a
        name, wait up to ``timeout`` seconds (None: forever, 0: not at all) for it to be bound:
        a bind wakes the wait at once. ObjectNotFound if the object is gone or never bound."""
        return objects.get(self._state, ref_or_name, timeout)

    async def get_async(self, ref_or_name: ObjectRef | str, *, timeout: float | None = None) -> Any:
        """get() for asyncio code (the wait runs in the loop's default thread executor)."""
        return await objects.get_async(self._state, ref_or_name, timeout)

    def delete(self, ref_or_name: ObjectRef | str) -> None:
        """A name: unbind it. A reference: free the object now, as far as nobody still uses its
        memory (live values here or elsewhere keep it until released); get() then raises
        ObjectNotFound."""
        objects.delete(self._state, ref_or_name)

    def empty(self, shape: Any, dtype: Any = float, *, order: str = "C") -> tuple[Any, ObjectRef]:
        """An array object created in place: (a writable ndarray over the arena, its reference).
        Fill it, then hand out the reference; nothing is ever copied."""
        return objects.empty(self._state, shape, dtype, order)

    def zeros(self, shape: Any, dtype: Any = float, *, order: str = "C") -> tuple[Any, ObjectRef]:
        """empty(), filled with zeros."""
        return objects.zeros(self._state, shape, dtype, order)

    @property
    def transit_timeout(self) -> float:
        """Seconds a pickled ObjectRef keeps its object alive until another process unpickles it
        (an arena setting, default 60)."""
        return objects.object_stats(self._state).transit_timeout

    def set_transit_timeout(self, seconds: float) -> None:
        """Set the arena's transit timeout (for references pickled from now on)."""
        objects.set_transit_timeout(self._state, seconds)

    # ---------------------------------------------------------------- per-process tracking

    def processes(self) -> list[ProcessInfo]:
        """Every process in the table: attached, or dead with blocks not yet collected."""
        return tracking.processes(self._state)

    def process_memory(self, pid: int) -> int:
        """Usable bytes of the blocks ``pid`` owns (0 for a process the arena never saw)."""
        return tracking.process_memory(self._state, pid)

    def process_peak(self, pid: int) -> int:
        """The high-water mark of process_memory(pid)."""
        return tracking.process_peak(self._state, pid)

    def process_allocations(self, pid: int) -> list[MemoryBlock]:
        """The blocks ``pid`` owns, in address order."""
        return tracking.process_allocations(self._state, pid)

    def block_info(self, address: int) -> MemoryBlock:
        """The live block at ``address``: size, owner, seal and references."""
        address = access.checked_address(address)
        access.size_of(self._state, address)
        return tracking.block_info(self._state, address)

    def all_blocks(self) -> list[MemoryBlock]:
        """Every allocated block of the arena, in address order."""
        return tracking.all_blocks(self._state)

    def free_process_memory(self, pid: int) -> int:
        """Free every block ``pid`` owns, alive or not; return the bytes freed."""
        return tracking.free_process_memory(self._state, pid)

    def set_process_limit(self, pid: int, nbytes: int | None) -> None:
        """Cap the bytes ``pid`` may own (None: no cap); beyond it allocate() raises
        ProcessLimitExceeded."""
        tracking.set_process_limit(self._state, pid, nbytes)

    # ---------------------------------------------------------------- per-process caches

    @property
    def cache_limit(self) -> int:
        """Bytes of free small and medium blocks (up to 64 KiB) each process may keep cached."""
        return C.stats_read(self._state.handle()).cache_limit

    @property
    def cached_bytes(self) -> int:
        """Usable bytes of free blocks that processes hold in their caches (counted as available
        in stats(); they go back to the heap on collect(), trim, close or before OutOfMemory)."""
        return C.stats_read(self._state.handle()).cached

    def set_cache_limit(self, nbytes: int) -> None:
        """Set, for the whole arena, how many bytes of freed small and medium blocks each process
        may keep in its cache to reuse without the arena's lock. 0 turns the caches off: every
        allocation and free then takes the heap lock. Lowering it returns caches at once."""
        nbytes = check_int(nbytes, "nbytes")
        if nbytes < 0:
            raise ValueError(f"the cache limit must be >= 0 bytes, got {nbytes}")
        C.cache_set_limit(self._state.handle(), nbytes)

    # ---------------------------------------------------------------- inspection

    def stats(self) -> MemoryStats:
        """The arena's counters, read without a lock."""
        h = self._state.handle()
        return MemoryStats.of(C.stats_read(h), C.largest_free(h))

    def check(self) -> CheckReport:
        """Walk the whole heap and verify every invariant; CorruptionDetected names the first bad
        offset."""
        h = self._state.handle()
        live, dead = tracking.live_and_dead(h)  # as processes() says
        return C.check(h, CheckReport, live_processes=live, dead_processes=dead)

    # ---------------------------------------------------------------- collection and pressure

    def set_threshold(self, n: int) -> None:
        """Collect after ``n`` deallocated blocks (should_collect() turns true); default 1000."""
        n = check_int(n, "the threshold")
        if n <= 0:
            raise ValueError(f"the threshold must be positive, got {n}")
        self._threshold = n

    def should_collect(self) -> bool:
        """True once ``threshold`` blocks were freed since the last collection, or a process
        holding memory in the arena has died."""
        return collection.should_collect(self._state, self._threshold)

    def collect(self) -> int:
        """Free the orphaned blocks of dead processes (unless retained or persistent), clean
        their slots, return this process's cache to the arena; return the number of blocks
        freed."""
        return collection.collect(self._state)

    def force_collect(self) -> int:
        """collect() now, whatever should_collect() says, and run this process's trim
        callbacks."""
        return collection.force_collect(self._state)

    def on_pressure(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when a collector asks this process to trim (on its next
        allocation)."""
        collection.on_pressure(self._state, callback)

    def request_trim(self, pid: int) -> None:
        """Ask the live process ``pid`` to trim: its on_pressure callbacks run on its next
        allocation."""
        collection.request_trim(self._state, pid)

    # ---------------------------------------------------------------- coordinator

    def start_coordinator(self, **kwargs: Any) -> int:
        """Start a detached coordinator for this arena; return its pid once it holds the lease.

        Keywords: interval, metrics_port, metrics_host, events_path, log_level, trim_threshold,
        min_interval, log_path (its output; default nowhere), timeout (default 15 s).
        Raises CoordinatorRunning if a live coordinator already serves it.
        """
        return lease.start(self._state, **kwargs)

    # ---------------------------------------------------------------- events

    def set_collector(self, collector: Callable[[Event], None] | None) -> None:
        """Send this process's events to ``collector`` (None: no events, no cost)."""
        if collector is not None and not callable(collector):
            raise TypeError("collector must be callable or None")
        self._state.collector = collector

    def with_collector(self, collector: Callable[[Event], None]) -> MemoryManager:
        """set_collector(collector), then return this manager (for chaining)."""
        self.set_collector(collector)
        return self

    def drain_events(self, limit: int | None = None) -> list[Event]:
        """Take the events waiting in the arena's ring (from every process), oldest first."""
        return collection.drain_events(self._state, limit)

    def dropped_events(self) -> int:
        """Events lost because the ring was full."""
        return C.event_dropped(self._state.handle())


def _note(exc: BaseException, text: str) -> None:
    """Add ``text`` to the notes of an exception in flight (a warning before Python 3.11)."""
    add_note = getattr(exc, "add_note", None)
    if add_note is not None:
        add_note(text)
    else:
        warnings.warn(text, RuntimeWarning, stacklevel=3)


def attachment_of(manager: MemoryManager) -> Attachment:
    """The manager's per-process state, for the package's own layers above it (the global
    collector, the coordinator, the command line); ValueError if it is closed."""
    state = manager._state
    state.handle()
    return state
