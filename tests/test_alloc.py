"""The allocator's basic behaviours: recycling, splitting, coalescing, size classes, alignment,
access (read/write/view/seal/size_of/allocate_guarded) and the statistics."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from shmalloc import (
    AlignmentError,
    InvalidAddress,
    MemoryGuard,
    MemoryManager,
    MemoryPressure,
    MemoryStats,
    ProtectionViolation,
    ShmallocError,
)

HDR = 32  # sizeof(shm_block_t): the header in front of every payload (pinned in native/arena.c)
KiB = 1024
MiB = 1024 * KiB

SIZE_BOUNDARIES = [1, 63, 64, 65, 4095, 4096, 4097, 65536, 65537, 1 * MiB]


@pytest.fixture
def mgr(heap_mgr: MemoryManager) -> MemoryManager:
    """These tests pin the heap's placement policy:
    the per-process caches are off (test_cache.py covers them)."""
    return heap_mgr


def _round16(n: int) -> int:
    return (n + 15) & ~15


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _span(mgr: MemoryManager, address: int) -> tuple[int, int]:
    """The whole block (header included) that address is the payload of."""
    return address - HDR, address + mgr.size_of(address)


def _clean(mgr: MemoryManager) -> None:
    """check() passes and agrees with the O(1) counters."""
    rep = mgr.check()
    st = mgr.stats()
    assert rep.used == st.used
    assert rep.allocated_blocks == st.allocated_blocks
    assert rep.free_blocks == st.free_blocks
    assert rep.largest_free == st.largest_free_block
    assert rep.used + rep.allocated_blocks * HDR + rep.free_bytes == st.total


# ------------------------------------------------------------------------------- recycling


def test_freed_block_is_reused_by_next_fitting_request(mgr: MemoryManager) -> None:
    a = mgr.allocate(1000)
    guard = mgr.allocate(64)  # keeps a from merging into the free tail
    assert mgr.deallocate(a) >= 1000
    b = mgr.allocate(1000)
    assert b == a
    # a smaller request that fits the hole is also served from it
    mgr.deallocate(b)
    c = mgr.allocate(500)
    assert c == a
    mgr.deallocate(c)
    mgr.deallocate(guard)
    assert mgr.stats().used == 0
    _clean(mgr)


def test_recycling_many_times_does_not_grow_the_heap(mgr: MemoryManager) -> None:
    first = mgr.allocate(4096)
    guard = mgr.allocate(16)
    mgr.deallocate(first)
    for _ in range(1000):
        a = mgr.allocate(4096)
        assert a == first
        mgr.deallocate(a)
    st = mgr.stats()
    assert st.allocated_blocks == 1  # the guard
    assert st.free_blocks == 2  # the hole and the tail
    assert st.allocations == 1002 and st.deallocations == 1001
    mgr.deallocate(guard)
    _clean(mgr)


# ------------------------------------------------------------------------------- splitting


def test_free_4k_block_serves_1k_then_2k(mgr: MemoryManager) -> None:
    big = mgr.allocate(4096)
    guard = mgr.allocate(64)  # a live block right after it, so the hole stays a hole
    lo, hi = _span(mgr, big)
    assert mgr.size_of(big) == 4096
    assert guard - HDR == hi
    mgr.deallocate(big)
    free_before = mgr.check().free_blocks
    assert free_before == 2  # the 4 KiB hole and the tail

    one = mgr.allocate(1024)
    assert lo <= one - HDR and one + mgr.size_of(one) <= hi
    # the hole was split: a 1 KiB block and a free remainder (still 2 free blocks)
    assert mgr.check().free_blocks == 2
    two = mgr.allocate(2048)
    assert lo <= two - HDR and two + mgr.size_of(two) <= hi
    # the two blocks are disjoint
    assert one + mgr.size_of(one) <= two - HDR or two + mgr.size_of(two) <= one - HDR
    _clean(mgr)

    # what is left of the 4 KiB block is one free block holding exactly the rest
    rest = (hi - lo) - (mgr.size_of(one) + HDR) - (mgr.size_of(two) + HDR)
    assert rest >= 64
    three = mgr.allocate(rest - HDR)
    assert lo <= three - HDR and three + mgr.size_of(three) == hi
    assert mgr.check().free_blocks == 1  # only the tail is left
    for a in (one, two, three, guard):
        mgr.deallocate(a)
    assert mgr.check().free_blocks == 1
    _clean(mgr)


def test_split_leaves_3k_free_block(mgr: MemoryManager) -> None:
    big = mgr.allocate(4096)
    guard = mgr.allocate(64)
    mgr.deallocate(big)
    one = mgr.allocate(1024)
    assert one == big
    # the remainder (4 KiB - 1 KiB, less a header) is free and is handed out whole
    r = mgr.allocate(4096 - 1024 - HDR)
    assert r == one + 1024 + HDR
    assert r + mgr.size_of(r) == guard - HDR
    _clean(mgr)


# ------------------------------------------------------------------------------- coalescing


@pytest.mark.parametrize(
    "order", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
)
def test_three_adjacent_1k_blocks_coalesce(mgr: MemoryManager, order: tuple[int, int, int]) -> None:
    blocks = [mgr.allocate(1024) for _ in range(3)]
    guard = mgr.allocate(64)
    assert blocks[1] == blocks[0] + 1024 + HDR and blocks[2] == blocks[1] + 1024 + HDR
    assert guard == blocks[2] + 1024 + HDR
    before = mgr.stats()
    assert before.free_blocks == 1
    for i in order:
        mgr.deallocate(blocks[i])
    after = mgr.stats()
    rep = mgr.check()
    # one free block of 3 KiB plus two headers, and the tail
    assert rep.free_blocks == 2 and after.free_blocks == 2
    assert after.used == before.used - 3 * 1024
    assert after.allocated_blocks == before.allocated_blocks - 3
    # available grows by the three blocks, less the one header the merged free block keeps
    assert after.available == before.available + 3 * (1024 + HDR) - HDR
    # the merged block serves one request of exactly its size, at the first block's address
    merged = mgr.allocate(3 * 1024 + 2 * HDR)
    assert merged == blocks[0]
    assert mgr.size_of(merged) == 3 * 1024 + 2 * HDR
    assert mgr.stats().free_blocks == 1
    mgr.deallocate(merged)
    mgr.deallocate(guard)
    assert mgr.stats().free_blocks == 1 and mgr.stats().used == 0
    _clean(mgr)


def test_freeing_everything_coalesces_into_one_block(mgr: MemoryManager) -> None:
    rng = random.Random(7)
    addrs = [mgr.allocate(rng.randint(1, 20000)) for _ in range(300)]
    rng.shuffle(addrs)
    for a in addrs:
        mgr.deallocate(a)
    st = mgr.stats()
    assert st.used == 0 and st.allocated_blocks == 0 and st.free_blocks == 1
    assert st.largest_free_block == st.total - HDR == st.available
    _clean(mgr)


# ------------------------------------------------------------------------------- size classes


@pytest.mark.parametrize("size", SIZE_BOUNDARIES)
def test_size_class_boundary(mgr: MemoryManager, size: int) -> None:
    a = mgr.allocate(size)
    assert a > 0 and a % 16 == 0
    usable = mgr.size_of(a)
    assert usable >= size
    assert usable <= _round16(size) + 64  # no more than a rounding and an unsplittable remainder
    data = _pattern(size, size)
    assert mgr.write(a, data) == size
    assert mgr.read(a, size) == data
    with mgr.view(a, size) as v:
        copy = bytes(v)
    assert copy == data
    st = mgr.stats()
    assert st.used == usable and st.allocated_blocks == 1
    _clean(mgr)
    assert mgr.deallocate(a) == usable
    assert mgr.stats().used == 0
    _clean(mgr)


@pytest.mark.parametrize("size", SIZE_BOUNDARIES)
def test_size_class_boundary_from_recycled_holes(mgr: MemoryManager, size: int) -> None:
    """The same sizes served from the free lists (not the tail): holes of every class exist."""
    holes = []
    keep = []
    for s in SIZE_BOUNDARIES:
        holes.append(mgr.allocate(s))
        keep.append(mgr.allocate(16))
    for h in holes:
        mgr.deallocate(h)
    a = mgr.allocate(size)
    assert a % 16 == 0 and mgr.size_of(a) >= size
    data = _pattern(size, size + 1)
    mgr.write(a, data)
    for k in keep:  # neighbours are intact
        assert mgr.size_of(k) >= 16
    assert mgr.read(a, size) == data
    _clean(mgr)


def test_all_size_classes_live_together_do_not_overlap(mgr: MemoryManager) -> None:
    rng = random.Random(1)
    sizes = SIZE_BOUNDARIES * 3
    rng.shuffle(sizes)
    live: dict[int, bytes] = {}
    for i, s in enumerate(sizes):
        a = mgr.allocate(s)
        live[a] = _pattern(s, i)
        mgr.write(a, live[a])
    spans = sorted(_span(mgr, a) for a in live)
    for (_, hi), (lo, _) in itertools.pairwise(spans):
        assert hi <= lo
    for a, d in live.items():
        assert mgr.read(a, len(d)) == d
    assert mgr.stats().used == sum(mgr.size_of(a) for a in live)
    _clean(mgr)
    for a in live:
        mgr.deallocate(a)
    assert mgr.stats().used == 0
    _clean(mgr)


# ------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("align", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_power_of_two_alignment(mgr: MemoryManager, align: int) -> None:
    # make the free block's start unaligned for every alignment above 16 first
    pre = mgr.allocate(48)
    mgr.write(pre, b"p" * 48)
    addrs = []
    for size in (1, 100, 4096, 5000):
        a = mgr.allocate(size, align=align)
        assert a % align == 0
        assert mgr.size_of(a) >= size
        mgr.write(a, b"\x5a" * size)
        addrs.append(a)
        _clean(mgr)
    assert mgr.read(pre, 48) == b"p" * 48
    for a in addrs:
        assert mgr.read(a, 1) == b"\x5a"
        mgr.deallocate(a)
    mgr.deallocate(pre)
    st = mgr.stats()
    assert st.used == 0 and st.free_blocks == 1  # the front remainders were merged back
    _clean(mgr)


@pytest.mark.parametrize("align", [3, 12, 24, 48, 100, 4095, 5000])
def test_non_power_of_two_alignment_is_refused(mgr: MemoryManager, align: int) -> None:
    before = mgr.stats()
    with pytest.raises(AlignmentError) as ei:
        mgr.allocate(100, align=align)
    assert ei.value.alignment == align
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, ShmallocError)
    assert mgr.stats() == before


@pytest.mark.parametrize("align", [8192, 1 << 20, 0, -1, -16, -4096])
def test_out_of_range_alignment_is_refused(mgr: MemoryManager, align: int) -> None:
    before = mgr.stats()
    with pytest.raises(AlignmentError) as ei:
        mgr.allocate(100, align=align)
    assert ei.value.alignment == align
    assert mgr.stats() == before


@pytest.mark.parametrize("align", [32.0, "32", True, b"\x20", [32]])
def test_non_int_alignment_is_type_error(mgr: MemoryManager, align: object) -> None:
    before = mgr.stats()
    with pytest.raises(TypeError):
        mgr.allocate(100, align=align)  # type: ignore[arg-type]
    assert mgr.stats() == before


# ------------------------------------------------------------------------------- access


def test_write_read_offsets_and_lengths(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    n = mgr.size_of(a)
    assert n >= 100 and len(mgr.read(a)) == n
    assert mgr.write(a, b"hello") == 5
    assert mgr.write(a, b"world", offset=10) == 5
    assert mgr.read(a, 5) == b"hello"
    assert mgr.read(a, 5, offset=10) == b"world"
    assert mgr.read(a, 0) == b""
    assert mgr.read(a, 0, offset=n) == b""
    assert len(mgr.read(a)) == n  # n=None: to the block's end
    assert len(mgr.read(a, offset=10)) == n - 10
    assert mgr.read(a, offset=10)[:5] == b"world"
    # the last byte is writable and readable
    assert mgr.write(a, b"Z", offset=n - 1) == 1
    assert mgr.read(a, 1, offset=n - 1) == b"Z"
    # any contiguous buffer is accepted as data
    assert mgr.write(a, bytearray(b"ba")) == 2
    assert mgr.write(a, memoryview(b"mv"), offset=2) == 2
    import array

    arr = array.array("i", [1, 2])
    assert mgr.write(a, arr, offset=16) == arr.itemsize * 2
    assert mgr.read(a, 4) == b"bamv"
    assert mgr.read(a, 8, offset=16) == arr.tobytes()


def test_writes_do_not_touch_neighbours(mgr: MemoryManager) -> None:
    left, mid, right = (mgr.allocate(64) for _ in range(3))
    mgr.write(left, b"L" * mgr.size_of(left))
    mgr.write(right, b"R" * mgr.size_of(right))
    mgr.write(mid, b"M" * mgr.size_of(mid))
    assert mgr.read(left) == b"L" * mgr.size_of(left)
    assert mgr.read(right) == b"R" * mgr.size_of(right)
    _clean(mgr)


def test_view_is_zero_copy_both_ways(mgr: MemoryManager) -> None:
    a = mgr.allocate(256)
    with mgr.view(a) as v:
        assert len(v) == mgr.size_of(a) and not v.readonly
        v[0:3] = b"abc"
        assert mgr.read(a, 3) == b"abc"
        mgr.write(a, b"xyz", offset=100)
        assert bytes(v[100:103]) == b"xyz"
        with mgr.view(a, 10, offset=20) as part:
            assert len(part) == 10
            part[:] = b"0123456789"
        assert mgr.read(a, 10, offset=20) == b"0123456789"


def test_view_from_another_manager_sees_same_bytes(mgr: MemoryManager) -> None:
    other = MemoryManager.attach(mgr.name)
    try:
        a = mgr.allocate(32)
        with other.view(a) as v:
            mgr.write(a, b"shared!")
            assert bytes(v[:7]) == b"shared!"
        assert other.size_of(a) == mgr.size_of(a)
    finally:
        other.close()


def test_seal(mgr: MemoryManager) -> None:
    a = mgr.allocate(64)
    mgr.write(a, b"frozen")
    assert mgr.seal(a) is None
    with pytest.raises(ProtectionViolation) as ei:
        mgr.write(a, b"thawed")
    assert ei.value.address == a
    with pytest.raises(ProtectionViolation):
        mgr.write(a, b"x", offset=10)
    assert mgr.read(a, 6) == b"frozen"
    with mgr.view(a) as v:
        assert v.readonly
        with pytest.raises(TypeError):
            v[0] = 0
    mgr.seal(a)  # sealing twice is harmless
    assert mgr.read(a, 6) == b"frozen"
    # other blocks are unaffected
    b = mgr.allocate(64)
    assert mgr.write(b, b"ok") == 2
    # a sealed block may still be freed, and its space comes back unsealed
    size = mgr.size_of(a)
    assert mgr.deallocate(a) == size
    c = mgr.allocate(64)
    assert c == a
    assert mgr.write(c, b"fresh") == 5
    with mgr.view(c) as v:
        assert not v.readonly
    _clean(mgr)


def test_seal_is_seen_by_other_process_manager(mgr: MemoryManager) -> None:
    other = MemoryManager.attach(mgr.name)
    try:
        a = mgr.allocate(64)
        other.seal(a)
        with pytest.raises(ProtectionViolation):
            mgr.write(a, b"x")
    finally:
        other.close()


def test_size_of(mgr: MemoryManager) -> None:
    for n in (1, 16, 17, 100, 1000, 10000):
        a = mgr.allocate(n)
        assert mgr.size_of(a) >= max(n, 16)
        assert mgr.size_of(a) % 16 == 0
        assert mgr.size_of(a) == mgr.deallocate(a)


def test_allocate_guarded_frees_on_exit(mgr: MemoryManager) -> None:
    with mgr.allocate_guarded(4096) as g:
        assert isinstance(g, MemoryGuard)
        assert g.address % 16 == 0
        assert g.size == mgr.size_of(g.address) >= 4096
        assert mgr.stats().used == g.size
        with g.view() as v:
            v[:4] = b"abcd"
        assert g.read(4) == b"abcd"
        assert g.write(b"xy", offset=2) == 2
        assert mgr.read(g.address, 4) == b"abxy"
        addr = g.address
    assert mgr.stats().used == 0
    with pytest.raises(InvalidAddress):
        mgr.size_of(addr)
    with pytest.raises(ValueError):
        _ = g.address
    _clean(mgr)


def test_allocate_guarded_frees_on_exception(mgr: MemoryManager) -> None:
    with pytest.raises(RuntimeError), mgr.allocate_guarded(100):
        assert mgr.stats().used > 0
        raise RuntimeError("boom")
    assert mgr.stats().used == 0
    assert mgr.stats().allocated_blocks == 0


def test_allocate_guarded_release_keeps_block(mgr: MemoryManager) -> None:
    with mgr.allocate_guarded(100) as g:
        g.write(b"kept")
        addr = g.release()
    assert mgr.read(addr, 4) == b"kept"
    assert mgr.stats().allocated_blocks == 1
    assert g.free() == 0  # a released guard frees nothing
    assert mgr.size_of(addr) >= 100
    mgr.deallocate(addr)
    assert mgr.stats().used == 0


def test_allocate_guarded_free_now(mgr: MemoryManager) -> None:
    g = mgr.allocate_guarded(100)
    size = g.size
    assert g.free() == size
    assert g.free() == 0
    assert mgr.stats().used == 0


# ------------------------------------------------------------------------------- statistics


def test_stats_of_a_fresh_arena(mgr: MemoryManager) -> None:
    st = mgr.stats()
    assert isinstance(st, MemoryStats)
    assert st.used == 0 and st.peak == 0
    assert st.allocated_blocks == 0 and st.free_blocks == 1
    assert st.allocations == 0 and st.deallocations == 0
    assert 0 < st.total < mgr.capacity
    assert st.available == st.total - HDR == st.largest_free_block
    assert st.usage_percentage() == pytest.approx(100.0 * HDR / st.total)
    assert st.memory_pressure() is MemoryPressure.LOW
    assert st.fragmentation_ratio() == 0.0


def test_stats_track_allocations(mgr: MemoryManager) -> None:
    sizes = [10, 100, 1000, 10000, 100000]
    addrs = [mgr.allocate(s) for s in sizes]
    st = mgr.stats()
    used = sum(mgr.size_of(a) for a in addrs)
    assert st.used == used
    assert st.peak == used
    assert st.allocated_blocks == len(sizes)
    assert st.allocations == len(sizes) and st.deallocations == 0
    assert st.used + st.available + HDR * (st.allocated_blocks + st.free_blocks) == st.total
    big = addrs.pop()
    freed = mgr.deallocate(big)
    st2 = mgr.stats()
    assert st2.used == used - freed
    assert st2.peak == used  # the high-water mark stays
    assert st2.deallocations == 1 and st2.allocations == len(sizes)
    assert st2.allocated_blocks == len(sizes) - 1
    for a in addrs:
        mgr.deallocate(a)
    st3 = mgr.stats()
    assert st3.used == 0 and st3.peak == used and st3.deallocations == len(sizes)
    _clean(mgr)


def test_usage_percentage_and_pressure_from_real_arena(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 1 * MiB)
    try:
        st = m.stats()
        blocks = []
        seen = []
        # fill in 5 % steps and watch pressure go up monotonically
        step = st.total // 20
        while True:
            try:
                blocks.append(m.allocate(step))
            except MemoryError:
                break
            s = m.stats()
            pct = s.usage_percentage()
            assert pct == pytest.approx(100.0 * (s.total - s.available) / s.total)
            assert s.memory_pressure() is MemoryPressure.from_percentage(pct)
            seen.append(s.memory_pressure())
        assert seen == sorted(seen)
        assert MemoryPressure.LOW in seen and MemoryPressure.HIGH in seen
        # take the rest exactly: usage 100 %, CRITICAL, nothing free
        rest = m.stats().available
        if rest:
            blocks.append(m.allocate(rest))
        full = m.stats()
        assert full.available == 0 and full.free_blocks == 0
        assert full.usage_percentage() == 100.0
        assert full.memory_pressure() is MemoryPressure.CRITICAL
        assert full.fragmentation_ratio() == 0.0
        for b in blocks:
            m.deallocate(b)
        assert m.stats().memory_pressure() is MemoryPressure.LOW
        _clean(m)
    finally:
        m.close()
        m.destroy()


@pytest.mark.parametrize(
    "pct,level",
    [
        (0.0, MemoryPressure.LOW),
        (59.99, MemoryPressure.LOW),
        (60.0, MemoryPressure.MEDIUM),
        (79.99, MemoryPressure.MEDIUM),
        (80.0, MemoryPressure.HIGH),
        (94.99, MemoryPressure.HIGH),
        (95.0, MemoryPressure.CRITICAL),
        (100.0, MemoryPressure.CRITICAL),
    ],
)
def test_pressure_thresholds(pct: float, level: MemoryPressure) -> None:
    total = 1_000_000
    available = round(total * (1 - pct / 100))
    st = MemoryStats(
        total=total,
        used=total - available,
        available=available,
        peak=total - available,
        allocated_blocks=1,
        free_blocks=1,
        allocations=1,
        deallocations=0,
        largest_free_block=available,
    )
    assert st.usage_percentage() == pytest.approx(pct)
    assert st.memory_pressure() is level
    assert MemoryPressure.from_percentage(pct) is level
    assert (
        MemoryPressure.LOW < MemoryPressure.MEDIUM < MemoryPressure.HIGH < MemoryPressure.CRITICAL
    )


def test_fragmentation_ratio(mgr: MemoryManager) -> None:
    assert mgr.stats().fragmentation_ratio() == 0.0
    # holes of 1 KiB between live blocks, then the tail
    pairs = [(mgr.allocate(1024), mgr.allocate(16)) for _ in range(50)]
    for hole, _ in pairs:
        mgr.deallocate(hole)
    st = mgr.stats()
    rep = mgr.check()
    assert st.free_blocks == 51 == rep.free_blocks
    assert st.largest_free_block == rep.largest_free
    expected = 1.0 - st.largest_free_block / st.available
    assert st.fragmentation_ratio() == pytest.approx(expected)
    assert 0.0 < st.fragmentation_ratio() < 1.0
    # a 50-hole arena is more fragmented than a 1-hole arena
    for _, keep in pairs:
        mgr.deallocate(keep)
    assert mgr.stats().fragmentation_ratio() == 0.0
    assert mgr.stats().free_blocks == 1


def test_fragmentation_ratio_values() -> None:
    def stats(available: int, largest: int) -> MemoryStats:
        return MemoryStats(
            total=1000,
            used=1000 - available,
            available=available,
            peak=0,
            allocated_blocks=0,
            free_blocks=2,
            allocations=0,
            deallocations=0,
            largest_free_block=largest,
        )

    assert stats(0, 0).fragmentation_ratio() == 0.0
    assert stats(100, 100).fragmentation_ratio() == 0.0
    assert stats(100, 25).fragmentation_ratio() == pytest.approx(0.75)
    assert stats(400, 100).fragmentation_ratio() == pytest.approx(0.75)


def test_stats_agree_across_attached_managers(mgr: MemoryManager) -> None:
    other = MemoryManager.attach(mgr.name)
    try:
        a = mgr.allocate(5000)
        assert other.stats() == mgr.stats()
        other.deallocate(a)
        assert mgr.stats().used == 0 and mgr.stats().deallocations == 1
    finally:
        other.close()


def test_allocate_returns_address_in_heap(mgr: MemoryManager) -> None:
    st = mgr.stats()
    header = mgr.capacity - st.total
    a = mgr.allocate(1)
    assert header + HDR <= a < mgr.capacity
    assert a > 0
    assert os.path.exists(f"/dev/shm/{mgr.name}")


def test_fitting_free_block_deep_in_its_bin_is_found(arena_name: str) -> None:
    """A freed block serves the next request it fits, even when many smaller free blocks of the
    same size class sit in front of it: OutOfMemory ("no free block large enough") while
    largest_free_block >= the request would be a false out-of-memory."""
    m = MemoryManager.create(arena_name, 1 * MiB)
    try:
        big = m.allocate(8000)
        m.allocate(16)
        holes = []
        for _ in range(9):
            holes.append(m.allocate(4096))
            m.allocate(16)
        # use up the rest of the heap so the only free space is the holes made below
        while m.stats().available:
            m.allocate(m.stats().largest_free_block)
        m.deallocate(big)  # first into its bin: it ends up behind the nine 4 KiB holes
        for h in holes:
            m.deallocate(h)
        st = m.stats()
        assert st.largest_free_block == 8000
        a = m.allocate(7000)  # fits the 8000-byte hole
        assert a == big
        _clean(m)
    finally:
        m.close()
        m.destroy()
