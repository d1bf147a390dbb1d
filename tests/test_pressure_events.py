"""Pressure, collection threshold, events and trim requests, with real child processes (spawn
and fork): the MemoryPressure levels at their 60/80/95 % boundaries; one WARNING on the
`shmalloc` logger per crossing into HIGH and one CRITICAL (plus an automatic collection, which
reclaims a dead child's orphans) per crossing into CRITICAL; set_threshold/should_collect/
collect; the collector's events and their fields; events of a child read from the segment's ring
by the parent; the ring's dropped count; on_pressure callbacks run in a live child after
request_trim.

Children are command servers driven over a Pipe (see Child): no step relies on timing."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmalloc import InvalidAddress, MemoryManager, MemoryPressure, OutOfMemory
from shmalloc._binding import lib

TIMEOUT = 60.0
KiB = 1 << 10
MiB = 1 << 20
RING_SLOTS = int(getattr(lib, "SHM_RING_SLOTS", 4096))
HOT = ("memory.allocated", "memory.deallocated")


# ---------------------------------------------------------------- child side


def _op_alloc(m: MemoryManager, env: dict[str, Any], size: int, data: bytes | None = None) -> int:
    a = m.allocate(size)
    if data is not None:
        m.write(a, data)
    return a


def _op_call(m: MemoryManager, env: dict[str, Any], method: str, *args: Any) -> Any:
    return getattr(m, method)(*args)


def _op_read(m: MemoryManager, env: dict[str, Any], address: int, n: int) -> bytes:
    return m.read(address, n)


def _op_slot(m: MemoryManager, env: dict[str, Any]) -> int:
    return m._slot


def _op_collector(m: MemoryManager, env: dict[str, Any], on: bool) -> None:
    env.setdefault("events", [])
    m.set_collector(env["events"].append if on else None)


def _op_events(m: MemoryManager, env: dict[str, Any]) -> list[Any]:
    return list(env.get("events", []))


def _op_on_pressure(m: MemoryManager, env: dict[str, Any], victim: int | None) -> None:
    """Register a trim callback that counts its runs and frees ``victim`` (once)."""
    env["trims"] = 0
    env["victim"] = victim

    def trim() -> None:
        env["trims"] += 1
        if env["victim"] is not None:
            m.deallocate(env["victim"])
            env["victim"] = None

    m.on_pressure(trim)


def _op_trims(m: MemoryManager, env: dict[str, Any]) -> int:
    return int(env["trims"])


_OPS = {"alloc": _op_alloc, "call": _op_call, "read": _op_read, "slot": _op_slot,
        "collector": _op_collector, "events": _op_events, "on_pressure": _op_on_pressure,
        "trims": _op_trims}


def _serve(m: MemoryManager, conn: Any) -> None:
    """Child: answer (op, *args) requests until "exit" (or EOF). ``m`` arrives pickled by name
    (spawn: attached here) or is the parent's object inherited through fork."""
    env: dict[str, Any] = {}
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                op, *args = conn.recv()
            except EOFError:
                return
            if op == "exit":
                m.close()
                conn.send(("ok", None))
                return
            if op == "stop":
                conn.send(("ok", None))
                os.kill(os.getpid(), signal.SIGSTOP)
                continue
            try:
                res = _OPS[op](m, env, *args)
            except BaseException as e:  # sent back and re-raised in the parent
                conn.send(("err", e))
            else:
                conn.send(("ok", res))
    finally:
        conn.close()


# ---------------------------------------------------------------- parent side


