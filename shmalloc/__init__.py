"""shmalloc: a shared-memory allocator for cooperating Python processes.

One POSIX shared-memory segment is the arena; a C core keeps the heap, the free lists and the
counters inside it, so any number of processes allocate, read, write and free zero-copy.
"""

import logging
from typing import Any

from .errors import (
    AlignmentError,
    CorruptionDetected,
    InvalidAddress,
    NotAnArena,
    ObjectNotFound,
    OutOfMemory,
    ProcessLimitExceeded,
    ProtectionViolation,
    ShmallocError,
)
from .events import Event
from .gc import GcStats, GcStrategy, GlobalGarbageCollector
from .guard import MemoryGuard
from .lease import CoordinatorRunning
from .manager import DEFAULT_CAPACITY, MemoryManager
from .objects import ObjectRef
from .queues import JoinableQueue, Queue, SimpleQueue
from .stats import CheckReport, MemoryPressure, MemoryStats
from .tracking import MemoryBlock, ProcessInfo

__all__ = [
    "AlignmentError",
    "Coordinator",
    "GcStats",
    "GcStrategy",
    "GlobalGarbageCollector",
    "CheckReport",
    "CoordinatorRunning",
    "CorruptionDetected",
    "DEFAULT_CAPACITY",
    "Event",
    "InvalidAddress",
    "JoinableQueue",
    "MemoryBlock",
    "MemoryGuard",
    "MemoryManager",
    "MemoryPressure",
    "MemoryStats",
    "NotAnArena",
    "ObjectNotFound",
    "ObjectRef",
    "OutOfMemory",
    "ProcessInfo",
    "ProcessLimitExceeded",
    "ProtectionViolation",
    "Queue",
    "ShmallocError",
    "SimpleQueue",
]
__version__ = "0.1.0"

# A library logs, it does not print: pressure warnings reach stderr only if the application
# configured logging (the coordinator and the command line configure their own handlers).
logging.getLogger("shmalloc").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # lazy: `python -m shmalloc.coordinator` must not find the module imported already
    if name == "Coordinator":
        from .coordinator import Coordinator

        return Coordinator
    raise AttributeError(f"module 'shmalloc' has no attribute {name!r}")
