"""The coordinator: one process per arena that reclaims the memory of dead processes, watches
pressure, and turns the event ring into logs, a JSON-lines file and Prometheus metrics.

Run it with ``shmalloc coordinator NAME``, ``python -m shmalloc.coordinator NAME``,
``Coordinator(name).run()`` or, detached, ``start_coordinator(manager)``.

Every tick (``interval``, default 0.25 s) the coordinator checks that it still holds the lease and
that the arena still exists (an unlinked arena stops it: exit 0); reads arena usage,
``psutil.virtual_memory()`` and ``psutil.disk_usage('/dev/shm')``, logs each level change and, at
HIGH or worse, runs ``auto_collect()`` (which asks live processes over the trim threshold to
trim); drains the event ring. A process that ends wakes it at once, between ticks. The coordinator
never allocates in the arena, so a full arena does not stop it.

The modules of this package:
  watch.py     the process watch: pidfds on the process table, reclaiming the dead's memory
  pressure.py  the pressure levels of the arena, the system's memory and /dev/shm
  metrics.py   the Prometheus exporter
  service.py   the Coordinator class: the loop that ties them together and drains the events
  command.py   its command line (``main``) and exit statuses
The lease itself (taking, holding and handing over the role, and starting a detached coordinator)
is ``shmalloc.lease``: the manager starts coordinators too, and lies beneath this package.
"""

from __future__ import annotations

import os
from typing import Any

from .. import lease
from ..lease import EXIT_LEASE_HELD, CoordinatorRunning, coordinator_command
from ..manager import MemoryManager, attachment_of
from .command import main
from .service import DEFAULT_INTERVAL, Coordinator

__all__ = [
    "DEFAULT_INTERVAL",
    "EXIT_LEASE_HELD",
    "Coordinator",
    "CoordinatorRunning",
    "coordinator_command",
    "lease_holder",
    "main",
    "start_coordinator",
]


def lease_holder(manager: MemoryManager) -> int | None:
    """The pid of the arena's live coordinator, or None when no running process holds the lease."""
    return lease.holder(attachment_of(manager))


def start_coordinator(
    manager: MemoryManager, *, log_path: str | os.PathLike[str] | None = None, **kwargs: Any
) -> int:
    """``manager.start_coordinator(...)``: start a detached coordinator, return its pid."""
    return lease.start(attachment_of(manager), log_path=log_path, **kwargs)
