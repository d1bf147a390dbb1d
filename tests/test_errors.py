"""Every error path: the right exception, with the right fields, and an arena left exactly as it
was (counters, the heap walk, the bytes of live blocks and every byte of the heap)."""

from __future__ import annotations

import dataclasses
import mmap
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SHM_DIR, unique_name

from shmalloc import (
    AlignmentError,
    CorruptionDetected,
    InvalidAddress,
    MemoryManager,
    NotAnArena,
    OutOfMemory,
    ProcessLimitExceeded,
    ProtectionViolation,
    ShmallocError,
)
from shmalloc._binding import ffi
from shmalloc.manager import attachment_of

HDR = ffi.sizeof("shm_block_t")
OFF_SIZE = ffi.offsetof("shm_block_t", "size")
OFF_PREV = ffi.offsetof("shm_block_t", "prev_size")
OFF_FLAGS = ffi.offsetof("shm_block_t", "flags")
OFF_CHECK = ffi.offsetof("shm_block_t", "check")
MiB = 1 << 20


@pytest.fixture
def raw(small: MemoryManager) -> Iterator[mmap.mmap]:
    """The segment opened and mapped a second time, independently of the manager."""
    fd = os.open(os.path.join(SHM_DIR, small.name), os.O_RDWR)
    try:
        mm = mmap.mmap(fd, small.capacity, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        yield mm
    finally:
        mm.close()


class Populated:
    """A small arena with live blocks of several sizes (one sealed) and holes between them."""

    def __init__(self, m: MemoryManager) -> None:
        self.m = m
        self.live: dict[int, bytes] = {}
        holes = []
        for i, size in enumerate([16, 100, 1000, 4096, 5000, 70000]):
            a = m.allocate(size)
            data = bytes([(i * 37 + j) & 0xFF for j in range(m.size_of(a))])
            m.write(a, data)
            self.live[a] = data
            holes.append(m.allocate(200))
        for h in holes[::2]:
            m.deallocate(h)
        for h in holes[1::2]:
            self.live[h] = m.read(h)
        self.sealed = next(iter(self.live))
        m.seal(self.sealed)
        self.freed = holes[0]

    def snapshot(self, whole_segment: bool = True) -> tuple[Any, ...]:
        m = self.m
        data = {a: m.read(a) for a in self.live}
        seg = b""
        if whole_segment:
            # every byte of the heap, as this process's mapping sees it (the arena header holds
            # event rings and counters that an error may legitimately touch; stats() and
            # check() cover the rest of it)
            seg = bytes(attachment_of(m).mm[m.capacity - m.stats().total :])
        return (m.stats(), m.check(), data, seg)


@pytest.fixture
def pop(small: MemoryManager) -> Populated:
    return Populated(small)


def _sans_oom(st: Any) -> Any:
    """stats() less the count of OutOfMemory events (which an OOM rightly bumps)."""
    if hasattr(st, "oom_events"):
        return dataclasses.replace(st, oom_events=0)
    return st


def _assert_unchanged(pop: Populated, before: tuple[Any, ...], oom: bool = False) -> None:
    after = pop.snapshot(whole_segment=bool(before[3]))
    if oom:
        if hasattr(before[0], "oom_events"):
            assert after[0].oom_events == before[0].oom_events + 1
        after, before = (_sans_oom(after[0]), *after[1:]), (_sans_oom(before[0]), *before[1:])
    assert after[0] == before[0], "stats() changed"
    assert after[1] == before[1], "check() changed"
    assert after[2] == before[2], "the bytes of a live block changed"
    assert after[3] == before[3], "the heap's bytes changed"


def _interior(p: Populated) -> int:
    return max(p.live, key=lambda a: len(p.live[a])) + 16


# Each case: (id, function(pop) -> None that must raise, expected exception type)
CASES: list[
    tuple[str, Callable[[Populated], Any], type[BaseException] | tuple[type[BaseException], ...]]
] = [
    ("double-free", lambda p: p.m.deallocate(p.freed), InvalidAddress),
    ("free-interior", lambda p: p.m.deallocate(_interior(p)), InvalidAddress),
    ("free-interior-unaligned", lambda p: p.m.deallocate(_interior(p) + 3), InvalidAddress),
    ("free-out-of-range", lambda p: p.m.deallocate(p.m.capacity + 64), InvalidAddress),
    ("free-at-capacity", lambda p: p.m.deallocate(p.m.capacity), InvalidAddress),
    ("free-huge", lambda p: p.m.deallocate(1 << 62), InvalidAddress),
    ("free-beyond-u64", lambda p: p.m.deallocate(1 << 70), InvalidAddress),
    ("free-negative", lambda p: p.m.deallocate(-16), InvalidAddress),
    ("free-zero", lambda p: p.m.deallocate(0), InvalidAddress),
    ("free-in-arena-header", lambda p: p.m.deallocate(64), InvalidAddress),
    ("free-heap-start", lambda p: p.m.deallocate(p.m.capacity - p.m.stats().total), InvalidAddress),
    ("size_of-freed", lambda p: p.m.size_of(p.freed), InvalidAddress),
    ("size_of-interior", lambda p: p.m.size_of(_interior(p)), InvalidAddress),
    ("size_of-zero", lambda p: p.m.size_of(0), InvalidAddress),
    ("size_of-negative", lambda p: p.m.size_of(-1), InvalidAddress),
    ("read-freed", lambda p: p.m.read(p.freed), InvalidAddress),
    ("write-freed", lambda p: p.m.write(p.freed, b"x"), InvalidAddress),
    ("view-freed", lambda p: p.m.view(p.freed), InvalidAddress),
    ("seal-freed", lambda p: p.m.seal(p.freed), InvalidAddress),
    ("read-interior", lambda p: p.m.read(_interior(p), 1), InvalidAddress),
    ("write-interior", lambda p: p.m.write(_interior(p), b"x"), InvalidAddress),
    ("read-out-of-range", lambda p: p.m.read(p.m.capacity + 32, 1), InvalidAddress),
    ("write-zero", lambda p: p.m.write(0, b"x"), InvalidAddress),
    ("read-past-end", lambda p: p.m.read(_last(p), _size(p) + 1), ValueError),
    ("read-offset-past-end", lambda p: p.m.read(_last(p), 1, offset=_size(p)), ValueError),
    ("read-offset-beyond", lambda p: p.m.read(_last(p), offset=_size(p) + 1), ValueError),
    ("write-past-end", lambda p: p.m.write(_last(p), b"y" * (_size(p) + 1)), ValueError),
    ("write-straddles-end", lambda p: p.m.write(_last(p), b"yy", offset=_size(p) - 1), ValueError),
    ("write-offset-beyond", lambda p: p.m.write(_last(p), b"", offset=_size(p) + 1), ValueError),
    ("view-past-end", lambda p: p.m.view(_last(p), _size(p) + 1), ValueError),
    ("view-offset-beyond", lambda p: p.m.view(_last(p), 1, offset=_size(p)), ValueError),
    ("read-negative-n", lambda p: p.m.read(_last(p), -1), ValueError),
    ("read-negative-offset", lambda p: p.m.read(_last(p), 1, offset=-1), ValueError),
    ("write-negative-offset", lambda p: p.m.write(_last(p), b"z", offset=-1), ValueError),
    ("view-negative-n", lambda p: p.m.view(_last(p), -5), ValueError),
    ("view-negative-offset", lambda p: p.m.view(_last(p), offset=-16), ValueError),
    ("write-sealed", lambda p: p.m.write(p.sealed, b"nope"), ProtectionViolation),
    ("write-sealed-empty", lambda p: p.m.write(p.sealed, b""), ProtectionViolation),
    ("size-0", lambda p: p.m.allocate(0), ValueError),
    ("size-negative", lambda p: p.m.allocate(-1), ValueError),
    ("size-very-negative", lambda p: p.m.allocate(-(1 << 70)), ValueError),
    ("size-str", lambda p: p.m.allocate("16"), TypeError),
    ("size-float", lambda p: p.m.allocate(16.0), TypeError),
    ("size-bool", lambda p: p.m.allocate(True), TypeError),
    ("size-None", lambda p: p.m.allocate(None), TypeError),
    ("size-bytes", lambda p: p.m.allocate(b"16"), TypeError),
    ("align-bad", lambda p: p.m.allocate(16, align=24), AlignmentError),
    ("align-float", lambda p: p.m.allocate(16, align=32.0), TypeError),
    ("free-str", lambda p: p.m.deallocate(str(_last(p))), TypeError),
    ("free-float", lambda p: p.m.deallocate(float(_last(p))), TypeError),
    ("free-bool", lambda p: p.m.deallocate(True), TypeError),
    ("free-None", lambda p: p.m.deallocate(None), TypeError),
    ("read-str-address", lambda p: p.m.read(str(_last(p))), TypeError),
    ("read-float-address", lambda p: p.m.read(float(_last(p))), TypeError),
    ("read-bool-address", lambda p: p.m.read(False), TypeError),
    ("read-None-address", lambda p: p.m.read(None), TypeError),
    ("read-float-n", lambda p: p.m.read(_last(p), 1.0), TypeError),
    ("read-str-n", lambda p: p.m.read(_last(p), "1"), TypeError),
    ("read-float-offset", lambda p: p.m.read(_last(p), 1, 0.0), TypeError),
    ("write-str-data", lambda p: p.m.write(_last(p), "text"), TypeError),
    ("write-float-data", lambda p: p.m.write(_last(p), 1.5), TypeError),
    ("write-bool-data", lambda p: p.m.write(_last(p), True), TypeError),
    ("write-None-data", lambda p: p.m.write(_last(p), None), TypeError),
    ("write-int-data", lambda p: p.m.write(_last(p), 3), TypeError),
    ("write-list-data", lambda p: p.m.write(_last(p), [1, 2]), TypeError),
    ("write-str-address", lambda p: p.m.write(str(_last(p)), b"x"), TypeError),
    ("write-None-address", lambda p: p.m.write(None, b"x"), TypeError),
    ("write-bool-offset", lambda p: p.m.write(_last(p), b"x", offset=True), TypeError),
    ("size_of-str", lambda p: p.m.size_of("0x10"), TypeError),
    ("size_of-float", lambda p: p.m.size_of(float(_last(p))), TypeError),
    ("seal-None", lambda p: p.m.seal(None), TypeError),
    ("view-str", lambda p: p.m.view("x"), TypeError),
    ("guarded-size-0", lambda p: p.m.allocate_guarded(0), ValueError),
    ("guarded-size-str", lambda p: p.m.allocate_guarded("1"), TypeError),
    ("pid-str", lambda p: p.m.allocate(16, pid="1"), TypeError),
    ("pid-negative", lambda p: p.m.allocate(16, pid=-5), ValueError),
]


def _last(p: Populated) -> int:
    """A live, unsealed block."""
    return max(a for a in p.live if a != p.sealed)


def _size(p: Populated) -> int:
    return p.m.size_of(_last(p))


@pytest.mark.parametrize("fn,exc", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_leaves_arena_unchanged(
    pop: Populated, fn: Callable[[Populated], Any], exc: Any
) -> None:
    before = pop.snapshot()
    with pytest.raises(exc) as ei:
        fn(pop)
    assert str(ei.value)  # every error says something
    _assert_unchanged(pop, before)
    # and the arena still works
    a = pop.m.allocate(100)
    pop.m.write(a, b"after")
    assert pop.m.read(a, 5) == b"after"
    pop.m.deallocate(a)
    assert pop.m.check() == before[1]
    assert {a: pop.m.read(a) for a in pop.live} == before[2]


def test_invalid_address_fields(pop: Populated) -> None:
    with pytest.raises(InvalidAddress) as ei:
        pop.m.deallocate(pop.freed)
    assert ei.value.address == pop.freed
    assert hex(pop.freed) in str(ei.value)
    interior = _interior(pop)
    with pytest.raises(InvalidAddress) as ei:
        pop.m.size_of(interior)
    assert ei.value.address == interior


def test_double_free_after_coalescing_with_free_predecessor(small: MemoryManager) -> None:
    """Free A, then B (B merges into A), then B again: B is no live block, so InvalidAddress."""
    m = small
    a, b, c = (m.allocate(1024) for _ in range(3))
    m.deallocate(a)
    m.deallocate(b)
    before = (m.stats(), m.check(), m.read(c))
    with pytest.raises(InvalidAddress) as ei:
        m.deallocate(b)
    assert ei.value.address == b
    assert (m.stats(), m.check(), m.read(c)) == before


def test_freed_address_inside_merged_block_is_not_a_block(small: MemoryManager) -> None:
    """An address freed into its free predecessor is no block any more: size_of, read and write
    must refuse it (and so cannot reach into whatever is allocated there later)."""
    m = small
    a, b, c = (m.allocate(1024) for _ in range(3))
    m.deallocate(a)
    m.deallocate(b)  # b's block merges into a's
    for op in (
        lambda: m.size_of(b),
        lambda: m.read(b, 4),
        lambda: m.write(b, b"abcd"),
        lambda: m.view(b),
        lambda: m.seal(b),
    ):
        with pytest.raises(InvalidAddress):
            op()
    m.check()


def test_stale_address_cannot_write_across_a_new_block(small: MemoryManager) -> None:
    """A block allocated over a freed (merged) address: the stale address is an interior address
    of the new block, and writing through it must neither succeed nor damage the heap."""
    m = small
    a, b, c = (m.allocate(1024) for _ in range(3))
    m.deallocate(a)
    m.deallocate(b)
    x = m.allocate(1568)  # from the merged hole; b now lies inside x, and x's tail after it
    assert x == a and x < b < x + m.size_of(x)
    before = (m.stats(), m.check())
    with pytest.raises(InvalidAddress):
        m.write(b, b"\xff" * 1024)
    assert (m.stats(), m.check()) == before


# ------------------------------------------------------------------------------- out of memory


def test_out_of_memory_fields(pop: Populated) -> None:
    m = pop.m
    before = pop.snapshot()
    st = before[0]
    request = 2 * m.capacity
    with pytest.raises(OutOfMemory) as ei:
        m.allocate(request)
    e = ei.value
    assert isinstance(e, MemoryError) and isinstance(e, ShmallocError)
    assert e.requested == request
    assert e.available == st.available
    assert e.used == st.used
    assert e.total == st.total
    assert "cannot allocate" in str(e)
    _assert_unchanged(pop, before, oom=True)


def test_out_of_memory_when_no_block_is_large_enough(pop: Populated) -> None:
    """Enough bytes free in total, but no single block large enough."""
    m = pop.m
    st = m.stats()
    request = st.largest_free_block + 16
    assert request <= m.capacity
    before = pop.snapshot()
    with pytest.raises(OutOfMemory) as ei:
        m.allocate(request)
    assert ei.value.requested == request
    assert ei.value.available == st.available
    assert ei.value.used == st.used
    assert ei.value.total == st.total
    _assert_unchanged(pop, before, oom=True)
    # the largest free block itself is still available
    a = m.allocate(st.largest_free_block)
    m.deallocate(a)


def _claim_slot(m: MemoryManager) -> None:
    """The first allocation attaches this process to the arena's process table."""
    m.deallocate(m.allocate(1))


def test_out_of_memory_with_alignment(small: MemoryManager) -> None:
    _claim_slot(small)
    st = small.stats()
    before = (_sans_oom(small.stats()), small.check())
    with pytest.raises(OutOfMemory) as ei:
        small.allocate(st.available, align=4096)
    assert ei.value.requested == st.available
    assert (_sans_oom(small.stats()), small.check()) == before


def test_out_of_memory_size_beyond_u64(small: MemoryManager) -> None:
    _claim_slot(small)
    before = (_sans_oom(small.stats()), small.check())
    with pytest.raises(OutOfMemory) as ei:
        small.allocate(1 << 80)
    assert ei.value.requested > small.capacity
    assert ei.value.total == before[0].total
    assert (_sans_oom(small.stats()), small.check()) == before


def test_fill_until_out_of_memory_then_free_all(small: MemoryManager) -> None:
    m = small
    addrs = []
    sizes = [16, 1000, 4096, 100, 20000, 64]
    i = 0
    with pytest.raises(OutOfMemory) as ei:
        while True:
            size = sizes[i % len(sizes)]
            addrs.append(m.allocate(size))
            m.write(addrs[-1], bytes([i & 0xFF]) * size)
            i += 1
            assert i < 100000, "a 1 MiB arena never ran out"
    full = m.stats()
    assert ei.value.used == full.used
    assert ei.value.available == full.available
    assert full.used == sum(m.size_of(a) for a in addrs)
    assert full.allocated_blocks == len(addrs)
    m.check()
    # the data survived filling the arena
    for j, a in enumerate(addrs):
        assert m.read(a, 1) == bytes([j & 0xFF])
    # small requests still fit until nothing does
    while True:
        try:
            addrs.append(m.allocate(1))
        except OutOfMemory:
            break
    assert m.stats().largest_free_block < 32
    for a in addrs:
        m.deallocate(a)
    st = m.stats()
    assert st.used == 0
    assert st.allocated_blocks == 0 and st.free_blocks == 1
    assert st.available == st.total - HDR
    m.check()
    big = m.allocate(st.available)  # the whole heap in one block again
    m.deallocate(big)


def test_out_of_memory_is_memory_error_for_callers(small: MemoryManager) -> None:
    try:
        small.allocate(small.capacity)
    except MemoryError as e:
        assert type(e) is OutOfMemory
    else:
        pytest.fail("no MemoryError")


# ------------------------------------------------------------------------------- sealed views


def test_view_of_sealed_block_is_read_only(pop: Populated) -> None:
    before = pop.snapshot(whole_segment=False)
    with pop.m.view(pop.sealed) as v:
        assert v.readonly
        assert bytes(v) == pop.live[pop.sealed]
        with pytest.raises(TypeError):
            v[0] = 1
        with pytest.raises(TypeError):
            v[:2] = b"ab"
    _assert_unchanged(pop, before)


# ------------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize(
    "exc",
    [
        OutOfMemory(100, 50, 25, 1000, "detail"),
        OutOfMemory(1, 2, 3, 4),
        ProcessLimitExceeded(1234, 4096, 1024, 8192),
        InvalidAddress(0x1230, "freed"),
        InvalidAddress(16),
        CorruptionDetected(0x40, "bad header"),
        AlignmentError(24),
        ProtectionViolation(0x5020),
    ],
    ids=lambda e: type(e).__name__,
)
def test_exceptions_pickle_with_their_fields(exc: ShmallocError) -> None:
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc)
    assert str(back) == str(exc)
    assert back.args == exc.args
    for f in type(exc)._fields:
        assert getattr(back, f) == getattr(exc, f)
    assert isinstance(back, ShmallocError)


