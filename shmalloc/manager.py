"""MemoryManager: one POSIX shared-memory arena, shared by any number of processes.

Python holds no allocator state: every question goes to the C core, which reads the segment.
This object holds only what is local to this process: the mapping, the descriptor, the C handle
and this process's slot in the arena's process table.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import posix_ipc

from . import process
from ._binding import ffi, lib, raise_status
from .errors import AlignmentError, CorruptionDetected, InvalidAddress, ProtectionViolation
from .collection import DEFAULT_THRESHOLD, CollectionMixin
from .events import Event
from .guard import MemoryGuard
from .ownership import OwnershipMixin
from .stats import CheckReport, MemoryStats
from .tracking import TrackingMixin

__all__ = ["MemoryManager", "DEFAULT_CAPACITY"]

DEFAULT_CAPACITY = 1 << 30
_U64_MAX = (1 << 64) - 1
_FLAGS = 1 << 61  # shm_alloc results at or above this carry pressure/trim flag bits
_ALLOCATED, _DEALLOCATED = "memory.allocated", "memory.deallocated"
_now = time.time
_shm_alloc = lib.shm_alloc
_shm_free = lib.shm_free
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,199}")
_ATTACH_WAIT = 1.0  # seconds an attach waits for a concurrent create to finish formatting

# Managers alive in this process, so that a fork child re-registers itself on first use.
_live: weakref.WeakSet[MemoryManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for m in list(_live):
        m._slot = -1


os.register_at_fork(after_in_child=_after_fork_in_child)


def validate_name(name: object) -> str:
    """An arena name: 1-200 characters of [A-Za-z0-9._:@+-], not starting with a dot or dash."""
    if not isinstance(name, str):
        raise TypeError(f"an arena name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid arena name {name!r}: use 1-200 characters of letters, digits and ._:@+- "
            "(no '/', no NUL), starting with a letter, digit or underscore"
        )
    return name


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


class MemoryManager(OwnershipMixin, TrackingMixin, CollectionMixin):
    """A shared-memory arena. ``MemoryManager()`` creates a new one with a unique name.

    Use :meth:`create` for a named arena and :meth:`attach` to join one from another process.
    Addresses are offsets into the arena, valid in every process attached to it.
    """

    _h: Any
    _slot: int

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        name: str | None = None,
        collector: Callable[[Event], None] | None = None,
        _mode: int = 0o600,
        _attach: bool = False,
    ) -> None:
        self._h = None
        self._closed = True
        self._owns_name = name is None and not _attach
        if name is None:
            name = f"shmalloc-{os.getpid()}-{secrets.token_hex(6)}"
        self._name = validate_name(name)
        self._collector = collector
        self._threshold = DEFAULT_THRESHOLD
        self._pressure_callbacks = []
        self._slot = -1
        self._slot_pid = 0
        self._lock = threading.Lock()
        if _attach:
            self._open_existing()
        else:
            self._create(_check_int(capacity, "capacity"), _check_int(_mode, "mode"))
        self._closed = False
        _live.add(self)

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def with_capacity(cls, nbytes: int) -> MemoryManager:
        """A new arena of ``nbytes`` (the seed's spelling of ``MemoryManager(nbytes)``)."""
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
        m = cls(capacity, name=validate_name(name), _mode=mode)
        if cache_limit is not None:
            try:
                m.set_cache_limit(cache_limit)
            except BaseException:
                m.destroy()
                m.close()
                raise
        return m

    @classmethod
    def attach(cls, name: str) -> MemoryManager:
        """Join the existing arena ``name``; ``FileNotFoundError`` if there is none."""
        return cls(name=validate_name(name), _attach=True)

    def _create(self, capacity: int, mode: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        capacity = -(-capacity // mmap.PAGESIZE) * mmap.PAGESIZE
        minimum = int(lib.shm_header_size()) + mmap.PAGESIZE
        if capacity < minimum or capacity > 1 << 40:
            raise ValueError(
                f"capacity {capacity} is out of range: give between {minimum} bytes and 1 TiB"
            )
        try:
            shm = posix_ipc.SharedMemory("/" + self._name, posix_ipc.O_CREX, mode=mode, size=capacity)
        except posix_ipc.ExistentialError:
            raise FileExistsError(
                f"an arena named {self._name!r} already exists; attach to it or pick another name"
            ) from None
        except posix_ipc.PermissionsError as e:
            raise PermissionError(f"cannot create arena {self._name!r}: {e}") from None
        try:
            self._map(shm.fd, capacity)
            rc = lib.shm_arena_format(
                self._base, capacity, shm.fd, secrets.randbits(64), time.time_ns()
            )
            if rc != 0:
                raise_status(rc)
            self._open_handle(shm.fd, capacity)
        except BaseException:
            self._unmap()
            shm.close_fd()
            posix_ipc.unlink_shared_memory("/" + self._name)
            raise
        self._fd = shm.fd

    def _open_existing(self) -> None:
        try:
            shm = posix_ipc.SharedMemory("/" + self._name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                f"no arena named {self._name!r} (see `shmalloc list`); create it first"
            ) from None
        except posix_ipc.PermissionsError:
            raise PermissionError(
                f"arena {self._name!r} exists but this user may not open it (mode 0600)"
            ) from None
        try:
            capacity = os.fstat(shm.fd).st_size
            if capacity < int(lib.shm_header_size()) + mmap.PAGESIZE:
                raise CorruptionDetected(
                    0, f"segment {self._name!r} is {capacity} bytes, too small to be an arena"
                )
            self._map(shm.fd, capacity)
            deadline = time.monotonic() + _ATTACH_WAIT
            while True:
                try:
                    self._open_handle(shm.fd, capacity)
                    break
                except CorruptionDetected:
                    # a creator may still be formatting: the magic is written last
                    if self._mm[:8] != b"\0" * 8 or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        except BaseException:
            self._unmap()
            shm.close_fd()
            raise
        self._fd = shm.fd

    def _map(self, fd: int, capacity: int) -> None:
        self._capacity = capacity
        self._mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
        self._base = ffi.from_buffer(self._mm)
        self._mv = memoryview(self._mm)

    def _unmap(self) -> None:
        mv = getattr(self, "_mv", None)
        if mv is not None:
            mv.release()
        base = getattr(self, "_base", None)
        if base is not None:
            ffi.release(base)
        mm = getattr(self, "_mm", None)
        if mm is not None:
            mm.close()

    def _open_handle(self, fd: int, capacity: int) -> None:
        out = ffi.new("shm_handle_t **")
        rc = lib.shm_handle_open(self._base, capacity, fd, out)
        if rc != 0:
            raise_status(rc)
        self._h = out[0]

    @property
    def name(self) -> str:
        """The arena's name: what other processes attach by."""
        return self._name

    @property
    def capacity(self) -> int:
        """The segment's size in bytes."""
        return self._capacity

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach this process. Its blocks stay until freed or collected.

        Raises BufferError (and stays open) while views into the arena are still alive.
        """
        if self._closed:
            return
        # Python cannot ask an mmap how many views it has, so detach first and, if the close is
        # refused, forget the slot: the next allocation claims it again.
        self._detach_slot()
        self._mv.release()
        ffi.release(self._base)
        try:
            self._mm.close()
        except BufferError:
            self._base = ffi.from_buffer(self._mm)
            self._mv = memoryview(self._mm)
            self._slot = -1
            raise BufferError(
                f"cannot close arena {self._name!r}: views or arrays into it are still alive; "
                "release them (view.release(), del array) first"
            ) from None
        lib.shm_handle_close(self._h)
        self._h = None
        self._slot = -1
        os.close(self._fd)
        self._closed = True
        _live.discard(self)

    def _detach_slot(self) -> None:
        """Give this process's slot back if it owns nothing and no other open manager in this
        process uses the same arena (they share the slot: it is keyed by pid and start time)."""
        if self._slot < 0 or self._slot_pid != os.getpid():
            return
        if any(m is not self and not m._closed and m._name == self._name for m in list(_live)):
            return
        lib.shm_proc_detach(self._h, self._slot)

    def destroy(self) -> None:
        """Unlink the segment. Mappings already open (here and elsewhere) keep working until closed."""
        try:
            posix_ipc.unlink_shared_memory("/" + self._name)
        except posix_ipc.ExistentialError:
            pass  # already unlinked: destroy is idempotent

    def __enter__(self) -> MemoryManager:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if self._owns_name:
            self.destroy()

    def __reduce__(self) -> tuple[Any, ...]:
        return (MemoryManager.attach, (self._name,))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self._capacity}"
        return f"<MemoryManager {self._name!r} {state}>"

    def __del__(self) -> None:
        h = getattr(self, "_h", None)
        if h is not None:
            lib.shm_handle_close(h)
            self._h = None
            os.close(self._fd)

    def _handle(self) -> Any:
        if self._closed:
            raise ValueError(f"arena {self._name!r} is closed in this process; attach again")
        return self._h

    # ---------------------------------------------------------------- processes

    def _own_slot(self) -> int:
        """This process's slot in the process table, claimed on first use (and after fork)."""
        with self._lock:
            if self._slot < 0:
                pid, started = process.self_identity()
                self._slot = self._attach_slot(pid, started)
                self._slot_pid = pid
            return self._slot

    def _slot_for(self, pid: int | None) -> int:
        if pid is None or pid == os.getpid():
            return self._slot if self._slot >= 0 else self._own_slot()
        pid = _check_int(pid, "pid")
        if pid <= 0:
            raise ValueError(f"pid must be positive, got {pid}")
        started = process.start_time(pid)
        if started is None:
            raise ValueError(f"no process with pid {pid}: memory can only be accounted to a live one")
        return self._attach_slot(pid, started)

    def _attach_slot(self, pid: int, started: int) -> int:
        """Claim (or find) the slot of (pid, started); when the table is full, collect the slots
        of dead processes once and try again."""
        slot = lib.shm_proc_attach(self._handle(), pid, started)
        if slot == lib.SHM_EPROCS:
            self.collect()
            slot = lib.shm_proc_attach(self._handle(), pid, started)
        if slot < 0:
            raise_status(slot)
        return int(slot)

    # ---------------------------------------------------------------- allocation

    def allocate(self, size: int, pid: int | None = None, *, align: int | None = None) -> int:
        """Allocate ``size`` bytes; return the block's address (an offset, 16-byte aligned or
        ``align``-aligned). The block is accounted to ``pid`` (default: this process)."""
        if size.__class__ is int and pid is None and align is None:
            slot = self._slot  # read once: another thread may claim it meanwhile
            try:
                r = _shm_alloc(self._h, size, 0, slot)
            except (OverflowError, TypeError):  # negative or huge size, or a closed manager
                return self._allocate_slow(size, pid, align)
            if 0 < r < _FLAGS:
                collector = self._collector
                if collector is not None:
                    pid = process.current_pid()
                    collector(Event(_ALLOCATED, pid, _now(), {"address": r, "size": size, "pid": pid}))
                return r
            if r != lib.SHM_EINVAL or slot >= 0:  # EINVAL with no slot yet: take the slow path
                return self._alloc_result(r, size, None)
        return self._allocate_slow(size, pid, align)

    def _allocate_slow(self, size: int, pid: int | None, align: int | None) -> int:
        size = _check_int(size, "size")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if align is None:
            align = 0
        elif align.__class__ is not int or align <= 0:
            raise AlignmentError(_check_int(align, "align"))
        h = self._handle()
        slot = self._slot_for(pid)
        r = lib.shm_alloc(h, size if size <= _U64_MAX else _U64_MAX, align, slot)
        return self._alloc_result(r, size, pid)

    def _alloc_result(self, r: int, size: int, pid: int | None) -> int:
        """Finish an allocation from shm_alloc's raw result: raise, or handle flags and events."""
        if r < 0:
            if r == lib.SHM_ENOMEM or r == lib.SHM_ENOSPC:
                self._emit("memory.oom", requested=size, available=int(lib.shm_last_error().available))
            raise_status(r)
        if r >= _FLAGS:
            r = self._after_alloc_flags(r)
        if self._collector is not None:
            self._emit("memory.allocated", address=r, size=size, pid=pid or process.current_pid())
        return r

    def deallocate(self, address: int) -> int:
        """Free the block at ``address`` (from any process); return its usable size."""
        if address.__class__ is int:
            try:
                r = _shm_free(self._h, address)
            except (OverflowError, TypeError):  # negative or huge address, or a closed manager
                r = self._deallocate_slow(address)
        else:
            r = self._deallocate_slow(address)
        if r < 0:
            raise_status(r, address)
        collector = self._collector
        if collector is not None:
            collector(
                Event(_DEALLOCATED, process.current_pid(), _now(), {"address": address, "size": r})
            )
        return r

    def _deallocate_slow(self, address: object) -> int:
        address = _check_int(address, "address")
        self._handle()
        raise InvalidAddress(address, "addresses are non-negative offsets into the arena")

    def allocate_guarded(self, size: int, pid: int | None = None) -> MemoryGuard:
        """Allocate a block that is freed when the returned guard's ``with`` block ends."""
        return MemoryGuard(self, self.allocate(size, pid))

    # ---------------------------------------------------------------- access

    def _block_size(self, address: int, for_write: int) -> int:
        if address.__class__ is not int or not 0 <= address <= _U64_MAX:
            address = _check_int(address, "address")
            raise InvalidAddress(address, "addresses are non-negative offsets into the arena")
        h = self._h
        r = lib.shm_block_size(h if h is not None else self._handle(), address, for_write)
        if r < 0:
            raise_status(r, address)
        return int(r)

    @staticmethod
    def _span(size: int, address: int, n: int | None, offset: int) -> tuple[int, int]:
        offset = _check_int(offset, "offset")
        if not 0 <= offset <= size:
            raise ValueError(
                f"offset {offset} is outside the block at {address:#x} ({size} usable bytes)"
            )
        if n is None:
            n = size - offset
        else:
            n = _check_int(n, "n")
            if n < 0 or offset + n > size:
                raise ValueError(
                    f"{n} bytes at offset {offset} cross the end of the block at {address:#x} "
                    f"({size} usable bytes); stay within size_of(address)"
                )
        start = address + offset
        return start, start + n

    def size_of(self, address: int) -> int:
        """Usable size of the block at ``address`` (at least what was asked for)."""
        return self._block_size(address, 0)

    def read(self, address: int, n: int | None = None, offset: int = 0) -> bytes:
        """Copy ``n`` bytes (default: to the block's end) out of the block, from ``offset``."""
        start, end = self._span(self._block_size(address, 0), address, n, offset)
        return self._mm[start:end]

    def write(self, address: int, data: Any, offset: int = 0) -> int:
        """Copy a bytes-like ``data`` into the block at ``offset``; return the bytes written."""
        try:
            src = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(
                f"data must be a contiguous bytes-like object, not {type(data).__name__}"
            ) from None
        start, end = self._span(self._block_size(address, 1), address, src.nbytes, offset)
        self._mv[start:end] = src
        return end - start

    def view(self, address: int, n: int | None = None, offset: int = 0) -> memoryview:
        """A zero-copy memoryview of the block (read-only if the block is sealed)."""
        try:
            size, sealed = self._block_size(address, 1), False
        except ProtectionViolation:
            size, sealed = self._block_size(address, 0), True
        start, end = self._span(size, address, n, offset)
        v = self._mv[start:end]
        return v.toreadonly() if sealed else v

    def ndarray(self, address: int, shape: int | tuple[int, ...], dtype: Any) -> Any:
        """A zero-copy numpy array over the block (needs the optional numpy extra)."""
        import numpy as np

        dt = np.dtype(dtype)
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        count = 1
        for d in shp:
            if _check_int(d, "shape entry") < 0:
                raise ValueError(f"negative dimension in shape {shp}")
            count *= d
        v = self.view(address, count * dt.itemsize)
        return np.frombuffer(v, dtype=dt, count=count).reshape(shp)

    def seal(self, address: int) -> None:
        """Make the block immutable: later writes raise ProtectionViolation, views are read-only."""
        self._block_size(address, 0)
        rc = lib.shm_block_seal(self._h, address)
        if rc != 0:
            raise_status(rc, address)

    # ---------------------------------------------------------------- per-process caches

    def _raw_stats(self) -> Any:
        """The C core's counters (shm_stats_t), read without a lock."""
        s = ffi.new("shm_stats_t *")
        lib.shm_stats_read(self._handle(), s)
        return s

    @property
    def cache_limit(self) -> int:
        """Bytes of free small and medium blocks (up to 64 KiB) each process may keep cached."""
        return int(self._raw_stats().cache_limit)

    @property
    def cached_bytes(self) -> int:
        """Usable bytes of free blocks that processes hold in their caches (counted as available
        in stats(); they go back to the heap on collect(), trim, close or before OutOfMemory)."""
        return int(self._raw_stats().cached)

    def set_cache_limit(self, nbytes: int) -> None:
        """Set, for the whole arena, how many bytes of freed small and medium blocks each process
        may keep in its cache to reuse without the arena's lock. 0 turns the caches off: every
        allocation and free then takes the heap lock. Lowering it returns caches at once."""
        nbytes = _check_int(nbytes, "nbytes")
        if nbytes < 0:
            raise ValueError(f"the cache limit must be >= 0 bytes, got {nbytes}")
        rc = lib.shm_cache_set_limit(self._handle(), min(nbytes, _U64_MAX))
        if rc < 0:
            raise_status(rc)

    # ---------------------------------------------------------------- inspection

    def stats(self) -> MemoryStats:
        """The arena's counters, read without a lock."""
        s = self._raw_stats()
        largest = lib.shm_largest_free(self._handle())
        if largest < 0:
            raise_status(largest)
        return MemoryStats(
            total=s.total,
            used=s.used,
            available=s.available,
            peak=s.peak,
            allocated_blocks=s.allocated_blocks,
            free_blocks=s.free_blocks,
            allocations=s.allocations,
            deallocations=s.deallocations,
            largest_free_block=int(largest),
            overhead=s.overhead,
            capacity=s.capacity,
            reserved=s.reserved,
            lock_recoveries=s.lock_recoveries,
            oom_events=s.oom_events,
            gc_runs=s.gc_runs,
        )

    def check(self) -> CheckReport:
        """Walk the whole heap and verify every invariant; CorruptionDetected names the first bad
        offset."""
        r = ffi.new("shm_check_report_t *")
        rc = lib.shm_check(self._handle(), r)
        if rc != 0:
            raise_status(rc)
        return CheckReport(
            blocks=r.blocks,
            allocated_blocks=r.allocated_blocks,
            free_blocks=r.free_blocks,
            used=r.used,
            free_bytes=r.free_bytes,
            largest_free=r.largest_free,
            live_processes=r.live_procs,
            dead_processes=r.dead_procs,
            cached_blocks=r.cached_blocks,
            cached_bytes=r.cached_bytes,
        )

    # ---------------------------------------------------------------- coordinator

    def start_coordinator(self, **kwargs: Any) -> int:
        """Start a detached coordinator for this arena; return its pid once it holds the lease.

        Keywords: interval, metrics_port, metrics_host, events_path, log_level, trim_threshold,
        min_interval, log_path (its output; default nowhere), timeout (default 15 s).
        Raises shmalloc.coordinator.CoordinatorRunning if a live coordinator already serves it.
        """
        from .coordinator import start_coordinator  # coordinator imports this module

        return start_coordinator(self, **kwargs)

    # ---------------------------------------------------------------- events

    def set_collector(self, collector: Callable[[Event], None] | None) -> None:
        """Send this process's events to ``collector`` (None: no events, no cost)."""
        if collector is not None and not callable(collector):
            raise TypeError("collector must be callable or None")
        self._collector = collector

    def with_collector(self, collector: Callable[[Event], None]) -> MemoryManager:
        self.set_collector(collector)
        return self
