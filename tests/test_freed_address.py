"""An address whose block was freed (by deallocate, or by a collection that reclaimed it from its
owner) is reported as freed by every call that takes an address, with how and by which process,
whether its header is still a free block's, was wiped when it merged with a neighbour, or waits
in a process's cache; a pointer into a live block still says that it lies inside one."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from children import run_child

from shmalloc import GcStrategy, GlobalGarbageCollector, InvalidAddress, MemoryManager

ME = os.getpid()
DEALLOCATED = f"was freed by deallocate() in process {ME}"

CALLS: dict[str, Callable[[MemoryManager, int], Any]] = {
    "deallocate": lambda m, a: m.deallocate(a),
    "size_of": lambda m, a: m.size_of(a),
    "read": lambda m, a: m.read(a),
    "retain": lambda m, a: m.retain(a),
    "adopt": lambda m, a: m.adopt(a),
    "persist": lambda m, a: m.persist(a),
    "bind": lambda m, a: m.bind("freed", a),
    "block_info": lambda m, a: m.block_info(a),
}


def _says_freed(m: MemoryManager, address: int, how: str = DEALLOCATED) -> None:
    for what, call in CALLS.items():
        with pytest.raises(InvalidAddress) as ei:
            call(m, address)
        assert f"the block at address {address:#x} {how}" in str(ei.value), (what, str(ei.value))
        assert "lies inside" not in str(ei.value)


def test_freed_and_merged_into_its_neighbour(heap_mgr: MemoryManager) -> None:
    a, b, c = (heap_mgr.allocate(1000) for _ in range(3))
    heap_mgr.deallocate(a)
    heap_mgr.deallocate(b)  # b joins a: its header is wiped
    _says_freed(heap_mgr, b)
    _says_freed(heap_mgr, a)  # still a free block's header
    d = heap_mgr.allocate(2000)  # reuses a and b: b's old address is inside d now
    assert d == a
    _says_freed(heap_mgr, b)
    heap_mgr.deallocate(c)
    heap_mgr.deallocate(d)


def test_freed_into_the_cache(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    mgr.deallocate(a)  # kept in this process's cache: still freed for the user
    _says_freed(mgr, a, f"was freed by deallocate(); it waits in the cache of process {ME}")
    mgr.collect()  # gives the cache back to the heap
    _says_freed(
        mgr, a, f"was freed by deallocate() and given back since by the cache of process {ME}"
    )


def test_a_pointer_into_a_live_block_lies_inside_it(heap_mgr: MemoryManager) -> None:
    a = heap_mgr.allocate(1000)
    with pytest.raises(InvalidAddress, match="lies inside a block, not at its start"):
        heap_mgr.deallocate(a + 64)
    heap_mgr.deallocate(a)


def _allocate_and_end(arena: str, conn: Any) -> None:
    m = MemoryManager.attach(arena)
    conn.send([m.allocate(size) for size in (64, 1000, 100_000)])
    conn.close()


@pytest.mark.parametrize("how", ["collect", "global", "targeted"])
def test_reclaimed_by_a_collection(mgr: MemoryManager, how: str) -> None:
    [addresses] = run_child("spawn", _allocate_and_end, mgr.name)
    if how == "collect":
        assert mgr.collect() == 3
    else:
        strategy = GcStrategy.GLOBAL
        if how == "targeted":
            strategy = GcStrategy.targeted(
                next(p.pid for p in mgr.processes() if p.pid != os.getpid())
            )
        assert GlobalGarbageCollector(mgr).collect(strategy).freed_blocks == 3
    for a in addresses:
        _says_freed(mgr, a, f"was reclaimed from its owner by a collection in process {ME}")
    mgr.check()


def test_freed_by_the_last_release_of_an_orphan(mgr: MemoryManager) -> None:
    [addresses] = run_child("spawn", _allocate_and_end, mgr.name)
    big = addresses[-1]
    mgr.retain(big)  # outlives its owner: collection leaves it to the reference
    assert mgr.collect() == 2
    assert mgr.release(big)  # the last reference: the orphan goes
    _says_freed(mgr, big, f"was freed when its last reference was released in process {ME}")