def test_raised_exceptions_pickle(pop: Populated) -> None:
    raised = []
    for fn in (
        lambda: pop.m.allocate(pop.m.capacity * 4),
        lambda: pop.m.deallocate(pop.freed),
        lambda: pop.m.write(pop.sealed, b"x"),
        lambda: pop.m.allocate(1, align=3 * 16),
    ):
        with pytest.raises(ShmallocError) as ei:
            fn()
        raised.append(ei.value)
    for e in raised:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
        for f in type(e)._fields:
            assert getattr(back, f) == getattr(e, f)
    assert isinstance(raised[0], OutOfMemory) and raised[0].requested == pop.m.capacity * 4


def test_exception_hierarchy() -> None:
    assert issubclass(OutOfMemory, MemoryError) and issubclass(OutOfMemory, ShmallocError)
    assert issubclass(AlignmentError, ValueError)
    for cls in (ProcessLimitExceeded, InvalidAddress, CorruptionDetected, ProtectionViolation):
        assert issubclass(cls, ShmallocError)
    assert issubclass(ShmallocError, Exception)


# ------------------------------------------------------------------------------- arena names


HOSTILE = [
    "a/b",
    "/abs",
    "x\0y",
    "",
    "..",
    ".",
    "../etc",
    "a" * 300,
    "a" * 201,
    "-rf",
    "sp ace",
    "tab\t",
    "nl\n",
    "é",
]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused(name: str) -> None:
    for make in (
        lambda: MemoryManager.create(name, MiB),
        lambda: MemoryManager.attach(name),
        lambda: MemoryManager(MiB, name=name),
    ):
        with pytest.raises(ValueError):
            make()
    if name not in ("", ".", "..") and "\0" not in name:
        assert not os.path.lexists(os.path.join(SHM_DIR, name))
    # nothing was created under any part of the name either
    for part in name.replace("\0", "/").split("/"):
        if part not in ("", ".", ".."):
            assert not os.path.lexists(os.path.join(SHM_DIR, part))