class Child:
    """A live child process running _serve, driven over a Pipe."""

    def __init__(self, method: str, m: MemoryManager) -> None:
        ctx = mp.get_context(method)
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(m, there), daemon=True)
        self.proc.start()
        there.close()
        try:
            tag, self.pid = self._recv()
            assert tag == "ready" and self.pid == self.proc.pid
        except BaseException:
            self.cleanup()
            raise

    def _recv(self) -> Any:
        if not self.conn.poll(TIMEOUT):
            raise AssertionError(f"child {self.proc.pid} did not answer within {TIMEOUT}s")
        try:
            return self.conn.recv()
        except EOFError:
            raise AssertionError(f"child {self.proc.pid} ended ({self.proc.exitcode})") from None

    def __call__(self, op: str, *args: Any) -> Any:
        self.conn.send((op, *args))
        tag, value = self._recv()
        if tag == "err":
            raise value
        return value

    def call(self, method: str, *args: Any) -> Any:
        return self("call", method, *args)

    def stop(self) -> None:
        """Have the child SIGSTOP itself; return once it is stopped."""
        self("stop")
        deadline = time.monotonic() + TIMEOUT
        while _state(self.pid) not in ("T", "t"):
            assert time.monotonic() < deadline, f"child {self.pid} did not stop"
            time.sleep(0.001)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(TIMEOUT)
        assert not self.proc.is_alive()
        assert self.proc.exitcode == -signal.SIGKILL

    def exit(self) -> None:
        self("exit")
        self.proc.join(TIMEOUT)
        assert self.proc.exitcode == 0

    def cleanup(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(TIMEOUT)
        self.conn.close()


@pytest.fixture
def children() -> Iterator[Any]:
    """Start children with children(method, mgr); every one is killed and joined afterwards."""
    started: list[Child] = []

    def start(method: str, m: MemoryManager) -> Child:
        c = Child(method, m)
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "gone"
    return raw[raw.rindex(b")") + 2 :][:1].decode()


@pytest.fixture
def tiny(arena_name: str) -> Iterator[MemoryManager]:
    """A 1 MiB arena of this test's own."""
    m = MemoryManager.create(arena_name, 1 * MiB)
    try:
        yield m
    finally:
        if not m.closed:
            m.close()
        m.destroy()


def _records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shmalloc"]


def _pct(m: MemoryManager) -> float:
    return m.stats().usage_percentage()


# ---------------------------------------------------------------- levels


def test_pressure_level_of_a_percentage() -> None:
    cases = [(0.0, "LOW"), (59.999, "LOW"), (60.0, "MEDIUM"), (79.999, "MEDIUM"), (80.0, "HIGH"),
             (94.999, "HIGH"), (95.0, "CRITICAL"), (100.0, "CRITICAL")]
    for pct, level in cases:
        assert MemoryPressure.from_percentage(pct) is MemoryPressure[level], pct
    assert MemoryPressure.LOW < MemoryPressure.MEDIUM < MemoryPressure.HIGH < MemoryPressure.CRITICAL


def test_memory_pressure_levels_at_the_boundaries(
    tiny: MemoryManager, caplog: pytest.LogCaptureFixture
) -> None:
    """One block sized so that usage lands exactly on, and 16 bytes below, 60, 80 and 95 %.
    Each allocation starts from an empty (LOW) arena, so each one that reaches HIGH or CRITICAL
    is a crossing and logs once, at the level it reached."""
    caplog.set_level(logging.WARNING, logger="shmalloc")
    st = tiny.stats()
    assert st.memory_pressure() is MemoryPressure.LOW and st.usage_percentage() < 1
    hdr = st.total - st.available  # one free block: its header is all that is busy
    logged = []
    for pct, below, at in [(60, "LOW", "MEDIUM"), (80, "MEDIUM", "HIGH"), (95, "HIGH", "CRITICAL")]:
        busy = math.ceil(st.total * pct / 100)
        u = -(-(busy - 2 * hdr) // 16) * 16  # one live block and the free tail: two headers
        for size, level in [(u - 16, below), (u, at)]:
            n = len(_records(caplog))
            a = tiny.allocate(size)
            logged.append([r.levelname for r in _records(caplog)[n:]])
            assert tiny.size_of(a) == size
            s = tiny.stats()
            assert s.total - s.available == size + 2 * hdr
            assert (s.usage_percentage() >= pct) == (size == u), (pct, size, s.usage_percentage())
            assert s.memory_pressure() is MemoryPressure[level], (pct, size, s.usage_percentage())
            tiny.deallocate(a)
    assert logged == [[], [], [], ["WARNING"], ["WARNING"], ["CRITICAL"]]
    s = tiny.stats()
    assert s.used == 0 and s.memory_pressure() is MemoryPressure.LOW
    tiny.check()


# ---------------------------------------------------------------- crossings


def test_high_and_critical_logged_once_per_crossing(
    tiny: MemoryManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shmalloc")
    events: list[Any] = []
    tiny.set_collector(events.append)
    me = os.getpid()
    blocks: list[int] = []
    steps: list[tuple[float, float, list[logging.LogRecord]]] = []  # (before, after, new records)
    while _pct(tiny) < 97:
        before, n = _pct(tiny), len(_records(caplog))
        blocks.append(tiny.allocate(4 * KiB))
        steps.append((before, _pct(tiny), _records(caplog)[n:]))
    assert len(steps) > 100  # many allocations inside MEDIUM, HIGH and CRITICAL

    logged = [(b, a, r) for b, a, r in steps if r]
    assert len(logged) == 2, [(b, a, [x.getMessage() for x in r]) for b, a, r in logged]
    (b1, a1, [high]), (b2, a2, [crit]) = logged
    assert b1 < 80 <= a1 < 95
    assert high.levelno == logging.WARNING and "HIGH" in high.getMessage()
    assert tiny.name in high.getMessage()
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
    assert [e.name for e in tiny.drain_events() if e.name in {x.name for x in rare}] == [
        e.name for e in rare
    ]

    # freeing logs nothing; falling to LOW and rising again is a new crossing
    n = len(_records(caplog))
    while _pct(tiny) >= 50:
        tiny.deallocate(blocks.pop())
    assert tiny.stats().memory_pressure() is MemoryPressure.LOW
    assert len(_records(caplog)) == n
    while _pct(tiny) < 85:
        blocks.append(tiny.allocate(4 * KiB))
    new = _records(caplog)[n:]
    assert [r.levelno for r in new] == [logging.WARNING]
    assert [e.name for e in events].count("memory.pressure_high") == 2
    for a in blocks:
        tiny.deallocate(a)
    tiny.check()


def test_critical_crossing_collects_a_dead_childs_orphans(
    tiny: MemoryManager, children: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shmalloc")
    c = children("fork", tiny)
    theirs = [c("alloc", 40 * KiB) for _ in range(5)]
    their_bytes = tiny.process_memory(c.pid)
    assert their_bytes == sum(tiny.size_of(a) for a in theirs)
    c.kill()
    assert tiny.stats().used == their_bytes  # nobody collected yet

    events: list[Any] = []
    tiny.set_collector(events.append)
    mine = []
    for _ in range(400):
        mine.append(tiny.allocate(4 * KiB))
        if any(e.name == "memory.pressure_critical" for e in events):
            break
    else:
        pytest.fail(f"never reached CRITICAL: {_pct(tiny):.1f}%")

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
    assert [(e.name, e.fields) for e in tiny.drain_events()][-2:] == [
        (e.name, e.fields) for e in rare[2:]
    ]
    for a in theirs:
        with pytest.raises(InvalidAddress):
            tiny.size_of(a)
    assert tiny.process_memory(c.pid) == 0
    assert all(p.pid != c.pid for p in tiny.processes())
    s = tiny.stats()
    assert s.used == sum(tiny.size_of(a) for a in mine)
    assert s.memory_pressure() < MemoryPressure.CRITICAL
    crit = [r for r in _records(caplog) if r.levelno == logging.CRITICAL]
    assert len(crit) == 1
    assert len([r for r in _records(caplog) if r.levelno == logging.WARNING]) == 1
    for a in mine:
        tiny.deallocate(a)
    tiny.check()


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


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                     ("5", TypeError), (None, TypeError), (True, TypeError)])
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
    assert mgr._collector is None
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
    avail = mgr.stats().available
    assert theirs[0][1] == {"requested": 128 * MiB, "available": avail}
    assert theirs[1][1] == {"freed_blocks": 0}
    assert theirs[2][1] == {"requested": 64 * MiB, "available": avail}
    # the child's own collector saw everything it emitted once it was set
    got = [(e.name, e.pid, e.fields) for e in c("events")]
    assert got == [
        ("memory.allocated", c.pid, {"address": x, "size": 200, "pid": c.pid}),
        ("memory.deallocated", c.pid, {"address": x, "size": size}),
        ("memory.oom", c.pid, {"requested": 64 * MiB, "available": avail}),
    ]
    assert mgr.drain_events() == []


def test_child_pressure_events_reach_the_parent(tiny: MemoryManager, children: Any) -> None:
    tiny.drain_events()
    c = children("fork", tiny)
    blocks = []
    while _pct(tiny) < 96:
        blocks.append(c("alloc", 16 * KiB))
    ring = tiny.drain_events()
    assert [(e.name, e.pid) for e in ring] == [
        ("memory.pressure_high", c.pid),
        ("memory.pressure_critical", c.pid),
        ("memory.gc_triggered", c.pid),
    ]
    assert 80 <= ring[0].fields["usage_percentage"] < 95 <= ring[1].fields["usage_percentage"]
    for a in blocks:
        tiny.deallocate(a)


def test_ring_overflow_is_counted(tiny: MemoryManager) -> None:
    """Nobody drains the ring: past RING_SLOTS events, pushes are counted as dropped, never
    blocking; draining makes room again."""
    tiny.drain_events()
    assert tiny.dropped_events() == 0
    n = RING_SLOTS + 500
    for i in range(n):
        with pytest.raises(OutOfMemory):
            tiny.allocate(2 * MiB + i)  # one memory.oom each, a distinct size
    assert tiny.dropped_events() == n - RING_SLOTS
    head = tiny.drain_events(10)
    assert [e.fields["requested"] for e in head] == [2 * MiB + i for i in range(10)]
    rest = tiny.drain_events()
    assert len(rest) == RING_SLOTS - 10  # the oldest were kept, the newest dropped
    assert rest[-1].fields["requested"] == 2 * MiB + RING_SLOTS - 1
    assert tiny.drain_events() == []
    # room again: nothing more is dropped
    tiny.collect()
    assert [e.name for e in tiny.drain_events()] == ["memory.gc_triggered"]
    assert tiny.dropped_events() == n - RING_SLOTS


# ---------------------------------------------------------------- trim requests


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_on_pressure_callback_runs_in_the_child_on_its_next_allocation(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    c = children(method, mgr)
    victim = c("alloc", 10000)
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
    assert mgr.process_memory(c.pid) == with_victim - 10000 + mgr.size_of(y)
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
