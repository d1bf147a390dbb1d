"""numpy's memory handler over an arena (shmalloc.npalloc, native/npalloc.c): large arrays made
in the arena, small ones and what the arena cannot serve in numpy's memory, lending without a
copy, threads, and a lender killed with its arrays alive."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from in_threads import run_in_threads

np = pytest.importorskip("numpy")

from shmalloc import MemoryManager  # noqa: E402
from shmalloc import _binding as C  # noqa: E402
from shmalloc.manager import attachment_of  # noqa: E402
from shmalloc.npalloc import ArenaAllocator, handler_name  # noqa: E402

MiB = 1 << 20


def live(m: MemoryManager) -> int:
    return int(C.objects_info(attachment_of(m).handle()).live)


@pytest.fixture
def alloc(mgr: MemoryManager) -> Iterator[ArenaAllocator]:
    a = ArenaAllocator(mgr, threshold=MiB)
    yield a
    a.close()
    gc.collect()  # its capsule goes with the last array it made: then the arena may close


def test_large_arrays_are_made_in_the_arena_small_ones_not(
    mgr: MemoryManager, alloc: ArenaAllocator
) -> None:
    before = mgr.stats().used
    with alloc.active():
        assert handler_name() == "shmalloc_arena"
        big = np.arange(MiB // 8, dtype=np.float64) * 2  # exactly 1 MiB
        small = np.ones(1000)
        assert handler_name(big) == "shmalloc_arena"
        assert alloc.owns(big) and not alloc.owns(small)
        assert mgr.stats().used >= before + MiB
    assert handler_name() != "shmalloc_arena"
    assert not alloc.owns(big + 1)  # made after the block: numpy's own memory again
    assert big[-1] == 2 * (MiB // 8 - 1) and small.sum() == 1000
    assert alloc.stats().arena_blocks == 1
    del big, small
    assert alloc.stats().arena_blocks == 0
    assert mgr.stats().used == before


def test_calloc_zeroes_a_reused_block_and_realloc_moves_it(alloc: ArenaAllocator) -> None:
    with alloc.active():
        ones = np.ones(MiB // 4)
        del ones  # its block, written with ones, goes back to the arena
        zeros = np.zeros(MiB // 4)
        assert alloc.owns(zeros) and not zeros.any()
        grown = np.arange(MiB // 4, dtype=np.float64)
        grown.resize(MiB // 2, refcheck=False)  # numpy's realloc: a new block, copied
        assert alloc.owns(grown)
        assert (grown[: MiB // 4] == np.arange(MiB // 4)).all() and not grown[MiB // 4 :].any()
        grown.resize(10, refcheck=False)  # below the threshold: into numpy's memory
        assert not alloc.owns(grown) and list(grown) == list(range(10))
    del zeros, grown
    assert alloc.stats().arena_blocks == 0


def test_lend_publishes_the_array_memory_without_a_copy(
    mgr: MemoryManager, alloc: ArenaAllocator
) -> None:
    base = mgr.stats().used
    with alloc.active():
        x = np.arange(MiB // 4, dtype=np.float64).reshape(512, 512)
    ref = alloc.lend(x)
    assert ref is not None and not x.flags.writeable
    got = mgr.get(ref)
    assert got.__array_interface__["data"][0] == x.__array_interface__["data"][0]
    assert got.shape == x.shape and (got == x).all()
    assert mgr.stats().used < base + 2 * MiB + 64 * 1024  # one block and a small header
    assert alloc.lend(x) is None  # lent already
    assert alloc.lend(x[1:]) is None  # does not start its block
    assert alloc.lend(np.ones(MiB)) is None  # numpy's memory
    del x  # numpy frees it: its hold goes, the object stays with the reference and the view
    assert alloc.stats().lent_live == 0 and live(mgr) == 1
    assert got[511, 511] == 512 * 512 - 1
    del got, ref
    assert live(mgr) == 0 and mgr.stats().used == base
    mgr.check()


def test_a_deleted_lent_object_keeps_the_array_valid(
    mgr: MemoryManager, alloc: ArenaAllocator
) -> None:
    base = mgr.stats().used
    with alloc.active():
        x = np.full(MiB // 8, 7.0)
    ref = alloc.lend(x)
    assert ref is not None
    mgr.delete(ref)
    del ref
    mgr.check()
    assert live(mgr) == 1  # the array still reads it
    assert (x == 7.0).all()
    del x
    assert live(mgr) == 0 and mgr.stats().used == base


def test_a_full_arena_falls_back_to_numpy(arena_name: str) -> None:
    with MemoryManager.create(arena_name, 8 * MiB) as small:
        try:
            a = ArenaAllocator(small, threshold=MiB)
            with a.active():
                big = np.ones(2 * MiB)  # 16 MiB: more than the arena
                fits = np.ones(MiB // 8)
            assert not a.owns(big) and a.owns(fits) and big.sum() == 2 * MiB
            assert a.stats().fallbacks == 1
            a.close()
            del big, fits
        finally:
            small.destroy()


def test_threads_allocate_lend_and_free_at_once(mgr: MemoryManager, alloc: ArenaAllocator) -> None:
    base = mgr.stats().used

    def work(seed: int) -> None:
        with alloc.active():
            for i in range(40):
                a = np.full(MiB // 8 + seed, float(i))
                ref = alloc.lend(a) if i % 2 else None
                view = mgr.get(ref) if ref is not None else a
                assert view[-1] == i and alloc.owns(a)
                del a, ref, view

    run_in_threads(work, 4)
    st = alloc.stats()
    assert st.arena_allocs == 160 and st.lent == 80 and st.arena_blocks == 0 and not st.fallbacks
    assert live(mgr) == 0 and mgr.stats().used == base
    mgr.check()


LENDER = """
import sys, numpy as np
from shmalloc import MemoryManager
from shmalloc.npalloc import ArenaAllocator
mgr = MemoryManager.attach(sys.argv[1])
alloc = ArenaAllocator(mgr)
with alloc.active():
    lent, plain = np.ones(1 << 18), np.ones(1 << 18)
ref = alloc.lend(lent)
mgr.put(ref, name="lent")  # another holder: the named object outlives the lender
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_killed_lender_leaves_nothing_behind(mgr: MemoryManager) -> None:
    base = mgr.stats().used
    child = subprocess.Popen(
        [sys.executable, "-c", LENDER, mgr.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert mgr.stats().used >= base + 4 * MiB
        assert live(mgr) == 2  # the lent array, and the named reference to it
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    mgr.collect()  # the dead slot: its plain block freed, its holds and LENT owner dropped
    assert live(mgr) == 2  # the name keeps the reference, which keeps the object
    inner = mgr.get("lent")
    assert mgr.get(inner).sum() == 1 << 18  # the lent memory outlived its lender
    del inner
    mgr.delete("lent")
    mgr.collect()
    mgr.check()
    assert live(mgr) == 0 and mgr.stats().used == base
