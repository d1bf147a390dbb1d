"""Process identity: (pid, start time), so that a recycled pid is never taken for a dead owner."""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if there is no such process.

    This is the number psutil's create_time() is computed from, read exactly rather than as a
    float, so that two readings of the same process always compare equal.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(b")") + 2 :].split()
    return int(rest[19])


def is_alive(pid: int, started: int) -> bool:
    """Is the process (pid, started) still running (and not a zombie)?"""
    if start_time(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    return raw[raw.rindex(b")") + 2 :][:1] not in (b"Z", b"X")


_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def current_pid() -> int:
    """os.getpid(), cached (and refreshed in fork children): it is on the event path."""
    return _pid


def self_identity() -> tuple[int, int]:
    pid = os.getpid()
    st = start_time(pid)
    assert st is not None
    return pid, st
