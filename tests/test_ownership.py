"""Ownership across processes with real children (spawn and fork): a child killed with SIGKILL
leaves orphans that collect() frees, while the blocks adopted by, or retained by, a live process,
and persistent and named blocks, survive with their data; references die with their holder;
releasing the last reference on an orphan frees it; adopt moves the accounting.

Children are command servers driven over a Pipe (see children.py); a SIGKILLed child is blocked on
its pipe or SIGSTOPped, never in the middle of a call."""

from __future__ import annotations

import os
from typing import Any

import pytest
from children import process_row

from shmalloc import InvalidAddress, MemoryManager


def _pattern(tag: str, n: int) -> bytes:
    unit = tag.encode() + b"|"
    return (unit * (n // len(unit) + 1))[:n]


def _gone(m: MemoryManager, address: int) -> bool:
    try:
        m.size_of(address)
    except InvalidAddress:
        return True
    return False


# ---------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("method,how", [("spawn", "blocked-on-pipe"), ("fork", "sigstopped")])
def test_sigkill_orphans_are_collected_kept_blocks_survive(
    mgr: MemoryManager, children: Any, method: str, how: str
) -> None:
    me = os.getpid()
    c = children(method, mgr)
    name = f"blk-{me}-{c.pid}"
    sizes = {
        "o1": 1000,
        "o2": 20000,
        "own_ref": 3000,
        "adopted": 4000,
        "retained": 5000,
        "persistent": 6000,
        "named": 7000,
    }
    data = {k: _pattern(k, n) for k, n in sizes.items()}

    theirs = mgr.allocate(256)  # a parent's block that the child will reference
    mgr.write(theirs, _pattern("theirs", 256))
    addr = {k: c("alloc", sizes[k], data[k]) for k in sizes}
    c.call("retain", addr["own_ref"])  # the child's own reference dies with it
    c.call("retain", theirs)
    c.call("persist", addr["persistent"])
    c.call("bind", name, addr["named"])
    mgr.adopt(addr["adopted"])
    mgr.retain(addr["retained"])
    usable = {k: mgr.size_of(a) for k, a in addr.items()}
    rep = mgr.check()
    assert rep.allocated_blocks == 8

    child_keys = ["o1", "o2", "own_ref", "retained"]
    assert mgr.process_memory(c.pid) == sum(usable[k] for k in child_keys)
    assert [b.address for b in mgr.process_allocations(c.pid)] == sorted(
        addr[k] for k in child_keys
    )
    assert mgr.process_memory(me) == mgr.size_of(theirs) + usable["adopted"]
    mine = {b.address: b for b in mgr.process_allocations(me)}
    assert mine[addr["adopted"]].pid == me
    assert mine[theirs].refcount == 1
    assert mgr.lookup(name) == addr["named"]
    assert name in mgr.names()
    assert process_row(mgr, c.pid).alive

    if how == "sigstopped":
        c.stop()
        assert process_row(mgr, c.pid).alive  # stopped is not dead
    c.kill()
    assert process_row(mgr, c.pid).alive is False
    assert mgr.should_collect()
    rep = mgr.check()
    assert rep.allocated_blocks == 8  # nothing freed before a collection

    events: list[Any] = []
    mgr.set_collector(events.append)
    mgr.drain_events()
    assert mgr.collect() == 3
    orphans = ["o1", "o2", "own_ref"]
    for k in orphans:
        assert _gone(mgr, addr[k]), k
    kept = [k for k in sizes if k not in orphans]
    for k in kept:
        assert mgr.read(addr[k], sizes[k]) == data[k], k
    assert mgr.read(theirs, 256) == _pattern("theirs", 256)
    # the dead child's reference on the parent's block was dropped
    assert {b.address: b.refcount for b in mgr.process_allocations(me)}[theirs] == 0
    # what is left of the child: the block the parent retains
    [left] = mgr.process_allocations(c.pid)
    assert (left.address, left.pid, left.refcount) == (addr["retained"], c.pid, 1)
    assert mgr.process_memory(c.pid) == usable["retained"]
    reclaimed = sum(usable[k] for k in orphans)
    for evs in (events, mgr.drain_events()):
        got = [(e.name, e.fields) for e in evs if e.pid == me]
        assert ("memory.process_reclaimed", {"pid": c.pid, "bytes": reclaimed}) in got
        assert ("memory.gc_triggered", {"freed_blocks": 3}) in got
    st = mgr.stats()
    assert st.used == mgr.size_of(theirs) + sum(usable[k] for k in kept)
    assert st.allocated_blocks == 5
    assert mgr.check().allocated_blocks == 5

    assert mgr.collect() == 0  # nothing more to take
    assert mgr.read(addr["retained"], sizes["retained"]) == data["retained"]

    # dropping the last reference on the orphan frees it
    used = mgr.stats().used
    assert mgr.release(addr["retained"]) is True
    assert _gone(mgr, addr["retained"])
    assert mgr.stats().used == used - usable["retained"]
    assert mgr.process_memory(c.pid) == 0
    mgr.check()
    mgr.collect()
    assert all(p.pid != c.pid for p in mgr.processes())

    # the named block stays persistent after unbind, until deallocated
    assert mgr.lookup(name) == addr["named"]
    mgr.unbind(name)
    with pytest.raises(KeyError):
        mgr.lookup(name)
    assert name not in mgr.names()
    mgr.collect()
    assert mgr.read(addr["named"], sizes["named"]) == data["named"]
    for a in (addr["named"], addr["persistent"], addr["adopted"], theirs):
        mgr.deallocate(a)
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0
    assert mgr.check().allocated_blocks == 0


def test_retain_release_reference_counts(mgr: MemoryManager, children: Any) -> None:
    c = children("fork", mgr)
    a = c("alloc", 3000, b"r" * 3000)
    late = c("alloc", 2000, b"l" * 2000)
    n = mgr.size_of(a)
    with pytest.raises(ValueError):
        mgr.release(a)  # no reference held yet
    mgr.retain(a)
    mgr.retain(a)
    c.call("retain", a)
    assert [b.refcount for b in mgr.process_allocations(c.pid) if b.address == a] == [3]
    # releasing a block whose owner lives never frees it
    assert c.call("release", a) is False
    assert mgr.size_of(a) == n

    c.kill()
    mgr.retain(late)  # a live reference taken after the owner died, before collection, keeps it
    assert mgr.collect() == 0
    assert mgr.read(a, 3000) == b"r" * 3000 and mgr.read(late, 2000) == b"l" * 2000
    assert [b.refcount for b in mgr.process_allocations(c.pid)] == [2, 1]

    used = mgr.stats().used
    assert mgr.release(a) is False  # one reference left
    assert mgr.read(a, 3000) == b"r" * 3000
    assert mgr.stats().used == used
    assert mgr.release(a) is True
    assert _gone(mgr, a)
    assert mgr.stats().used == used - n
    with pytest.raises(InvalidAddress):
        mgr.release(a)
    assert mgr.release(late) is True
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0
    mgr.check()


# ---------------------------------------------------------------- adopt


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_adopt_moves_accounting_and_outlives_the_producer(
    mgr: MemoryManager, children: Any, method: str
) -> None:
    me = os.getpid()
    mgr.allocate(64)  # the parent has a slot and some usage of its own
    base = mgr.process_memory(me)
    c = children(method, mgr)
    handed = c("alloc", 50000, _pattern("handed", 50000))
    dropped = c("alloc", 1000)
    hn, dn = mgr.size_of(handed), mgr.size_of(dropped)
    assert mgr.process_memory(c.pid) == hn + dn
    assert mgr.process_memory(me) == base

    mgr.adopt(handed)
    assert mgr.process_memory(c.pid) == dn
    assert mgr.process_memory(me) == base + hn
    assert mgr.process_peak(me) >= base + hn
    assert process_row(mgr, c.pid).allocations == 1
    [b] = [b for b in mgr.process_allocations(me) if b.address == handed]
    assert (b.pid, b.size) == (me, hn)
    assert [b.address for b in mgr.process_allocations(c.pid)] == [dropped]
    assert c.call("process_memory", me) == base + hn
    mgr.check()

    # the producer exits cleanly: its own block is an orphan, the handed one is not
    c.exit()
    assert process_row(mgr, c.pid).alive is False
    assert mgr.collect() == 1
    assert _gone(mgr, dropped)
    assert mgr.read(handed, 50000) == _pattern("handed", 50000)
    assert mgr.process_memory(me) == base + hn
    assert all(p.pid != c.pid for p in mgr.processes())
    mgr.check()


def test_child_adopts_a_parent_block(mgr: MemoryManager, children: Any) -> None:
    me = os.getpid()
    a = mgr.allocate(4000)
    c = children("fork", mgr)
    c.call("adopt", a)
    assert mgr.process_memory(me) == 0
    assert mgr.process_memory(c.pid) == mgr.size_of(a)
    c.kill()
    assert mgr.collect() == 1
    assert _gone(mgr, a)
    mgr.check()


# ---------------------------------------------------------------- persist and names


def test_persistent_and_named_blocks_have_no_owner(mgr: MemoryManager, children: Any) -> None:
    c = children("fork", mgr)
    p = c("alloc", 1500, b"p" * 1500)
    nb = c("alloc", 2500, b"n" * 2500)
    c.call("persist", p)
    c.call("bind", "shared/config", nb)
    assert mgr.process_memory(c.pid) == 0
    assert mgr.process_allocations(c.pid) == []
    assert mgr.lookup("shared/config") == nb
    with pytest.raises(FileExistsError):
        mgr.bind("shared/config", p)
    assert c.call("names") == mgr.names() == ["shared/config"]
    c.exit()
    for _ in range(2):
        assert mgr.collect() == 0
    assert mgr.read(p, 1500) == b"p" * 1500
    assert mgr.read(mgr.lookup("shared/config"), 2500) == b"n" * 2500
    assert mgr.stats().allocated_blocks == 2
    # freeing a named block removes its name
    mgr.deallocate(nb)
    assert mgr.names() == []
    with pytest.raises(KeyError):
        mgr.lookup("shared/config")
    mgr.deallocate(p)
    assert mgr.stats().used == 0
    mgr.check()


def test_releasing_the_last_reference_after_the_owner_died_frees(
    mgr: MemoryManager, children: Any
) -> None:
    """The owner was killed and nobody has collected yet: the block is an orphan all the same,
    so dropping its last reference frees it at once."""
    c = children("fork", mgr)
    a = c("alloc", 5000, b"q" * 5000)
    n = mgr.size_of(a)
    mgr.retain(a)
    c.kill()
    assert process_row(mgr, c.pid).alive is False
    used = mgr.stats().used
    assert mgr.release(a) is True
    assert _gone(mgr, a)
    assert mgr.stats().used == used - n
    mgr.check()


def test_adopting_an_orphan_before_collection_keeps_it(mgr: MemoryManager, children: Any) -> None:
    me = os.getpid()
    c = children("fork", mgr)
    a = c("alloc", 3000, b"o" * 3000)
    b = c("alloc", 1000)
    c.kill()
    mgr.adopt(a)  # the consumer takes over after the producer died
    assert mgr.process_memory(me) == mgr.size_of(a)
    assert mgr.collect() == 1
    assert _gone(mgr, b)
    assert mgr.read(a, 3000) == b"o" * 3000
    assert [x.address for x in mgr.process_allocations(me)] == [a]
    mgr.check()
