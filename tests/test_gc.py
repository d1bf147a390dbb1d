"""GlobalGarbageCollector and GcStrategy: what each strategy frees, the GcStats it reports, the
events it emits, auto_collect's pressure and interval rules, and two collectors at once.

Workers are real processes (tests/shm_workers.py); "dead" means killed with SIGKILL and reaped."""

from __future__ import annotations

import pytest
from shm_workers import Worker, wait_for

from shmalloc import Event, MemoryManager, MemoryPressure
from shmalloc.gc import GcStrategy, GlobalGarbageCollector

SIZES = [100, 5000, 70000]


def _pids(m: MemoryManager) -> set[int]:
    return {p.pid for p in m.processes()}


def _figures(s: object) -> tuple[int, int, int]:
    return (s.freed_blocks, s.freed_bytes, s.processes_cleaned)  # type: ignore[attr-defined]


def test_strategy_constructors_and_validation() -> None:
    assert GcStrategy.threshold(10) == GcStrategy.threshold(10)
    assert GcStrategy.threshold(10).nbytes == 10
    assert GcStrategy.targeted(7).pid == 7
    assert GcStrategy.GLOBAL != GcStrategy.UNREFERENCED
    assert repr(GcStrategy.targeted(7)) == "GcStrategy.targeted(7)"
    assert repr(GcStrategy.GLOBAL) == "GcStrategy.GLOBAL"
    with pytest.raises(ValueError):
        GcStrategy.threshold(-1)
    with pytest.raises(TypeError):
        GcStrategy.threshold(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GcStrategy.targeted(0)
    with pytest.raises(TypeError):
        GcStrategy.targeted("1")  # type: ignore[arg-type]


def test_bad_arguments_are_refused(mgr: MemoryManager) -> None:
    gc = GlobalGarbageCollector(mgr)
    with pytest.raises(TypeError, match="GcStrategy"):
        gc.collect("GLOBAL")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        gc.set_threshold(-5)
    with pytest.raises(ValueError):
        gc.set_min_interval(-1)
    with pytest.raises(TypeError):
        gc.set_min_interval("5")  # type: ignore[arg-type]


def test_global_reclaims_a_killed_worker_and_reports_it(mgr: MemoryManager) -> None:
    events: list[Event] = []
    mgr.set_collector(events.append)
    mine = mgr.allocate(4096)
    mine_size = mgr.size_of(mine)  # 4096 rounded up to its size class
    with Worker(mgr.name) as live, Worker(mgr.name) as w:
        live_addr = live.call("alloc", [300])[0]
        w.call("alloc", SIZES)
        held = mgr.process_memory(w.pid)
        assert held >= sum(SIZES)
        w.kill()
        gc = GlobalGarbageCollector(mgr)
        s = gc.collect(GcStrategy.GLOBAL)
        assert _figures(s) == (len(SIZES), held, 1)
        assert s.reclaimed == ((w.pid, held),)
        assert s.duration >= 0.0
        assert w.pid not in _pids(mgr)
        # the living keep everything
        assert mgr.size_of(mine) == mine_size >= 4096
        assert mgr.size_of(live_addr) >= 300
        assert live.pid in _pids(mgr)
        seen = [(e.name, e.fields) for e in events]
        assert ("memory.process_reclaimed", {"pid": w.pid, "bytes": held}) in seen
        assert ("memory.gc_triggered", {"freed_blocks": len(SIZES)}) in seen
        # nothing is left: a second run frees nothing and says so
        again = gc.collect(GcStrategy.GLOBAL)
        assert _figures(again) == (0, 0, 0)
        assert again.reclaimed == ()
    mgr.check()


def test_global_keeps_a_block_that_a_live_process_retains(mgr: MemoryManager) -> None:
    with Worker(mgr.name) as w:
        a, b, c = w.call("alloc", [256, 512, 1024])
        sizes = {x: mgr.size_of(x) for x in (a, b, c)}
        mgr.retain(b)
        w.kill()
        gc = GlobalGarbageCollector(mgr)
        s = gc.collect(GcStrategy.GLOBAL)
        # the slot still owns the retained block, so it is not given back yet
        assert _figures(s) == (2, sizes[a] + sizes[c], 0)
        assert mgr.size_of(b) == sizes[b]
        assert mgr.process_memory(w.pid) == sizes[b]
        assert mgr.release(b) is True  # the last reference on an orphan frees it at once
        s = gc.collect(GcStrategy.GLOBAL)
        assert _figures(s) == (0, 0, 1)
        assert w.pid not in _pids(mgr)
    mgr.check()


def test_global_frees_a_block_retained_only_by_another_dead_process(mgr: MemoryManager) -> None:
    with Worker(mgr.name) as owner, Worker(mgr.name) as holder:
        (x,) = owner.call("alloc", [1000])
        (y,) = holder.call("alloc", [2000])
        holder.call("retain", x)
        sx, sy = mgr.size_of(x), mgr.size_of(y)
        owner.kill()
        holder.kill()
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.GLOBAL)
        assert _figures(s) == (2, sx + sy, 2)
        assert dict(s.reclaimed) == {owner.pid: sx, holder.pid: sy}
    assert mgr.stats().used == 0
    mgr.check()


