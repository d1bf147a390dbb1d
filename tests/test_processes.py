"""Per-process tracking with real child processes (spawn and fork): a child's usage, peak and
blocks as the parent sees them, processes() before and after a SIGKILL, a fork child's own slot,
process limits (here and in a child), free_process_memory, and process identity (pid, start time).

Children are command servers: the parent sends (op, *args) over a Pipe and blocks on the reply,
so no step relies on timing. A SIGKILLed child is always blocked on its pipe (or SIGSTOPped)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from children import TIMEOUT, proc_state, process_row, serve

from shmalloc import InvalidAddress, MemoryManager, ProcessLimitExceeded
from shmalloc import process as sprocess
from shmalloc.manager import attachment_of

KiB = 1 << 10
MiB = 1 << 20


# ---------------------------------------------------------------- usage, peak, blocks


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_usage_peak_and_blocks_seen_from_parent(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    me = os.getpid()
    c = children(method, mgr)
    assert c.pid != me
    assert mgr.process_memory(c.pid) == 0
    assert mgr.process_allocations(c.pid) == []

    a = c("alloc", 100, b"a" * 100)
    b = c("alloc", 5000, b"b" * 5000)
    big = c("alloc", 70000, b"c" * 70000)
    sizes = {x: mgr.size_of(x) for x in (a, b, big)}
    assert sizes[a] >= 100 and sizes[b] >= 5000 and sizes[big] >= 70000
    peak = sum(sizes.values())
    assert mgr.process_memory(c.pid) == peak
    assert mgr.process_peak(c.pid) == peak

    assert c.call("deallocate", b) == sizes[b]
    c.call("seal", big)
    c.call("retain", a)
    # the parent holds nothing: nothing of this is accounted to it
    assert mgr.process_memory(me) == 0

    assert mgr.process_memory(c.pid) == sizes[a] + sizes[big]
    assert mgr.process_peak(c.pid) == peak  # the high-water mark stays
    blocks = mgr.process_allocations(c.pid)
    got = [(x.address, x.size, x.pid, x.sealed, x.refcount) for x in blocks]
    assert got == [
        (a, sizes[a], c.pid, False, 1),
        (big, sizes[big], c.pid, True, 0),
    ]
    # the child sees the same figures
    assert c.call("process_memory", c.pid) == mgr.process_memory(c.pid)
    assert c.call("process_allocations", c.pid) == blocks
    assert mgr.read(big, 70000) == b"c" * 70000

    info = process_row(mgr, c.pid)
    assert info.alive is True
    assert (info.usage, info.peak, info.limit, info.allocations) == (
        sizes[a] + sizes[big],
        peak,
        None,
        2,
    )
    mgr.check()

    c.kill()
    info = process_row(mgr, c.pid)
    assert info.alive is False
    # still accounted until a collection reclaims it
    assert info.usage == sizes[a] + sizes[big]
    assert mgr.process_memory(c.pid) == sizes[a] + sizes[big]
    assert mgr.check().allocated_blocks == 2

    assert mgr.collect() == 2
    assert all(p.pid != c.pid for p in mgr.processes())
    assert mgr.process_memory(c.pid) == 0
    assert mgr.process_allocations(c.pid) == []
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0
    rep = mgr.check()
    assert rep.allocated_blocks == 0 and rep.dead_processes == 0


def test_unknown_pid_has_nothing(mgr: MemoryManager) -> None:
    mgr.allocate(64)
    unknown = 2**31 - 7
    assert mgr.process_memory(unknown) == 0
    assert mgr.process_peak(unknown) == 0
    assert mgr.process_allocations(unknown) == []
    with pytest.raises(TypeError):
        mgr.process_memory("1")  # type: ignore[arg-type]


def test_accounting_to_another_pid(mgr: MemoryManager, children: Any) -> None:
    """allocate(size, pid=child) charges the child, not the caller; the child can free it."""
    c = children("fork", mgr)
    a = mgr.allocate(3000, c.pid)
    n = mgr.size_of(a)
    assert mgr.process_memory(c.pid) == n
    assert mgr.process_memory(os.getpid()) == 0
    [blk] = mgr.process_allocations(c.pid)
    assert (blk.address, blk.pid) == (a, c.pid)
    assert c.call("deallocate", a) == n
    assert mgr.process_memory(c.pid) == 0
    assert mgr.process_peak(c.pid) == n
    mgr.check()


# ---------------------------------------------------------------- fork: own slot


@pytest.mark.parametrize("parent_first", [True, False], ids=["parent-first", "child-first"])
def test_fork_child_gets_its_own_slot(
    mgr: MemoryManager, children: Any, parent_first: bool
) -> None:
    me = os.getpid()
    mine = mgr.allocate(1000) if parent_first else None
    c = children("fork", mgr)  # the child inherits this very MemoryManager object
    x = c("alloc", 2000, b"x" * 2000)
    y = c("alloc", 300)
    if mine is None:
        mine = mgr.allocate(1000)
    child_slot = c("slot")
    assert child_slot >= 0 and child_slot != attachment_of(mgr).slot

    assert mgr.process_memory(me) == mgr.size_of(mine)
    assert [b.address for b in mgr.process_allocations(me)] == [mine]
    assert mgr.process_memory(c.pid) == mgr.size_of(x) + mgr.size_of(y)
    assert [(b.address, b.pid) for b in mgr.process_allocations(c.pid)] == [(x, c.pid), (y, c.pid)]
    rows = {p.pid: p for p in mgr.processes()}
    assert rows[me].slot != rows[c.pid].slot
    assert rows[me].alive and rows[c.pid].alive
    assert rows[c.pid].allocations == 2 and rows[me].allocations == 1

    # the child's blocks die with it; the parent's do not
    c.kill()
    assert mgr.collect() == 2
    assert [b.address for b in mgr.process_allocations(me)] == [mine]
    assert mgr.process_memory(me) == mgr.size_of(mine)
    assert mgr.stats().allocated_blocks == 1
    mgr.check()


# ---------------------------------------------------------------- limits


def test_process_limit_in_this_process(mgr: MemoryManager) -> None:
    me = os.getpid()
    a = mgr.allocate(8000)
    used = mgr.size_of(a)
    mgr.set_process_limit(me, 10000)
    assert process_row(mgr, me).limit == 10000
    with pytest.raises(ProcessLimitExceeded) as ei:
        mgr.allocate(4000)
    e = ei.value
    assert (e.pid, e.limit, e.used, e.requested) == (me, 10000, used, 4000)
    assert str(me) in str(e)
    # a refused allocation changes nothing
    assert mgr.process_memory(me) == used
    assert mgr.stats().allocated_blocks == 1
    # up to the limit is fine
    b = mgr.allocate(10000 - used)
    assert mgr.process_memory(me) == 10000
    with pytest.raises(ProcessLimitExceeded):
        mgr.allocate(1)
    # None removes the limit
    mgr.set_process_limit(me, None)
    assert process_row(mgr, me).limit is None
    c = mgr.allocate(4000)
    assert mgr.process_memory(me) == 10000 + mgr.size_of(c)
    for x in (a, b, c):
        mgr.deallocate(x)
    mgr.check()


@pytest.mark.parametrize(
    "bad,exc",
    [(0, ValueError), (-5, ValueError), (1.5, TypeError), ("10", TypeError), (True, TypeError)],
)
def test_process_limit_bad_values(mgr: MemoryManager, bad: Any, exc: type) -> None:
    with pytest.raises(exc):
        mgr.set_process_limit(os.getpid(), bad)


def test_process_limit_on_a_pid_that_is_not_running(mgr: MemoryManager) -> None:
    with pytest.raises(ValueError):
        mgr.set_process_limit(2**31 - 7, 4096)
    assert mgr.processes() == []


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_limit_on_a_child_is_enforced_in_the_child(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    c = children(method, mgr)
    a = c("alloc", 4096)
    used = mgr.size_of(a)
    mgr.set_process_limit(c.pid, 6000)
    assert process_row(mgr, c.pid).limit == 6000
    assert c.call("processes") == mgr.processes()

    with pytest.raises(ProcessLimitExceeded) as ei:
        c("alloc", 4096)
    e = ei.value
    assert (e.pid, e.limit, e.used, e.requested) == (c.pid, 6000, used, 4096)
    # the parent cannot charge the child past its limit either
    with pytest.raises(ProcessLimitExceeded) as ei:
        mgr.allocate(4096, c.pid)
    assert ei.value.pid == c.pid
    # the parent itself is not limited
    mine = mgr.allocate(64 * KiB)
    assert mgr.process_memory(c.pid) == used

    c("alloc", 1000)  # still within the limit
    mgr.set_process_limit(c.pid, None)
    c("alloc", 64 * KiB)
    assert mgr.process_memory(c.pid) > 64 * KiB
    mgr.deallocate(mine)
    mgr.check()


# ---------------------------------------------------------------- free_process_memory


def test_free_process_memory_of_a_live_child(mgr: MemoryManager, children: Any) -> None:
    c = children("fork", mgr)
    mine = mgr.allocate(500)
    addrs = [c("alloc", n, bytes([i + 1]) * n) for i, n in enumerate((100, 20000, 300000))]
    total = sum(mgr.size_of(x) for x in addrs)
    assert mgr.process_memory(c.pid) == total
    used_before = mgr.stats().used

    assert mgr.free_process_memory(c.pid) == total
    assert mgr.process_memory(c.pid) == 0
    assert mgr.process_allocations(c.pid) == []
    assert mgr.stats().used == used_before - total
    for x in addrs:
        with pytest.raises(InvalidAddress):
            c("read", x, 1)
    # the parent's block is untouched; the child is still alive and still works
    assert mgr.process_memory(os.getpid()) == mgr.size_of(mine)
    assert process_row(mgr, c.pid).alive
    z = c("alloc", 64, b"z" * 64)
    assert mgr.read(z, 64) == b"z" * 64
    assert mgr.process_memory(c.pid) == mgr.size_of(z)
    mgr.check()


def test_free_process_memory_of_this_process(mgr: MemoryManager) -> None:
    addrs = [mgr.allocate(n) for n in (10, 1000, 100000)]
    total = sum(mgr.size_of(x) for x in addrs)
    assert mgr.free_process_memory(os.getpid()) == total
    assert mgr.stats().used == 0
    assert mgr.free_process_memory(os.getpid()) == 0
    assert mgr.free_process_memory(2**31 - 7) == 0  # never seen: nothing to free
    mgr.check()


# ---------------------------------------------------------------- process identity


def test_is_alive_needs_the_right_start_time(children: Any, mgr: MemoryManager) -> None:
    me, started = sprocess.self_identity()
    assert sprocess.is_alive(me, started)
    assert not sprocess.is_alive(me, started + 1)
    assert not sprocess.is_alive(me, started - 1)
    c = children("fork", mgr)
    cstart = sprocess.start_time(c.pid)
    assert cstart is not None
    assert sprocess.is_alive(c.pid, cstart)
    assert not sprocess.is_alive(c.pid, cstart + 1)
    c.kill()
    assert sprocess.start_time(c.pid) is None
    assert not sprocess.is_alive(c.pid, cstart)


def _charge_as_other_incarnation(
    m: MemoryManager, monkeypatch: pytest.MonkeyPatch, pid: int, fake_start: int, size: int
) -> int:
    """Allocate a block accounted to (pid, fake_start): what a process that had the same pid
    before would have left behind."""
    real = sprocess.start_time
    with monkeypatch.context() as mp_:
        mp_.setattr(sprocess, "start_time", lambda p: fake_start if p == pid else real(p))
        return m.allocate(size, pid)


def test_slot_with_another_start_time_is_dead_for_collect(mgr: MemoryManager) -> None:
    """A slot keyed (pid, another start time) belongs to an earlier process with that pid:
    collect() reclaims it although a process with that pid is running (our parent here)."""
    other = os.getppid()
    started = sprocess.start_time(other)
    assert started is not None and sprocess.is_alive(other, started)
    mine = mgr.allocate(100)
    with pytest.MonkeyPatch.context() as mp_:
        real = sprocess.start_time
        mp_.setattr(sprocess, "start_time", lambda p: started - 1 if p == other else real(p))
        old = mgr.allocate(5000, other)
    n = mgr.size_of(old)
    [row] = [p for p in mgr.processes() if p.pid == other]
    assert row.start_time == started - 1 and row.alive is False and row.usage == n
    assert mgr.should_collect()

    events: list[Any] = []
    mgr.set_collector(events.append)
    assert mgr.collect() == 1
    with pytest.raises(InvalidAddress):
        mgr.size_of(old)
    assert [e.fields for e in events if e.name == "memory.process_reclaimed"] == [
        {"pid": other, "bytes": n}
    ]
    assert all(p.pid != other for p in mgr.processes())
    # memory charged to the real process with that pid is not collected
    real_block = mgr.allocate(700, other)
    assert process_row(mgr, other).alive and process_row(mgr, other).start_time == started
    assert not mgr.should_collect()
    assert mgr.collect() == 0
    assert mgr.size_of(real_block) >= 700 and mgr.size_of(mine) >= 100
    mgr.deallocate(real_block)
    mgr.check()


def test_recycled_pid_is_not_the_dead_owner(
    mgr: MemoryManager, children: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child whose pid an earlier (dead) process had: the earlier one's blocks are reclaimed,
    the child's blocks, allocated under the same pid, are not."""
    c = children("fork", mgr)
    cstart = sprocess.start_time(c.pid)
    assert cstart is not None
    old = _charge_as_other_incarnation(mgr, monkeypatch, c.pid, cstart - 5, 4000)
    old_n = mgr.size_of(old)
    # the child now attaches with its real start time and allocates
    x = c("alloc", 2500, b"new" * 800)
    rows = sorted((p.start_time, p.alive) for p in mgr.processes() if p.pid == c.pid)
    assert rows == [(cstart - 5, False), (cstart, True)]
    assert mgr.process_memory(c.pid) == old_n + mgr.size_of(x)

    assert mgr.collect() == 1
    with pytest.raises(InvalidAddress):
        mgr.size_of(old)
    assert c("read", x, 2400) == b"new" * 800
    assert mgr.process_memory(c.pid) == mgr.size_of(x)
    assert [(b.address, b.pid) for b in mgr.process_allocations(c.pid)] == [(x, c.pid)]
    assert [(p.start_time, p.alive) for p in mgr.processes() if p.pid == c.pid] == [(cstart, True)]
    assert mgr.collect() == 0
    mgr.check()


