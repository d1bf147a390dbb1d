"""Starting a coordinator as a detached process: its command line, and the start that waits until
it holds the lease."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from typing import Any

from ..errors import ShmallocError
from ..manager import MemoryManager, attachment_of
from .command import EXIT_LEASE_HELD
from .lease import CoordinatorRunning, lease_holder, read_lease

__all__ = ["coordinator_command", "start_coordinator"]

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


def start_coordinator(
    manager: MemoryManager,
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = _START_TIMEOUT,
    **kwargs: Any,
) -> int:
    """Start a detached coordinator for ``manager``'s arena; return its pid once it holds the
    lease.

    ``kwargs`` are Coordinator's (interval, metrics_port, metrics_host, events_path, log_level,
    trim_threshold, min_interval). Its output goes to ``log_path`` (appended) or nowhere. Raises
    CoordinatorRunning if the arena already has one, ShmallocError if the child exits or does not
    take the lease within ``timeout`` seconds.
    """
    holder = lease_holder(manager)
    if holder is not None:
        raise CoordinatorRunning(manager.name, holder)
    cmd = coordinator_command(manager.name, **kwargs)
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
    h = attachment_of(manager).handle()
    deadline = time.monotonic() + timeout
    while True:
        pid, _ = read_lease(h)
        if pid == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            see = f"; see {os.fspath(log_path)}" if log_path is not None else ""
            if code == EXIT_LEASE_HELD and pid and pid != proc.pid:
                raise CoordinatorRunning(manager.name, pid)
            raise ShmallocError(
                f"the coordinator for arena {manager.name!r} exited with status {code} before "
                f"taking the lease{see}; run `{' '.join(cmd)}` to see why"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ShmallocError(
                f"the coordinator for arena {manager.name!r} (pid {proc.pid}) did not take the "
                f"lease within {timeout:g} s; it was killed"
            )
        time.sleep(0.01)
    # reap it when it ends, so that it never lingers as a zombie of this process
    threading.Thread(target=proc.wait, name=f"reap-coordinator-{proc.pid}", daemon=True).start()
    return proc.pid
