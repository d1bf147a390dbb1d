"""Objects in the arena: put/get round trips, zero-copy values, and the lifetime rule of the
objects section, with real processes (spawn and fork) and kill -9."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from children import TIMEOUT

from shmalloc import InvalidAddress, MemoryManager, ObjectNotFound, ObjectRef
from shmalloc import _binding as C
from shmalloc.manager import attachment_of

MiB = 1 << 20
METHODS = ["spawn", "fork"]


def _live(m: MemoryManager) -> int:
    """Objects alive in the arena."""
    return C.objects_info(attachment_of(m).handle()).live


def _sample() -> dict[str, Any]:
    return {
        "matrix": np.arange(60_000, dtype=np.float64).reshape(200, 300),
        "fortran": np.asfortranarray(np.arange(4096.0).reshape(64, 64)),
        "ints": np.arange(10, dtype=">i2"),  # small: in the pickle stream
        "blob": b"\x00\x01" * 3000,
        "nested": {"name": "run 3", "tags": ("a", "b"), "n": 7, "none": None},
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))
    return bool(a == b)


def _shares_arena(m: MemoryManager, arr: Any) -> bool:
    return bool(np.shares_memory(arr, np.frombuffer(attachment_of(m).mm, dtype=np.uint8)))


# ---------------------------------------------------------------- children


def _producer(arena: str, q: Any, name: str | None) -> None:
    """Put the sample, hand the reference on, exit at once."""
    m = MemoryManager.attach(arena)
    q.put(m.put(_sample(), name=name))


def _holder(arena: str, q: Any, conn: Any) -> None:
    """Take a reference from the queue, get its value, report, and hold it until killed."""
    m = MemoryManager.attach(arena)
    value = m.get(q.get(timeout=TIMEOUT))
    conn.send((_shares_arena(m, value["matrix"]), value["matrix"].flags.writeable))
    conn.recv()


def _waiter(arena: str, name: str, conn: Any) -> None:
    """Wait for a name to be bound; send what was found and how long the wait took."""
    m = MemoryManager.attach(arena)
    conn.send("waiting")
    t0 = time.monotonic()
    value = m.get(name, timeout=TIMEOUT)
    conn.send((value, time.monotonic() - t0))


def _check_in_place(arena: str, ref: ObjectRef, conn: Any) -> None:
    m = MemoryManager.attach(arena)
    a = m.get(ref)
    conn.send((a.tolist(), a.flags.writeable, _shares_arena(m, a)))


def _start(method: str, target: Any, *args: Any) -> Any:
    p = multiprocessing.get_context(method).Process(target=target, args=args)
    p.start()
    return p


def _finish(p: Any) -> None:
    p.join(TIMEOUT)
    assert p.exitcode == 0, f"child exited with {p.exitcode}"


# ---------------------------------------------------------------- round trips, zero-copy


def test_round_trip_and_zero_copy(mgr: MemoryManager) -> None:
    src = _sample()
    ref = mgr.put(src)
    value = mgr.get(ref)
    assert _same(value, src)
    big = value["matrix"]
    assert _shares_arena(mgr, big) and not big.flags.writeable
    assert value["fortran"].flags.f_contiguous and _shares_arena(mgr, value["fortran"])
    with pytest.raises(ValueError, match="read-only"):
        big[0, 0] = 1
    assert ref.nbytes >= src["matrix"].nbytes
    for plain in [b"bytes" * 1000, "text", 12, [1, {2: 3}], None, bytearray(b"x" * 5000)]:
        assert mgr.get(mgr.put(plain)) == plain


@pytest.mark.parametrize("cores", ["all", "one"])
def test_a_large_buffer_goes_in_whole_however_its_copy_is_split(
    mgr: MemoryManager, cores: str
) -> None:
    # 16 MiB and up is streamed in one part per usable core (native/copy.c), from the first
    # 16-aligned destination byte, parts split on destination cache lines; the odd length and
    # offsets leave heads and tails to copy plainly. Pinned to one core, the copy is one part.
    blob = np.random.default_rng(3).integers(0, 256, 20 * MiB + 13, dtype=np.uint8)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if cores == "one":
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # this thread only
            for src in (blob, blob[1:]):  # the source aligned as numpy makes it, and not
                got = mgr.get(ref := mgr.put(src))
                assert _shares_arena(mgr, got) and np.array_equal(got, src)
                del got
                mgr.delete(ref)
            data = blob.tobytes()  # (write hands only bytes to the C core's copy)
            address = mgr.allocate(len(data) + 16)
            for offset in (1, 8, 15):  # the destination's head: 15, 8 and 1 bytes
                assert mgr.write(address, data, offset=offset) == len(data)
                assert mgr.read(address, len(data), offset=offset) == data
            mgr.deallocate(address)
        except BaseException as e:  # reported by the test's thread below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


_FAULTING_PUT = """
import mmap, resource, sys
import numpy as np
from shmalloc import MemoryManager
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the fault below
path, name = sys.argv[1], sys.argv[2]
with open(path, "wb") as f:
    f.truncate(32 << 20)
