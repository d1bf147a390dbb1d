"""shmalloc.compat against the standard library's documented behaviour, and what compat adds.

Most tests take ``api``: the same test runs once against ``multiprocessing.shared_memory`` /
``multiprocessing.managers.SharedMemoryManager`` and once against ``shmalloc.compat`` (whose
current arena is then this test's own arena, exported to children through
SHMALLOC_COMPAT_ARENA). Every stdlib segment a test makes is unlinked afterwards and checked
gone from /dev/shm; every compat name is unlinked and checked gone from the arena's directory.

Children are real processes (spawn and fork) that get a block's name as a plain string (or the
pickled object) and report over a Pipe; no test sleeps or times anything.
"""

from __future__ import annotations

import errno
import gc
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from multiprocessing import managers as std_managers
from multiprocessing import shared_memory as std_shared_memory
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from children import TIMEOUT, run_child
from conftest import SHM_DIR, unique_name

from shmalloc import MemoryManager, compat

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- the module pair


def module(kind: str) -> ModuleType:
    """The SharedMemory/ShareableList module of one side: "stdlib" or "compat"."""
    return std_shared_memory if kind == "stdlib" else compat


def manager_class(kind: str) -> Any:
    return std_managers.SharedMemoryManager if kind == "stdlib" else compat.SharedMemoryManager


class Api:
    """One side of the comparison, and the names its test made (unlinked at teardown)."""

    def __init__(self, kind: str, arena: MemoryManager | None) -> None:
        self.kind = kind
        self.arena = arena
        mod = module(kind)
        self.SharedMemory = mod.SharedMemory
        self.ShareableList = mod.ShareableList
        self.SharedMemoryManager = manager_class(kind)
        self.names: list[str] = []

    def new(self, size: int, name: str | None = None) -> Any:
        shm = self.SharedMemory(name, create=True, size=size)
        self.names.append(shm.name)
        return shm

    def new_list(self, seq: Any) -> Any:
        sl = self.ShareableList(seq)
        self.names.append(sl.shm.name)
        return sl

    def exists(self, name: str) -> bool:
        if self.kind == "stdlib":
            return os.path.exists(os.path.join(SHM_DIR, name))
        assert self.arena is not None
        return name in self.arena.names()

    def cleanup(self) -> None:
        for name in self.names:
            try:
                shm = self.SharedMemory(name)
            except FileNotFoundError:
                continue
            shm.close()
            shm.unlink()
        left = [n for n in self.names if self.exists(n)]
        assert not left, f"{self.kind}: names left behind: {left}"


@pytest.fixture
def arena(mgr: MemoryManager) -> Iterator[MemoryManager]:
    """This test's arena as compat's current arena (and SHMALLOC_COMPAT_ARENA for children)."""
    before = os.environ.get(compat.ARENA_ENV)
    compat.set_arena(mgr)
    try:
        yield mgr
    finally:
        compat.set_arena(None)
        gc.collect()  # objects of this test let go of the arena
        assert os.environ.get(compat.ARENA_ENV) == before


@pytest.fixture(params=["stdlib", "compat"])
def api(request: pytest.FixtureRequest) -> Iterator[Api]:
    arena = request.getfixturevalue("arena") if request.param == "compat" else None
    a = Api(request.param, arena)
    yield a
    gc.collect()
    a.cleanup()


# ---------------------------------------------------------------- child side


def _child_attach_and_write(kind: str, name: str, conn: Any) -> None:
    shm = module(kind).SharedMemory(name)
    conn.send((shm.name, shm.size, bytes(shm.buf[:6])))
    shm.buf[6:11] = b"child"
    shm.close()
    conn.close()


def _child_use_object(shm: Any, conn: Any) -> None:
    """Gets the object itself: pickled (spawn) or inherited (fork)."""
    conn.send((shm.name, bytes(shm.buf[:6])))
    shm.buf[6:11] = b"child"
    shm.close()
    conn.close()


def _child_list(kind: str, name: str, conn: Any) -> None:
    sl = module(kind).ShareableList(name=name)
    conn.send(list(sl))
    sl[0] = sl[0] + 1
    sl[1] = "kid"
    sl[2] = None
    sl.shm.close()
    conn.close()


def _child_list_object(sl: Any, conn: Any) -> None:
    conn.send(list(sl))
    sl[0] = -1
    conn.close()


