"""check() knows the queues: clean after real queue traffic between processes, and each queue
invariant of shm_layout.h ([Q1]-[Q4], with the object ones [O1]-[O4]) reported as
CorruptionDetected when a queue's bytes in a real segment are damaged, never a crash. Each damage
is undone before the test ends, and check() is clean again."""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import pickle
import random
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from queue_workers import put_array

from shmalloc import CorruptionDetected, JoinableQueue, MemoryManager, Queue
from shmalloc._binding import ffi
from shmalloc.manager import attachment_of

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")


@contextmanager
def segment(mgr: MemoryManager) -> Iterator[mmap.mmap]:
    """A second mapping of the arena's segment, as another process of the user would have."""
    with open(f"/dev/shm/{mgr.name}", "r+b") as f, mmap.mmap(f.fileno(), mgr.capacity) as m:
        yield m


@dataclass
class Layout:
    """Where a queue's bytes are, asked of C (ffi.offsetof), never typed in."""

    obj: int  # the queue object's header (payload address)
    control: int  # its shm_queue_t
    ring: int  # its first cell
    capacity: int
    self_cell: bytes  # a cell naming the queue itself

    def field(self, name: str) -> int:
        return self.control + ffi.offsetof("shm_queue_t", name)

    def cell(self, i: int) -> int:
        return self.ring + i * ffi.sizeof("shm_qcell_t")

    def item(self, m: mmap.mmap, i: int) -> int:
        """The header address of the object in cell i."""
        return U64.unpack_from(m, self.cell(i))[0] & ~1


def layout(mgr: MemoryManager, q: Queue) -> Layout:
    info = q._info()
    obj = q._ref.address
    with segment(mgr) as m:
        ring = U64.unpack_from(m, obj + ffi.sizeof("shm_object_t"))[0]  # buffer 0's address
    return Layout(obj, info.control, ring, info.capacity, U64.pack(obj) + U64.pack(q._ref.id))


def test_check_clean_after_queue_traffic(mgr: MemoryManager) -> None:
    """Producers in other processes, growth past the first ring, a joinable queue, arrays, a
    reference put twice, a deleted item waiting, a queue pickled in transit: check() is clean at
    every step and counts what it walked."""
    ctx = multiprocessing.get_context("spawn")
    q = Queue(arena=mgr)
    jq = JoinableQueue(arena=mgr)
    ps = [ctx.Process(target=put_array, args=(q, 1000 + i)) for i in range(3)]
    for p in ps:
        p.start()
    for i in range(150):  # past the first 64 cells: the ring grows
        jq.put({"i": i, "a": np.full(10, i)})
    for p in ps:
        p.join(60)
        assert p.exitcode == 0
    ref = mgr.put(b"shared")
    q.put(ref)
    q.put(ref)  # the same reference twice: one object in two cells, as a reference
    doomed = mgr.put(np.arange(10))
    q.put(doomed)
    r = mgr.check()
    assert r.queues == 2 and r.queued == 3 + 3 + 150
    assert r.objects == 2 + 3 + 150 + 2  # the queues, the arrays, the dicts, ref and doomed
    mgr.delete(doomed)  # its cell still names it: get() will skip it
    in_transit = pickle.dumps(q)  # a ticket holds the queue until someone unpickles it
    assert mgr.check().tickets >= 1
    got = sorted(len(q.get(timeout=10)) for _ in range(3))
    assert got == [1000, 1001, 1002]
    for i in range(100):
        x = jq.get(timeout=10)
        assert x["i"] == i and (x["a"] == i).all()
        jq.task_done()
    del x
    assert mgr.check().queued == 3 + 50
    pickle.loads(in_transit).close()
    del q, jq, ref, doomed  # the last holds: each queue goes with the items left in it
    gc.collect()
    r = mgr.check()
    assert r.objects == r.queues == r.queued == r.tickets == 0


# Each damage: (what it does, the invariant check() must name). ``f(m, lay, mgr)`` writes the
# damage; the test saved the bytes it may touch and writes them back afterwards.
Damage = Callable[[mmap.mmap, Layout, MemoryManager], None]


def _set64(m: mmap.mmap, at: int, v: int) -> None:
    U64.pack_into(m, at, v & (2**64 - 1))


def _get64(m: mmap.mmap, at: int) -> int:
    return int(U64.unpack_from(m, at)[0])


def _holds_offset(obj: int) -> int:
    return obj + ffi.offsetof("shm_object_t", "holds")


def _held_offset(mgr: MemoryManager) -> int:
    slot = attachment_of(mgr).slot
    return ffi.offsetof("shm_arena_t", "objects") + ffi.offsetof("shm_objects_t", "held") + 4 * slot