with open(path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 32 << 20)
    f.truncate((16 << 20) + 4096)  # pages past these are gone: reading them raises SIGBUS
src = np.frombuffer(mm, dtype=np.uint8)
mgr = MemoryManager.attach(name)
print("putting", flush=True)
mgr.put(src)  # in 2-4 parts: the caller's (the first, up to 16 MiB and a cache line) is all
# readable, and a helper's part faults
"""


def test_a_fault_in_a_copy_helper_is_reported_like_one_in_the_caller(
    mgr: MemoryManager, tmp_path: Any
) -> None:
    """A large copy's helper threads leave the fault signals unblocked: a helper that reads a
    truncated file gets SIGBUS, and faulthandler reports it before the process dies (a blocked
    SIGBUS would kill the process silently)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable core: the copy is not split")
    path = str(tmp_path / "truncated")
    args = [sys.executable, "-X", "faulthandler", "-c", _FAULTING_PUT, path, mgr.name]
    # under CI's ASan pass, ASan's own SIGBUS handler would end the child another way
    asan = os.environ.get("ASAN_OPTIONS", "") + ":handle_sigbus=0"
    env = {**os.environ, "ASAN_OPTIONS": asan}
    run = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert run.returncode == -signal.SIGBUS, (run.returncode, run.stderr[-2000:])
    assert "putting" in run.stdout and "Fatal Python error: Bus error" in run.stderr
    # faulthandler names a "Current thread" only when a Python thread faulted: a helper did
    assert "Current thread" not in run.stderr, run.stderr[-2000:]


