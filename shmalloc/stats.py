"""Value types that describe an arena: statistics, pressure levels and the checker's report."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from . import _binding as C

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = TypeVar("_T", bound="DataclassInstance")


def _carried(cls: type[_T], source: object, **given: Any) -> _T:
    """A ``cls`` with ``source``'s fields of the same names, but for the ones ``given``."""
    rest = {f.name: getattr(source, f.name) for f in fields(cls) if f.name not in given}
    return cls(**rest, **given)


class MemoryPressure(enum.IntEnum):
    """How close the arena is to full, by usage percentage."""

    LOW = 0  # < 60 %
    MEDIUM = 1  # 60 .. 79 %
    HIGH = 2  # 80 .. 94 %: a WARNING on the shmalloc logger
    CRITICAL = 3  # >= 95 %: a CRITICAL log and an automatic collection

    @classmethod
    def from_percentage(cls, pct: float) -> MemoryPressure:
        """The level of a usage percentage (the thresholds are the C core's)."""
        return cls(C.pressure_of_percent(pct))


@dataclass(frozen=True)
class MemoryStats:
    """A snapshot of an arena's counters (read without a lock; each field is exact on its own).

    ``total`` is the heap: the capacity less the arena header. ``used`` is the usable bytes of
    live blocks, ``available`` the usable bytes of free blocks; the difference to ``total`` is
    block headers (``overhead`` for live blocks).
    """

    total: int
    used: int
    available: int
    peak: int
    allocated_blocks: int
    free_blocks: int
    allocations: int
    deallocations: int
    largest_free_block: int
    overhead: int = 0
    capacity: int = 0
    reserved: int = 0
    lock_recoveries: int = 0
    oom_events: int = 0
    gc_runs: int = 0

    @classmethod
    def of(cls, raw: C.RawStats, largest_free_block: int) -> MemoryStats:
        """The public view of the C core's counters (``largest_free_block`` is read apart)."""
        return _carried(cls, raw, largest_free_block=largest_free_block)

    def usage_percentage(self) -> float:
        """Share of the heap that is not available to a new allocation, in percent (the C core's
        formula: blocks held in per-process caches count as available)."""
        return C.usage_percent(self.total, self.available)

    def memory_pressure(self) -> MemoryPressure:
        return MemoryPressure.from_percentage(self.usage_percentage())

    def fragmentation_ratio(self) -> float:
        """1 - largest free block / all free bytes; 0.0 when nothing is free."""
        if self.available == 0:
            return 0.0
        return max(0.0, 1.0 - self.largest_free_block / self.available)


@dataclass(frozen=True)
class CheckReport:
    """What a clean full heap walk (``MemoryManager.check()``) counted."""

    blocks: int
    allocated_blocks: int
    free_blocks: int
    used: int
    free_bytes: int
    largest_free: int
    live_processes: int
    dead_processes: int
    cached_blocks: int = 0  # free blocks held in per-process caches (not in allocated_blocks)
    cached_bytes: int = 0
    objects: int = 0  # objects in the arena (queues and their items included)
    tickets: int = 0  # pickled references in transit
    queues: int = 0  # shared-memory queues
    queued: int = 0  # items waiting in them
