"""A segment truncated under its arena by a process of the same user (outside the threat model:
the blocks past the new end are lost, and a process that touches one dies of SIGBUS). What can be
survived is: ``check()``, ``shmalloc check`` and the coordinator notice it before they touch a
page that is gone, and say so as CorruptionDetected naming the truncation."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

from conftest import SHM_DIR

from shmalloc import CorruptionDetected, MemoryManager
from shmalloc import _binding as C
from shmalloc.manager import attachment_of

TIMEOUT = 60.0


def _truncate(name: str) -> int:
    """Cut the segment just past the header and the first heap page (the header stays, so that
    nothing that reads only the header can die of SIGBUS while the test looks on)."""
    size = C.header_size() + mmap.PAGESIZE
    os.truncate(os.path.join(SHM_DIR, name), size)
    return size


def test_check_reports_a_truncated_segment(mgr: MemoryManager) -> None:
    mgr.check()
    size = _truncate(mgr.name)
    try:
        mgr.check()
    except CorruptionDetected as e:
        assert e.offset == size
        assert "truncated" in e.detail and str(mgr.capacity) in e.detail
    else:
        raise AssertionError("check() did not notice the truncation")
    # ``shmalloc check`` attaches afresh: the header no longer matches the segment's size
    out = subprocess.run(
        [sys.executable, "-m", "shmalloc", "check", mgr.name],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "truncated" in out.stdout + out.stderr
    assert out.returncode != -signal.SIGBUS


def test_the_coordinator_reports_truncation_and_stops_without_sigbus(mgr: MemoryManager) -> None:
    h = attachment_of(mgr).handle()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmalloc", "coordinator", mgr.name, "--interval", "0.02"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while C.lease_get(h)[0] != proc.pid:  # serving: it holds the lease
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the coordinator never took the lease"
            time.sleep(0.01)
        _truncate(mgr.name)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err  # a clean exit with an error, not SIGBUS (-7)
    assert "truncated" in err and "CRITICAL" in err
