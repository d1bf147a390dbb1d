"""Arena lifecycle: creating, attaching, closing, destroying, the context manager, pickling into
spawn and fork children, and a fork child that inherited its parent's manager."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import pickle
import stat
import time
from collections.abc import Iterator
from typing import Any

import posix_ipc
import pytest
from conftest import SHM_DIR

from shmalloc import CorruptionDetected, MemoryManager, NotAnArena, attachment
from shmalloc import _binding as C
from shmalloc.manager import attachment_of

MiB = 1 << 20
JOIN_TIMEOUT = 60


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Names registered here are unlinked after the test, whatever happened."""
    names: list[str] = []
    yield names
    for n in names:
        if os.path.exists(_path(n)):
            os.unlink(_path(n))


def _join(p: mp.process.BaseProcess) -> None:
    p.join(JOIN_TIMEOUT)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"child {p.pid} did not finish")


def _block_owner_pid(m: MemoryManager, address: int) -> int:
    return C.block_info(attachment_of(m).handle(), address).pid


def _process_usage(m: MemoryManager, pid: int) -> int:
    if hasattr(m, "process_memory"):
        return int(m.process_memory(pid))
    return C.proc_info(attachment_of(m).handle(), _slot_of(m, pid)).usage


def _slot_of(m: MemoryManager, pid: int) -> int:
    rows = [r for r in C.proc_rows(attachment_of(m).handle()) if r.pid == pid]
    assert rows, f"pid {pid} has no slot"
    return rows[0].slot


# ------------------------------------------------------------------------------- creation


def test_default_constructor_picks_unique_names() -> None:
    with MemoryManager(MiB) as a, MemoryManager(MiB) as b:
        assert a.name != b.name
        assert os.path.exists(_path(a.name)) and os.path.exists(_path(b.name))
        x = a.allocate(100)
        a.write(x, b"only in a")
        assert b.stats().used == 0  # two arenas, not one
        assert a.capacity == MiB == b.capacity
    assert not os.path.exists(_path(a.name)) and not os.path.exists(_path(b.name))


def test_default_capacity_is_lazy() -> None:
    with MemoryManager() as m:
        assert m.capacity == 1 << 30
        st = os.stat(_path(m.name))
        assert st.st_size == 1 << 30
        assert st.st_blocks * 512 < 16 * MiB  # a sparse file: no RAM for unused capacity
        a = m.allocate(100 * MiB)
        assert m.size_of(a) >= 100 * MiB
        m.write(a, b"end", offset=100 * MiB - 3)
        assert m.read(a, 3, offset=100 * MiB - 3) == b"end"
        # the pages are reserved up front (so touching them never raises SIGBUS)
        assert os.stat(_path(m.name)).st_blocks * 512 >= 100 * MiB


def test_with_capacity() -> None:
    with MemoryManager.with_capacity(3 * MiB) as m:
        assert isinstance(m, MemoryManager)
        assert m.capacity == 3 * MiB
        assert os.stat(_path(m.name)).st_size == 3 * MiB
        assert m.stats().total < 3 * MiB
    assert not os.path.exists(_path(m.name))


def test_capacity_is_rounded_up_to_a_page() -> None:
    with MemoryManager(MiB + 1) as m:
        assert m.capacity == MiB + mmap.PAGESIZE
        assert m.capacity % mmap.PAGESIZE == 0


def test_create_named(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 2 * MiB)
    try:
        assert m.name == arena_name
        assert m.capacity == 2 * MiB
        assert os.path.exists(_path(arena_name))
        assert arena_name in repr(m)
    finally:
        m.close()
        m.destroy()
    assert not os.path.exists(_path(arena_name))


def test_create_sweeps_segments_abandoned_mid_create(arena_name: str) -> None:
    """A creator killed while formatting leaves its private dot name behind; a later create
    unlinks those older than ABANDONED_AFTER, and leaves a recent one (a creator at work)."""
    old = posix_ipc.SharedMemory(
        f"/.shmalloc-creating-1-old{arena_name}", posix_ipc.O_CREX, size=4096
    )
    new = posix_ipc.SharedMemory(
        f"/.shmalloc-creating-1-new{arena_name}", posix_ipc.O_CREX, size=4096
    )
    old.close_fd()
    new.close_fd()
    then = time.time() - attachment.ABANDONED_AFTER - 60
    os.utime(_path(old.name[1:]), (then, then))
    try:
        MemoryManager.create(arena_name, MiB).destroy()
        assert not os.path.exists(_path(old.name[1:]))
        assert os.path.exists(_path(new.name[1:]))
    finally:
        for seg in (old, new):
            if os.path.exists(_path(seg.name[1:])):
                seg.unlink()