def test_threshold_reclaims_big_dead_ones_and_asks_big_live_ones_to_trim(
    mgr: MemoryManager,
) -> None:
    with Worker(mgr.name) as small, Worker(mgr.name) as big, Worker(mgr.name) as live:
        small.call("alloc", [10_000])
        big.call("alloc", [400_000, 400_000])
        live.call("alloc", [500_000])
        small_held = mgr.process_memory(small.pid)
        big_held = mgr.process_memory(big.pid)
        small.kill()
        big.kill()
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.threshold(100_000))
        assert _figures(s) == (2, big_held, 1)
        assert s.reclaimed == ((big.pid, big_held),)
        assert s.trimmed == (live.pid,)
        assert mgr.process_memory(small.pid) == small_held  # under the threshold: left alone
        # the live one runs its on_pressure callbacks the next time it allocates
        assert live.call("trims") == 0
        live.call("alloc", [64])
        assert live.call("trims") == 1
        # GLOBAL takes the small one too
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.GLOBAL)
        assert _figures(s) == (1, small_held, 1)
    mgr.check()


def test_targeted_frees_every_block_of_a_live_process(mgr: MemoryManager) -> None:
    events: list[Event] = []
    mgr.set_collector(events.append)
    with Worker(mgr.name) as w, Worker(mgr.name) as other:
        addrs = w.call("alloc", SIZES)
        mgr.retain(addrs[0])  # targeted ignores references too
        (kept,) = other.call("alloc", [777])
        held = mgr.process_memory(w.pid)
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.targeted(w.pid))
        assert _figures(s) == (len(SIZES), held, 1)  # counted, alive: its slot stays
        assert s.reclaimed == ((w.pid, held),)
        assert w.proc.poll() is None
        assert mgr.process_memory(w.pid) == 0
        assert mgr.size_of(kept) >= 777
        assert ("memory.process_reclaimed", {"pid": w.pid, "bytes": held}) in [
            (e.name, e.fields) for e in events
        ]
        # the worker goes on working
        assert len(w.call("alloc", [128])) == 1
    mgr.check()


def test_targeted_on_a_dead_process_gives_its_slot_back(mgr: MemoryManager) -> None:
    with Worker(mgr.name) as w:
        (a,) = w.call("alloc", [4096])
        size = mgr.size_of(a)  # 4096 rounded up to its size class
        assert size >= 4096
        mgr.retain(a)  # GLOBAL would keep it; targeted does not
        w.kill()
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.targeted(w.pid))
        assert _figures(s) == (1, size, 1)
        assert w.pid not in _pids(mgr)
        # a pid the arena does not know: nothing to do
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.targeted(w.pid))
        assert _figures(s) == (0, 0, 0)
    mgr.check()


def test_unreferenced_frees_orphans_nobody_references(mgr: MemoryManager) -> None:
    events: list[Event] = []
    mgr.set_collector(events.append)
    with Worker(mgr.name) as w, Worker(mgr.name) as live:
        a, b = w.call("alloc", [3000, 6000])
        (c,) = live.call("alloc", [100])
        mgr.retain(a)
        held_a, held_b = mgr.size_of(a), mgr.size_of(b)
        w.kill()
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.UNREFERENCED)
        assert _figures(s) == (1, held_b, 0)
        assert s.reclaimed == ()  # totals only
        assert mgr.size_of(a) >= 3000 and mgr.size_of(c) >= 100
        assert ("memory.gc_triggered", {"freed_blocks": 1}) in [(e.name, e.fields) for e in events]
        assert mgr.process_memory(w.pid) == held_a
        assert mgr.release(a) is True
        s = GlobalGarbageCollector(mgr).collect(GcStrategy.UNREFERENCED)
        assert _figures(s) == (0, 0, 1)
    mgr.check()


