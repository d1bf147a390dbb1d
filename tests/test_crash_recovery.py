"""A process killed inside the C core, at any step of an operation, while it holds the heap lock:
the next process to take the lock rolls the half-done step back from the undo journal, and the
heap is exactly as it was before (native/journal.c)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from shmalloc import MemoryManager


@pytest.fixture
def mgr(heap_mgr: MemoryManager) -> MemoryManager:
    """These tests kill a process inside the heap lock's steps:
    the per-process caches are off (test_cache.py covers them)."""
    return heap_mgr


CHILD = """
import sys
from shmalloc import MemoryManager
m = MemoryManager.attach(sys.argv[1])
arg = int(sys.argv[2])
{op}
print("survived", flush=True)
"""


def run_child(mgr: MemoryManager, step: str, op: str, arg: int = 0) -> None:
    """Run ``op`` in a fresh process that SIGKILLs itself at ``step`` inside the C core."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(op=op), mgr.name, str(arg)],
        env=dict(os.environ, SHMALLOC_FAULT=step),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stderr)
    assert "survived" not in child.stdout


def fragmented(mgr: MemoryManager) -> tuple[list[int], list[int]]:
    """Live blocks with free holes between them, so that allocations split and frees merge."""
    blocks = [mgr.allocate(s) for s in (3000, 500, 3000, 500, 3000, 500, 8000)]
    for i, a in enumerate(blocks):
        mgr.write(a, bytes([i + 1]) * mgr.size_of(a))
    holes = blocks[0:6:2]
    for a in holes:
        mgr.deallocate(a)
    live = [a for a in blocks if a not in holes]
    return live, holes


def assert_intact(mgr: MemoryManager, live: list[int], blocks_before: list[int]) -> None:
    for a in live:
        i = blocks_before.index(a)
        assert mgr.read(a) == bytes([i + 1]) * mgr.size_of(a)


@pytest.mark.parametrize("step", ["alloc.locked", "alloc.removed", "alloc.carved", "alloc.done"])
def test_killed_inside_allocate_is_rolled_back(mgr: MemoryManager, step: str) -> None:
    live, holes = fragmented(mgr)
    order = sorted(live + holes)
    before_report, before = mgr.check(), mgr.stats()
    run_child(mgr, step, "m.allocate(1000)")
    after_report = mgr.check()  # the first lock taker: it rolls back
    after = mgr.stats()
    assert after.lock_recoveries == before.lock_recoveries + 1
    assert after_report.blocks == before_report.blocks
    assert after_report.free_blocks == before_report.free_blocks
    assert (after.used, after.available, after.allocations) == (
        before.used,
        before.available,
        before.allocations,
    )
    assert_intact(mgr, live, order)
    again = mgr.allocate(1000)  # the heap works on
    for a in live + [again]:
        mgr.deallocate(a)
    mgr.collect()
    assert mgr.stats().used == 0
    mgr.check()


@pytest.mark.parametrize("step", ["free.locked", "free.unlinked", "free.inserted"])
def test_killed_inside_deallocate_is_rolled_back(mgr: MemoryManager, step: str) -> None:
    live, holes = fragmented(mgr)
    order = sorted(live + holes)
    victim = live[0]  # between two free holes: freeing it merges three blocks
    before_report, before = mgr.check(), mgr.stats()
    run_child(mgr, step, "m.deallocate(arg)", victim)
    after_report = mgr.check()
    after = mgr.stats()
    assert after.lock_recoveries == before.lock_recoveries + 1
    assert (after_report.blocks, after_report.free_blocks) == (
        before_report.blocks,
        before_report.free_blocks,
    )
    assert after.used == before.used and after.deallocations == before.deallocations
    assert_intact(mgr, live, order)  # the victim is still allocated, its data untouched
    for a in live:
        mgr.deallocate(a)
    assert mgr.stats().used == 0
    mgr.check()


def test_killed_inside_retain_is_rolled_back(mgr: MemoryManager) -> None:
    a = mgr.allocate(256)
    run_child(mgr, "retain.half", "m.retain(arg)", a)
    mgr.check()  # [R2]: the refcount and the reference table agree again
    assert mgr.process_allocations(os.getpid())[0].refcount == 0
    mgr.deallocate(a)
    mgr.collect()
    assert mgr.stats().used == 0


def test_collector_killed_between_steps_keeps_what_it_freed(mgr: MemoryManager) -> None:
    # a process that leaves four orphans behind, then dies
    owner = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom shmalloc import MemoryManager\n"
            "m = MemoryManager.attach(sys.argv[1])\n"
            "keep = [m.allocate(100) for _ in range(8)]\n"
            "for a in keep[1::2]: m.deallocate(a)\n",
            mgr.name,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert owner.returncode == 0, owner.stderr
    assert mgr.stats().allocated_blocks == 4
    run_child(mgr, "gc.step", "m.collect()")
    mid = mgr.stats()
    mgr.check()
    assert 0 < mid.allocated_blocks < 4  # the first step stayed done, the rest not yet
    mgr.collect()
    assert mgr.stats().used == 0 and mgr.stats().allocated_blocks == 0
    mgr.check()
