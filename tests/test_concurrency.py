"""Four processes allocate, write, verify and free at random in one arena, and free each other's
blocks: addresses travel through multiprocessing queues, so a block is often freed by a process
that did not allocate it. Afterwards the heap walk is clean and nothing is left allocated."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
from typing import Any

import pytest
from in_threads import run_in_threads

from shmalloc import MemoryManager, OutOfMemory

NPROCS = 4
OPS = 6000
MAX_LIVE = 120
JOIN_TIMEOUT = 120

SIZES = [(1, 64), (65, 4096), (4097, 65536), (65537, 262144)]
WEIGHTS = [5, 4, 2, 1]


def _fill(tag: int, n: int) -> bytes:
    unit = tag.to_bytes(8, "little")
    return (unit * (n // 8 + 1))[:n]


def _worker(
    m: MemoryManager, index: int, seed: int, inbox: Any, outboxes: list[Any], results: Any
) -> None:
    """One of NPROCS workers; m arrives pickled by name (spawn) or pickled through fork."""
    stats = {"alloc": 0, "free_own": 0, "free_foreign": 0, "sent": 0, "verified": 0, "oom": 0}
    try:
        rng = random.Random(seed)
        pid = os.getpid()
        live: dict[int, tuple[int, int]] = {}  # address -> (tag, size written)
        counter = 0
        finished = [0]  # sentinels received: workers that will send nothing more

        def verify(addr: int, tag: int, n: int) -> None:
            got = m.read(addr, n)
            if got != _fill(tag, n):
                raise AssertionError(f"block {addr:#x} of {n} bytes lost its data (tag {tag:#x})")
            if m.size_of(addr) < n:
                raise AssertionError(f"block {addr:#x} shrank below {n}")
            stats["verified"] += 1

        def take_foreign(block: bool) -> None:
            try:
                item = inbox.get(timeout=JOIN_TIMEOUT) if block else inbox.get_nowait()
            except queue.Empty:
                if block:
                    raise AssertionError("timed out waiting for the other workers") from None
                return
            if item is None:
                finished[0] += 1
                return
            addr, tag, n = item
            verify(addr, tag, n)
            if m.deallocate(addr) < n:
                raise AssertionError("deallocate returned a size smaller than the block's data")
            stats["free_foreign"] += 1

        for _ in range(OPS):
            r = rng.random()
            if r < 0.45 and len(live) < MAX_LIVE:
                lo, hi = rng.choices(SIZES, WEIGHTS)[0]
                n = rng.randint(lo, hi)
                try:
                    addr = m.allocate(n)
                except OutOfMemory:
                    stats["oom"] += 1
                    continue
                if addr in live:
                    raise AssertionError(f"address {addr:#x} handed out twice")
                counter += 1
                tag = (pid << 32) | counter
                m.write(addr, _fill(tag, n))
                live[addr] = (tag, n)
                stats["alloc"] += 1
            elif r < 0.65 and live:
                addr = rng.choice(list(live))
                verify(addr, *live[addr])
            elif r < 0.85 and live:
                addr = rng.choice(list(live))
                tag, n = live.pop(addr)
                verify(addr, tag, n)
                m.deallocate(addr)
                stats["free_own"] += 1
            elif live:
                # hand a block to another worker, which verifies and frees it
                addr = rng.choice(list(live))
                tag, n = live.pop(addr)
                outboxes[rng.choice([i for i in range(NPROCS) if i != index])].put((addr, tag, n))
                stats["sent"] += 1
            if rng.random() < 0.3:
                take_foreign(block=False)
        for addr, (tag, n) in list(live.items()):
            verify(addr, tag, n)
            m.deallocate(addr)
            stats["free_own"] += 1
        for i, box in enumerate(outboxes):
            if i != index:
                box.put(None)
        while finished[0] < NPROCS - 1:
            take_foreign(block=True)
        m.close()
        results.put(("ok", index, stats))
    except BaseException as e:  # report, never leave the parent waiting
        import traceback

        results.put(("error", index, traceback.format_exc() + repr(e)))
        # release the others: they wait for our sentinels
        for i, box in enumerate(outboxes):
            if i != index:
                box.put(None)


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_four_processes_random_ops_with_cross_frees(mgr: MemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    inboxes = [ctx.Queue() for _ in range(NPROCS)]
    results = ctx.Queue()
    seed = random.randrange(1 << 30)
    procs = [
        ctx.Process(target=_worker, args=(mgr, i, seed + i, inboxes[i], inboxes, results))
        for i in range(NPROCS)
    ]
    for p in procs:
        p.start()
    reports = []
    try:
        for _ in range(NPROCS):
            reports.append(results.get(timeout=JOIN_TIMEOUT))
    finally:
        for p in procs:
            p.join(JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
        for q in [*inboxes, results]:
            q.close()
            q.join_thread()
    errors = [r for r in reports if r[0] != "ok"]
    assert not errors, f"seed {seed}: " + "\n".join(str(e) for e in errors)
    assert [p.exitcode for p in procs] == [0] * NPROCS
    totals = {k: sum(r[2][k] for r in reports) for k in reports[0][2]}
    assert totals["alloc"] >= NPROCS * OPS // 4
    assert totals["sent"] > 0 and totals["free_foreign"] == totals["sent"]
    assert totals["alloc"] == totals["free_own"] + totals["free_foreign"]

    # caches of the exited processes, blocks freed to them after they exited, and this process's
    # cache go back to the heap, where everything merges into one block again
    mgr.collect()
    st = mgr.stats()
    rep = mgr.check()
    assert st.used == 0, f"seed {seed}: {st}"
    assert st.allocated_blocks == 0 and rep.allocated_blocks == 0
    assert st.free_blocks == 1 == rep.free_blocks
    assert st.allocations == totals["alloc"] == st.deallocations
    assert st.peak > 0
    assert rep.used == 0 and rep.free_bytes == st.total


def _hammer_same_sizes(m: MemoryManager, n: int, start: Any, results: Any) -> None:
    """Every worker allocates and frees blocks of the same few sizes, as fast as it can."""
    try:
        start.wait(JOIN_TIMEOUT)
        rng = random.Random(os.getpid())
        mine: list[int] = []
        for _ in range(n):
            if mine and (len(mine) > 50 or rng.random() < 0.5):
                a = mine.pop(rng.randrange(len(mine)))
                if m.read(a, 8) != a.to_bytes(8, "little"):
                    raise AssertionError(f"block {a:#x} was overwritten")
                m.deallocate(a)
            else:
                a = m.allocate(rng.choice([16, 48, 1024, 4096]))
                m.write(a, a.to_bytes(8, "little"))
                mine.append(a)
        for a in mine:
            m.deallocate(a)
        results.put(("ok", os.getpid()))
    except BaseException as e:
        results.put(("error", repr(e)))


def test_contended_small_classes_fork(mgr: MemoryManager) -> None:
    """Same-size-class contention: many processes pop and push the same bins at once."""
    ctx = mp.get_context("fork")
    start = ctx.Barrier(NPROCS + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer_same_sizes, args=(mgr, 20000, start, results))
        for _ in range(NPROCS)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(JOIN_TIMEOUT)
        reports = [results.get(timeout=JOIN_TIMEOUT) for _ in procs]
    finally:
        for p in procs:
            p.join(JOIN_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(r[0] == "ok" for r in reports), reports
    assert [p.exitcode for p in procs] == [0] * NPROCS
    mgr.collect()  # the caches go back to the heap
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0 and st.free_blocks == 1
    assert st.allocations == st.deallocations >= NPROCS * 10000
    mgr.check()


def test_threads_in_one_process_share_the_arena(mgr: MemoryManager) -> None:
    """The C core runs without the GIL: four threads of one process allocate, verify and free
    concurrently, handing blocks to each other."""
    nthreads, ops = 4, 3000
    boxes: list[queue.Queue[Any]] = [queue.Queue() for _ in range(nthreads)]
    counts = [0] * nthreads

    def run(index: int) -> None:
        rng = random.Random(index)
        live: dict[int, bytes] = {}
        for i in range(ops):
            r = rng.random()
            if r < 0.5 and len(live) < 64:
                n = rng.randint(1, 20000)
                a = mgr.allocate(n)
                assert a not in live
                data = _fill((index << 40) | i, n)
                mgr.write(a, data)
                live[a] = data
                counts[index] += 1
            elif r < 0.8 and live:
                a = rng.choice(list(live))
                d = live.pop(a)
                assert mgr.read(a, len(d)) == d
                mgr.deallocate(a)
            elif live:
                a = rng.choice(list(live))
                boxes[(index + 1) % nthreads].put((a, live.pop(a)))
            try:
                a, d = boxes[index].get_nowait()
            except queue.Empty:
                continue
            assert mgr.read(a, len(d)) == d
            mgr.deallocate(a)
        for a, d in live.items():
            assert mgr.read(a, len(d)) == d
            mgr.deallocate(a)

    mgr.deallocate(
        mgr.allocate(1)
    )  # join the process table first (the race for that has its own test)
    run_in_threads(run, nthreads)
    # blocks still in the boxes were handed over after their receiver finished
    for box in boxes:
        while not box.empty():
            a, d = box.get_nowait()
            assert mgr.read(a, len(d)) == d
            mgr.deallocate(a)
    mgr.collect()  # this process's cache goes back to the heap
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0 and st.free_blocks == 1
    assert st.allocations == sum(counts) + 1 == st.deallocations
    mgr.check()


def test_threads_racing_for_the_first_allocation(mgr: MemoryManager) -> None:
    """Several threads make the very first allocation of a fresh manager at once (the moment the
    process joins the arena's process table): every one of them must succeed."""
    import threading

    nthreads, rounds = 4, 200
    errors: list[str] = []
    for _ in range(rounds):
        m = MemoryManager.attach(mgr.name)  # a fresh manager: not yet in the process table
        start = threading.Barrier(nthreads)
        got: list[int] = []

        def first(
            m: MemoryManager = m, start: threading.Barrier = start, got: list[int] = got
        ) -> None:
            try:
                start.wait(JOIN_TIMEOUT)
                got.append(m.allocate(64))
            except BaseException as e:  # collected and asserted on below
                errors.append(repr(e))

        threads = [threading.Thread(target=first) for _ in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for a in got:
            m.deallocate(a)
        m.close()
        if errors:
            break
    assert not errors, errors
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0
    mgr.check()
