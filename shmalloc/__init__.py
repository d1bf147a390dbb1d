"""shmalloc: a shared-memory allocator for cooperating Python processes.

One POSIX shared-memory segment is the arena; a C core keeps the heap, the free lists and the
counters inside it, so any number of processes allocate, read, write and free zero-copy.
"""

from .errors import (
    AlignmentError,
    CorruptionDetected,
    InvalidAddress,
    OutOfMemory,
    ProcessLimitExceeded,
    ProtectionViolation,
    ShmallocError,
)
from .events import Event
from .guard import MemoryGuard
from .manager import DEFAULT_CAPACITY, MemoryManager
from .stats import CheckReport, MemoryPressure, MemoryStats

__all__ = [
    "AlignmentError",
    "CheckReport",
    "CorruptionDetected",
    "DEFAULT_CAPACITY",
    "Event",
    "InvalidAddress",
    "MemoryGuard",
    "MemoryManager",
    "MemoryPressure",
    "MemoryStats",
    "OutOfMemory",
    "ProcessLimitExceeded",
    "ProtectionViolation",
    "ShmallocError",
]
__version__ = "0.1.0"
