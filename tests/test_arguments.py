"""Arguments: any integer-like value (``operator.index``, e.g. numpy integers) is taken where an
int is, values out of range are ValueError (never a bare OverflowError), and the messages about
them read right."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shmalloc import (
    AlignmentError,
    GcStrategy,
    GlobalGarbageCollector,
    InvalidAddress,
    MemoryManager,
    compat,
)

I = np.int64  # noqa: E741 - short for the many numpy integers below


def test_numpy_integers_across_the_public_api(mgr: MemoryManager) -> None:
    a = mgr.allocate(I(100))
    assert mgr.size_of(I(a)) >= 100
    assert mgr.write(I(a), b"hello", I(3)) == 5
    assert mgr.read(I(a), I(5), I(3)) == b"hello"
    assert mgr.read(np.uint64(a), np.int32(2), np.int8(3)) == b"he"
    assert bytes(mgr.view(I(a), I(2), I(3))) == b"he"
    b = mgr.allocate(np.uint32(64), I(os.getpid()), align=I(256))
    assert b % 256 == 0
    assert mgr.block_info(I(b)).size >= 64
    mgr.retain(I(b))
    assert mgr.release(I(b)) is False
    mgr.seal(I(b))
    arr = mgr.ndarray(I(b), I(4), "u1")
    assert arr.shape == (4,)
    assert mgr.ndarray(I(b), (I(2), np.int16(2)), "u1").shape == (2, 2)
    mgr.bind("numpy-int", I(b))
    mgr.unbind("numpy-int")
    del arr
    assert mgr.deallocate(I(b)) >= 64
    mgr.set_process_limit(I(os.getpid()), I(1 << 20))
    assert mgr.processes()[0].limit == 1 << 20
    mgr.set_process_limit(os.getpid(), None)
    assert mgr.process_memory(I(os.getpid())) > 0
    assert mgr.process_peak(I(os.getpid())) > 0
    assert [x.address for x in mgr.process_allocations(I(os.getpid()))] == [a]
    mgr.request_trim(I(os.getpid()))
    mgr.set_cache_limit(I(1 << 16))
    mgr.set_threshold(I(10))
    mgr.deallocate(a)
    gc = GlobalGarbageCollector(mgr)
    gc.set_threshold(I(5))
    assert GcStrategy.targeted(I(os.getpid())).pid == os.getpid()
    assert type(GcStrategy.targeted(I(os.getpid())).pid) is int
    assert GcStrategy.threshold(np.uint16(10)).nbytes == 10
    gc.collect(GcStrategy.threshold(I(1 << 30)))


def test_numpy_integers_create_arenas(arena_name: str) -> None:
    with MemoryManager(I(1 << 20)) as m:
        assert m.capacity == 1 << 20
    m = MemoryManager.create(arena_name, I(1 << 20), mode=I(0o600), cache_limit=I(0))
    try:
        assert m.cache_limit == 0
    finally:
        m.close()
        m.destroy()


def test_numpy_integers_in_compat(mgr: MemoryManager) -> None:
    shm = compat.SharedMemory(create=True, size=I(100), arena=mgr)
    try:
        assert shm.size == 100 and type(shm.size) is int
        other = compat.SharedMemory(shm.name, size=I(0), arena=mgr)
        other.close()
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("bad", [True, 1.0, "1", None, np.float64(1.0), np.bool_(True)])
def test_non_integers_are_type_errors(mgr: MemoryManager, bad: object) -> None:
    if bad is None:  # None means "to the end" for n, and "no limit" for a process limit
        with pytest.raises(TypeError):
            mgr.allocate(bad)  # type: ignore[arg-type]
        return
    a = mgr.allocate(16)
    for call in (
        lambda: mgr.allocate(bad),  # type: ignore[arg-type]
        lambda: mgr.size_of(bad),  # type: ignore[arg-type]
        lambda: mgr.read(a, 1, bad),  # type: ignore[arg-type]
        lambda: mgr.read(a, bad),  # type: ignore[arg-type]
        lambda: mgr.set_process_limit(os.getpid(), bad),  # type: ignore[arg-type]
        lambda: GcStrategy.targeted(bad),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError):
            call()


def test_huge_values_are_value_errors_not_overflow(mgr: MemoryManager) -> None:
    with pytest.raises(AlignmentError) as ei:
        mgr.allocate(64, align=2**64)
    assert ei.value.alignment == 2**64
    with pytest.raises(AlignmentError):
        mgr.allocate(64, align=2**200)
    with pytest.raises(ValueError, match="below 2\\*\\*64"):
        mgr.set_process_limit(os.getpid(), 2**64)
    with pytest.raises(InvalidAddress):
        mgr.deallocate(I(-1))
    with pytest.raises(InvalidAddress):
        mgr.read(2**64)
    with pytest.raises(ValueError):
        mgr.set_process_limit(2**64, 100)
    mgr.set_process_limit(os.getpid(), 2**64 - 1)  # the largest limit there is


def test_read_messages(mgr: MemoryManager) -> None:
    a = mgr.allocate(16)
    end = mgr.size_of(a)
    with pytest.raises(ValueError, match=r"^n must be >= 0"):
        mgr.read(a, -1)
    with pytest.raises(ValueError, match=rf"^1 byte at offset {end} cross"):
        mgr.read(a, 1, end)
    with pytest.raises(ValueError, match=rf"^2 bytes at offset {end - 1} cross"):
        mgr.read(a, 2, end - 1)