def test_a_reference_is_small_hashable_and_picklable(mgr: MemoryManager) -> None:
    ref = mgr.put(np.zeros(MiB // 8), name="a-rather-long-name-for-an-object-0123456789")
    data = pickle.dumps(ref)
    assert len(data) < 200
    back = pickle.loads(data)
    assert back == ref and hash(back) == hash(ref) and len({ref, back}) == 1
    assert back.name == ref.name and back.nbytes == ref.nbytes >= MiB
    mgr.delete(ref)


@pytest.mark.parametrize("method", METHODS)
def test_an_array_made_in_place_is_seen_elsewhere_without_a_copy(
    mgr: MemoryManager, method: str
) -> None:
    arr, ref = mgr.empty((4, 5), np.int32)
    assert arr.flags.writeable and _shares_arena(mgr, arr)
    arr[...] = np.arange(20).reshape(4, 5)
    z, zref = mgr.zeros(3, np.float32)
    assert z.tolist() == [0.0, 0.0, 0.0]
    here, there = multiprocessing.get_context(method).Pipe()
    p = _start(method, _check_in_place, mgr.name, ref, there)
    assert here.recv() == (arr.tolist(), False, True)
    _finish(p)


# ---------------------------------------------------------------- the lifetime rule


@pytest.mark.parametrize("method", METHODS)
def test_a_producer_may_put_hand_the_reference_on_and_exit(mgr: MemoryManager, method: str) -> None:
    q = multiprocessing.get_context(method).Queue()
    p = _start(method, _producer, mgr.name, q, None)
    _finish(p)  # the producer is gone before anyone unpickles its reference
    mgr.collect()  # and its process reference with it
    ref = q.get(timeout=TIMEOUT)
    assert _same(mgr.get(ref), _sample())
    assert C.objects_info(attachment_of(mgr).handle()).tickets == 0  # taken over


def test_dropping_every_holder_frees_at_once_without_a_collection(mgr: MemoryManager) -> None:
    used, runs = mgr.stats().used, mgr.stats().gc_runs
    ref = mgr.put(_sample())
    value = mgr.get(ref)
    view = value["matrix"][10:20]  # a view of the value keeps it too
    del value
    gc.collect()
    del ref
    gc.collect()
    assert _live(mgr) == 1
    assert view.sum() == sum(range(3000, 6000))
    del view
    gc.collect()
    assert _live(mgr) == 0
    assert mgr.stats().used == used and mgr.stats().gc_runs == runs


@pytest.mark.parametrize("method", METHODS)
def test_a_consumer_killed_while_holding_is_collected(mgr: MemoryManager, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    q, (here, there) = ctx.Queue(), ctx.Pipe()
    p = _start(method, _holder, mgr.name, q, there)
    ref = mgr.put(_sample())
    q.put(ref)
    assert here.recv() == (True, False)
    del ref
    gc.collect()
    assert _live(mgr) == 1  # the consumer holds it
    os.kill(p.pid, signal.SIGKILL)
    p.join(TIMEOUT)
    assert _live(mgr) == 1  # until its death is noticed
    mgr.collect()
    assert _live(mgr) == 0 and mgr.stats().used == 0


def test_a_reference_never_unpickled_expires_after_the_transit_timeout(mgr: MemoryManager) -> None:
    mgr.set_transit_timeout(0.2)
    assert mgr.transit_timeout == pytest.approx(0.2)
    ref = mgr.put(np.ones(MiB))
    data = pickle.dumps(ref)
    del ref
    gc.collect()
    assert _live(mgr) == 1  # in transit (expiry happens only in collections and expire calls)
    time.sleep(0.3)  # past the deadline (this is the timeout under test, not a synchronisation)
    mgr.collect()
    assert _live(mgr) == 0 and mgr.stats().used == 0
    late = pickle.loads(data)  # a reference to a gone object: get says so
    with pytest.raises(ObjectNotFound):
        mgr.get(late)


@pytest.mark.parametrize("method", METHODS)
def test_a_named_object_survives_its_producer_until_delete(mgr: MemoryManager, method: str) -> None:
    q = multiprocessing.get_context(method).Queue()
    p = _start(method, _producer, mgr.name, q, "results")
    _finish(p)
    q.get(timeout=TIMEOUT)  # its reference, unpickled here
    gc.collect()
    mgr.collect()
    assert _same(mgr.get("results"), _sample())
    assert "results" in mgr.names()
    mgr.delete("results")
    gc.collect()
    assert _live(mgr) == 0 and "results" not in mgr.names()
    with pytest.raises(ObjectNotFound):
        mgr.get("results", timeout=0)


def test_memory_under_a_live_view_is_never_reused(mgr: MemoryManager) -> None:
    ref = mgr.put(np.arange(MiB // 8, dtype=np.int64))
    view = mgr.get(ref)[1000:]
    mgr.delete(ref)  # get() of it fails from now on; the view keeps its memory
    with pytest.raises(ObjectNotFound):
        mgr.get(ref)
    del ref
    gc.collect()
    taken = []
    for size in [MiB, 64 << 10, 4096, 256, 64]:
        while True:
            try:
                a = mgr.allocate(size)
            except MemoryError:
                break
            mgr.write(a, b"\xff" * size)
            taken.append(a)
    assert np.array_equal(view, np.arange(1000, MiB // 8))
    for a in taken:
        mgr.deallocate(a)
    assert _live(mgr) == 1
    del view
    gc.collect()
    assert _live(mgr) == 0


def test_object_blocks_are_the_objects_own(mgr: MemoryManager) -> None:
    ref = mgr.put(np.ones(4096))
    with pytest.raises(ValueError, match="belongs to an object"):
        mgr.deallocate(ref.address)
    with pytest.raises(ValueError, match="belongs to an object"):
        mgr.adopt(ref.address)
    mgr.delete(ref)
    with pytest.raises(ObjectNotFound):
        mgr.delete(ref)
    with pytest.raises(InvalidAddress):
        mgr.size_of(ref.address)
    mgr.check()


# ---------------------------------------------------------------- waiting for a name


@pytest.mark.parametrize("method", METHODS)
def test_a_bind_in_another_process_wakes_a_waiting_get(mgr: MemoryManager, method: str) -> None:
    here, there = multiprocessing.get_context(method).Pipe()
    p = _start(method, _waiter, mgr.name, "late", there)
    assert here.recv() == "waiting"
    ref = mgr.put({"answer": 42}, name="late")
    value, waited = here.recv()
    _finish(p)
    assert value == {"answer": 42} and waited < TIMEOUT
    mgr.delete(ref)


def test_timeouts_and_missing_names(mgr: MemoryManager) -> None:
    with pytest.raises(ObjectNotFound):
        mgr.get("absent", timeout=0)
    t0 = time.monotonic()
    with pytest.raises(KeyError, match="within 0.1 s"):
        mgr.get("absent", timeout=0.1)
    assert time.monotonic() - t0 >= 0.1
    with pytest.raises(ValueError):
        mgr.get("absent", timeout=-1)
    with pytest.raises(TypeError):
        mgr.get(12)  # type: ignore[arg-type]
    with pytest.raises(ObjectNotFound):
        mgr.delete("absent")
    mgr.put(1, name="taken")
    with pytest.raises(FileExistsError):
        mgr.put(2, name="taken")
    assert mgr.get("taken") == 1


def test_get_async_waits_without_blocking_the_loop(mgr: MemoryManager) -> None:
    async def main() -> tuple[Any, int]:
        ticks = 0
        waiting = asyncio.ensure_future(mgr.get_async("async-name", timeout=TIMEOUT))
        while ticks < 3:  # the loop runs while the get waits
            await asyncio.sleep(0)
            ticks += 1
        threading.Thread(target=mgr.put, args=("hello",), kwargs={"name": "async-name"}).start()
        return await waiting, ticks

    assert asyncio.run(main()) == ("hello", 3)
