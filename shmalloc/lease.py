"""The coordinator lease: which process holds the coordinator role of an arena, and starting a
coordinator process that takes it.

The role is held through a lease in the segment: the (pid, start time) of the holder, read and
swapped under the heap lock (``shm_lease_get``/``shm_lease_swap``). A coordinator takes it from
(0, 0), or from a holder that /proc says has ended (even by ``kill -9``): the swap only succeeds
from the values it read, so two contenders cannot both take over. A holder that is still running
makes a new coordinator refuse (:class:`CoordinatorRunning`, exit status 3). On a clean stop the
holder swaps the lease back to (0, 0). Workers never wait for the coordinator: if none runs,
nothing but reclamation of dead processes' memory is delayed.

This module sits beneath the manager (it acts on an :class:`Attachment`), so that
``MemoryManager.start_coordinator`` can start one without importing the coordinator itself,
which is built on the manager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from . import _binding as C
from . import process, tracking
from .attachment import Attachment
from .errors import ShmallocError

__all__ = [
    "EXIT_LEASE_HELD",
    "CoordinatorRunning",
    "acquire",
    "coordinator_command",
    "holder",
    "read_lease",
    "release",
    "start",
]

logger = logging.getLogger("shmalloc.coordinator")  # one logger for every part of the coordinator

EXIT_LEASE_HELD = 3  # a coordinator's exit status when another live one holds the lease


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


def holder_runs(h: C.Handle, pid: int, start: int) -> bool:
    """Does the process holding the lease run? The life lock of its slot says, in whatever PID
    namespace it runs (a coordinator claims a slot when it takes the lease); /proc only for a
    holder without a slot."""
    for row in tracking.scan_slots(h):
        if row.pid == pid and row.start_time == start and row.state == C.PROC_LIVE:
            return tracking.is_running(h, row)
    return process.is_alive(pid, start)


def holder(a: Attachment) -> int | None:
    """The pid of the arena's live coordinator, or None when no running process holds the lease."""
    h = a.handle()
    pid, start = read_lease(h)
    if pid and holder_runs(h, pid, start):
        return pid
    return None


def acquire(a: Attachment) -> tuple[int, int]:
    """Take the lease for this process; CoordinatorRunning if a live process holds it. The taker
    claims its slot first, so that its life lock tells every process, in any PID namespace,
    whether it still runs."""
    h = a.handle()
    tracking.own_slot(a)
    me = process.self_identity()
    for _ in range(100):  # each failed swap means another contender moved first: look again
        held = read_lease(h)
        if held == me:
            return me
        if held[0] and holder_runs(h, *held):
            raise CoordinatorRunning(a.name, *held)
        if held[0]:
            logger.warning(
                "taking over the coordinator lease of arena %s from process %d, which has ended",
                a.name,
                held[0],
            )
        if C.lease_swap(h, held, me):
            return me
    raise ShmallocError(f"could not take the coordinator lease of arena {a.name!r}: contended")


def release(a: Attachment, me: tuple[int, int]) -> bool:
    """Give the lease back (swap ``me`` for (0, 0)); False if ``me`` no longer held it."""
    return C.lease_swap(a.handle(), me, (0, 0))


_START_TIMEOUT = 15.0  # seconds start_coordinator waits for the child to show in the lease


def coordinator_command(
    name: str,
    *,
    interval: float | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    events_path: str | os.PathLike[str] | None = None,
    log_level: str | None = None,
    trim_threshold: int | None = None,
    min_interval: float | None = None,
) -> list[str]:
    """The argv that runs a coordinator for ``name`` with this interpreter."""
    cmd = [sys.executable, "-m", "shmalloc.coordinator", name]
    for flag, value in (
        ("--interval", interval),
        ("--metrics-port", metrics_port),
        ("--metrics-host", metrics_host),
        ("--events", None if events_path is None else os.fspath(events_path)),
        ("--log-level", log_level),
        ("--trim-threshold", trim_threshold),
        ("--min-interval", min_interval),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def start(
    a: Attachment,
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = _START_TIMEOUT,
    **kwargs: Any,
) -> int:
    """Start a detached coordinator for the arena; return its pid once it holds the lease.

    ``kwargs`` are Coordinator's (interval, metrics_port, metrics_host, events_path, log_level,
    trim_threshold, min_interval). Its output goes to ``log_path`` (appended) or nowhere. Raises
    CoordinatorRunning if the arena already has one, ShmallocError if the child exits or does not
    take the lease within ``timeout`` seconds.
    """
    held = holder(a)
    if held is not None:
        raise CoordinatorRunning(a.name, held)
    return launch(a, coordinator_command(a.name, **kwargs), log_path=log_path, timeout=timeout)


def launch(
    a: Attachment,
    cmd: list[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = _START_TIMEOUT,
) -> int:
    """Run ``cmd``, a coordinator of the arena, detached (its own session); return its pid once
    it holds the lease. CoordinatorRunning if it exits because another one holds it, ShmallocError
    if it exits otherwise or does not take the lease within ``timeout`` seconds (it is killed)."""
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            out = stack.enter_context(open(log_path, "ab"))
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    h = a.handle()
    deadline = time.monotonic() + timeout
    while True:
        pid, _ = read_lease(h)
        if pid == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            see = f"; see {os.fspath(log_path)}" if log_path is not None else ""
            if code == EXIT_LEASE_HELD and pid and pid != proc.pid:
                raise CoordinatorRunning(a.name, pid)
            raise ShmallocError(
                f"the coordinator for arena {a.name!r} exited with status {code} before "
                f"taking the lease{see}; run `{' '.join(cmd)}` to see why"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ShmallocError(
                f"the coordinator for arena {a.name!r} (pid {proc.pid}) did not take the "
                f"lease within {timeout:g} s; it was killed"
            )
        time.sleep(0.01)
    # reap it when it ends, so that it never lingers as a zombie of this process
    threading.Thread(target=proc.wait, name=f"reap-coordinator-{proc.pid}", daemon=True).start()
    return proc.pid
