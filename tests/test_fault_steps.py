"""The fault-step matrix: for every named step of the C core's fault injection (the names come from
the core: ``shm_fault_step_count`` / ``shm_fault_step_name``) and every scenario that reaches it,
a child started with ``SHMALLOC_FAULT=<step>`` SIGKILLs itself at that step; then this process
asserts that the arena is consistent (``check()``), that a lock the child died holding was
recovered, that after a collection nothing of the child's is left (no block, no slot, no byte
counted as used once this process has freed its own), that this process's data is intact and
that the heap still serves allocations.

A queue scenario (steps ``queue.*``) also has a check in ``AFTER``, run once the child is collected:
the queue holds exactly the items it should (a step inside the heap lock rolled back, one after it
done: an item put is there once, an item taken went with the dead child), it still works, and
once dropped it leaves no object behind.

Each step runs the scenarios of ``PLAN`` that reach it, not every scenario: a scenario listed for
a step that does not reach it fails the test (the child exits instead of dying by SIGKILL).
"""

from __future__ import annotations

import gc
import os
import pickle
import queue
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import destroyed_after, unique_name

from shmalloc import MemoryManager, Queue, objects
from shmalloc import _binding as C
from shmalloc._binding import ffi, lib
from shmalloc.manager import attachment_of

STEPS = [ffi.string(lib.shm_fault_step_name(i)).decode() for i in range(lib.shm_fault_step_count())]

ATTACH = "import sys\nfrom shmalloc import MemoryManager\nm = MemoryManager.attach(sys.argv[1])\n"
A = "A = [int(x) for x in sys.argv[2:]]\n"
Setup = Callable[[MemoryManager, Path], tuple[str, list[int]]]  # -> (child's code, its args)


