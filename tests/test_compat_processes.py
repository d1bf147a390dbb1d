"""shmalloc.compat across real processes: a spawn child that still holds compat objects when it
exits says nothing on stderr; a full name directory and an out-of-memory compat arena say which
setting to change (``set_arena`` / ``SHMALLOC_COMPAT_ARENA``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from shmalloc import MemoryManager, OutOfMemory, ShmallocError, compat
from shmalloc import _binding as C

SPAWN_CHILD = """
import multiprocessing as mp
import sys
from shmalloc import MemoryManager, compat

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    with MemoryManager(1 << 22) as m:
        compat.set_arena(m)
        shm = compat.SharedMemory(create=True, size=16)
        sl = compat.ShareableList([1, "two"])
        q = ctx.Queue()
        # the child's Process object holds its args until the interpreter's very end
        for obj in (shm, sl):
            p = ctx.Process(target=q.put, args=(obj,))
            p.start()
            print(type(q.get()).__name__, flush=True)
            p.join()
            assert p.exitcode == 0, p.exitcode
        shm.close()
        shm.unlink()
        sl.shm.close()
        sl.shm.unlink()
        compat.set_arena(None)
"""


def test_spawn_child_exits_without_finalizer_noise(tmp_path: os.PathLike[str]) -> None:
    script = os.path.join(tmp_path, "spawn_child.py")
    with open(script, "w") as f:
        f.write(SPAWN_CHILD)
    r = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["SharedMemory", "ShareableList"]
    assert "Exception ignored" not in r.stderr, r.stderr
    assert r.stderr == "", r.stderr


def test_full_name_directory_names_the_table_and_the_way_out(mgr: MemoryManager) -> None:
    compat.set_arena(mgr)
    made = []
    try:
        for i in range(C.MAX_NAMES):
            mgr.bind(f"n{i}", mgr.allocate(16))
        with pytest.raises(ShmallocError) as ei:
            mgr.bind("one-too-many", mgr.allocate(16))
        assert "names directory is full" in str(ei.value)
        assert str(C.MAX_NAMES) in str(ei.value)
        with pytest.raises(ShmallocError) as ci:
            made.append(compat.SharedMemory(create=True, size=16))
        text = str(ci.value)
        assert "names directory is full" in text and str(C.MAX_NAMES) in text, text
        assert "set_arena" in text and "SHMALLOC_COMPAT_ARENA" in text, text
    finally:
        compat.set_arena(None)
        for shm in made:
            shm.close()
            shm.unlink()


def test_out_of_memory_in_compat_names_its_settings(small: MemoryManager) -> None:
    compat.set_arena(small)
    try:
        with pytest.raises(OutOfMemory) as ei:
            compat.SharedMemory(create=True, size=small.capacity * 2)
        text = str(ei.value)
        assert "set_arena" in text and "SHMALLOC_COMPAT_ARENA" in text, text
        assert ei.value.requested >= small.capacity * 2
    finally:
        compat.set_arena(None)


def test_default_compat_arena_is_sized_for_the_machine() -> None:
    st = os.statvfs("/dev/shm")
    expected = min(st.f_frsize * st.f_blocks, 1 << 40)
    assert 0 <= expected - compat.default_capacity() < os.sysconf("SC_PAGESIZE")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os
                from shmalloc import compat
                shm = compat.SharedMemory(create=True, size=16)
                print(compat.get_arena().capacity)
                shm.close(); shm.unlink(); compat.get_arena().destroy()
                """
            ),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SHMALLOC_COMPAT_ARENA": f"shmalloc-test-compat-{os.getpid()}"},
        timeout=60,
        check=True,
    )
    assert int(out.stdout) == compat.default_capacity()