@pytest.mark.parametrize("name", [3, 3.5, b"name", ["n"], True], ids=repr)
def test_non_str_names_are_type_error(name: object) -> None:
    for make in (
        lambda: MemoryManager.create(name, MiB),
        lambda: MemoryManager.attach(name),  # type: ignore[arg-type]
        lambda: MemoryManager(MiB, name=name),
    ):  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            make()


def test_longest_allowed_name_works() -> None:
    name = unique_name("long")
    name = name + "x" * (200 - len(name))
    with MemoryManager.create(name, MiB) as m:
        try:
            assert m.name == name
            a = m.allocate(10)
            assert m.size_of(a) >= 10
        finally:
            m.destroy()


@pytest.mark.parametrize(
    "capacity,exc",
    [
        (0, ValueError),
        (-1, ValueError),
        (1, ValueError),
        (1 << 50, ValueError),
        (1.5, TypeError),
        ("1M", TypeError),
        (None, TypeError),
        (True, TypeError),
    ],
)
def test_bad_capacity(arena_name: str, capacity: Any, exc: type[BaseException]) -> None:
    with pytest.raises(exc):
        MemoryManager.create(arena_name, capacity)
    assert not os.path.exists(os.path.join(SHM_DIR, arena_name))


# ------------------------------------------------------------------------------- corruption


