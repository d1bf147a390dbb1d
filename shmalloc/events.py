"""Observability events: what a collector set with ``MemoryManager.set_collector`` receives, and
their encoding in the segment's event ring (native/ring.c) for the coordinator to drain."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Event:
    """One event: ``name`` such as ``memory.allocated``, the emitting ``pid``, a wall-clock
    ``time`` (seconds since the epoch) and the event's ``fields`` (see SPEC.md, Observability)."""

    name: str
    pid: int
    time: float
    fields: dict[str, Any] = field(default_factory=dict)


# name -> (ring kind, field names in ring order): the one table of event kinds (C stores the
# kind number and never pushes events itself). Floats travel as their IEEE-754 bits.
SCHEMA: dict[str, tuple[int, tuple[str, ...]]] = {
    "memory.allocated": (1, ("address", "size", "pid")),
    "memory.deallocated": (2, ("address", "size")),
    "memory.oom": (3, ("requested", "available")),
    "memory.pressure_high": (4, ("usage_percentage",)),
    "memory.pressure_critical": (5, ("usage_percentage",)),
    "memory.gc_triggered": (6, ("freed_blocks",)),
    "memory.process_reclaimed": (7, ("pid", "bytes")),
}
_BY_KIND = {kind: (name, fields) for name, (kind, fields) in SCHEMA.items()}
FLOAT_FIELDS = frozenset({"usage_percentage"})
# Events every process writes to the ring even without a collector: they are rare.
RARE = frozenset(SCHEMA) - {"memory.allocated", "memory.deallocated"}


def encode(ev: Event) -> tuple[int, list[int]]:
    kind, names = SCHEMA[ev.name]
    values = []
    for n in names:
        v = ev.fields.get(n, 0)
        if n in FLOAT_FIELDS:
            v = struct.unpack("<Q", struct.pack("<d", float(v)))[0]
        values.append(int(v) & 0xFFFFFFFFFFFFFFFF)
    return kind, values + [0] * (5 - len(values))


def decode(cell: Any) -> Event | None:
    entry = _BY_KIND.get(int(cell.kind))
    if entry is None:
        return None
    name, names = entry
    fields: dict[str, Any] = {}
    for i, n in enumerate(names):
        v = int(cell.f[i])
        fields[n] = struct.unpack("<d", struct.pack("<Q", v))[0] if n in FLOAT_FIELDS else v
    return Event(name, int(cell.pid), cell.time_ns / 1e9, fields)
