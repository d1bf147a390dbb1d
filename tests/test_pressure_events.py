"""Pressure, collection threshold, events and trim requests, with real child processes (spawn
and fork): the MemoryPressure levels at their 60/80/95 % boundaries; one WARNING on the
`shmalloc` logger per crossing into HIGH and one CRITICAL (plus an automatic collection, which
reclaims a dead child's orphans) per crossing into CRITICAL; set_threshold/should_collect/
collect; the collector's events and their fields; events of a child read from the segment's ring
by the parent; the ring's dropped count; on_pressure callbacks run in a live child after
request_trim.

Children are command servers driven over a Pipe (see children.py): no step relies on timing."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytest

from shmalloc import InvalidAddress, MemoryManager, MemoryPressure, OutOfMemory
from shmalloc._binding import lib
from shmalloc.manager import attachment_of

KiB = 1 << 10
MiB = 1 << 20
RING_SLOTS = int(lib.SHM_RING_SLOTS)
HOT = ("memory.allocated", "memory.deallocated")


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shmalloc"]


def _pct(m: MemoryManager) -> float:
    return m.stats().usage_percentage()


# ---------------------------------------------------------------- levels


def test_pressure_level_of_a_percentage() -> None:
    cases = [
        (0.0, "LOW"),
        (59.999, "LOW"),
        (60.0, "MEDIUM"),
        (79.999, "MEDIUM"),
        (80.0, "HIGH"),
        (94.999, "HIGH"),
        (95.0, "CRITICAL"),
        (100.0, "CRITICAL"),
    ]
    for pct, level in cases:
        assert MemoryPressure.from_percentage(pct) is MemoryPressure[level], pct
    assert (
        MemoryPressure.LOW < MemoryPressure.MEDIUM < MemoryPressure.HIGH < MemoryPressure.CRITICAL
    )


def test_memory_pressure_levels_at_the_boundaries(
    small: MemoryManager, caplog: pytest.LogCaptureFixture
) -> None:
    """One block sized so that usage lands exactly on, and 16 bytes below, 60, 80 and 95 %.
    Each allocation starts from an empty (LOW) arena, so each one that reaches HIGH or CRITICAL
    is a crossing and logs once, at the level it reached."""
    caplog.set_level(logging.WARNING, logger="shmalloc")
    st = small.stats()
    assert st.memory_pressure() is MemoryPressure.LOW and st.usage_percentage() < 1
    hdr = st.total - st.available  # one free block: its header is all that is busy
    logged = []
    for pct, below, at in [(60, "LOW", "MEDIUM"), (80, "MEDIUM", "HIGH"), (95, "HIGH", "CRITICAL")]:
        busy = math.ceil(st.total * pct / 100)
        u = -(-(busy - 2 * hdr) // 16) * 16  # one live block and the free tail: two headers
        for size, level in [(u - 16, below), (u, at)]:
            n = len(_records(caplog))
            a = small.allocate(size)
            logged.append([r.levelname for r in _records(caplog)[n:]])
            assert small.size_of(a) == size
            s = small.stats()
            assert s.total - s.available == size + 2 * hdr
            assert (s.usage_percentage() >= pct) == (size == u), (pct, size, s.usage_percentage())
            assert s.memory_pressure() is MemoryPressure[level], (pct, size, s.usage_percentage())
            small.deallocate(a)
    assert logged == [[], [], [], ["WARNING"], ["WARNING"], ["CRITICAL"]]
    s = small.stats()
    assert s.used == 0 and s.memory_pressure() is MemoryPressure.LOW
    small.check()


# ---------------------------------------------------------------- crossings


def test_high_and_critical_logged_once_per_crossing(
    small: MemoryManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shmalloc")
    events: list[Any] = []
    small.set_collector(events.append)
    me = os.getpid()
    blocks: list[int] = []
    steps: list[tuple[float, float, list[logging.LogRecord]]] = []  # (before, after, new records)
    while _pct(small) < 97:
        before, n = _pct(small), len(_records(caplog))
        blocks.append(small.allocate(2 * KiB))
        steps.append((before, _pct(small), _records(caplog)[n:]))
    assert len(steps) > 100  # many allocations inside MEDIUM, HIGH and CRITICAL

    logged = [(b, a, r) for b, a, r in steps if r]
    assert len(logged) == 2, [(b, a, [x.getMessage() for x in r]) for b, a, r in logged]
    (b1, a1, [high]), (b2, a2, [crit]) = logged
    assert b1 < 80 <= a1 < 95
    assert high.levelno == logging.WARNING and "HIGH" in high.getMessage()
    assert small.name in high.getMessage()
    assert b2 < 95 <= a2
    assert crit.levelno == logging.CRITICAL and "CRITICAL" in crit.getMessage()
    assert sum(1 for b, a, _ in steps if a >= 80) > 10  # and no record for the others

    rare = [e for e in events if e.name not in HOT]
    assert [e.name for e in rare] == [
        "memory.pressure_high",
        "memory.pressure_critical",
        "memory.gc_triggered",
    ]
    assert all(e.pid == me for e in rare)
    assert rare[0].fields["usage_percentage"] == pytest.approx(a1)
    assert rare[1].fields["usage_percentage"] == pytest.approx(a2)
    assert rare[2].fields == {"freed_blocks": 0}  # the automatic collection: nothing dead
    assert len([e for e in events if e.name == "memory.allocated"]) == len(blocks)
    # the same rare events reached the ring
    assert [e.name for e in small.drain_events() if e.name in {x.name for x in rare}] == [
        e.name for e in rare
    ]

    # freeing logs nothing; falling to LOW and rising again is a new crossing
    n = len(_records(caplog))
    while _pct(small) >= 50:
        small.deallocate(blocks.pop())
    assert small.stats().memory_pressure() is MemoryPressure.LOW
    assert len(_records(caplog)) == n
    while _pct(small) < 85:
        blocks.append(small.allocate(4 * KiB))
    new = _records(caplog)[n:]
    assert [r.levelno for r in new] == [logging.WARNING]
    assert [e.name for e in events].count("memory.pressure_high") == 2
    for a in blocks:
        small.deallocate(a)
    small.check()


def test_critical_crossing_collects_a_dead_childs_orphans(
    small: MemoryManager, children: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shmalloc")
    c = children("fork", small)
    theirs = [c("alloc", 40 * KiB) for _ in range(5)]
    their_bytes = small.process_memory(c.pid)
    assert their_bytes == sum(small.size_of(a) for a in theirs)
    c.kill()
    assert small.stats().used == their_bytes  # nobody collected yet

    events: list[Any] = []
    small.set_collector(events.append)
    mine = []
    for _ in range(400):
        mine.append(small.allocate(4 * KiB))
        if any(e.name == "memory.pressure_critical" for e in events):
            break
    else:
        pytest.fail(f"never reached CRITICAL: {_pct(small):.1f}%")

    rare = [e for e in events if e.name not in HOT]
    assert [e.name for e in rare] == [
        "memory.pressure_high",
        "memory.pressure_critical",
        "memory.process_reclaimed",
        "memory.gc_triggered",
    ]
    assert rare[2].fields == {"pid": c.pid, "bytes": their_bytes}
    assert rare[3].fields == {"freed_blocks": 5}
    # the same, in the arena's ring
    assert [(e.name, e.fields) for e in small.drain_events()][-2:] == [
        (e.name, e.fields) for e in rare[2:]
    ]
    for a in theirs:
        with pytest.raises(InvalidAddress):
            small.size_of(a)
    assert small.process_memory(c.pid) == 0
    assert all(p.pid != c.pid for p in small.processes())
    s = small.stats()
    assert s.used == sum(small.size_of(a) for a in mine)
    assert s.memory_pressure() < MemoryPressure.CRITICAL
    crit = [r for r in _records(caplog) if r.levelno == logging.CRITICAL]
    assert len(crit) == 1
    assert len([r for r in _records(caplog) if r.levelno == logging.WARNING]) == 1
    for a in mine:
        small.deallocate(a)
    small.check()


# ---------------------------------------------------------------- threshold


def test_threshold_should_collect_and_reset(mgr: MemoryManager, children: Any) -> None:
    mgr.set_threshold(5)
    blocks = [mgr.allocate(100) for _ in range(10)]
    assert not mgr.should_collect()
    for a in blocks[:4]:
        mgr.deallocate(a)
    assert not mgr.should_collect()
    # frees count arena-wide: the fifth comes from another process
    c = children("fork", mgr)
    c.call("deallocate", blocks[4])
    assert mgr.should_collect()
    assert mgr.collect() == 0
    assert not mgr.should_collect()
    for a in blocks[5:9]:
        mgr.deallocate(a)
    assert not mgr.should_collect()
    mgr.deallocate(blocks[9])
    assert mgr.should_collect()
    mgr.force_collect()
    assert not mgr.should_collect()
    mgr.check()


def test_default_threshold_is_1000(mgr: MemoryManager) -> None:
    blocks = [mgr.allocate(32) for _ in range(1000)]
    for a in blocks[:999]:
        mgr.deallocate(a)
    assert not mgr.should_collect()
    mgr.deallocate(blocks[999])
    assert mgr.should_collect()
    mgr.collect()
    assert not mgr.should_collect()


@pytest.mark.parametrize(
    "bad,exc",
    [
        (0, ValueError),
        (-3, ValueError),
        (2.0, TypeError),
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_thresholds(mgr: MemoryManager, bad: Any, exc: type) -> None:
    mgr.set_threshold(2)
    with pytest.raises(exc):
        mgr.set_threshold(bad)
    # the threshold in force is unchanged
    for a in [mgr.allocate(16) for _ in range(2)]:
        mgr.deallocate(a)
    assert mgr.should_collect()


# ---------------------------------------------------------------- events


def test_collector_receives_events_with_their_fields(arena_name: str) -> None:
    events: list[Any] = []
    me, other = os.getpid(), os.getppid()
    with MemoryManager(1 * MiB, name=arena_name, collector=events.append) as m:
        try:
            a = m.allocate(100)
            b = m.allocate(50, other)  # accounted to another (live) process
            size = m.deallocate(a)
            st = m.stats()
            want = st.available + 4 * KiB
            with pytest.raises(OutOfMemory) as ei:
                m.allocate(want)
            assert (ei.value.requested, ei.value.available) == (want, st.available)
            with pytest.raises(OutOfMemory):
                m.allocate(4 * MiB)  # more than the whole arena
            assert [(e.name, e.pid, e.fields) for e in events] == [
                ("memory.allocated", me, {"address": a, "size": 100, "pid": me}),
                ("memory.allocated", me, {"address": b, "size": 50, "pid": other}),
                ("memory.deallocated", me, {"address": a, "size": size}),
                ("memory.oom", me, {"requested": want, "available": st.available}),
                ("memory.oom", me, {"requested": 4 * MiB, "available": st.available}),
            ]
            assert all(isinstance(e.time, float) for e in events)
            assert size >= 100

            # set_collector(None): no more events; with_collector returns the manager
            m.set_collector(None)
            m.deallocate(m.allocate(10))
            assert len(events) == 5
            other_events: list[Any] = []
            assert m.with_collector(other_events.append) is m
            x = m.allocate(10)
            assert [e.name for e in other_events] == ["memory.allocated"] and len(events) == 5
            with pytest.raises(TypeError):
                m.set_collector("not callable")  # type: ignore[arg-type]
            m.deallocate(x)
            m.deallocate(b)
        finally:
            m.close()
            m.destroy()


def test_no_collector_no_events(mgr: MemoryManager) -> None:
    """Without a collector, allocate/deallocate emit nothing (the ring gets none of them); rare
    events still go to the ring, where the coordinator reads them."""
    mgr.drain_events()
    assert attachment_of(mgr).collector is None
    blocks = [mgr.allocate(64) for _ in range(20)]
    for a in blocks:
        mgr.deallocate(a)
    assert mgr.drain_events() == []
    with pytest.raises(OutOfMemory):
        mgr.allocate(1 << 30)
    assert [e.name for e in mgr.drain_events()] == ["memory.oom"]
    # a collector receives allocation events; the hot pair stays out of the ring
    seen: list[Any] = []
    mgr.set_collector(seen.append)
    a = mgr.allocate(64)
    mgr.deallocate(a)
    assert [(e.name, e.fields["address"]) for e in seen] == [
        ("memory.allocated", a),
        ("memory.deallocated", a),
    ]
    assert [e.name for e in mgr.drain_events() if e.name in HOT] == []


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_events_reach_the_parent_through_the_ring(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    mgr.drain_events()
    c = children(method, mgr)
    c("alloc", 100)  # no collector in the child: not in the ring
    with pytest.raises(OutOfMemory):
        c("alloc", 128 * MiB)
    assert c.call("collect") == 0
    c("collector", True)
    x = c("alloc", 200)
    size = c.call("deallocate", x)
    with pytest.raises(OutOfMemory):
        c("alloc", 64 * MiB)

    ring = mgr.drain_events()
    assert all(e.pid == c.pid for e in ring)  # the parent emitted nothing
    theirs = [(e.name, e.fields) for e in ring if e.name not in HOT]
    assert [n for n, _ in theirs] == ["memory.oom", "memory.gc_triggered", "memory.oom"]
    avail = mgr.stats().available  # as the second out-of-memory left it: caches all returned
    assert theirs[2][1] == {"requested": 64 * MiB, "available": avail}
    assert theirs[1][1] == {"freed_blocks": 0}
    # the first saw the same free bytes, split differently by the child's cache refills: the
    # headers of at most a few more or fewer free blocks
    assert theirs[0][1]["requested"] == 128 * MiB
    assert abs(theirs[0][1]["available"] - avail) <= 4 * 32
    # the child's own collector saw everything it emitted once it was set
    got = [(e.name, e.pid, e.fields) for e in c("events")]
    assert got == [
        ("memory.allocated", c.pid, {"address": x, "size": 200, "pid": c.pid}),
        ("memory.deallocated", c.pid, {"address": x, "size": size}),
        ("memory.oom", c.pid, {"requested": 64 * MiB, "available": avail}),
    ]
    assert mgr.drain_events() == []


def test_child_pressure_events_reach_the_parent(small: MemoryManager, children: Any) -> None:
    small.drain_events()
    c = children("fork", small)
    blocks = []
    while _pct(small) < 96:
        blocks.append(c("alloc", 16 * KiB))
    ring = small.drain_events()
    assert [(e.name, e.pid) for e in ring] == [
        ("memory.pressure_high", c.pid),
        ("memory.pressure_critical", c.pid),
        ("memory.gc_triggered", c.pid),
    ]
    assert 80 <= ring[0].fields["usage_percentage"] < 95 <= ring[1].fields["usage_percentage"]
    for a in blocks:
        small.deallocate(a)


def test_ring_overflow_is_counted(small: MemoryManager) -> None:
    """Nobody drains the ring: past RING_SLOTS events, pushes are counted as dropped, never
    blocking; draining makes room again."""
    small.drain_events()
    assert small.dropped_events() == 0
    n = RING_SLOTS + 500
    for i in range(n):
        with pytest.raises(OutOfMemory):
            small.allocate(2 * MiB + i)  # one memory.oom each, a distinct size
    assert small.dropped_events() == n - RING_SLOTS
    head = small.drain_events(10)
    assert [e.fields["requested"] for e in head] == [2 * MiB + i for i in range(10)]
    rest = small.drain_events()
    assert len(rest) == RING_SLOTS - 10  # the oldest were kept, the newest dropped
    assert rest[-1].fields["requested"] == 2 * MiB + RING_SLOTS - 1
    assert small.drain_events() == []
    # room again: nothing more is dropped
    small.collect()
    assert [e.name for e in small.drain_events()] == ["memory.gc_triggered"]
    assert small.dropped_events() == n - RING_SLOTS


# ---------------------------------------------------------------- trim requests


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_on_pressure_callback_runs_in_the_child_on_its_next_allocation(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    c = children(method, mgr)
    victim = c("alloc", 10000)
    victim_size = mgr.size_of(victim)  # 10000 rounded up to its size class
    c("on_pressure", victim)
    c("alloc", 64)
    assert c("trims") == 0
    with_victim = mgr.process_memory(c.pid)

    mgr.request_trim(c.pid)
    c.call("size_of", victim)  # not an allocation: the callback waits
    assert c("trims") == 0
    assert mgr.process_memory(c.pid) == with_victim

    y = c("alloc", 64)
    assert c("trims") == 1
    with pytest.raises(InvalidAddress):
        mgr.size_of(victim)
    assert mgr.process_memory(c.pid) == with_victim - victim_size + mgr.size_of(y)
    c("alloc", 64)
    assert c("trims") == 1  # one request, one run

    mgr.request_trim(c.pid)
    mgr.request_trim(c.pid)
    c("alloc", 64)
    c("alloc", 64)
    assert c("trims") == 2  # pending requests are answered together
    mgr.check()

    with pytest.raises(ValueError):
        mgr.request_trim(2**31 - 7)


def test_force_collect_runs_this_processes_callbacks(mgr: MemoryManager) -> None:
    runs: list[int] = []
    mgr.on_pressure(lambda: runs.append(1))
    mgr.allocate(64)
    assert runs == []
    mgr.force_collect()
    assert runs == [1]
    mgr.request_trim(os.getpid())
    mgr.allocate(64)
    assert runs == [1, 1]
    with pytest.raises(TypeError):
        mgr.on_pressure(42)  # type: ignore[arg-type]