def _poke(raw: mmap.mmap, offset: int, value: int) -> bytes:
    old = raw[offset : offset + 8]
    raw[offset : offset + 8] = struct.pack("<Q", value)
    return old


@pytest.mark.parametrize(
    "field,value",
    [
        (OFF_SIZE, 0xDEAD0),
        (OFF_SIZE, 1 << 40),
        (OFF_SIZE, 0),
        (OFF_PREV, 48),
        (OFF_FLAGS, 1),
        (OFF_CHECK, 0),
    ],
)
def test_smashed_header_is_detected_not_followed(
    pop: Populated, raw: mmap.mmap, field: int, value: int
) -> None:
    m = pop.m
    victim = _last(pop)
    hdr = victim - HDR
    before = pop.snapshot(whole_segment=False)
    old = _poke(raw, hdr + field, value)
    assert (
        attachment_of(m).mm[hdr + field : hdr + field + 8] != old
    )  # the manager's mapping sees the damage
    for op in (
        lambda: m.deallocate(victim),
        lambda: m.size_of(victim),
        lambda: m.read(victim, 1),
        lambda: m.write(victim, b"x"),
        lambda: m.seal(victim),
    ):
        with pytest.raises(CorruptionDetected) as ei:
            op()
        assert ei.value.offset == hdr
        assert "corrupt" in str(ei.value)
    with pytest.raises(CorruptionDetected) as ei:
        m.check()
    assert ei.value.offset == hdr
    # nothing was changed by the refused operations: repairing the header restores the arena
    raw[hdr + field : hdr + field + 8] = old
    _assert_unchanged(pop, before)