def test_create_duplicate_is_file_exists(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    mgr.write(a, b"keep me")
    before = mgr.stats()
    with pytest.raises(FileExistsError) as ei:
        MemoryManager.create(mgr.name, MiB)
    assert mgr.name in str(ei.value)
    with pytest.raises(FileExistsError):
        MemoryManager(MiB, name=mgr.name)
    # the existing arena is untouched (not reformatted, not unlinked)
    assert os.path.exists(_path(mgr.name))
    assert mgr.stats() == before
    assert mgr.read(a, 7) == b"keep me"
    other = MemoryManager.attach(mgr.name)
    assert other.read(a, 7) == b"keep me"
    other.close()
    mgr.check()


def test_segment_mode_is_0600(mgr: MemoryManager) -> None:
    st = os.stat(_path(mgr.name))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    with MemoryManager(MiB) as m:
        assert stat.S_IMODE(os.stat(_path(m.name)).st_mode) == 0o600


# ------------------------------------------------------------------------------- attach


def test_attach_absent_is_file_not_found(arena_name: str) -> None:
    with pytest.raises(FileNotFoundError) as ei:
        MemoryManager.attach(arena_name)
    assert arena_name in str(ei.value)
    assert not os.path.exists(_path(arena_name))


def test_attach_shares_the_arena(mgr: MemoryManager) -> None:
    other = MemoryManager.attach(mgr.name)
    try:
        assert other.name == mgr.name and other.capacity == mgr.capacity
        a = mgr.allocate(1000)
        mgr.write(a, b"hello from the creator")
        assert other.read(a, 22) == b"hello from the creator"
        b = other.allocate(500)
        other.write(b, b"hello back")
        assert mgr.read(b, 10) == b"hello back"
        assert other.stats() == mgr.stats()
        assert mgr.deallocate(b) >= 500
        assert other.deallocate(a) >= 1000
        assert mgr.stats().used == 0
    finally:
        other.close()
    mgr.check()


def _make_segment(name: str, size: int, fill: bytes) -> None:
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
    try:
        with mmap.mmap(shm.fd, size) as mm:
            mm[: len(fill)] = fill
    finally:
        shm.close_fd()


@pytest.mark.parametrize("kind", ["garbage", "zero", "wrong-version", "wrong-capacity", "tiny"])
def test_attach_to_a_segment_that_is_no_arena(arena_name: str, kind: str) -> None:
    size = MiB
    if kind == "garbage":
        fill = os.urandom(64 * 1024)
    elif kind == "zero":
        fill = b""
    elif kind == "tiny":
        size, fill = 100, b"\xff" * 100
    else:
        # a real arena's header with one field changed
        with MemoryManager(MiB) as real:
            hdr = bytearray(attachment_of(real).mm[: real.capacity - real.stats().total])
        if kind == "wrong-version":
            v = C.offsetof("shm_arena_t", "version")
            hdr[v : v + 4] = (999).to_bytes(4, "little")
        else:
            c = C.offsetof("shm_arena_t", "capacity")
            hdr[c : c + 8] = (2 * MiB).to_bytes(8, "little")
        fill = bytes(hdr)
    try:
        _make_segment(arena_name, size, fill)
        expected = NotAnArena if kind in ("garbage", "zero", "tiny") else CorruptionDetected
        with pytest.raises(expected) as ei:
            MemoryManager.attach(arena_name)
        assert arena_name in str(ei.value) or isinstance(ei.value, CorruptionDetected)
        # the segment was left alone: not unlinked, not formatted
        assert os.path.getsize(_path(arena_name)) == size
        with open(_path(arena_name), "rb") as f:
            assert f.read(len(fill)) == fill
    finally:
        posix_ipc.unlink_shared_memory("/" + arena_name)


# ------------------------------------------------------------------------------- close, destroy


def test_close(mgr: MemoryManager) -> None:
    a = mgr.allocate(64)
    mgr.write(a, b"survives close")
    assert not mgr.closed
    mgr.close()
    assert mgr.closed
    assert "closed" in repr(mgr)
    mgr.close()  # idempotent
    for op in (
        lambda: mgr.allocate(1),
        lambda: mgr.read(a),
        lambda: mgr.deallocate(a),
        lambda: mgr.stats(),
        lambda: mgr.check(),
        lambda: mgr.write(a, b"x"),
    ):
        with pytest.raises(ValueError):
            op()
    # the arena and the block stay: closing detaches, it does not destroy
    assert os.path.exists(_path(mgr.name))
    again = MemoryManager.attach(mgr.name)
    try:
        assert again.read(a, 14) == b"survives close"
        assert again.stats().allocated_blocks == 1
        again.deallocate(a)
    finally:
        again.close()


def test_destroy_keeps_open_mappings_working(mgr: MemoryManager) -> None:
    other = MemoryManager.attach(mgr.name)
    try:
        a = mgr.allocate(100)
        mgr.write(a, b"before destroy")
        mgr.destroy()
        assert not os.path.exists(_path(mgr.name))
        with pytest.raises(FileNotFoundError):
            MemoryManager.attach(mgr.name)
        # both mappings still work and still share the same arena
        assert other.read(a, 14) == b"before destroy"
        b = other.allocate(100)
        other.write(b, b"after destroy")
        assert mgr.read(b, 13) == b"after destroy"
        mgr.deallocate(a)
        mgr.deallocate(b)
        assert other.stats().used == 0
        other.check()
        mgr.destroy()  # idempotent
    finally:
        other.close()
    assert not mgr.closed
    mgr.close()


def test_destroy_then_create_same_name(mgr: MemoryManager) -> None:
    mgr.allocate(100)
    mgr.destroy()
    fresh = MemoryManager.create(mgr.name, MiB)
    try:
        assert fresh.stats().used == 0  # a new arena, not the old one
        assert mgr.stats().used > 0
    finally:
        fresh.close()
        fresh.destroy()


def test_context_manager_destroys_unnamed_arena() -> None:
    with MemoryManager(MiB) as m:
        name = m.name
        assert os.path.exists(_path(name))
        m.allocate(10)
    assert m.closed
    assert not os.path.exists(_path(name))


def test_context_manager_destroys_unnamed_arena_on_error() -> None:
    with pytest.raises(KeyError), MemoryManager.with_capacity(MiB) as m:
        name = m.name
        raise KeyError("boom")
    assert m.closed
    assert not os.path.exists(_path(name))


def test_context_manager_keeps_named_arena(arena_name: str, cleanup: list[str]) -> None:
    cleanup.append(arena_name + "-n")
    with MemoryManager.create(arena_name, MiB) as m:
        a = m.allocate(10)
        m.write(a, b"persist")
    assert m.closed
    assert os.path.exists(_path(arena_name))
    with MemoryManager.attach(arena_name) as again:
        assert again.read(a, 7) == b"persist"
    assert os.path.exists(_path(arena_name))  # an attached manager never destroys either
    with MemoryManager(MiB, name=arena_name + "-n") as named:
        pass
    assert named.closed
    assert os.path.exists(_path(arena_name + "-n"))


def test_context_manager_of_attached_unnamed_arena_does_not_destroy() -> None:
    with MemoryManager(MiB) as creator:
        with MemoryManager.attach(creator.name) as joined:
            assert joined.name == creator.name
        assert os.path.exists(_path(creator.name))
        assert creator.stats().total > 0
    assert not os.path.exists(_path(creator.name))


def test_close_with_live_view_raises_and_stays_usable(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    with mgr.view(a) as v:
        with pytest.raises(BufferError):
            mgr.close()
        assert not mgr.closed
        # everything still works, including the view
        v[:2] = b"ok"
        assert mgr.read(a, 2) == b"ok"
        b = mgr.allocate(10)
        mgr.write(b, b"fine")
        assert mgr.read(b, 4) == b"fine"
        mgr.check()
        with mgr.view(b) as v2:
            v.release()
            with pytest.raises(BufferError):
                mgr.close()  # v2 is still alive
            assert bytes(v2[:4]) == b"fine"
    mgr.close()
    assert mgr.closed


def test_refused_close_leaves_the_process_attached(mgr: MemoryManager) -> None:
    """A close() refused with BufferError changes nothing: this process still allocates, and its
    blocks are still accounted to it."""
    a = mgr.allocate(100)
    with mgr.view(a):
        mgr.deallocate(a)  # the view outlives the block; this process now owns nothing
        with pytest.raises(BufferError):
            mgr.close()
    assert not mgr.closed
    b = mgr.allocate(100)
    assert _block_owner_pid(mgr, b) == os.getpid()
    assert _process_usage(mgr, os.getpid()) == mgr.size_of(b)
    mgr.check()
    mgr.deallocate(b)


@pytest.mark.parametrize("second", ["attach", "unpickle"])
def test_closing_one_of_two_managers_in_a_process_keeps_the_other_working(
    mgr: MemoryManager, second: str
) -> None:
    """Two managers of one arena in one process (attach, or a pickled copy loaded here): closing
    one must not detach the process from under the other."""
    mgr.deallocate(mgr.allocate(10))  # this process has joined the arena and owns nothing
    other = (
        MemoryManager.attach(mgr.name) if second == "attach" else pickle.loads(pickle.dumps(mgr))
    )
    other.deallocate(other.allocate(10))
    other.close()
    a = mgr.allocate(10)
    assert _block_owner_pid(mgr, a) == os.getpid()
    assert _process_usage(mgr, os.getpid()) == mgr.size_of(a)
    mgr.check()
    mgr.deallocate(a)


def test_close_with_live_ndarray(mgr: MemoryManager) -> None:
    np = pytest.importorskip("numpy")
    a = mgr.allocate(8 * 10)
    arr = mgr.ndarray(a, (10,), np.int64)
    try:
        arr[:] = np.arange(10)
        with pytest.raises(BufferError):
            mgr.close()
        assert not mgr.closed
        assert mgr.read(a, 8, offset=8) == (1).to_bytes(8, "little")
    finally:
        del arr
    mgr.close()
    assert mgr.closed


# ------------------------------------------------------------------------------- pickling


def test_pickle_round_trip_attaches(mgr: MemoryManager) -> None:
    a = mgr.allocate(100)
    mgr.write(a, b"pickled")
    data = pickle.dumps(mgr)
    assert mgr.name.encode() in data
    assert len(data) < 1000  # the name, not the arena
    clone = pickle.loads(data)
    try:
        assert clone is not mgr and clone.name == mgr.name
        assert clone.read(a, 7) == b"pickled"
    finally:
        clone.close()
    assert not mgr.closed


def _child_use(m: Any, address: int, q: Any) -> None:
    """Runs in a child: m arrives pickled (by name) or inherited."""
    try:
        if isinstance(m, bytes):
            m = pickle.loads(m)
        got = m.read(address, 12)
        m.write(address, b"child wrote!")
        b = m.allocate(333)
        m.write(b, b"from child %d" % os.getpid())
        q.put(("ok", os.getpid(), got, b, m.size_of(b)))
    except BaseException as e:  # report, never hang the parent
        q.put(("error", os.getpid(), repr(e), 0, 0))


@pytest.mark.parametrize(
    "method,how", [("spawn", "arg"), ("fork", "pickle-bytes"), ("fork", "arg")]
)
def test_manager_into_child_process(mgr: MemoryManager, method: str, how: str) -> None:
    ctx = mp.get_context(method)
    a = mgr.allocate(100)
    mgr.write(a, b"from parent!")
    q = ctx.Queue()
    arg = pickle.dumps(mgr) if how == "pickle-bytes" else mgr
    p = ctx.Process(target=_child_use, args=(arg, a, q))
    p.start()
    try:
        status, pid, got, b, size = q.get(timeout=JOIN_TIMEOUT)
    finally:
        _join(p)
    assert status == "ok", got
    assert p.exitcode == 0
    assert pid == p.pid != os.getpid()
    assert got == b"from parent!"
    assert mgr.read(a, 12) == b"child wrote!"
    assert mgr.size_of(b) == size >= 333
    assert mgr.read(b, len(b"from child %d" % pid)) == b"from child %d" % pid
    assert _block_owner_pid(mgr, b) == pid
    mgr.deallocate(b)
    mgr.deallocate(a)
    assert mgr.stats().used == 0
    mgr.check()


def _fork_child_inherited(m: MemoryManager, conn: Any) -> None:
    try:
        a = m.allocate(4000)
        m.write(a, b"fork")
        conn.send(("ok", os.getpid(), a, m.size_of(a)))
        conn.recv()  # stay alive while the parent looks at this process's slot
        conn.send(("freed", m.deallocate(a)))
    except BaseException as e:
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def test_fork_child_with_inherited_manager_is_its_own_process(mgr: MemoryManager) -> None:
    ctx = mp.get_context("fork")
    mine = mgr.allocate(1000)  # the parent takes its slot first
    parent_usage = _process_usage(mgr, os.getpid())
    assert parent_usage == mgr.size_of(mine)
    parent_slot = _slot_of(mgr, os.getpid())

    here, there = ctx.Pipe()
    p = ctx.Process(target=_fork_child_inherited, args=(mgr, there))
    p.start()
    there.close()
    try:
        msg = here.recv()
        assert msg[0] == "ok", msg
        _, pid, a, size = msg
        assert pid == p.pid
        # the child's block is accounted to the child, in a slot of its own
        assert _block_owner_pid(mgr, a) == pid
        assert _slot_of(mgr, pid) != parent_slot
        assert _process_usage(mgr, pid) == size
        assert _process_usage(mgr, os.getpid()) == parent_usage
        assert _block_owner_pid(mgr, mine) == os.getpid()
        assert mgr.read(a, 4) == b"fork"
        assert mgr.check().live_processes >= 2
        here.send("free it")
        msg = here.recv()
        assert msg == ("freed", size)
    finally:
        here.close()
        _join(p)
    assert p.exitcode == 0
    assert mgr.stats().used == mgr.size_of(mine)
    assert _process_usage(mgr, os.getpid()) == parent_usage
    mgr.deallocate(mine)
    mgr.check()


def _fork_grandchild(m: MemoryManager, q: Any) -> None:
    try:
        ctx = mp.get_context("fork")
        inner = ctx.Queue()
        p = ctx.Process(target=_child_use, args=(m, m.allocate(16), inner))
        p.start()
        res = inner.get(timeout=JOIN_TIMEOUT)
        p.join(JOIN_TIMEOUT)
        q.put(("ok", os.getpid(), res, p.exitcode))
    except BaseException as e:
        q.put(("error", repr(e)))


def test_fork_of_a_fork_child(mgr: MemoryManager) -> None:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_fork_grandchild, args=(mgr, q))
    p.start()
    try:
        msg = q.get(timeout=JOIN_TIMEOUT)
    finally:
        _join(p)
    assert msg[0] == "ok", msg
    _, child_pid, (status, gpid, _, b, _), exitcode = msg
    assert status == "ok" and exitcode == 0
    assert gpid != child_pid and gpid != os.getpid()
    assert _block_owner_pid(mgr, b) == gpid
    mgr.check()


def _short_lived(m: MemoryManager, q: Any) -> None:
    try:
        a = m.allocate(100)
        m.write(a, b"x")
        m.deallocate(a)
        m.close()
        q.put("ok")
    except BaseException as e:
        q.put(repr(e))


def test_many_short_lived_processes_each_can_allocate(mgr: MemoryManager) -> None:
    """Worker after worker attaches, allocates, frees, closes and exits. The process table has a
    fixed number of slots; processes that are gone (and own nothing) must not keep theirs, or
    the arena refuses every new process after the first 128."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    results = []
    for _ in range(140):
        p = ctx.Process(target=_short_lived, args=(mgr, q))
        p.start()
        try:
            results.append(q.get(timeout=JOIN_TIMEOUT))
        finally:
            _join(p)
    failed = [(i, r) for i, r in enumerate(results) if r != "ok"]
    assert not failed, f"{len(failed)} of 140 workers failed, first: {failed[0]}"
    st = mgr.stats()
    assert st.used == 0 and st.allocations == 140 == st.deallocations
    mgr.check()


def test_pickle_by_name_fails_cleanly_once_destroyed(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, MiB)
    data = pickle.dumps(m)
    m.close()
    m.destroy()
    with pytest.raises(FileNotFoundError):
        pickle.loads(data)