def _fill_to(m: MemoryManager, level: MemoryPressure, size: int = 64 << 10) -> list[int]:
    out = []
    while m.stats().memory_pressure() < level:
        out.append(m.allocate(size))
    return out


def test_auto_collect_respects_pressure(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 4 << 20)
    try:
        gc = GlobalGarbageCollector(m)
        gc.set_min_interval(0)
        assert m.stats().memory_pressure() == MemoryPressure.LOW
        assert not gc.should_collect()
        assert gc.auto_collect() is None
        assert gc.last_run is None
        with Worker(m.name) as w:
            nblocks = len(w.call("fill", 64 << 10))  # the worker takes everything
            assert m.stats().memory_pressure() == MemoryPressure.CRITICAL
            held = m.process_memory(w.pid)
            assert gc.should_collect()
            assert gc.should_collect(MemoryPressure.HIGH)
            assert not gc.should_collect(MemoryPressure.MEDIUM)  # a caller's own reading
            s = gc.auto_collect()
            assert s is not None and s.trimmed == (w.pid,) and s.freed_blocks == 0
            w.kill()
            s = gc.auto_collect()
            assert s is not None and _figures(s) == (nblocks, held, 1)
        assert m.stats().memory_pressure() == MemoryPressure.LOW
        assert gc.auto_collect() is None
    finally:
        m.close()
        m.destroy()


def test_auto_collect_respects_min_interval(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 4 << 20)
    try:
        gc = GlobalGarbageCollector(m)
        assert gc.min_interval == 5.0
        gc.set_min_interval(3600)
        blocks = _fill_to(m, MemoryPressure.HIGH)
        assert gc.should_collect()
        assert gc.auto_collect() is not None
        assert gc.last_run is not None
        assert not gc.should_collect()  # within the hour since the last run
        assert gc.auto_collect() is None
        gc.collect(GcStrategy.GLOBAL)  # a manual run also counts
        assert gc.auto_collect() is None
        gc.set_min_interval(0)
        assert gc.auto_collect() is not None
        # a fresh collector has no last run
        assert GlobalGarbageCollector(m).should_collect()
        for b in blocks:
            m.deallocate(b)
    finally:
        m.close()
        m.destroy()


def test_set_threshold_chooses_who_is_asked_to_trim(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 4 << 20)
    try:
        with Worker(m.name) as small, Worker(m.name) as big:
            small.call("alloc", [1000])
            big.call("fill", 64 << 10)
            gc = GlobalGarbageCollector(m)
            gc.set_min_interval(0)
            gc.set_threshold(100_000)
            assert gc.threshold == 100_000
            s = gc.auto_collect()
            assert s is not None and s.trimmed == (big.pid,)
            gc.set_threshold(0)
            s = gc.auto_collect()
            assert s is not None and sorted(s.trimmed) == sorted([small.pid, big.pid])
    finally:
        m.close()
        m.destroy()


def test_two_collectors_in_two_processes_do_not_double_count(mgr: MemoryManager) -> None:
    victims = [Worker(mgr.name) for _ in range(4)]
    collectors = [Worker(mgr.name) for _ in range(2)]
    try:
        total_bytes = 0
        for v in victims:
            v.call("alloc", [1000 + 37 * i for i in range(60)])
            total_bytes += mgr.process_memory(v.pid)
        for v in victims:
            v.kill()
        for c in collectors:  # both start before either answers
            c.send("gc")
        results = [c._read() for c in collectors]
        blocks = sum(r[0] for r in results)
        freed = sum(r[1] for r in results)
        cleaned = sum(r[2] for r in results)
        assert (blocks, freed, cleaned) == (4 * 60, total_bytes, 4)
        assert mgr.stats().used == 0
        assert wait_for(lambda: not ({v.pid for v in victims} & _pids(mgr)), "slots given back")
    finally:
        for w in victims + collectors:
            w.close()
    mgr.check()
