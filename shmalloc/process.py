"""Process identity: (pid, start time), so that a recycled pid is never taken for a dead owner."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name, or None if there is no such process
    (the process may end, or be reaped, at any moment between the open and the read)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:  # FileNotFoundError, or ProcessLookupError when reaped mid-read
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), or None if there is no such process.

    This is the number psutil's create_time() is computed from, read exactly rather than as a
    float, so that two readings of the same process always compare equal.
    """
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int, started: int) -> bool:
    """Is the process (pid, started) still running (and not a zombie)?"""
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == started and fields[0] not in (b"Z", b"X")


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