# ---------------------------------------------------------------- SharedMemory


def test_create_with_generated_name_then_attach_by_name(api: Api) -> None:
    shm = api.new(100)
    assert isinstance(shm.name, str) and shm.name
    assert shm.size == 100
    assert len(shm.buf) == 100
    assert bytes(shm.buf) == bytes(100)  # a new block reads as zeros
    shm.buf[:5] = b"hello"
    other = api.SharedMemory(shm.name)
    assert other.name == shm.name
    assert other.size == 100
    assert bytes(other.buf[:5]) == b"hello"
    other.buf[95:] = b"world"
    assert bytes(shm.buf[95:]) == b"world"
    assert repr(shm) == f"SharedMemory({shm.name!r}, size=100)"
    other.close()
    shm.close()


def test_create_with_a_chosen_name(api: Api) -> None:
    name = "psm_" + unique_name("n")[-10:]
    shm = api.new(64, name)
    assert shm.name == name
    with pytest.raises(FileExistsError) as ei:
        api.SharedMemory(name, create=True, size=64)
    assert ei.value.errno == errno.EEXIST
    shm.close()


def test_attaching_a_missing_name_raises_file_not_found(api: Api) -> None:
    with pytest.raises(FileNotFoundError) as ei:
        api.SharedMemory("psm_" + unique_name("missing")[-10:])
    assert ei.value.errno == errno.ENOENT


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"create": True, "size": 0}, "'size' must be a positive number different from zero"),
        ({"create": True, "size": -1}, "'size' must be a positive integer"),
        ({"create": False, "size": 10}, "'name' can only be None if create=True"),
    ],
)
def test_size_and_name_rules(api: Api, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        api.SharedMemory(None, **kwargs)


def test_attach_ignores_size(api: Api) -> None:
    shm = api.new(4096)
    other = api.SharedMemory(shm.name, size=16)
    assert other.size == 4096
    other.close()
    shm.close()


def test_close_keeps_the_block_and_is_idempotent(api: Api) -> None:
    shm = api.new(32)
    shm.buf[:4] = b"kept"
    name = shm.name
    shm.close()
    assert shm.buf is None
    shm.close()
    again = api.SharedMemory(name)
    assert bytes(again.buf[:4]) == b"kept"
    again.close()


def test_close_is_refused_while_views_of_buf_are_alive(api: Api) -> None:
    shm = api.new(32)
    view = shm.buf[2:6]
    with pytest.raises(BufferError):
        shm.close()
    view[:] = b"live"  # the memory is still there
    view.release()
    shm.close()
    again = api.SharedMemory(shm.name)
    assert bytes(again.buf[2:6]) == b"live"
    again.close()


def test_unlink_removes_the_name_but_open_objects_keep_working(api: Api) -> None:
    shm = api.new(64)
    other = api.SharedMemory(shm.name)
    shm.unlink()
    with pytest.raises(FileNotFoundError):
        api.SharedMemory(shm.name)
    with pytest.raises(FileNotFoundError):
        shm.unlink()
    shm.buf[:3] = b"abc"
    assert bytes(other.buf[:3]) == b"abc"
    # the name is free again: a new block under it is a different block
    fresh = api.new(64, shm.name)
    assert bytes(fresh.buf[:3]) == bytes(3)
    fresh.buf[:3] = b"xyz"
    assert bytes(shm.buf[:3]) == b"abc"
    for s in (fresh, other, shm):
        s.close()


def test_a_reused_block_reads_as_zeros(api: Api) -> None:
    for _ in range(3):
        shm = api.new(5000)
        assert bytes(shm.buf) == bytes(5000)
        shm.buf[:] = b"\xff" * 5000
        shm.close()
        shm.unlink()


def test_pickles_by_name(api: Api) -> None:
    shm = api.new(16)
    shm.buf[:4] = b"pick"
    copy = pickle.loads(pickle.dumps(shm))
    assert copy.name == shm.name and copy.size == shm.size
    assert bytes(copy.buf[:4]) == b"pick"
    copy.close()
    shm.close()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_attaches_by_name_and_writes(api: Api, method: str) -> None:
    shm = api.new(64)
    shm.buf[:6] = b"parent"
    [(name, size, head)] = run_child(method, _child_attach_and_write, api.kind, shm.name)
    assert (name, size, head) == (shm.name, 64, b"parent")
    assert bytes(shm.buf[:11]) == b"parentchild"
    shm.close()


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_gets_the_object(api: Api, method: str) -> None:
    shm = api.new(64)
    shm.buf[:6] = b"parent"
    [(name, head)] = run_child(method, _child_use_object, shm)
    assert (name, head) == (shm.name, b"parent")
    assert bytes(shm.buf[:11]) == b"parentchild"
    shm.close()


# ---------------------------------------------------------------- ShareableList

ITEMS = [1, 2.5, True, "héllo", b"by", None, -7]


def test_shareable_list_items_and_format(api: Api) -> None:
    sl = api.new_list(ITEMS)
    assert list(sl) == ITEMS
    assert [type(v) for v in sl] == [type(v) for v in ITEMS]
    assert len(sl) == len(ITEMS)
    assert sl.format == "qdxxxxxxx?8s8sxxxxxx?xq"
    assert sl[-1] == -7 and sl[-7] == 1
    assert repr(sl) == f"ShareableList({ITEMS!r}, name={sl.shm.name!r})"
    assert sl.count(None) == 1 and sl.count(42) == 0
    assert sl.index(True) == 0  # True == 1: the first equal item wins
    assert sl.index(b"by") == 4
    sl.shm.close()


def test_shareable_list_index_finds_first_equal(api: Api) -> None:
    sl = api.new_list([0, 1.0, True, "x"])
    assert sl.index(1) == 1  # 1 == 1.0
    assert sl.index("x") == 3
    with pytest.raises(ValueError, match="not in this container"):
        sl.index("absent")
    sl.shm.close()


def test_shareable_list_indexing_errors(api: Api) -> None:
    sl = api.new_list([1, 2, 3])
    with pytest.raises(IndexError):
        sl[3]
    with pytest.raises(IndexError):
        sl[3] = 0
    sl.shm.close()


def test_shareable_list_setitem_changes_type_and_format(api: Api) -> None:
    sl = api.new_list([1, "abc", b"xy", None])
    sl[0] = 3.5
    sl[1] = 7
    sl[2] = b"12345678"
    sl[3] = "fits"  # a fixed-size slot takes up to 8 bytes of str
    assert list(sl) == [3.5, 7, b"12345678", "fits"]
    assert sl.format == "dq8s8s"
    sl[1] = "back"
    assert sl[1] == "back" and sl.format == "d8s8s8s"
    sl.shm.close()


def test_shareable_list_str_may_not_grow_beyond_its_slot(api: Api) -> None:
    sl = api.new_list(["abc", 1])
    sl[0] = "12345678"  # "abc" reserved 8 bytes
    with pytest.raises(ValueError, match="exceeds available storage"):
        sl[0] = "123456789"
    with pytest.raises(ValueError, match="exceeds available storage"):
        sl[1] = b"123456789"
    assert list(sl) == ["12345678", 1]
    sl.shm.close()


def test_shareable_list_limits(api: Api) -> None:
    with pytest.raises(KeyError):  # the stdlib raises KeyError; compat a TypeError that is one
        api.new_list([1, [2]])
    with pytest.raises(KeyError):
        api.new_list([1.5, 2j])
    sl = api.new_list([0])
    with pytest.raises(KeyError):
        sl[0] = object()
    with pytest.raises(Exception) as ei:  # struct.error: beyond a signed 64-bit int
        sl[0] = 1 << 63
    assert "struct" in type(ei.value).__module__ or "range" in str(ei.value)
    sl[0] = (1 << 63) - 1
    assert sl[0] == (1 << 63) - 1
    sl.shm.close()
    # a str/bytes item must stay under 10 MB (the stdlib asserts, compat raises ValueError)
    with pytest.raises((AssertionError, ValueError)):
        api.new_list([b"x" * 10_000_000])


def test_shareable_list_strips_trailing_nuls(api: Api) -> None:
    sl = api.new_list(["a\x00", b"b\x00\x00"])
    assert list(sl) == ["a", b"b"]  # documented limitation of the stdlib
    sl.shm.close()


def test_shareable_list_empty(api: Api) -> None:
    sl = api.ShareableList()
    api.names.append(sl.shm.name)
    assert len(sl) == 0 and list(sl) == [] and sl.format == ""
    sl.shm.close()


def test_shareable_list_attach_by_name_and_pickle(api: Api) -> None:
    sl = api.new_list([10, "s"])
    other = api.ShareableList(name=sl.shm.name)
    other[0] = 11
    assert sl[0] == 11
    copy = pickle.loads(pickle.dumps(sl))
    assert list(copy) == [11, "s"] and copy.shm.name == sl.shm.name
    copy[1] = "t"
    assert sl[1] == "t"
    for s in (copy, other, sl):
        s.shm.close()


def test_shareable_list_with_a_chosen_name(api: Api) -> None:
    name = "psm_" + unique_name("l")[-10:]
    sl = api.ShareableList([1], name=name)
    api.names.append(name)
    assert sl.shm.name == name
    with pytest.raises(FileExistsError):
        api.ShareableList([2], name=name)
    sl.shm.close()


def test_shareable_list_generic_alias(api: Api) -> None:
    alias = api.ShareableList[int]
    assert alias.__origin__ is api.ShareableList


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_shareable_list_across_processes(api: Api, method: str) -> None:
    sl = api.new_list([41, "parent", 3.0])
    [seen] = run_child(method, _child_list, api.kind, sl.shm.name)
    assert seen == [41, "parent", 3.0]
    assert list(sl) == [42, "kid", None]
    [seen] = run_child(method, _child_list_object, sl)
    assert seen == [42, "kid", None]
    assert sl[0] == -1
    sl.shm.close()


# ---------------------------------------------------------------- SharedMemoryManager


def test_manager_hands_out_both_and_frees_them_on_exit(api: Api) -> None:
    with api.SharedMemoryManager() as smm:
        shm = smm.SharedMemory(128)
        sl = smm.ShareableList([1, "two", None])
        names = [shm.name, sl.shm.name]
        api.names += names
        assert shm.size == 128
        shm.buf[:3] = b"abc"
        attached = api.SharedMemory(shm.name)
        assert bytes(attached.buf[:3]) == b"abc"
        attached.close()
        [seen] = run_child("spawn", _child_list, api.kind, sl.shm.name)
        assert seen == [1, "two", None]
        assert list(sl) == [2, "kid", None]
    for name in names:
        with pytest.raises(FileNotFoundError):
            api.SharedMemory(name)
    # objects still held in this process keep working after the manager unlinked them
    shm.buf[:3] = b"xyz"
    assert bytes(shm.buf[:3]) == b"xyz" and sl[0] == 2
    shm.close()
    sl.shm.close()


def test_manager_start_and_shutdown(api: Api) -> None:
    smm = api.SharedMemoryManager()
    smm.start()
    try:
        shm = smm.SharedMemory(16)
        api.names.append(shm.name)
        assert api.exists(shm.name)
    finally:
        smm.shutdown()
    assert not api.exists(shm.name)
    shm.close()


# ---------------------------------------------------------------- compat only


def _attached_blocks(mgr: MemoryManager) -> set[int]:
    return {b.address for b in mgr.all_blocks()}


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter (an unrelated process: no multiprocessing ties)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("ending", ["exit", "os._exit", "SIGKILL"])
def test_an_attached_process_that_ends_does_not_destroy_the_block(
    arena: MemoryManager, ending: str
) -> None:
    """The stdlib's trap: an unrelated process that attaches registers the segment with its own
    resource tracker, which unlinks it when that process exits. Nothing like it here."""
    shm = compat.SharedMemory(create=True, size=64)
    try:
        end = {
            "exit": "sys.exit(0)",
            "os._exit": "os._exit(0)",
            "SIGKILL": "os.kill(os.getpid(), signal.SIGKILL)",
        }[ending]
        proc = _run_python(
            f"""
            import os, signal, sys
            from shmalloc import compat
            s = compat.SharedMemory(sys.argv[1])
            s.buf[:5] = b"other"
            {end}
            """,
            shm.name,
        )
        expected = -signal.SIGKILL if ending == "SIGKILL" else 0
        assert proc.returncode == expected, proc.stderr
        arena.collect()  # whatever the ended process left is reclaimed; the block is not
        assert shm.name in arena.names()
        again = compat.SharedMemory(shm.name)
        assert bytes(again.buf[:5]) == b"other"
        again.close()
    finally:
        shm.close()
        shm.unlink()


def test_names_are_strings_any_process_attaches_by(arena: MemoryManager) -> None:
    shm = compat.SharedMemory(create=True, size=32)
    assert shm.name in arena.names()
    assert shm.arena is not None and shm.arena.name == arena.name
    out = _run_python(
        """
        import sys
        from shmalloc import compat
        s = compat.SharedMemory(sys.argv[1])
        s.buf[:4] = b"seen"
        print(compat.get_arena().name, s.size)
        s.close()
        """,
        shm.name,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [arena.name, "32"]  # found through SHMALLOC_COMPAT_ARENA
    assert bytes(shm.buf[:4]) == b"seen"
    shm.close()
    shm.unlink()
    assert shm.name not in arena.names()


def test_set_arena_exports_and_restores_the_environment(mgr: MemoryManager) -> None:
    before = os.environ.get(compat.ARENA_ENV)
    assert compat.set_arena(mgr) is mgr
    try:
        assert os.environ[compat.ARENA_ENV] == mgr.name
        assert compat.get_arena() is mgr
        shm = compat.SharedMemory(create=True, size=8)
        assert shm.name in mgr.names()
        shm.close()
        shm.unlink()
    finally:
        compat.set_arena(None)
    assert os.environ.get(compat.ARENA_ENV) == before


def test_an_explicit_arena_overrides_the_current_one(arena: MemoryManager) -> None:
    with MemoryManager(8 << 20) as other:
        shm = compat.SharedMemory(create=True, size=8, arena=other)
        assert shm.name in other.names() and shm.name not in arena.names()
        with pytest.raises(FileNotFoundError):
            compat.SharedMemory(shm.name)  # not in the current arena
        copy = pickle.loads(pickle.dumps(shm))  # the pickle names the arena too
        assert copy.arena is not None and copy.arena.name == other.name
        copy.close()
        shm.close()
        shm.unlink()
        assert other.names() == []
        del shm, copy
        gc.collect()


def _get_default_arena(barrier: Any, conn: Any) -> None:
    barrier.wait()
    conn.send(compat.get_arena().name)
    conn.close()


def test_default_arena_is_created_once_when_processes_race() -> None:
    """Three spawned processes open the default arena at once: one creates it, all share it."""
    name = unique_name("default")
    os.environ[compat.ARENA_ENV] = name
    try:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(3)
        pipes, procs = [], []
        for _ in range(3):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_get_default_arena, args=(barrier, child))
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        names = [c.recv() for c in pipes]
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0
        assert names == [name] * 3
        m = MemoryManager.attach(name)
        assert m.capacity == compat.default_capacity()
        m.close()
    finally:
        del os.environ[compat.ARENA_ENV]
        path = os.path.join(SHM_DIR, name)
        if os.path.exists(path):
            os.unlink(path)


def test_bad_names(arena: MemoryManager) -> None:
    with pytest.raises(ValueError, match="block name"):
        compat.SharedMemory("x" * 56, create=True, size=8)
    with pytest.raises(TypeError):
        compat.SharedMemory(b"psm_bytes")  # type: ignore[arg-type]
    address = arena.allocate(64)
    arena.bind("not-compat", address)
    with pytest.raises(ValueError, match="not made by shmalloc.compat"):
        compat.SharedMemory("not-compat")
    arena.deallocate(address)
    assert arena.names() == []


def _holder(name: str, conn: Any) -> None:
    """Attach (compat) and serve: "read" -> the first 8 bytes, bytes -> written, "close"."""
    shm = compat.SharedMemory(name)
    conn.send("attached")
    while (msg := conn.recv()) != "close":
        if msg == "read":
            conn.send(bytes(shm.buf[:8]))
        else:
            shm.buf[: len(msg)] = msg
            conn.send("written")
    shm.close()
    conn.send("closed")
    conn.close()


def _inherited_holder(shm: Any, conn: Any) -> None:
    """Fork child using the object it inherited (no attach)."""
    conn.send("ready")
    while (msg := conn.recv()) != "exit":
        if msg == "read":
            conn.send(bytes(shm.buf[:8]))
        else:
            shm.buf[: len(msg)] = msg
            conn.send("written")
    conn.close()  # and exit without closing anything


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_unlinked_memory_is_freed_only_when_the_last_process_closes(
    arena: MemoryManager, method: str
) -> None:
    shm = compat.SharedMemory(create=True, size=256)
    shm.buf[:8] = b"original"
    address = arena.lookup(shm.name)
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_holder, args=(shm.name, child))
    p.start()
    try:
        assert parent.recv() == "attached"
        shm.unlink()
        shm.close()
        assert address in _attached_blocks(arena)  # the child still has it open
        others = [compat.SharedMemory(create=True, size=256) for _ in range(8)]
        assert all(arena.lookup(o.name) != address for o in others)
        parent.send("read")
        assert parent.recv() == b"original"
        parent.send(b"childout")
        assert parent.recv() == "written"
        parent.send("close")
        assert parent.recv() == "closed"
        if method == "spawn":  # the last user closed it: freed there
            assert address not in _attached_blocks(arena)
        else:  # a fork child also holds the object it inherited, until it ends
            assert address in _attached_blocks(arena)
        for o in others:
            o.close()
            o.unlink()
    finally:
        p.join(TIMEOUT)
    assert p.exitcode == 0
    arena.collect()  # the references of the ended child go, and with them the block
    assert address not in _attached_blocks(arena)