def test_smashed_header_via_managers_own_mapping(pop: Populated) -> None:
    m = pop.m
    victim = _last(pop)
    off = victim - HDR + OFF_SIZE
    old = attachment_of(m).mm[off : off + 8]
    attachment_of(m).mm[off : off + 8] = b"\xff" * 8
    try:
        with pytest.raises(CorruptionDetected):
            m.deallocate(victim)
        with pytest.raises(CorruptionDetected):
            m.size_of(victim)
        with pytest.raises(CorruptionDetected):
            m.check()
    finally:
        attachment_of(m).mm[off : off + 8] = old
    m.check()


def test_smashed_neighbour_stops_free(pop: Populated, raw: mmap.mmap) -> None:
    """Freeing a block looks at its neighbours: a damaged one is reported, and the block stays."""
    m = pop.m
    blocks = sorted(pop.live)
    victim = blocks[1]
    nxt = victim + m.size_of(victim)  # the next block's header
    before = pop.snapshot(whole_segment=False)
    old = _poke(raw, nxt + OFF_SIZE, 0x12345670)
    with pytest.raises(CorruptionDetected) as ei:
        m.deallocate(victim)
    assert ei.value.offset == nxt
    raw[nxt + OFF_SIZE : nxt + OFF_SIZE + 8] = old
    _assert_unchanged(pop, before)
    assert m.size_of(victim) == len(pop.live[victim])


