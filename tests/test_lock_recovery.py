"""A process killed while it holds the heap lock must not block the others (robust mutex)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from shmalloc import MemoryManager

CHILD = """
import sys
from shmalloc import MemoryManager
m = MemoryManager.attach(sys.argv[1])
{op}
print("survived", flush=True)
"""


@pytest.mark.parametrize(
    ("step", "op"),
    [
        ("alloc.locked", "m.allocate(1000)"),
        ("free.locked", "m.deallocate(int(sys.argv[2]))"),
    ],
)
def test_killed_lock_holder_is_recovered(mgr: MemoryManager, step: str, op: str) -> None:
    keep = mgr.allocate(4096)
    mgr.write(keep, b"kept" * 1024)
    victim = mgr.allocate(512)
    before = mgr.stats()
    env = dict(os.environ, SHMALLOC_FAULT=step)
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(op=op), mgr.name, str(victim)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # the child died by SIGKILL at the fault point, holding the lock
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout
    # the next taker recovers the lock instead of blocking forever
    other = mgr.allocate(2048)
    after = mgr.stats()
    assert after.allocations == before.allocations + 1
    s = mgr.check()
    assert s.allocated_blocks == 3
    assert mgr.read(keep) == b"kept" * 1024
    assert after.lock_recoveries == before.lock_recoveries + 1
    for a in (keep, victim, other):
        mgr.deallocate(a)
    assert mgr.stats().used == 0