def test_zombie_child_counts_as_dead(mgr: MemoryManager) -> None:
    """A child killed but not yet reaped (a zombie) holds nothing: processes() shows it dead and
    collect() reclaims its blocks (the collector is not necessarily the dead one's parent)."""
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=serve, args=(mgr, there), daemon=True)
    p.start()
    there.close()
    try:
        assert here.poll(TIMEOUT)
        _, pid = here.recv()
        here.send(("alloc", 9000))
        assert here.poll(TIMEOUT)
        _, a = here.recv()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while proc_state(pid) != "Z":
            assert time.monotonic() < deadline, f"child {pid} did not become a zombie"
            time.sleep(0.001)
        # the leader shows Z as soon as it exits, while its other threads (the keeper holding
        # its life lock among them) may still be on their way out: the kernel marks the life
        # lock when the last one is gone
        while process_row(mgr, pid).alive:
            assert time.monotonic() < deadline, f"zombie {pid} is still shown alive"
            time.sleep(0.001)
        assert mgr.should_collect()
        assert mgr.collect() == 1
        with pytest.raises(InvalidAddress):
            mgr.size_of(a)
        assert all(r.pid != pid for r in mgr.processes())
    finally:
        if p.is_alive():
            p.kill()
        p.join(TIMEOUT)
        here.close()
    mgr.check()


