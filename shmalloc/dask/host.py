"""The host arena: which arena the Dask workers of one host share, and who may destroy it.

One arena per (user, cluster, host). Its name is a hash of the user id, the scheduler's address
and the host identity (``SHMALLOC_DASK_HOST``, or the machine's name), so that two clusters on
one machine, or two simulated hosts of one cluster, never share an arena by accident.

Who is in: every worker that uses the arena holds a shared ``flock`` on the segment's file in
/dev/shm for as long as it does (the kernel drops it when the process ends, even by SIGKILL).
Whoever gets the exclusive lock (a worker leaving, or the host coordinator's janitor, which
waits for it) is alone: it checks that the file it locked is still the one under the name and
unlinks it. A worker joining takes its shared lock first and only then checks that the file is
still linked, so it never joins an arena that is being destroyed: it creates a new one instead.

The first worker creates the arena and starts the host coordinator (``python -m
shmalloc.dask.janitor NAME``): shmalloc's Coordinator (reclaiming the objects of killed workers
within about a second) plus the janitor thread that destroys the arena once no worker holds it,
after which the coordinator stops by itself. A worker that finds no coordinator starts one.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import sys

from .. import lease
from ..coordinator.pressure import SHM_DIR
from ..errors import ShmallocError
from ..lease import CoordinatorRunning, holder
from ..manager import MemoryManager, attachment_of

__all__ = ["HOST_ENV", "HostArena", "arena_name", "host_identity", "start_coordinator"]

logger = logging.getLogger("shmalloc.dask")

HOST_ENV = "SHMALLOC_DASK_HOST"  # a worker's host identity; unset: the machine's name
_START_TIMEOUT = 30.0  # seconds to wait for a new coordinator to take the lease


def host_identity() -> str:
    """This process's host: ``$SHMALLOC_DASK_HOST`` if set, else the machine's name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def arena_name(scheduler: str, host: str) -> str:
    """The name of the arena that the workers of the cluster ``scheduler`` on ``host`` share."""
    digest = hashlib.sha256(f"{os.geteuid()}\0{scheduler}\0{host}".encode()).hexdigest()
    return f"shmalloc-dask-{digest[:24]}"


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _still_linked(fd: int, name: str) -> bool:
    """Is the file open on ``fd`` still the segment under ``name``?"""
    st = os.fstat(fd)
    try:
        return st.st_nlink > 0 and os.stat(_path(name)).st_ino == st.st_ino
    except FileNotFoundError:
        return False


def destroy_if_alone(fd: int, name: str, *, wait: bool) -> bool:
    """Take the exclusive lock on ``fd`` (waiting for it if ``wait``); if this got it and the file
    is still the arena ``name``, unlink it. True if this call destroyed the arena."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    if not _still_linked(fd, name):
        return False
    _unlink(name)
    return True


def _unlink(name: str) -> None:
    import posix_ipc

    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass  # someone else unlinked it: idempotent, as MemoryManager.destroy


class HostArena:
    """This process's membership of a host arena: the manager and the shared lock."""

    def __init__(self, mgr: MemoryManager, fd: int, created: bool) -> None:
        self.mgr, self.fd, self.created = mgr, fd, created

    @property
    def name(self) -> str:
        return self.mgr.name

    @classmethod
    def join(cls, name: str, capacity: int, *, coordinator: bool = True) -> HostArena:
        """Attach to the arena ``name``, creating it (with ``capacity`` bytes, reserved lazily)
        if there is none; start its coordinator if none runs (``coordinator=False``: never)."""
        for _ in range(100):  # each turn lost a race with a creator or a destroyer
            created = False
            try:
                mgr = MemoryManager.create(name, capacity)
                created = True
            except FileExistsError:
                try:
                    mgr = MemoryManager.attach(name)
                except FileNotFoundError:
                    continue  # destroyed between the two calls
            try:
                fd = os.open(_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                mgr.close()
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            mapped = os.fstat(attachment_of(mgr).fd).st_ino
            if _still_linked(fd, name) and os.fstat(fd).st_ino == mapped:
                member = cls(mgr, fd, created)
                if coordinator:
                    member.ensure_coordinator()
                return member
            os.close(fd)  # a destroyer got there first: start again with a new arena
            mgr.close()
        raise ShmallocError(f"could not join the host arena {name!r}: contended 100 times")

    def ensure_coordinator(self) -> int | None:
        """The pid of the arena's coordinator, started now if none runs."""
        pid = holder(attachment_of(self.mgr))
        if pid is not None:
            return pid
        try:
            return start_coordinator(self.name)
        except CoordinatorRunning as e:
            return e.pid

    def leave(self) -> bool:
        """Close this process's attachment and drop its lock; destroy the arena if this was the
        last worker on it. True if it destroyed it."""
        try:
            self.mgr.close()
        except BufferError:
            logger.warning("arena %s: views still alive at close; leaving it mapped", self.name)
        try:
            return destroy_if_alone(self.fd, self.name, wait=False)
        finally:
            os.close(self.fd)


def start_coordinator(name: str, *, interval: float = 0.25) -> int:
    """Start the host coordinator of the arena ``name`` (a detached process in its own session);
    return its pid once it holds the lease. CoordinatorRunning if another one got there first."""
    cmd = [sys.executable, "-m", "shmalloc.dask.janitor", name, "--interval", str(interval)]
    with MemoryManager.attach(name) as mgr:
        return lease.launch(attachment_of(mgr), cmd, timeout=_START_TIMEOUT)


def janitor(name: str) -> bool:
    """Wait until no worker holds the arena ``name``, then destroy it. True if this did."""
    try:
        fd = os.open(_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return destroy_if_alone(fd, name, wait=True)
    finally:
        os.close(fd)
