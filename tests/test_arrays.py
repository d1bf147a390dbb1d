"""The ndarray hand-off: share_array() copies once into the arena, the handle pickles small, and
another process (spawn or fork) opens the same memory: what it writes, the producer sees."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from children import TIMEOUT, run_child

from shmalloc import InvalidAddress, MemoryManager
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
def test_a_producer_that_ends_leaves_its_block_to_the_collector_unless_persistent(
    mgr: MemoryManager, persist: bool
) -> None:
    [h] = run_child("spawn", _produce, mgr.name, persist)
    mgr.collect()
    if persist:
        a = h.open(mgr)
        assert np.array_equal(a, np.arange(1000, dtype=np.int32))
        del a
        h.free(mgr)
    else:
        with pytest.raises(InvalidAddress):
            h.open(mgr)


def _produce_and_wait(arena: str, conn: Any) -> None:
    """Child: share an array, hand back the handle, end when told."""
    m = MemoryManager.attach(arena)
    conn.send(share_array(m, np.arange(5)))
    conn.recv()


def test_a_consumer_can_adopt_the_array(mgr: MemoryManager) -> None:
    """adopt=True: the consumer holds the array, which then outlives its producer (arrays are
    objects, held by processes rather than owned: see shmalloc.arrays)."""
    ctx = multiprocessing.get_context("spawn")
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
