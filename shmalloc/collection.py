"""Manager-level garbage collection, pressure reactions, trim requests and the event ring.

A mixin of MemoryManager. Which processes are dead is decided here, with (pid, start time) from
/proc (process.py); the C core (native/gc.c) then frees their orphaned blocks under the heap lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import process
from ._binding import ffi, lib, raise_status
from .events import RARE, Event, decode, encode
from .stats import MemoryPressure, MemoryStats
from .tracking import mark_if_dead, read_slot, scan_slots

logger = logging.getLogger("shmalloc")

DEFAULT_THRESHOLD = 1000
FLAG_MASK = (1 << 61) - 1


class CollectionMixin:
    _h: Any
    _name: str
    _slot: int
    _collector: Callable[[Event], None] | None
    _threshold: int
    _pressure_callbacks: list[Callable[[], None]]

    def _handle(self) -> Any: ...
    def _raw_stats(self) -> Any: ...
    def stats(self) -> MemoryStats: ...

    # ------------------------------------------------------------ collection

    def set_threshold(self, n: int) -> None:
        """Collect after ``n`` deallocated blocks (should_collect() turns true); default 1000."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"the threshold must be an int, not {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"the threshold must be positive, got {n}")
        self._threshold = n

    def should_collect(self) -> bool:
        """True once ``threshold`` blocks were freed since the last collection, or a process
        holding memory in the arena has died."""
        if self._raw_stats().frees_since_gc >= self._threshold:
            return True
        h = self._handle()
        return any(mark_if_dead(h, r, mark=False) for r in scan_slots(h))

    def _collect_dead(self, slot: int = -1) -> tuple[Any, list[tuple[int, int]]]:
        """Reclaim dead processes (or one dead slot); returns the C result and, per process
        reclaimed, (pid, bytes)."""
        h = self._handle()
        dead = [r for r in scan_slots(h) if (slot < 0 or r.slot == slot) and mark_if_dead(h, r)]
        res = ffi.new("shm_gc_result_t *")
        rc = lib.shm_gc(h, slot, 0, 0, 0, res)
        if rc < 0:
            raise_status(rc)
        reclaimed = []
        for r in dead:
            after = read_slot(h, r.slot)
            left = after.usage if after.state != lib.SHM_PROC_FREE else 0
            if r.usage > left:
                reclaimed.append((int(r.pid), int(r.usage - left)))
                self._emit("memory.process_reclaimed", pid=r.pid, bytes=r.usage - left)
        return res, reclaimed

    def _return_cache(self) -> None:
        """Give this process's cache of free blocks (and the blocks other processes freed to it)
        back to the arena, where they can merge and serve any process."""
        if self._slot is not None and self._slot >= 0:
            rc = lib.shm_cache_flush(self._handle(), self._slot)
            if rc < 0:
                raise_status(rc)

    def collect(self) -> int:
        """Free the orphaned blocks of dead processes (unless retained or persistent), clean their
        slots, return this process's cache to the arena; return the number of blocks freed."""
        res, _ = self._collect_dead()
        self._return_cache()  # after: it takes in what the collection pushed to it for the dead
        self._emit("memory.gc_triggered", freed_blocks=res.freed_blocks)
        return int(res.freed_blocks)

    def force_collect(self) -> int:
        """collect() now, whatever should_collect() says, and run this process's trim callbacks."""
        self._run_pressure_callbacks()
        return self.collect()

    # ------------------------------------------------------------ pressure

    def on_pressure(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when a collector asks this process to trim (on its next allocation)."""
        if not callable(callback):
            raise TypeError("on_pressure takes a callable")
        self._pressure_callbacks.append(callback)

    def _run_pressure_callbacks(self) -> None:
        for cb in list(self._pressure_callbacks):
            cb()

    def request_trim(self, pid: int) -> None:
        """Ask the live process ``pid`` to trim: its on_pressure callbacks run on its next
        allocation."""
        for r in scan_slots(self._handle()):
            if r.state == lib.SHM_PROC_LIVE and r.pid == pid:
                lib.shm_proc_trim_request(self._handle(), r.slot)
                return
        raise ValueError(f"process {pid} is not attached to arena {self._name!r}")

    def _after_alloc_flags(self, r: int) -> int:
        """Handle the flag bits of shm_alloc's result; return the address."""
        address = r & FLAG_MASK
        if r & lib.SHM_ALLOC_TRIM_FLAG:
            lib.shm_proc_trim_ack(self._handle(), self._slot)
            self._return_cache()
            self._run_pressure_callbacks()
        if r & lib.SHM_ALLOC_PRESSURE_FLAG:
            level = MemoryPressure(lib.shm_pressure_level(self._handle()))
            pct = self.stats().usage_percentage()
            if level == MemoryPressure.HIGH:
                logger.warning(
                    "arena %s is under HIGH memory pressure: %.1f%% used", self._name, pct
                )
                self._emit("memory.pressure_high", usage_percentage=pct)
            elif level == MemoryPressure.CRITICAL:
                logger.critical(
                    "arena %s is under CRITICAL memory pressure: %.1f%% used; collecting",
                    self._name,
                    pct,
                )
                self._emit("memory.pressure_critical", usage_percentage=pct)
                self.force_collect()
        return address

    # ------------------------------------------------------------ events

    def _emit(self, name: str, **fields: Any) -> None:
        """Deliver an event to this process's collector, if any; rare events (all but
        allocated/deallocated) also go to the arena's ring for the coordinator, collector or not.
        The hot pair stays out of the ring: the coordinator reads their totals from counters."""
        collector = self._collector
        rare = name in RARE
        if collector is None and not rare:
            return
        ev = Event(name, process.current_pid(), time.time(), fields)
        if collector is not None:
            collector(ev)
        if rare:
            kind, f = encode(ev)
            lib.shm_event_push(self._handle(), kind, ev.pid, int(ev.time * 1e9), *f)

    def drain_events(self, limit: int | None = None) -> list[Event]:
        """Take the events waiting in the arena's ring (from every process), oldest first."""
        h = self._handle()
        cell = ffi.new("shm_event_t *")
        out: list[Event] = []
        while (limit is None or len(out) < limit) and lib.shm_event_pop(h, cell) == 1:
            ev = decode(cell)
            if ev is not None:
                out.append(ev)
        return out

    def dropped_events(self) -> int:
        """Events lost because the ring was full."""
        return int(lib.shm_event_dropped(self._handle()))
