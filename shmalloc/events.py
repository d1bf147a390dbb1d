"""Observability events: what a collector set with ``MemoryManager.set_collector`` receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One event: ``name`` such as ``memory.allocated``, the emitting ``pid``, a wall-clock
    ``time`` (seconds since the epoch) and the event's ``fields`` (see SPEC.md, Observability)."""

    name: str
    pid: int
    time: float
    fields: dict[str, Any] = field(default_factory=dict)
