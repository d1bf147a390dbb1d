"""The ndarray hand-off: share_array() copies once into the arena, the handle pickles small, and
another process (spawn or fork) opens the same memory: what it writes, the producer sees."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from children import TIMEOUT, run_child

from shmalloc import GlobalGarbageCollector, InvalidAddress, MemoryManager
from shmalloc.arrays import SharedArray, share_array

REPO_ROOT = Path(__file__).resolve().parent.parent
KiB, MiB = 1 << 10, 1 << 20


def _consume(handle: SharedArray, expected_sum: float, conn: Any) -> None:
    """Child: open the handle (attaching to its arena by name), check it, write into it."""
    a = handle.open()
    conn.send((a.shape, str(a.dtype), float(a.sum()) == expected_sum, a.flags.writeable))
    a *= -1  # in place: the producer sees it only if this is the producer's memory
    a.flat[0] = 12345
    del a
    conn.close()


def _produce(arena: str, persist: bool, conn: Any) -> None:
    """Child: share an array, hand back the handle, and end."""
    m = MemoryManager.attach(arena)
    h = share_array(m, np.arange(1000, dtype=np.int32), persist=persist)
    conn.send(h)
    conn.close()


@pytest.mark.parametrize("nbytes", [64 * KiB, 1 * MiB])
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_gets_the_same_array_without_copying(
    mgr: MemoryManager, nbytes: int, method: str
) -> None:
    src = np.random.default_rng(nbytes).standard_normal(nbytes // 8)
    h = share_array(mgr, src)
    assert len(pickle.dumps(h)) < 300  # whatever the array's size
    [(shape, dtype, same, writeable)] = run_child(method, _consume, h, float(src.sum()))
    assert (shape, dtype, same, writeable) == (src.shape, "float64", True, True)
    mine = h.open(mgr)
    expected = -src
    expected[0] = 12345
    assert np.array_equal(mine, expected)  # the child's writes, seen in place
    del mine
    assert h.free(mgr) >= nbytes


def test_open_is_zero_copy_and_share_is_one_copy(mgr: MemoryManager) -> None:
    src = np.arange(64 * KiB // 4, dtype=np.float32)
    h = share_array(mgr, src)
    a, b = h.open(mgr), h.asarray(mgr)
    assert np.shares_memory(a, b)
    assert not np.shares_memory(a, src)
    a[7] = -1
    assert b[7] == -1 and src[7] == 7
    assert mgr.read(h.address, 4, 7 * 4) == np.float32(-1).tobytes()
    del a, b
    h.free(mgr)
    with pytest.raises(InvalidAddress):
        mgr.size_of(h.address)


@pytest.mark.parametrize(
    "src",
    [
        np.asfortranarray(np.arange(24.0).reshape(4, 6)),
        np.arange(40).reshape(5, 8)[:, ::3],  # not contiguous: stored C-contiguous
        np.zeros(4, dtype=[("id", "<i4"), ("xy", ">f8", (2,))]),
        np.array(3.5),
        np.zeros((0, 7), dtype=np.uint16),
        np.arange(10, dtype=">i2"),
        np.array([b"ab", b"cde"]),
    ],
    ids=["fortran", "strided", "structured", "0-d", "empty", "big-endian", "bytes"],
)
def test_layouts_and_dtypes_survive(mgr: MemoryManager, src: Any) -> None:
    h = pickle.loads(pickle.dumps(share_array(mgr, src)))
    a = h.open(mgr)
    assert a.shape == src.shape and a.dtype == src.dtype
    assert np.array_equal(a, src)
    if src.ndim > 1 and src.flags.f_contiguous and not src.flags.c_contiguous:
        assert h.order == "F" and a.flags.f_contiguous
    else:
        assert h.order == "C" and a.flags.c_contiguous
    del a
    h.free(mgr)


def test_arrays_of_objects_are_refused(mgr: MemoryManager) -> None:
    with pytest.raises(TypeError, match="Python objects"):
        share_array(mgr, np.array([object(), 1]))
    assert mgr.all_blocks() == []


def test_a_handle_refuses_another_arena(mgr: MemoryManager) -> None:
    h = share_array(mgr, np.ones(3))
    with MemoryManager(1 << 20) as other, pytest.raises(ValueError, match="lives in arena"):
        h.open(other)
    h.free(mgr)


@pytest.mark.parametrize("persist", [False, True])
def test_a_producer_that_ends_leaves_a_received_handle_usable(
    mgr: MemoryManager, persist: bool
) -> None:
    [h] = run_child("spawn", _produce, mgr.name, persist)  # the producer has ended
    mgr.collect()
    GlobalGarbageCollector(mgr).collect()
    a = h.open(mgr)  # the received handle pinned the block: no collection freed it
    assert np.array_equal(a, np.arange(1000, dtype=np.int32))
    del a
    if persist:
        h.free(mgr)
    else:  # orphaned: the last pin (this handle) frees it as it goes
        del h
        gc.collect()
        assert mgr.stats().allocated_blocks == 0


def _blocks(mgr: MemoryManager) -> set[int]:
    return {b.address for b in mgr.all_blocks()}


def test_an_opened_view_outlives_its_producer_and_every_collection(mgr: MemoryManager) -> None:
    """The producer shares and ends; this process keeps only a view of what it opened: no
    collection frees the block under it, new allocations do not land on it, and the block is
    freed once the last view goes."""
    [h] = run_child("spawn", _produce, mgr.name, False)
    a = h.open(mgr)
    del h  # only the array pins the block now
    gc.collect()
    view = a[10:20][::-1]
    raw = memoryview(a[500:])
    del a
    gc.collect()
    assert mgr.collect() == 0
    stats = GlobalGarbageCollector(mgr).collect()
    assert stats.freed_blocks == 0
    pinned = _blocks(mgr)
    fresh = [mgr.allocate(4000) for _ in range(50)]
    for x in fresh:
        mgr.write(x, b"\xff" * 4000)
    assert list(view) == list(range(19, 9, -1))
    assert np.frombuffer(raw, dtype=np.int32)[0] == 500
    assert pinned <= _blocks(mgr)
    del view
    assert pinned <= _blocks(mgr)  # raw still pins it
    raw.release()
    del raw
    gc.collect()
    assert _blocks(mgr) == set(fresh)  # freed with its last view, at once
    for x in fresh:
        mgr.deallocate(x)
    mgr.check()


def _pool_share(arena: str, seed: int) -> SharedArray:
    m = MemoryManager.attach(arena)
    return share_array(m, np.full(256, seed, dtype=np.float64))


def test_pool_results_survive_the_workers_without_persist(mgr: MemoryManager) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        handles = pool.starmap(_pool_share, [(mgr.name, i) for i in range(4)])
        pool.close()
        pool.join()  # every worker has ended
    mgr.collect()
    GlobalGarbageCollector(mgr).collect()
    arrays = [h.open(mgr) for h in handles]
    assert [float(x[0]) for x in arrays] == [0.0, 1.0, 2.0, 3.0]
    del arrays, handles
    gc.collect()
    assert mgr.stats().allocated_blocks == 0


def test_a_fork_child_does_not_release_the_parents_pin(mgr: MemoryManager) -> None:
    h = share_array(mgr, np.arange(8))
    a = h.open(mgr)
    pid = os.fork()
    if pid == 0:  # the child drops its copy of the array, then leaves
        del a
        gc.collect()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    used = mgr.stats().used
    h.free(mgr)  # the producer's hold goes: only this process's view keeps the memory now
    mgr.collect()
    filler = [mgr.allocate(64) for _ in range(64)]
    assert list(a) == list(range(8)) and mgr.stats().used >= used  # still pinned here
    del a
    gc.collect()
    for f in filler:
        mgr.deallocate(f)
    assert mgr.stats().used < used  # the last view went: freed at once, no collection


def _produce_and_wait(arena: str, conn: Any) -> None:
    """Child: share an array, hand back the handle, end when told."""
    m = MemoryManager.attach(arena)
    conn.send(share_array(m, np.arange(5)))
    conn.recv()


def test_a_consumer_can_adopt_the_array(mgr: MemoryManager) -> None:
    """adopt=True: the consumer holds the array, which then outlives its producer (arrays are
    objects, held by processes rather than owned: see shmalloc.arrays)."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_produce_and_wait, args=(mgr.name, there))
    child.start()
    h = here.recv()
    a = h.open(mgr, adopt=True)
    del a
    here.send("end")
    child.join(TIMEOUT)
    assert child.exitcode == 0
    mgr.collect()
    assert np.array_equal(h.open(mgr), np.arange(5))
    h.free(mgr)
    with pytest.raises(InvalidAddress):
        h.open(mgr)


def test_without_numpy_the_error_says_what_to_install(mgr: MemoryManager) -> None:
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None  # as if numpy were not installed\n"
        "from shmalloc import MemoryManager\n"
        "from shmalloc.arrays import share_array\n"
        "m = MemoryManager.attach(sys.argv[1])\n"
        "try:\n"
        "    share_array(m, [1, 2])\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, mgr.name],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'shmalloc[numpy]'" in out.stdout