def test_smashed_free_block_stops_allocate(small: MemoryManager, raw: mmap.mmap) -> None:
    m = small
    a = m.allocate(100)
    tail = a + m.size_of(a)  # header of the free tail
    before = (m.stats(), m.check())
    old = _poke(raw, tail + OFF_SIZE, 64)
    with pytest.raises(CorruptionDetected):
        m.allocate(100)
    with pytest.raises(CorruptionDetected) as ei:
        m.check()
    assert ei.value.offset == tail
    raw[tail + OFF_SIZE : tail + OFF_SIZE + 8] = old
    assert (m.stats(), m.check()) == before
    m.deallocate(m.allocate(100))


def test_smashed_free_list_link_is_detected(small: MemoryManager, raw: mmap.mmap) -> None:
    m = small
    a = m.allocate(100)
    tail = a + m.size_of(a)
    link = tail + HDR  # shm_free_links_t.next
    old = _poke(raw, link, 0x4000_0000)
    with pytest.raises(CorruptionDetected):
        m.allocate(100)
    with pytest.raises(CorruptionDetected):
        m.check()
    raw[link : link + 8] = old
    m.check()
    b = m.allocate(100)
    assert b == tail + HDR


def test_smashed_arena_magic_is_detected(small: MemoryManager, raw: mmap.mmap) -> None:
    old = _poke(raw, 0, 0x0123456789ABCDEF)
    try:
        with pytest.raises(CorruptionDetected) as ei:
            small.check()
        assert ei.value.offset == 0
        with pytest.raises(NotAnArena):  # without the magic it cannot be told from another's
            MemoryManager.attach(small.name)
    finally:
        raw[0:8] = old
    small.check()
    MemoryManager.attach(small.name).close()


def test_random_garbage_over_every_header_never_crashes(
    small: MemoryManager, raw: mmap.mmap
) -> None:
    """Overwrite each block header in turn with garbage: every call raises, none crashes."""
    import random

    m = small
    addrs = [m.allocate(s) for s in (16, 300, 5000, 70000, 16)]
    m.deallocate(addrs[2])
    rng = random.Random(5)
    for a in addrs:
        hdr = a - HDR
        old = raw[hdr : hdr + HDR]
        for _ in range(5):
            raw[hdr : hdr + HDR] = rng.randbytes(HDR)
            with pytest.raises((CorruptionDetected, InvalidAddress)):
                m.deallocate(a)
            with pytest.raises((CorruptionDetected, InvalidAddress)):
                m.size_of(a)
            with pytest.raises(CorruptionDetected):
                m.check()
        raw[hdr : hdr + HDR] = old
        m.check()
