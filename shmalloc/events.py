"""Observability events: what a collector set with ``MemoryManager.set_collector`` receives, and
their encoding in the segment's event ring (native/ring.c) for the coordinator to drain.

:data:`KINDS` is the one table of event kinds: each kind's name, its number in the ring, its
fields in ring order, whether every process writes it to the ring, and the level the
coordinator logs it at. Code names an event by the constants below, never by a string literal.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALLOCATED",
    "DEALLOCATED",
    "GC_TRIGGERED",
    "KINDS",
    "OOM",
    "PRESSURE_CRITICAL",
    "PRESSURE_HIGH",
    "PROCESS_RECLAIMED",
    "RARE",
    "Event",
    "EventKind",
    "decode",
    "encode",
]


@dataclass(slots=True)
class Event:
    """One event: ``name`` such as ``memory.allocated``, the emitting ``pid``, a wall-clock
    ``time`` (seconds since the epoch) and the event's ``fields`` (see docs/api.md)."""

    name: str
    pid: int
    time: float
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventKind:
    """One kind of event. ``ring``: written to the arena's ring by every process even without a
    collector (rare events; the allocation pair is counted, not queued). Float fields travel in
    the ring as their IEEE-754 bits."""

    name: str
    number: int
    fields: tuple[str, ...]
    ring: bool
    log_level: int
    float_fields: frozenset[str] = frozenset()


ALLOCATED = "memory.allocated"
DEALLOCATED = "memory.deallocated"
OOM = "memory.oom"
PRESSURE_HIGH = "memory.pressure_high"
PRESSURE_CRITICAL = "memory.pressure_critical"
GC_TRIGGERED = "memory.gc_triggered"
PROCESS_RECLAIMED = "memory.process_reclaimed"

_PCT = frozenset({"usage_percentage"})
KINDS: dict[str, EventKind] = {
    k.name: k
    for k in (
        EventKind(ALLOCATED, 1, ("address", "size", "pid"), False, logging.DEBUG),
        EventKind(DEALLOCATED, 2, ("address", "size"), False, logging.DEBUG),
        EventKind(OOM, 3, ("requested", "available"), True, logging.WARNING),
        EventKind(PRESSURE_HIGH, 4, ("usage_percentage",), True, logging.WARNING, _PCT),
        EventKind(PRESSURE_CRITICAL, 5, ("usage_percentage",), True, logging.CRITICAL, _PCT),
        EventKind(GC_TRIGGERED, 6, ("freed_blocks",), True, logging.INFO),
        EventKind(PROCESS_RECLAIMED, 7, ("pid", "bytes"), True, logging.INFO),
    )
}
_BY_NUMBER = {k.number: k for k in KINDS.values()}
RARE = frozenset(k.name for k in KINDS.values() if k.ring)
_RING_FIELDS = 5  # shm_event_t.f


def encode(ev: Event) -> tuple[int, list[int]]:
    """The ring's (kind number, five 64-bit fields) for ``ev``."""
    kind = KINDS[ev.name]
    values = []
    for n in kind.fields:
        v = ev.fields.get(n, 0)
        if n in kind.float_fields:
            v = struct.unpack("<Q", struct.pack("<d", float(v)))[0]
        values.append(int(v) & 0xFFFFFFFFFFFFFFFF)
    return kind.number, values + [0] * (_RING_FIELDS - len(values))


def decode(number: int, pid: int, time_ns: int, values: tuple[int, ...]) -> Event | None:
    """The event a ring cell holds; None for a kind this version does not know."""
    kind = _BY_NUMBER.get(number)
    if kind is None:
        return None
    fields: dict[str, Any] = {}
    for n, v in zip(kind.fields, values, strict=False):  # 5 ring fields
        fields[n] = struct.unpack("<d", struct.pack("<Q", v))[0] if n in kind.float_fields else v
    return Event(kind.name, pid, time_ns / 1e9, fields)