def run_python(
    code: str, mgr: MemoryManager, args: list[int], cwd: Path, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("SHMALLOC_FAULT", None)
    if fault is not None:
        env["SHMALLOC_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-c", ATTACH + A + code, mgr.name, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def orphans(mgr: MemoryManager, cwd: Path, sizes: list[int], retain: int = 0) -> list[int]:
    """A process that allocates ``sizes`` (retaining the first ``retain``) and exits without
    freeing: its blocks are orphans. Returns [its pid, the addresses...]."""
    code = (
        "out = [m.allocate(s) for s in A[1:]]\n[m.retain(a) for a in out[:A[0]]]\n"
        "import os; print(os.getpid(), *out)\n"
    )
    p = run_python(code, mgr, [retain, *sizes], cwd)
    assert p.returncode == 0, p.stderr
    return [int(x) for x in p.stdout.split()]


# ------------------------------------------------------------------------- scenarios
# Each sets the arena up (from this process, and helpers) and returns what the child runs.


def alloc_split(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    m.allocate(1000)
    return "m.allocate(3000)", []


def alloc_exact(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    x = m.allocate(2000)
    m.allocate(100)
    m.deallocate(x)
    return "m.allocate(2000)", []


def alloc_aligned(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    m.allocate(100)
    return "m.allocate(1000, align=4096)", []


def alloc_large(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return "m.allocate(1 << 20)", []


def alloc_after_dead_holder(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    """A helper died in the middle of an allocation, holding the heap lock with a journal to
    roll back: the child recovers the lock, then dies itself."""
    m.allocate(500)
    p = run_python("m.allocate(3000)", m, [], cwd, fault="alloc.carved")
    assert p.returncode == -signal.SIGKILL, p.stderr
    return "m.allocate(100)", []


def _frees(
    m: MemoryManager, pick: Callable[[list[int]], tuple[list[int], int]]
) -> tuple[str, list[int]]:
    blocks = [m.allocate(500) for _ in range(5)]
    holes, victim = pick(blocks)
    for a in holes:
        m.deallocate(a)
    return "m.deallocate(A[0])", [victim]


def free_isolated(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return _frees(m, lambda b: ([], b[2]))


def free_merge_both(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return _frees(m, lambda b: ([b[1], b[3]], b[2]))


def free_merge_next(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return _frees(m, lambda b: ([b[3]], b[2]))


def free_merge_prev(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return _frees(m, lambda b: ([b[1]], b[2]))


def free_retained_named(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    x = m.allocate(700)
    m.allocate(300)
    m.retain(x)
    m.bind("fault-named", x)
    return "m.deallocate(A[0])", [x]


def retain_release(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return "m.retain(A[0]); m.retain(A[0]); m.release(A[0]); m.release(A[0])", [m.allocate(300)]


def retain_orphan(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    _, x, _ = orphans(m, cwd, [300, 300])
    return "m.retain(A[0]); m.release(A[0])", [x]


def gc_dead(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    orphans(m, cwd, [100, 200, 300, 400, 500, 6000])
    return "m.collect()", []


def gc_dead_retained(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    orphans(m, cwd, [100, 200, 300, 400], retain=2)
    return "m.collect()", []


def gc_unreferenced(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    orphans(m, cwd, [100, 200, 300, 400])
    return (
        "from shmalloc.gc import GcStrategy, GlobalGarbageCollector\n"
        "GlobalGarbageCollector(m).collect(GcStrategy.UNREFERENCED)"
    ), []


def gc_targeted(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return "m.free_process_memory(A[0])", orphans(m, cwd, [100, 200, 300])[:1]


def cache_reuse(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    m.set_cache_limit(256 << 10)  # an 8 MiB arena starts without caches
    m.allocate(100)
    return "a = m.allocate(100); m.deallocate(a); m.allocate(100); m.allocate(3000)", []


def remote_free(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    m.set_cache_limit(256 << 10)
    x = m.allocate(100)  # this process's block, freed by the child: a remote free
    m.allocate(100)
    # the child takes a slot first (a process without one frees under the heap lock)
    return "m.deallocate(m.allocate(64)); m.deallocate(A[0])", [x]


# Queue scenarios: the queue and what the child must leave in it are kept in _QUEUES until the
# scenario's check (AFTER) has looked at the queue after the child's death and dropped it.
# The child gets the queue as a pickled reference (an int of the pickle's bytes).
_QUEUES: dict[str, Any] = {}
QCHILD = (
    "import pickle\nimport numpy as np\n"
    "q = pickle.loads(A[0].to_bytes((A[0].bit_length() + 7) // 8, 'big'))\n"
)


def _queue_for_child(m: MemoryManager, items: list[Any], maxsize: int = 0) -> int:
    q = Queue(maxsize, arena=m)
    for x in items:
        q.put(x)
    _QUEUES["q"] = q
    return int.from_bytes(pickle.dumps(q), "big")


def queue_put(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return QCHILD + "q.put(np.arange(1000))", [_queue_for_child(m, ["first"])]


def queue_get(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return QCHILD + "q.get()", [_queue_for_child(m, ["first", "second"])]


def queue_grow(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    return QCHILD + "q.put(64)", [_queue_for_child(m, list(range(64)))]


def queue_drain(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    """The child holds the queue last: dropping it frees the queue and its items."""
    arg = _queue_for_child(m, ["a", np.arange(2000), "c"])
    del _QUEUES["q"]  # the pickled reference's ticket keeps it for the child
    gc.collect()
    return QCHILD + "del q", [arg]


def object_put(m: MemoryManager, cwd: Path) -> tuple[str, list[int]]:
    """A put of an array (a header block and a buffer block), made in one C call."""
    return "import numpy as np\nref = m.put(np.arange(1000))\n", []


def _drained(q: Queue) -> list[Any]:
    out = []
    while True:
        try:
            x = q.get_nowait()
        except queue.Empty:
            return out
        out.append(x.tolist() if isinstance(x, np.ndarray) else x)


def _queue_check(want: list[Any]) -> Callable[[MemoryManager], None]:
    """After the child died and was collected: the queue holds exactly ``want``, keeps working,
    and once dropped leaves no object behind."""

    def check(m: MemoryManager) -> None:
        q = _QUEUES.pop("q", None)
        if q is not None:
            assert _drained(q) == want
            q.put("again")
            assert q.get_nowait() == "again"
            del q
        gc.collect()
        m.collect()
        info = objects.object_stats(attachment_of(m))
        assert (info.live, info.tickets, info.dying) == (0, 0, 0), info

    return check


AFTER: dict[tuple[str, Setup], Callable[[MemoryManager], None]] = {
    ("queue.put.half", queue_put): _queue_check(["first"]),  # rolled back
    ("queue.put.done", queue_put): _queue_check(["first", list(range(1000))]),  # it is in
    ("queue.get.half", queue_get): _queue_check(["first", "second"]),  # rolled back
    ("queue.get.done", queue_get): _queue_check(["second"]),  # delivered to the dead child
    ("queue.grow", queue_grow): _queue_check(list(range(64))),  # rolled back
    ("queue.drain", queue_drain): _queue_check([]),  # collection finishes the freeing
    ("object.filled", queue_put): _queue_check(["first"]),  # made, never put in
    ("object.filled", object_put): _queue_check([]),  # made, never published: no object
}

ALLOCS = [alloc_split, alloc_exact, alloc_aligned, alloc_large, alloc_after_dead_holder]
PLAN: dict[str, list[Setup]] = {
    "alloc.locked": ALLOCS,
    "alloc.removed": ALLOCS,
    "alloc.carved": [alloc_split, alloc_aligned, alloc_large],
    "alloc.done": ALLOCS,
    "free.locked": [free_isolated, free_merge_both, free_retained_named],
    "free.unlinked": [free_merge_both, free_merge_next, free_merge_prev],
    "free.inserted": [free_isolated, free_merge_both, free_merge_prev, free_retained_named],
    "retain.half": [retain_release, retain_orphan],
    "gc.step": [gc_dead, gc_dead_retained, gc_targeted, gc_unreferenced],
    "cache.popped": [cache_reuse],
    "cache.pushed": [cache_reuse, remote_free],
    "remote.claimed": [remote_free],
    "queue.put.half": [queue_put],
    "queue.put.done": [queue_put],
    "queue.get.half": [queue_get],
    "queue.get.done": [queue_get],
    "queue.grow": [queue_grow],
    "queue.drain": [queue_drain],
    "object.filled": [object_put, queue_put],
}


def test_every_fault_step_of_the_core_has_scenarios() -> None:
    assert len(STEPS) >= 2 and len(set(STEPS)) == len(STEPS)
    assert sorted(PLAN) == sorted(STEPS), "PLAN and the core's fault steps differ"


def lock_holders(mgr: MemoryManager, pid: int) -> list[int]:
    """The locks (-1: the heap lock, i: slot i's) whose holder is thread ``pid``."""
    h = attachment_of(mgr).handle()
    return [which for which in range(-1, C.MAX_PROCS) if C.lock_owner(h, which) == pid]


@pytest.fixture
def arena() -> Iterator[MemoryManager]:
    with destroyed_after(MemoryManager.create(unique_name("fault"), 8 << 20)) as m:
        yield m


@pytest.mark.parametrize(
    ("step", "setup"),
    [pytest.param(step, s, id=f"{step}-{s.__name__}") for step in PLAN for s in PLAN[step]],
)
def test_killed_at_step(step: str, setup: Setup, arena: MemoryManager, tmp_path: Path) -> None:
    m = arena
    mine = {}  # this process's blocks and their content
    for i, n in enumerate((100, 5000, 300)):
        a = m.allocate(n)
        mine[a] = bytes([i + 1]) * m.size_of(a)
        m.write(a, mine[a])
    code, args = setup(m, tmp_path)
    recoveries = m.stats().lock_recoveries

    env = dict(os.environ, SHMALLOC_FAULT=step)
    child = subprocess.Popen(
        [sys.executable, "-c", ATTACH + A + code + "\nprint('completed')", m.name, *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, f"{step} not reached: {child.returncode} {err}"
    assert "completed" not in out

    held = lock_holders(m, child.pid)  # read before anything takes a lock
    report = m.check()  # takes the heap lock: recovers it if the child died holding it
    assert report.allocated_blocks >= len(mine)
    if -1 in held:
        assert m.stats().lock_recoveries > recoveries, "the dead holder's lock was not recovered"
    m.collect()
    after = AFTER.get((step, setup))
    if after is not None:
        after(m)
    assert lock_holders(m, child.pid) == [], "a lock still names the dead child"
    assert child.pid not in [p.pid for p in m.processes()], "the dead child keeps its slot"
    assert all(b.pid != child.pid for b in m.all_blocks()), "a block of the dead child is left"
    for a, data in mine.items():
        assert m.read(a) == data, f"block {a:#x} changed under its owner"
    churn = [m.allocate(n) for n in (16, 100, 1000, 5000, 70000, 100, 16)]
    for a in churn:
        m.write(a, b"x" * m.size_of(a))
    for b in m.all_blocks():
        m.deallocate(b.address)
    m.collect()  # what those frees put in this process's cache goes back to the heap
    assert m.stats().used == 0, "bytes still counted as used after every block was freed"
    report = m.check()
    assert (report.allocated_blocks, report.free_blocks) == (0, 1)
