"""Per-process caches (native/cache.c): small and medium blocks reused without the heap lock, frees
of another process's blocks through its lock-free remote list, and what happens to a cache when
its process is killed, asked to trim, or the arena runs out of memory."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from shmalloc import CorruptionDetected, InvalidAddress, MemoryManager, OutOfMemory
from shmalloc import _binding as C
from shmalloc.manager import attachment_of

MiB = 1 << 20


def _cached(mgr: MemoryManager) -> tuple[int, int]:
    rep = mgr.check()  # the full walk: every list checked against the heap [K1] [K2]
    return rep.cached_blocks, rep.cached_bytes


def test_default_limit_and_small_arenas_start_without_caches(mgr: MemoryManager) -> None:
    assert mgr.cache_limit == (mgr.stats().total // 512)  # 64 MiB arena: 1/512 of its heap
    small = MemoryManager.create(mgr.name + "-s", MiB)
    try:
        assert small.cache_limit == 0  # 1 MiB: below 32 MiB an arena starts without caches
    finally:
        small.destroy()
        small.close()


def test_a_freed_small_block_is_reused_from_the_cache(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    size = mgr.size_of(a)
    assert size >= 100
    assert mgr.deallocate(a) == size
    blocks, nbytes = _cached(mgr)
    assert blocks >= 1 and nbytes >= size  # the refill's batch and the freed block
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0 and st.available >= nbytes
    assert mgr.allocate(100) == a  # last in, first out
    with pytest.raises(InvalidAddress):
        mgr.deallocate(a + 16)  # interior
    mgr.deallocate(a)
    with pytest.raises(InvalidAddress, match="was freed"):
        mgr.deallocate(a)  # it sits in the cache: a double free is still caught


def test_cached_bytes_and_peak_seen_through_the_cache(mgr: MemoryManager) -> None:
    addrs = [mgr.allocate(100) for _ in range(10)]
    live = sum(mgr.size_of(a) for a in addrs)
    for a in addrs:
        mgr.deallocate(a)
    assert mgr.cached_bytes == mgr.check().cached_bytes >= live
    assert mgr.stats().peak >= live  # the allocations came from the cache, not the heap
    mgr.collect()
    assert mgr.cached_bytes == 0


def test_a_heap_allocation_raises_the_peak_to_live_bytes_not_cached_ones(
    mgr: MemoryManager,
) -> None:
    addrs = [mgr.allocate(100) for _ in range(10)]
    for a in addrs:
        mgr.deallocate(a)
    p0 = mgr.stats().peak
    assert mgr.cached_bytes > 0 and p0 > 0
    big = mgr.allocate(1 << 20)  # the heap path, with this process's cache not empty
    assert mgr.stats().peak == mgr.size_of(big) > p0  # the cache's bytes are not live ones
    mgr.deallocate(big)
    again = mgr.allocate(1 << 20)  # used less this cache's bytes is the peak: no sum needed
    assert mgr.stats().peak == mgr.size_of(again)
    bigger = mgr.allocate(2 << 20)  # above it: summed, and raised to the live bytes
    assert mgr.stats().peak == mgr.size_of(again) + mgr.size_of(bigger)
    mgr.deallocate(again)
    mgr.deallocate(bigger)


def test_collect_returns_the_cache_and_everything_merges(mgr: MemoryManager) -> None:
    addrs = [mgr.allocate(n) for n in (16, 100, 1000, 5000, 20000, 60000) for _ in range(20)]
    for a in addrs:
        mgr.deallocate(a)
    assert _cached(mgr)[0] > 0
    mgr.collect()
    assert _cached(mgr) == (0, 0)
    st = mgr.stats()
    assert st.free_blocks == 1 and st.largest_free_block == st.available


def test_cache_stays_within_its_limit(mgr: MemoryManager) -> None:
    addrs = [mgr.allocate(3000) for _ in range(300)]
    for a in addrs:
        mgr.deallocate(a)
    assert 0 < _cached(mgr)[1] <= mgr.cache_limit


def test_set_cache_limit(mgr: MemoryManager) -> None:
    for a in [mgr.allocate(200) for _ in range(50)]:
        mgr.deallocate(a)
    assert _cached(mgr)[0] > 0
    mgr.set_cache_limit(0)  # off: the caches go back at once
    assert mgr.cache_limit == 0 and _cached(mgr) == (0, 0)
    a = mgr.allocate(200)
    mgr.deallocate(a)
    assert _cached(mgr) == (0, 0) and mgr.stats().free_blocks == 1
    mgr.set_cache_limit(1 * MiB)
    assert mgr.cache_limit == MiB
    with pytest.raises(ValueError):
        mgr.set_cache_limit(-1)
    with pytest.raises(TypeError):
        mgr.set_cache_limit(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mgr.set_cache_limit(mgr.capacity * 2)  # more than the heap
    assert mgr.cache_limit == MiB


def test_process_limit_counts_cached_allocations(mgr: MemoryManager) -> None:
    mgr.set_process_limit(os.getpid(), 10_000)
    live = []
    with pytest.raises(Exception, match="limit"):
        while True:
            live.append(mgr.allocate(1000))
    assert mgr.process_memory(os.getpid()) <= 10_000
    for a in live:
        mgr.deallocate(a)
    assert mgr.process_memory(os.getpid()) == 0
    mgr.set_process_limit(os.getpid(), None)


def test_remote_free_reaches_the_owner_without_its_lock(mgr: MemoryManager, children: Any) -> None:
    c = children("spawn", mgr)
    blocks = [c("alloc", 500, b"x" * 500) for _ in range(10)]
    held = mgr.process_memory(c.pid)
    assert held >= 10 * 500
    mgr.allocate(64)  # this process joins the table: its frees of the child's blocks go remote
    for a in blocks[:5]:
        mgr.deallocate(a)
    # freed at once as users see it, though the child has not taken them in yet
    assert held - mgr.process_memory(c.pid) == 5 * mgr.size_of(blocks[5])
    with pytest.raises(InvalidAddress):
        mgr.deallocate(blocks[0])  # on the child's remote list: freed already
    mgr.check()
    c("alloc", 500)  # the child's next allocation drains its remote list into its cache
    mgr.check()
    for a in blocks[5:]:
        assert c("read", a, 500) == b"x" * 500
        mgr.deallocate(a)
    c.call("collect")  # the child returns its cache
    mgr.collect()
    st = mgr.stats()
    assert st.allocated_blocks == 2  # the child's last block and this process's 64 bytes
    mgr.check()


def _remote(mgr: MemoryManager, slot: int) -> tuple[int, int]:
    info = C.cache_info(attachment_of(mgr).handle(), slot)
    return info.remote_pending, info.remote_bytes


def test_an_idle_owners_remote_list_is_drained_for_it(mgr: MemoryManager, children: Any) -> None:
    """An owner that stops allocating never drains its remote list itself: a collection does it,
    and so does a freer that finds more than 256 KiB waiting there."""
    c = children("spawn", mgr)
    slot = c("slot") if c("alloc", 64) else -1
    blocks = [c("alloc", 40000) for _ in range(12)]
    mgr.allocate(64)
    for a in blocks[:4]:
        mgr.deallocate(a)
    pending, waiting = _remote(mgr, slot)
    assert pending == 1 and 4 * 40000 <= waiting < 256 << 10
    mgr.collect()  # drains it for the idle child
    assert _remote(mgr, slot) == (0, 0)
    for a in blocks[4:]:  # 8 x 40 KB: past 256 KiB the freer drains it
        mgr.deallocate(a)
    assert _remote(mgr, slot)[1] <= 256 << 10
    mgr.check()


def test_killed_process_cache_and_remote_list_are_reclaimed(
    mgr: MemoryManager, children: Any
) -> None:
    c = children("fork", mgr)
    mine = [c("alloc", n) for n in (100, 100, 2000, 2000, 30000)]
    for a in mine[:3]:
        c.call("deallocate", a)  # into the child's cache
    own = mgr.allocate(64)
    mgr.deallocate(mine[3])  # onto the child's remote list
    c.kill()
    assert mgr.collect() >= 1  # the block it still owned, its cache and its remote list
    st = mgr.stats()
    assert st.used == mgr.size_of(own) and st.allocated_blocks == 1
    assert c.pid not in [p.pid for p in mgr.processes()]
    mgr.check()


@pytest.mark.parametrize("step", ["cache.popped", "cache.pushed"])
def test_killed_inside_the_cache_is_repaired(mgr: MemoryManager, step: str) -> None:
    """Killed holding only its slot lock: the lists may be torn; the heap is the truth."""
    code = (
        "import sys\nfrom shmalloc import MemoryManager\nm = MemoryManager.attach(sys.argv[1])\n"
        "a = m.allocate(100); m.deallocate(a); m.allocate(100)\nprint('survived')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, mgr.name],
        env=dict(os.environ, SHMALLOC_FAULT=step),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    mgr.check()  # takes the dead holder's slot lock: repaired from the heap walk
    mgr.collect()
    st = mgr.stats()
    assert st.used == 0 and st.free_blocks == 1
    assert [p.pid for p in mgr.processes()] in ([], [os.getpid()])


def test_killed_after_claiming_a_remote_free_is_finished_by_the_collector(
    mgr: MemoryManager,
) -> None:
    x = mgr.allocate(100)
    code = (
        "import sys\nfrom shmalloc import MemoryManager\nm = MemoryManager.attach(sys.argv[1])\n"
        "m.deallocate(m.allocate(64)); m.deallocate(int(sys.argv[2]))\nprint('survived')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code, mgr.name, str(x)],
        env=dict(os.environ, SHMALLOC_FAULT="remote.claimed"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with pytest.raises(InvalidAddress):
        mgr.deallocate(x)  # claimed: freed, though never pushed
    mgr.collect()  # pushes it for the dead freer, then this process drains it
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0 and st.free_blocks == 1
    mgr.check()


def test_out_of_memory_takes_back_other_processes_caches(arena_name: str, children: Any) -> None:
    m = MemoryManager.create(arena_name, 40 * MiB, cache_limit=4 * MiB)
    try:
        c = children("fork", m)
        c("alloc", 12 * MiB)  # kept: a process may cache a sixteenth of what it uses
        addrs = [c("alloc", 1000 * k) for k in range(1, 61) for _ in range(2)]
        for a in addrs:
            c.call("deallocate", a)  # into the child's cache, beside its refills' batches
        cached = m.check().cached_bytes
        assert cached > MiB // 4
        big = m.stats().largest_free_block
        # more than the heap has outside the child's cache: served after taking it back
        a = m.allocate(big + cached // 2)
        assert m.size_of(a) >= big + cached // 2
        assert m.check().cached_bytes == 0
        with pytest.raises(OutOfMemory):
            m.allocate(m.capacity)
    finally:
        m.destroy()
        m.close()


def test_trim_request_returns_the_cache(mgr: MemoryManager, children: Any) -> None:
    c = children("spawn", mgr)
    for a in [c("alloc", 1000) for _ in range(30)]:
        c.call("deallocate", a)
    before = mgr.check().cached_bytes
    assert before > 0
    mgr.request_trim(c.pid)
    keep = c("alloc", 5000)  # the child answers on its next allocation: its cache goes back
    after = mgr.check().cached_bytes
    assert after < before
    c.call("deallocate", keep)


def test_damaged_cache_link_is_corruption_not_a_crash(mgr: MemoryManager) -> None:
    a, b = mgr.allocate(100), mgr.allocate(100)
    mgr.deallocate(a)
    mgr.deallocate(b)  # b heads the list, its payload links to a
    with open(f"/dev/shm/{mgr.name}", "r+b") as f, mmap.mmap(f.fileno(), mgr.capacity) as raw:
        raw[b : b + 8] = (mgr.capacity * 4).to_bytes(8, "little")  # a link outside the segment
    assert mgr.allocate(100) == b
    with pytest.raises(CorruptionDetected):
        mgr.allocate(100)  # the next pop follows the damaged link: refused, not followed