DAMAGES: dict[str, tuple[Damage, str]] = {
    "magic": (lambda m, q, _: _set64(m, q.field("magic"), 0x1234), "[Q1]"),
    "head behind tail": (
        lambda m, q, _: _set64(m, q.field("head"), _get64(m, q.field("tail")) - 1),
        "[Q1]",
    ),
    "head past capacity": (
        lambda m, q, _: _set64(m, q.field("head"), _get64(m, q.field("tail")) + q.capacity + 1),
        "[Q1]",
    ),
    "capacity": (lambda m, q, _: _set64(m, q.field("capacity"), q.capacity * 2), "[Q1]"),
    "unfinished": (lambda m, q, _: _set64(m, q.field("unfinished"), 5), "[Q3]"),
    "joinable": (lambda m, q, _: U32.pack_into(m, q.field("joinable"), 7), "[Q3]"),
    "emptied cell": (lambda m, q, _: m.__setitem__(slice(q.cell(1), q.cell(2)), bytes(16)), "[Q2]"),
    "stray cell": (
        lambda m, q, _: m.__setitem__(slice(q.cell(5), q.cell(6)), m[q.cell(0) : q.cell(1)]),
        "[Q2]",
    ),
    "wild cell": (lambda m, q, _: _set64(m, q.cell(2), 0xDEADBEEF0), "[Q2]"),
    "misaligned cell": (lambda m, q, _: _set64(m, q.cell(2), q.item(m, 2) + 8), "[Q2]"),
    "id of the future": (lambda m, q, _: _set64(m, q.cell(0) + 8, 1 << 60), "[Q2]"),
    "item twice": (
        lambda m, q, _: m.__setitem__(slice(q.cell(1), q.cell(2)), m[q.cell(0) : q.cell(1)]),
        "[Q4]",
    ),
    "queue in a cell": (
        lambda m, q, _: m.__setitem__(slice(q.cell(0), q.cell(1)), q.self_cell),
        "[Q2]",
    ),
    "holds": (lambda m, q, _: U32.pack_into(m, _holds_offset(q.item(m, 0)), 0), "[O3]"),
    "held count": (
        lambda m, q, mgr: U32.pack_into(
            m, _held_offset(mgr), U32.unpack_from(m, _held_offset(mgr))[0] + 1
        ),
        "[O2]",
    ),
    "ring address": (
        lambda m, q, _: _set64(m, q.obj + ffi.sizeof("shm_object_t"), q.item(m, 0)),
        "[O4]",
    ),
    "object magic": (lambda m, q, _: _set64(m, q.item(m, 2), 0x99), "[O1]"),
}


def _snapshot(m: mmap.mmap, lay: Layout, mgr: MemoryManager) -> list[tuple[int, bytes]]:
    """The bytes a damage may touch: the queue's header, control struct and ring, its items'
    headers and this process's held count."""
    regions = [(lay.obj, ffi.sizeof("shm_object_t") + ffi.sizeof("shm_objbuf_t"))]
    regions += [
        (lay.control, ffi.sizeof("shm_queue_t")),
        (lay.ring, lay.cell(lay.capacity) - lay.ring),
    ]
    regions += [(lay.item(m, i), ffi.sizeof("shm_object_t")) for i in range(3)]
    regions += [(_held_offset(mgr), 4)]
    return [(at, bytes(m[at : at + n])) for at, n in regions]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_check_reports_a_damaged_queue(mgr: MemoryManager, damage: str) -> None:
    q = Queue(arena=mgr)
    for item in (b"a", np.arange(100), {"c": 3}):
        q.put(item)
    assert mgr.check().queued == 3
    lay = layout(mgr, q)
    write, tag = DAMAGES[damage]
    with segment(mgr) as m:
        saved = _snapshot(m, lay, mgr)
        write(m, lay, mgr)
        try:
            with pytest.raises(CorruptionDetected) as e:
                mgr.check()
            assert tag in e.value.detail, e.value.detail
        finally:
            for at, data in saved:
                m[at : at + len(data)] = data
    assert mgr.check().queued == 3
    assert q.get(timeout=5) == b"a"
    del q  # this process's hold on the queue was the last: it goes with its items
    assert mgr.check().objects == 0


def test_check_survives_random_damage_to_a_queue(mgr: MemoryManager) -> None:
    """Random words written over a queue's control struct, ring and items' headers: check()
    reports corruption or finds the bytes consistent; it never crashes or hangs."""
    q = Queue(arena=mgr)
    for item in (b"a", np.arange(100), {"c": 3}, 4):
        q.put(item)
    lay = layout(mgr, q)
    rng = random.Random(15)
    words = [(lay.control, ffi.sizeof("shm_queue_t")), (lay.ring, 16 * 8), (lay.obj, 64)]
    reported = 0
    with segment(mgr) as m:
        saved = _snapshot(m, lay, mgr)
        try:
            for _ in range(300):
                at, n = rng.choice(words)
                at += rng.randrange(n // 8) * 8
                old = _get64(m, at)
                _set64(
                    m,
                    at,
                    rng.choice(
                        (0, 1, 2**64 - 1, rng.getrandbits(64), old ^ (1 << rng.randrange(64)))
                    ),
                )
                try:
                    mgr.check()
                except CorruptionDetected:
                    reported += 1
                _set64(m, at, old)
        finally:
            for at, data in saved:
                m[at : at + len(data)] = data
    assert reported > 100
    assert mgr.check().queued == 4


def test_a_damaged_item_is_reported_and_left_in_the_queue(mgr: MemoryManager) -> None:
    """get() on a damaged item (here its header's stream length, which no deletion explains,
    unlike a missing object: that one was deleted while it waited, and is skipped) raises
    CorruptionDetected and takes nothing: once the bytes are mended, every item is still there,
    in order."""
    q = Queue(arena=mgr)
    items: list[Any] = [b"a", np.arange(100), {"c": 3}]
    for item in items:
        q.put(item)
    lay = layout(mgr, q)
    with segment(mgr) as m:
        saved = _snapshot(m, lay, mgr)
        _set64(m, lay.item(m, 0) + ffi.offsetof("shm_object_t", "pickle_len"), 1 << 40)
        try:
            with pytest.raises(CorruptionDetected):
                q.get_nowait()
            assert q.qsize() == 3
        finally:
            for at, data in saved:
                m[at : at + len(data)] = data
    back = [q.get_nowait() for _ in items]
    assert back[0] == b"a" and np.array_equal(back[1], items[1]) and back[2] == {"c": 3}
    del q, back
    assert mgr.check().objects == 0
