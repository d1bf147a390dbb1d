"""Threads, fork and signals inside one process (SPEC.md, "Safety under threads, fork, signals,
other users and containers").

Each scenario that could crash or hang runs in its own Python process, started in a new session
with a timeout: the test asserts on its exit status (0, no signal, no timeout) and kills its
whole process group if it hangs. Windows are made wide by real means, not by timing: a helper
process paused inside the C core holding the heap lock (SHMALLOC_FAULT_PAUSE, native/fault.c),
a thread seen asleep on that lock (the futex word's waiters bit), a signal sent while it sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import SHM_DIR, unique_name

TIMEOUT = 120

# Helpers for the scenario scripts below: a process that holds the heap lock for as long as the
# scenario needs, and a wait until some thread of this process sleeps on that lock.
PRELUDE = '''
import os, signal, subprocess, sys, threading, time
from shmalloc import MemoryManager
from shmalloc import _binding as C
from shmalloc.manager import attachment_of

HOLDER = (
    "import sys\\nfrom shmalloc import MemoryManager\\nm = MemoryManager.attach(sys.argv[1])\\n"
    "m.deallocate(m.allocate(1 << 20))\\nm.close()\\n"
)


def hold_heap_lock(name):
    """Start a process that pauses inside shm_alloc holding the heap lock (fault step
    alloc.locked); returns the function that lets it go and waits for its exit status 0."""
    note_r, note_w = os.pipe()
    go_r, go_w = os.pipe()
    env = dict(os.environ, SHMALLOC_FAULT="alloc.locked", SHMALLOC_FAULT_PAUSE=f"{note_w}:{go_r}")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, name], env=env, pass_fds=(note_w, go_r))
    os.close(note_w)
    os.close(go_r)
    assert os.read(note_r, 1) == b"p", "the holder did not reach the heap lock"
    os.close(note_r)

    def release():
        os.write(go_w, b"g")
        os.close(go_w)
        assert p.wait() == 0

    return release


def wait_for_heap_lock_sleeper(m):
    """Until a thread of this process sleeps on the heap lock: the FUTEX_WAITERS bit of the
    lock's futex word (glibc's robust mutex sets it before it sleeps)."""
    a = attachment_of(m)
    off = C.lock_offset(-1)
    while not int.from_bytes(a.mm[off : off + 4], "little") & 0x80000000:
        time.sleep(0.001)
'''


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new session; on a hang, kill its whole process group and fail."""
    p = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"the scenario hung (killed after {TIMEOUT} s)\n{out}\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _assert_ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, f"exit status {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _leftovers(prefix: str) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


# ---------------------------------------------------------------- 1. close under running calls

CLOSE_RACE = """
import sys, threading
from shmalloc import MemoryManager

errors = []


def worker(m, started):
    n, told = 0, False
    try:
        while True:
            a = m.allocate(100 + n % 3000)
            m.write(a, b"x" * 100)
            if m.read(a, 100) != b"x" * 100:
                errors.append(f"block {a:#x} lost its data")
            with m.view(a) as v:
                v[0:1] = b"y"
            m.size_of(a)
            m.deallocate(a)
            n += 1
            if n == 50:
                told = True
                started.release()
    except ValueError as e:  # closed: from the gate, the handle, the mmap or the view
        if "closed" not in str(e) and "released" not in str(e):
            errors.append(repr(e))
    except BaseException as e:
        errors.append(repr(e))
    finally:
        if not told:
            started.release()


for i in range(int(sys.argv[2])):
    m = MemoryManager.create(f"{sys.argv[1]}-{i}", 64 << 20)
    m.destroy()
    started = threading.Semaphore(0)
    ts = [threading.Thread(target=worker, args=(m, started)) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        started.acquire()  # every worker is in its loop
    while True:
        try:
            m.close()
            break
        except BufferError:  # a worker held a view at that moment: the close is refused
            continue
    for t in ts:
        t.join()
    for call in (lambda: m.allocate(100), lambda: m.read(64, 1), lambda: m.stats()):
        try:
            call()
            errors.append("a call after close succeeded")
        except ValueError:
            pass
assert not errors, errors
print("ok")
"""


def test_close_while_threads_are_inside_the_allocator() -> None:
    """Threads allocate, write, read, view and free while the main thread closes: every close
    waits for the calls inside and the threads then get ValueError; no crash, 40 times over."""
    prefix = unique_name("close")
    _assert_ok(_run(CLOSE_RACE, prefix, "40"))
    assert _leftovers(prefix) == []


def test_calls_after_close_raise_value_error(arena_name: str) -> None:
    from shmalloc import MemoryManager

    m = MemoryManager.create(arena_name, 8 << 20)
    m.destroy()
    a = m.allocate(100)
    m.close()
    m.close()  # idempotent
    for call in (
        lambda: m.allocate(100),
        lambda: m.deallocate(a),
        lambda: m.read(a, 10),
        lambda: m.write(a, b"x"),
        lambda: m.view(a),
        lambda: m.size_of(a),
        lambda: m.stats(),
    ):
        with pytest.raises(ValueError, match="closed"):
            call()