def test_check_counts_a_killed_process_as_dead_like_info_and_top(
    mgr: MemoryManager, children: Any
) -> None:
    """Right after a kill -9, before any collection: check() and ``shmalloc check`` count the
    killed process as dead, as processes() (behind ``info`` and ``top``) shows it."""
    mgr.allocate(100)
    kept, killed = children("fork", mgr), children("fork", mgr)
    kept("alloc", 100)
    killed("alloc", 100)
    report = mgr.check()
    assert (report.live_processes, report.dead_processes) == (3, 0)
    killed.kill()
    alive = {p.pid: p.alive for p in mgr.processes()}
    assert alive == {os.getpid(): True, kept.pid: True, killed.pid: False}
    report = mgr.check()
    assert (report.live_processes, report.dead_processes) == (2, 1)
    out = subprocess.run(
        [sys.executable, "-m", "shmalloc", "check", mgr.name],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert "2 live and 1 dead processes" in out.stdout
    mgr.collect()
    report = mgr.check()
    assert (report.live_processes, report.dead_processes) == (2, 0)


def test_usage_never_exceeds_the_limit(mgr: MemoryManager) -> None:
    """After any successful allocation, process_memory(pid) <= its limit. Here the request fits
    under the limit, but the only fitting hole is a little larger than the request and too small
    to split: the process must not be charged past its limit for it."""
    me = os.getpid()
    hole = mgr.allocate(1000)
    mgr.allocate(64)  # keeps the hole from merging with the free tail
    mgr.deallocate(hole)
    limit = mgr.process_memory(me) + 1000
    mgr.set_process_limit(me, limit)
    got = []
    for size in (976, 992, 1000, 16):
        try:
            got.append(mgr.allocate(size))
        except ProcessLimitExceeded as e:
            assert e.limit == limit
        assert mgr.process_memory(me) <= limit, (
            f"allocate({size}) succeeded and left usage {mgr.process_memory(me)} above the "
            f"limit {limit}; blocks {[mgr.size_of(a) for a in got]}"
        )
    mgr.check()


def test_two_managers_in_one_process_share_its_slot(arena_name: str) -> None:
    """Two MemoryManager objects on the same arena in one process: closing one must not take the
    process's slot from under the other."""
    me = os.getpid()
    m1 = MemoryManager.create(arena_name, 4 * MiB)
    m2 = MemoryManager.attach(arena_name)
    try:
        a = m1.allocate(100)
        b = m2.allocate(200)
        assert m1.process_memory(me) == m1.size_of(a) + m1.size_of(b)
        assert len([p for p in m1.processes() if p.pid == me]) == 1
        m1.deallocate(a)
        m2.deallocate(b)
        m1.close()  # this process still uses the arena through m2
        c = m2.allocate(300)
        assert m2.process_memory(me) == m2.size_of(c)
        assert process_row(m2, me).alive
        m2.deallocate(c)
        m2.check()
    finally:
        for m in (m1, m2):
            if not m.closed:
                m.close()
        m1.destroy()