def test_references_of_a_killed_process_do_not_keep_unlinked_memory(arena: MemoryManager) -> None:
    shm = compat.SharedMemory(create=True, size=256)
    address = arena.lookup(shm.name)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_holder, args=(shm.name, child))
    p.start()
    assert parent.recv() == "attached"
    os.kill(p.pid, signal.SIGKILL)
    p.join(TIMEOUT)
    assert p.exitcode == -signal.SIGKILL
    assert [b.refcount for b in arena.all_blocks() if b.address == address] == [2]
    shm.unlink()
    shm.close()  # collects the dead child's reference, then frees
    assert address not in _attached_blocks(arena)


def test_a_fork_child_keeps_inherited_memory_alive_after_the_parent_unlinks(
    arena: MemoryManager,
) -> None:
    shm = compat.SharedMemory(create=True, size=64)
    other = compat.SharedMemory(create=True, size=64)
    address = arena.lookup(shm.name)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_inherited_holder, args=(shm, child))
    p.start()
    try:
        assert parent.recv() == "ready"
        shm.buf[:8] = b"before!!"
        shm.unlink()
        shm.close()
        assert address in _attached_blocks(arena)  # the child took its own reference at fork
        parent.send(b"fromkid!")
        assert parent.recv() == "written"
        parent.send("read")
        assert parent.recv() == b"fromkid!"
        parent.send("exit")
    finally:
        p.join(TIMEOUT)
    assert p.exitcode == 0
    # the child ended without closing: the block waits for this process's next compat call
    assert address in _attached_blocks(arena)
    other.close()
    assert address not in _attached_blocks(arena)
    other.unlink()


