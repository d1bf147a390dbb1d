"""shmalloc.Queue, JoinableQueue and SimpleQueue: behaviour of multiprocessing's queues, items as
objects in the arena, and what SIGKILLed producers and consumers leave behind.

Children are real processes (fork and spawn). They record what they did in files written with
one unbuffered write per record (a SIGKILL loses no record already written) and signal progress
with multiprocessing Events; no test sleeps to synchronise. Every test ends by dropping its
queues and checking that the arena holds no object and no used byte any more.
(CPython's own queue tests, run against these classes: test_queue_stdlib.py.)
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from queue_workers import (
    join_worker,
    pool_init,
    pool_task,
    put_array,
    put_three,
    simple_echo,
    start_workers,
)

import shmalloc
from shmalloc import JoinableQueue, MemoryManager, Queue, SimpleQueue, objects
from shmalloc.manager import attachment_of

METHODS = ["fork", "spawn"]
TIMEOUT = 60.0


def assert_no_leak(m: MemoryManager) -> None:
    """Nothing left in the arena once every queue and value of the test is dropped."""
    gc.collect()
    m.collect()
    info = objects.object_stats(attachment_of(m))
    assert (info.live, info.tickets, info.dying) == (0, 0, 0), info
    assert m.stats().used == 0
    m.check()


def records(path: Path) -> list[int]:
    """The integers a child wrote to ``path`` (one line each), in order."""
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().split()]


# ---------------------------------------------------------------- one process


def test_fifo_sizes_and_nowait(mgr: MemoryManager) -> None:
    q = Queue(3, arena=mgr)
    assert (q.empty(), q.full(), q.qsize()) == (True, False, 0)
    for x in ("a", {"b": [1, 2]}, b"c" * 5000):
        q.put(x)
    assert (q.empty(), q.full(), q.qsize()) == (False, True, 3)
    with pytest.raises(queue.Full):
        q.put_nowait("d")
    with pytest.raises(queue.Full):
        q.put("d", False)
    assert q.get() == "a"
    assert q.get_nowait() == {"b": [1, 2]}
    assert q.get(True, 1.0) == b"c" * 5000
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(False)
    del q
    assert_no_leak(mgr)


def test_timeouts_wait_that_long(mgr: MemoryManager) -> None:
    q = Queue(1, arena=mgr)
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert time.monotonic() - t >= 0.2
    q.put(1)
    t = time.monotonic()
    with pytest.raises(queue.Full):
        q.put(2, timeout=0.2)
    assert time.monotonic() - t >= 0.2
    with pytest.raises(queue.Full):
        q.put(2, timeout=-1)
    assert q.get(timeout=0) == 1
    del q
    assert_no_leak(mgr)


def test_unbounded_queue_grows_its_ring_and_keeps_order(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    for i in range(1000):
        q.put(i)
        if i % 3 == 2:
            assert q.get() == i // 3
    assert q.qsize() == 1000 - 333
    assert [q.get() for _ in range(q.qsize())] == list(range(333, 1000))
    assert q._info().capacity >= 1000 - 333
    del q
    assert_no_leak(mgr)


def test_unpicklable_item_raises_in_put(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        q.put(lambda: 0)
    q.put(True)
    assert q.get() is True and q.empty()
    del q
    assert_no_leak(mgr)


def test_close_is_per_process(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    q.put(1)
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    other = pickle.loads(pickle.dumps(q))  # another handle on the same queue
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put(2)
    with pytest.raises(ValueError, match="is closed"):
        q.get()
    q.join_thread()
    q.cancel_join_thread()
    assert other.get_nowait() == 1  # the queue itself is still there
    del q, other
    assert_no_leak(mgr)


def test_dropping_a_queue_frees_the_items_in_it(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    for i in range(200):
        q.put(np.full(300, i) if i % 2 else i)
    assert objects.object_stats(attachment_of(mgr)).live == 201
    del q
    assert_no_leak(mgr)


def test_object_ref_travels_as_itself(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    ref = mgr.put(np.arange(10))
    q.put(ref)
    del ref
    got = q.get()
    assert isinstance(got, objects.ObjectRef)
    assert list(mgr.get(got)) == list(range(10))
    q.put(got)
    mgr.delete(got)  # deleted while in the queue: get() skips it
    q.put("after")
    assert q.get() == "after"
    del q, got
    assert_no_leak(mgr)


def test_default_arena_is_compat_s(mgr: MemoryManager) -> None:
    from shmalloc import compat

    compat.set_arena(mgr)
    try:
        q = shmalloc.Queue()
        assert q._ref.arena == mgr.name
        q.put(1)
        assert q.get() == 1
        del q
    finally:
        compat.set_arena(None)
    assert_no_leak(mgr)


def test_joinable_counts_and_refuses_extra_task_done(mgr: MemoryManager) -> None:
    q = JoinableQueue(arena=mgr)
    with pytest.raises(ValueError, match="too many"):
        q.task_done()
    q.put(1)
    q.put(2)
    q.get()
    q.task_done()
    q.get()
    q.task_done()
    q.join()  # returns at once: every item is done
    del q
    assert_no_leak(mgr)


def test_an_item_taken_as_a_get_is_cancelled_goes_back_whole(mgr: MemoryManager) -> None:
    """get_async's cancellation puts a taken item back (Queue._untake), whichever way get took
    it: a small value copied out and dropped at once (native/handoff.c), a value held over the
    arena, or a reference."""
    q = Queue(arena=mgr)
    ref = mgr.put("by reference")
    items: list[Any] = ["small", np.arange(1000), ref, None, b"", {"k": 1}]
    for x in items:
        q.put(x)
    for _ in range(len(items)):
        box: list[Any] = []
        assert q._take(box) is None
        q._untake(box.pop())
    back = [q.get_nowait() for _ in range(len(items))]
    assert back[0] == "small" and np.array_equal(back[1], items[1]) and back[2] == ref
    assert back[3:] == [None, b"", {"k": 1}]
    del q, ref, back, items, x
    assert_no_leak(mgr)


def test_falsy_values_come_out_of_every_get(mgr: MemoryManager) -> None:
    """None, 0, "", (), b"": values read in C, each delivered once, by every kind of get."""
    q = Queue(arena=mgr)
    values: list[Any] = [None, 0, "", (), b"", False, 0.0]

    async def by_get_async(q: Queue) -> list[Any]:
        return [await q.get_async() for _ in values]

    gets: list[Callable[[Queue], list[Any]]] = [
        lambda q: [q.get() for _ in values],
        lambda q: [q.get(timeout=TIMEOUT) for _ in values],
        lambda q: [q.get_nowait() for _ in values],
        lambda q: asyncio.run(by_get_async(q)),
    ]
    for get in gets:
        for v in values:
            q.put(v)
        back = get(q)
        assert back == values and [type(b) for b in back] == [type(v) for v in values]
        assert q.empty()
    del q
    assert_no_leak(mgr)


def test_a_finalizer_that_gets_during_a_get_takes_the_next_item(mgr: MemoryManager) -> None:
    """Reading a small value may start a collection, whose finalizers may get from the same
    queue on the same thread: each get still delivers its own item."""
    q = Queue(arena=mgr)
    nested: list[Any] = []
    outer: dict[str, Any] = {"in": False, "q": q}

    class Finalized:
        def __del__(self) -> None:
            if outer["in"]:
                outer["in"] = False
                nested.append(outer["q"].get())

    threshold, hits = gc.get_threshold(), 0
    try:
        for i in range(50):
            first, second = list(range(i, i + 40)), [-i] * 40  # read as lists: collections
            q.put(first)
            q.put(second)
            gc.collect()
            f = Finalized()
            f.me = f  # type: ignore[attr-defined]
            del f  # cyclic garbage, found by the next collection
            outer["in"] = True
            gc.set_threshold(1)
            got = q.get()
            gc.set_threshold(*threshold)
            outer["in"] = False
            gc.collect()
            hits += bool(nested)
            rest = nested.pop() if nested else q.get()
            # a collection before the outer take lets the finalizer take the first item
            assert (got, rest) == (first, second) or (got, rest) == (second, first), i
            assert q.empty()
    finally:
        gc.set_threshold(*threshold)
    assert hits > 0, "no finalizer ran inside a get: the test did not test"
    del q, outer["q"]
    assert_no_leak(mgr)


def test_an_item_given_back_to_a_queue_filled_meanwhile_goes_past_maxsize(
    mgr: MemoryManager,
) -> None:
    """A get_async cancelled after it took an item gives it back even if producers filled the
    queue to maxsize meanwhile (its ring at maxsize cells): the ring grows past maxsize for it,
    and ordinary puts still see the queue full until it drains below maxsize."""
    q = Queue(2, arena=mgr)
    q.put("taken")
    box: list[Any] = []
    assert q._take(box) is None
    q.put("a")
    q.put("b")
    assert q.full()
    q._untake(box.pop())
    assert q.qsize() == 3
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    assert [q.get_nowait() for _ in range(3)] == ["a", "b", "taken"]
    q.put_nowait("c")
    assert q.get_nowait() == "c"
    assert mgr.check().queued == 0
    del q
    assert_no_leak(mgr)


def test_asyncio_get_put_and_cancel(mgr: MemoryManager) -> None:
    q = Queue(1, arena=mgr)

    async def main(q: Queue) -> None:
        await q.put_async("x")
        with pytest.raises(queue.Full):
            await q.put_async("y", timeout=0.05)
        assert await q.get_async() == "x"
        with pytest.raises(queue.Empty):
            await q.get_async(timeout=0.05)
        waiting = asyncio.ensure_future(q.get_async())
        await asyncio.sleep(0)  # let it start waiting
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        getter = asyncio.ensure_future(q.get_async(timeout=TIMEOUT))
        await q.put_async("z")
        assert await getter == "z"

    asyncio.run(main(q))
    q.put("kept")
    assert q.get_nowait() == "kept"  # the cancelled get took nothing
    del q
    assert_no_leak(mgr)


# ---------------------------------------------------------------- between processes


@pytest.mark.parametrize("method", METHODS)
def test_array_put_in_a_child_comes_out_zero_copy(mgr: MemoryManager, method: str) -> None:
    q = Queue(arena=mgr)
    p = mp.get_context(method).Process(target=put_array, args=(q, 1 << 17))
    p.start()
    a = q.get(timeout=TIMEOUT)
    p.join(TIMEOUT)
    assert p.exitcode == 0
    assert isinstance(a, np.ndarray) and not a.flags.writeable
    assert a[-1] == (1 << 17) - 1
    mv = attachment_of(mgr).mv
    base = np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0]
    at = a.__array_interface__["data"][0]
    assert base <= at < base + len(mv), "the array is not a view over the arena"
    del a, q, mv
    assert_no_leak(mgr)


@pytest.mark.parametrize("method", METHODS)
def test_mpmc_delivers_each_item_exactly_once(
    mgr: MemoryManager, method: str, tmp_path: Path
) -> None:
    ctx = mp.get_context(method)
    q = Queue(16, arena=mgr)
    n, producers, consumers = 150, 3, 3
    never = ctx.Event()
    ranges = [(k * 1000, n) for k in range(producers)]
    prods, cons = start_workers(ctx, q, tmp_path, ranges, consumers, [never] * 6, 0)
    for p in prods:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    for _ in cons:
        q.put(None)
    for p in cons:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    got = [x for k in range(consumers) for x in records(tmp_path / f"c{k}")]
    want = [k * 1000 + i for k in range(producers) for i in range(n)]
    assert sorted(got) == want
    for k in range(consumers):  # each producer's items keep their order
        mine = records(tmp_path / f"c{k}")
        for j in range(producers):
            theirs = [x for x in mine if x // 1000 == j]
            assert theirs == sorted(theirs)
    assert q.empty()
    del q
    assert_no_leak(mgr)


@pytest.mark.parametrize("method", METHODS)
def test_blocked_put_is_woken_by_a_get(mgr: MemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    q = Queue(2, arena=mgr)
    done = ctx.Event()
    p = ctx.Process(target=put_three, args=(q, done))
    p.start()
    assert q.get(timeout=TIMEOUT) == 0  # makes room: the child's third put goes in
    assert done.wait(TIMEOUT)
    assert [q.get(timeout=TIMEOUT), q.get(timeout=TIMEOUT)] == [1, 2]
    p.join(TIMEOUT)
    assert p.exitcode == 0
    del q
    assert_no_leak(mgr)


@pytest.mark.parametrize("method", METHODS)
def test_joinable_join_waits_for_other_processes(mgr: MemoryManager, method: str) -> None:
    ctx = mp.get_context(method)
    q = JoinableQueue(arena=mgr)
    workers = [ctx.Process(target=join_worker, args=(q,)) for _ in range(2)]
    for w in workers:
        w.start()
    for i in range(20):
        q.put(i)
    # join() has no timeout (as multiprocessing's): wait for it in a thread, so that a worker
    # that dies (a crash, a sanitizer's abort) fails this test instead of hanging the run
    joiner = threading.Thread(target=q.join, daemon=True)
    joiner.start()
    joiner.join(TIMEOUT)
    assert not joiner.is_alive(), (
        f"join() never returned; workers' exit codes: {[w.exitcode for w in workers]}"
    )
    assert q._info().unfinished == 0
    for _ in workers:
        q.put(None)
    for w in workers:
        w.join(TIMEOUT)
        assert w.exitcode == 0
    q.join()
    del q
    assert_no_leak(mgr)


def test_simple_queue_between_processes(mgr: MemoryManager) -> None:
    ctx = mp.get_context("spawn")
    inq, outq = SimpleQueue(arena=mgr), SimpleQueue(arena=mgr)
    p = ctx.Process(target=simple_echo, args=(inq, outq))
    p.start()
    for i in range(5):
        inq.put(i)
    inq.put(None)
    assert [outq.get() for _ in range(5)] == [0, 2, 4, 6, 8]
    p.join(TIMEOUT)
    assert p.exitcode == 0 and inq.empty() and outq.empty()
    inq.close()
    with pytest.raises(ValueError, match="is closed"):
        inq.put(1)
    del inq, outq
    assert_no_leak(mgr)


def test_queue_passed_to_a_pool_initializer(mgr: MemoryManager) -> None:
    q = Queue(arena=mgr)
    pool = mp.get_context("spawn").Pool(2, initializer=pool_init, initargs=(q,))
    assert sorted(pool.map(pool_task, range(6))) == list(range(6))
    pool.close()  # not terminate(): a worker killed before it unpickled q would leave its
    pool.join()  # transit ticket to expire (after the arena's transit timeout)
    assert sorted(q.get(timeout=TIMEOUT) for _ in range(6)) == [x * x for x in range(6)]
    del q, pool  # the pool keeps its initargs
    assert_no_leak(mgr)


# ---------------------------------------------------------------- kill -9


@pytest.mark.parametrize("method", METHODS)
def test_producers_and_consumers_killed_mid_stream(
    mgr: MemoryManager, method: str, tmp_path: Path
) -> None:
    ctx = mp.get_context(method)
    q = Queue(8, arena=mgr)
    n = 400
    endless = (
        1_000_000  # the victim producer cannot finish before it is killed, however slow we are
    )
    progress = [ctx.Event() for _ in range(4)]
    ranges = [(0, endless), (endless, n)]
    prods, cons = start_workers(ctx, q, tmp_path, ranges, 2, progress, 50)
    assert progress[0].wait(TIMEOUT) and progress[2].wait(TIMEOUT)
    for victim in (prods[0], cons[0]):  # mid-stream: both are busy with the queue
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(TIMEOUT)
        assert victim.exitcode == -signal.SIGKILL
    prods[1].join(TIMEOUT)
    assert prods[1].exitcode == 0
    q.put(None)
    cons[1].join(TIMEOUT)
    assert cons[1].exitcode == 0
    mgr.collect()  # the dead ones' half-built items and taken items go
    drained = []
    while True:
        try:
            drained.append(q.get_nowait())
        except queue.Empty:
            break
    delivered = records(tmp_path / "c0") + records(tmp_path / "c1") + drained
    assert len(delivered) == len(set(delivered)), "an item was delivered twice"
    put_returned = set(records(tmp_path / "p0") + records(tmp_path / "p1"))
    assert set(records(tmp_path / "p1")) == set(range(endless, endless + n))
    lost = put_returned - set(delivered)
    # only the item the killed consumer took and had not written down yet may be missing
    assert len(lost) <= 1, f"items whose put returned were lost: {sorted(lost)}"
    assert all(isinstance(x, int) and 0 <= x < endless + n for x in delivered)
    q.put("still works")
    assert q.get(timeout=TIMEOUT) == "still works"
    del q
    assert_no_leak(mgr)


def fork_child_first_hand_off(mgr: MemoryManager, q: Queue, a: Any, handed: Any, go: Any) -> None:
    mgr.deallocate(mgr.allocate(64))  # its slot claimed by an allocation, not a queue call
    q.put(b"from the child")  # its first hand-off, through put's C half: adopts first
    handed.set()
    assert go.wait(TIMEOUT)
    assert a.sum() == sum(range(1000))  # the inherited view: intact, the parent's reuse aside
    assert q.get(timeout=TIMEOUT) == b"from the child"


def test_a_fork_child_holds_what_it_inherited_before_its_first_fast_put(
    mgr: MemoryManager,
) -> None:
    """put() and get() run in C, which must not skip a fork child's adoption of its parent's
    holds: here the child's slot exists before its first queue call."""
    ctx = mp.get_context("fork")
    q = Queue(arena=mgr)
    q.put(np.arange(1000.0))
    a = q.get()  # a read-only view over the arena, held by this process
    handed, go = ctx.Event(), ctx.Event()
    p = ctx.Process(target=fork_child_first_hand_off, args=(mgr, q, a, handed, go))
    p.start()
    assert handed.wait(TIMEOUT)
    del q, a
    gc.collect()
    # the child's holds keep the queue and the array's object
    assert objects.object_stats(attachment_of(mgr)).live == 3  # and the child's item
    junk = [mgr.allocate(8000) for _ in range(64)]  # would reuse the array's block, were it free
    for at in junk:
        mgr.write(at, b"\xff" * 8000)
    go.set()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    for at in junk:
        mgr.deallocate(at)
    assert_no_leak(mgr)


def fork_child_keeps_queue(q: Queue, handed: Any, go: Any) -> None:
    q.qsize()  # its first call: from now on it holds the queue it inherited
    handed.set()
    assert go.wait(TIMEOUT)
    q.put("from the child")  # the parent let its handle go meanwhile
    assert q.get(timeout=TIMEOUT) == "from the child"


def test_fork_child_holds_the_queue_it_inherited(mgr: MemoryManager) -> None:
    ctx = mp.get_context("fork")
    q = Queue(arena=mgr)
    handed, go = ctx.Event(), ctx.Event()
    p = ctx.Process(target=fork_child_keeps_queue, args=(q, handed, go))
    p.start()
    assert handed.wait(TIMEOUT)
    del q
    gc.collect()
    assert objects.object_stats(attachment_of(mgr)).live == 1  # the child's hold keeps it
    go.set()
    p.join(TIMEOUT)
    assert p.exitcode == 0
    assert_no_leak(mgr)
