"""The coordinator lease: which process holds the coordinator role of an arena.

The role is held through a lease in the segment: the (pid, start time) of the holder, read and
swapped under the heap lock (``shm_lease_get``/``shm_lease_swap``). A coordinator takes it from
(0, 0), or from a holder that /proc says has ended (even by ``kill -9``): the swap only succeeds
from the values it read, so two contenders cannot both take over. A holder that is still running
makes a new coordinator refuse (:class:`CoordinatorRunning`, exit status 3). On a clean stop the
holder swaps the lease back to (0, 0). Workers never wait for the coordinator: if none runs,
nothing but reclamation of dead processes' memory is delayed.
"""

from __future__ import annotations

import logging

from .. import _binding as C
from .. import process
from ..errors import ShmallocError
from ..manager import MemoryManager, attachment_of

__all__ = ["CoordinatorRunning", "acquire_lease", "lease_holder", "read_lease", "release_lease"]

logger = logging.getLogger("shmalloc.coordinator")  # one logger for every part of the coordinator


class CoordinatorRunning(ShmallocError):
    """The arena already has a live coordinator: the process ``pid`` holds the lease."""

    _fields = ("name", "pid", "start_time")

    def __init__(self, name: str, pid: int, start_time: int = 0) -> None:
        self.name, self.pid, self.start_time = name, pid, start_time
        super().__init__(
            f"arena {name!r} already has a coordinator: process {pid} holds the lease; "
            f"leave it running, or stop it (kill {pid}) and start a new one"
        )


def read_lease(h: C.Handle) -> tuple[int, int]:
    """The (pid, start time) in the lease of the arena handle ``h``; (0, 0) when nobody holds it."""
    return C.lease_get(h)


def lease_holder(manager: MemoryManager) -> int | None:
    """The pid of the arena's live coordinator, or None when no running process holds the lease."""
    pid, start = read_lease(attachment_of(manager).handle())
    if pid and process.is_alive(pid, start):
        return pid
    return None


def acquire_lease(manager: MemoryManager) -> tuple[int, int]:
    """Take the lease for this process; CoordinatorRunning if a live process holds it."""
    h = attachment_of(manager).handle()
    me = process.self_identity()
    for _ in range(100):  # each failed swap means another contender moved first: look again
        held = read_lease(h)
        if held == me:
            return me
        if held[0] and process.is_alive(*held):
            raise CoordinatorRunning(manager.name, *held)
        if held[0]:
            logger.warning(
                "taking over the coordinator lease of arena %s from process %d, which has ended",
                manager.name,
                held[0],
            )
        if C.lease_swap(h, held, me):
            return me
    raise ShmallocError(
        f"could not take the coordinator lease of arena {manager.name!r}: contended"
    )


def release_lease(manager: MemoryManager, me: tuple[int, int]) -> bool:
    """Give the lease back (swap ``me`` for (0, 0)); False if ``me`` no longer held it."""
    return C.lease_swap(attachment_of(manager).handle(), me, (0, 0))
