"""Manager-level garbage collection, pressure reactions, trim requests and the event ring.

Functions over an :class:`Attachment`. Which processes are dead is decided in tracking.py, with
(pid, start time) from /proc; the C core (native/gc.c) then frees their orphaned blocks under
the heap lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import _binding as C
from . import events
from .attachment import Attachment, check_int
from .events import Event
from .stats import MemoryPressure
from .tracking import mark_if_dead, reclaim_dead, scan_slots

__all__ = [
    "DEFAULT_THRESHOLD",
    "after_alloc_flags",
    "collect",
    "drain_events",
    "force_collect",
    "request_trim",
    "return_cache",
    "should_collect",
    "usage_percentage",
]

logger = logging.getLogger("shmalloc")

DEFAULT_THRESHOLD = 1000


def should_collect(a: Attachment, threshold: int) -> bool:
    """True once ``threshold`` blocks were freed since the last collection, or a process
    holding memory in the arena has died."""
    h = a.handle()
    if C.stats_read(h).frees_since_gc >= threshold:
        return True
    return any(mark_if_dead(h, r, mark=False) for r in scan_slots(h))


def collect_dead(a: Attachment, slot: int = -1) -> C.GcResult:
    """Reclaim dead processes (or one dead slot), with a ``memory.process_reclaimed`` event for
    each whose blocks were freed."""
    res, reclaimed = reclaim_dead(a.handle(), slot)
    for pid, nbytes in reclaimed:
        a.emit(events.PROCESS_RECLAIMED, pid=pid, bytes=nbytes)
    return res


def return_cache(a: Attachment) -> None:
    """Give this process's cache of free blocks (and the blocks other processes freed to it)
    back to the arena, where they can merge and serve any process."""
    slot = a.slot
    if slot >= 0:
        C.cache_flush(a.handle(), slot)


def collect(a: Attachment) -> int:
    """Free the orphaned blocks of dead processes, clean their slots, return this process's
    cache to the arena; return the number of blocks freed."""
    res = collect_dead(a)
    return_cache(a)  # after: it takes in what the collection pushed to it for the dead
    a.emit(events.GC_TRIGGERED, freed_blocks=res.freed_blocks)
    return res.freed_blocks


def force_collect(a: Attachment) -> int:
    """collect() now, after running this process's trim callbacks."""
    run_pressure_callbacks(a)
    return collect(a)


def on_pressure(a: Attachment, callback: Callable[[], None]) -> None:
    if not callable(callback):
        raise TypeError("on_pressure takes a callable")
    a.pressure_callbacks.append(callback)


def run_pressure_callbacks(a: Attachment) -> None:
    for cb in list(a.pressure_callbacks):
        cb()


def request_trim(a: Attachment, pid: int) -> None:
    """Ask the live process ``pid`` to trim: its on_pressure callbacks run on its next
    allocation."""
    pid = check_int(pid, "pid")
    h = a.handle()
    for r in scan_slots(h):
        if r.state == C.PROC_LIVE and r.pid == pid:
            C.proc_trim_request(h, r.slot)
            return
    raise ValueError(f"process {pid} is not attached to arena {a.name!r}")


def usage_percentage(a: Attachment) -> float:
    """How full the arena is, by the C core's one formula (cached blocks count as free)."""
    s = C.stats_read(a.handle())
    return C.usage_percent(s.total, s.available)


def after_alloc_flags(a: Attachment, r: int) -> int:
    """Act on the flag bits of an allocation's raw result; return the address."""
    h = a.handle()
    if r & C.TRIM_FLAG:
        C.proc_trim_ack(h, a.slot)
        return_cache(a)
        run_pressure_callbacks(a)
    if r & C.PRESSURE_FLAG:
        level = MemoryPressure(C.pressure_level(h))
        pct = usage_percentage(a)
        if level == MemoryPressure.HIGH:
            logger.warning("arena %s is under HIGH memory pressure: %.1f%% used", a.name, pct)
            a.emit(events.PRESSURE_HIGH, usage_percentage=pct)
        elif level == MemoryPressure.CRITICAL:
            logger.critical(
                "arena %s is under CRITICAL memory pressure: %.1f%% used; collecting", a.name, pct
            )
            a.emit(events.PRESSURE_CRITICAL, usage_percentage=pct)
            force_collect(a)
    return r & C.ADDRESS_MASK


def drain_events(a: Attachment, limit: int | None = None) -> list[Event]:
    """Take the events waiting in the arena's ring (from every process), oldest first."""
    h = a.handle()
    out: list[Event] = []
    while limit is None or len(out) < limit:
        cell = C.event_pop(h)
        if cell is None:
            break
        ev = events.decode(cell.kind, cell.pid, cell.time_ns, cell.fields)
        if ev is not None:
            out.append(ev)
    return out