def test_dropping_an_object_releases_its_reference(arena: MemoryManager) -> None:
    shm = compat.SharedMemory(create=True, size=16)
    address = arena.lookup(shm.name)

    def refs() -> list[int]:
        return [b.refcount for b in arena.all_blocks() if b.address == address]

    assert refs() == [1]
    other = compat.SharedMemory(shm.name)
    assert refs() == [2]
    del other
    gc.collect()
    assert refs() == [1]
    shm.unlink()
    assert refs() == [1]  # unlinked, but still open here
    del shm
    gc.collect()
    assert refs() == []


def _attach_close_loop(name: str, conn: Any) -> None:
    """Attach, write, close, over and over, until the name is gone; report the count."""
    n = 0
    try:
        while True:
            shm = compat.SharedMemory(name)
            shm.buf[n % 64] = n % 256
            shm.close()
            n += 1
            if n == 20:
                conn.send("going")
    except FileNotFoundError:
        conn.send(n)
    conn.close()


def test_processes_closing_at_once_free_an_unlinked_block_exactly_once(
    arena: MemoryManager,
) -> None:
    shm = compat.SharedMemory(create=True, size=64)
    address = arena.lookup(shm.name)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(3):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_attach_close_loop, args=(shm.name, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    assert [c.recv() for c in pipes] == ["going"] * 3  # all three are attaching and closing
    shm.unlink()
    shm.close()
    counts = [c.recv() for c in pipes]
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    assert all(n >= 20 for n in counts)
    arena.check()  # a double free would corrupt the heap; check() walks it all
    assert address not in _attached_blocks(arena)  # the last one to close freed it
