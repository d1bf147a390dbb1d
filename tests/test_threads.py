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
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import SHM_DIR, destroyed_after, unique_name

from shmalloc import MemoryManager

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


def _python(code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """``python -c code args...``, its output piped to this process."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, **popen
    )


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new session; on a hang, kill its whole process group and fail."""
    p = _python(code, *args, stderr=subprocess.PIPE, start_new_session=True)
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
    except ValueError as e:  # closed: from the gate, the handle, or the mapping's views
        if "closed" not in str(e):
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


# ---------------------------------------------------------------- 2, 3. the slot claim


def _fork_mid(setup: str, child: str) -> str:
    """A child script: ``setup`` starts a thread ``t`` that sleeps on the heap lock (held by a
    real paused process, let go by ``release()``); the main thread then forks, and the fork
    child runs ``child`` (which sets ``code``, 0 for success); both must finish cleanly."""
    return (
        PRELUDE
        + setup
        + """
wait_for_heap_lock_sleeper(m)
pid = os.fork()  # from the main thread, while the other one is inside the library
if pid == 0:
    try:
"""
        + textwrap.indent(child, "        ")
        + """
    except BaseException as e:
        print("child:", repr(e), flush=True)
        code = 2
    os._exit(code)
release()
t.join()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
m.check()
m.close()
print("ok")
"""
    )


FORK_MID_CLAIM = _fork_mid(
    """
m = MemoryManager.create(sys.argv[1], 64 << 20)  # the test's fixture unlinks it
release = hold_heap_lock(m.name)  # a real process holds the heap lock, paused
t = threading.Thread(target=lambda: m.deallocate(m.allocate(100)))
t.start()  # this process's first allocation: its slot claim sleeps on the heap lock
""",
    """m.deallocate(m.allocate(100))  # the child's own first allocation: its own slot
code = 0 if attachment_of(m).slot_pid == os.getpid() else 3
""",
)


def test_fork_while_another_thread_claims_the_slot(arena_name: str) -> None:
    """The child of a fork made while another thread sleeps inside the slot claim (on the heap
    lock, held by a real process) claims its own slot and goes on; it used to hang forever on
    the Python lock that thread held."""
    _assert_ok(_run(FORK_MID_CLAIM, arena_name))


SIGNAL_IN_CLAIM = (
    PRELUDE
    + """
m = MemoryManager.create(sys.argv[1], 64 << 20)  # the test's fixture unlinks it
got = []


def on_alarm(signum, frame):
    a = m.allocate(200)  # a handler that allocates, inside the first allocate's claim
    m.write(a, b"handler")
    got.append(a)


signal.signal(signal.SIGALRM, on_alarm)
release = hold_heap_lock(m.name)


def ring():
    wait_for_heap_lock_sleeper(m)  # the main thread sleeps inside its slot claim
    signal.setitimer(signal.ITIMER_REAL, 0.001)  # the handler runs as the claim returns
    while not signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):
        time.sleep(0.001)
    release()


t = threading.Thread(target=ring)
t.start()
first = m.allocate(100)  # this process's first allocation
t.join()
while not got:  # the handler has run (the signal arrived while the claim slept)
    time.sleep(0.001)
assert m.read(got[0], 7) == b"handler"
st = m.processes()
assert [p.pid for p in st] == [os.getpid()], st
m.deallocate(first)
m.deallocate(got[0])
m.check()
m.close()
print("ok")
"""
)


def test_signal_handler_that_allocates_during_the_first_allocation(arena_name: str) -> None:
    """SIGALRM arrives while the process's first allocate() sleeps inside its slot claim; the
    handler allocates too. It used to deadlock on the Python lock the interrupted claim held;
    now both claims get the same slot."""
    _assert_ok(_run(SIGNAL_IN_CLAIM, arena_name))


SIGNAL_STORM = """
import os, signal, sys
from shmalloc import MemoryManager

m = MemoryManager.attach(sys.argv[1])
got = []
signal.signal(signal.SIGALRM, lambda s, f: got.append(m.allocate(64)))
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[2]), 0.01)  # then every 10 ms
a = m.allocate(100)
while not got:
    signal.pause()  # (a signal between the test and the pause: the next one ends it)
signal.setitimer(signal.ITIMER_REAL, 0)
m.deallocate(a)
for b in got:
    m.deallocate(b)
m.close()
print("ok")
"""


def test_timer_signals_across_the_first_allocation_of_fresh_processes(arena_name: str) -> None:
    """Fresh processes arm a timer that lands around their first allocate() (spread over the
    claim and the /proc read); the handler allocates. None may hang or fail."""
    from shmalloc import MemoryManager

    m = MemoryManager.create(arena_name, 64 << 20)
    try:
        for i in range(24):
            delay = 0.000_05 + i * 0.000_05
            _assert_ok(_run(SIGNAL_STORM, arena_name, f"{delay:.6f}"))
        m.collect()
        assert m.stats().used == 0
        m.check()
    finally:
        m.close()
        m.destroy()


FORK_MID_COLLECT = _fork_mid(
    """
from shmalloc.gc import GlobalGarbageCollector

m = MemoryManager.create(sys.argv[1], 64 << 20)  # the test's fixture unlinks it
m.deallocate(m.allocate(100))  # this process has its slot
leaver = "import os, sys; from shmalloc import MemoryManager; "
leaver += "MemoryManager.attach(sys.argv[1]).allocate(100); os._exit(0)"
subprocess.run([sys.executable, "-c", leaver, m.name], check=True)  # ends owning a block
collector = GlobalGarbageCollector(m)
release = hold_heap_lock(m.name)
t = threading.Thread(target=collector.collect)
t.start()  # a collection that sleeps on the heap lock (marking the ended process dead)
""",
    """collector.collect()  # the child's own collection, with the parent's collector object
code = 0
""",
)


def test_fork_while_another_thread_collects(arena_name: str) -> None:
    """A fork child of a process whose other thread is inside GlobalGarbageCollector.collect()
    can collect with the same collector (it used to hang on the collector's Python lock)."""
    _assert_ok(_run(FORK_MID_COLLECT, arena_name))


# ---------------------------------------------------------------- 4. the slot's pending word

OWNER = """
import sys
from shmalloc import MemoryManager

m = MemoryManager.attach(sys.argv[1])
print(m.allocate(100), m.allocate(100), flush=True)
sys.stdin.readline()  # killed while it waits here
"""

FREER = """
import os, sys, threading
from shmalloc import MemoryManager

note_r, note_w = os.pipe()
go_r, go_w = os.pipe()
os.environ["SHMALLOC_FAULT"] = "remote.claimed"  # read when the first handle opens
os.environ["SHMALLOC_FAULT_PAUSE"] = f"{note_w}:{go_r}"
m = MemoryManager.attach(sys.argv[1])
m.deallocate(m.allocate(64))  # this process has its slot (and so frees through its cache)
a, b = int(sys.argv[2]), int(sys.argv[3])
t = threading.Thread(target=m.deallocate, args=(a,))
t.start()
assert os.read(note_r, 1) == b"p"  # t has claimed a (REMOTE) and not yet pushed it
m.deallocate(b)  # another thread of this process frees another of the owner's blocks
print("freed", flush=True)
sys.stdin.readline()
os.write(go_w, b"g")
t.join()
m.close()
print("ok", flush=True)
"""


@contextmanager
def _arena_and_children(
    name: str,
) -> Iterator[tuple[MemoryManager, Callable[..., subprocess.Popen[str]]]]:
    """A new 64 MiB arena and a function that starts ``python -c CODE ARGS...`` with pipes;
    afterwards every child still running is killed and the arena destroyed."""
    children: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        p = _python(code, *args, stdin=subprocess.PIPE)
        children.append(p)
        return p

    with destroyed_after(MemoryManager.create(name, 64 << 20)) as m:
        try:
            yield m, start
        finally:
            for p in children:
                if p.poll() is None:
                    p.kill()
                    p.wait(TIMEOUT)


def test_two_threads_freeing_another_process_blocks_share_no_pending_push(
    arena_name: str,
) -> None:
    """Thread 1 of a process is paused between claiming another process's block and pushing it
    onto that owner's remote list; thread 2 frees another block of the same owner; the owner
    dies and a third process collects. The block in flight must survive the collection (it
    used to be freed: thread 2 overwrote, then cleared, the process's one pending word) and be
    freed exactly once after the push."""
    with _arena_and_children(arena_name) as (m, start):
        owner = start(OWNER, arena_name)
        assert owner.stdout is not None and owner.stdin is not None
        a, b = owner.stdout.readline().split()
        freer = start(FREER, arena_name, a, b)
        assert freer.stdout is not None and freer.stdin is not None
        assert freer.stdout.readline().strip() == "freed"
        owner.kill()
        owner.wait(TIMEOUT)
        m.collect()
        # block a is still claimed by the paused push: a heap block that is neither free nor
        # cached (check() reports it as freed, as users see it), and the dead owner's slot
        # stays until it is freed
        rep = m.check()
        assert rep.blocks - rep.free_blocks - rep.cached_blocks - rep.allocated_blocks == 1
        assert [p.pid for p in m.processes() if not p.alive] == [owner.pid]
        freer.stdin.write("go\n")
        freer.stdin.flush()
        out, _ = freer.communicate(timeout=TIMEOUT)
        assert freer.returncode == 0 and out.strip().endswith("ok"), out
        m.collect()
        st = m.stats()
        rep = m.check()
        assert (st.used, rep.allocated_blocks, rep.free_blocks) == (0, 0, 1)
        assert m.processes() == []


MANY_OWNER = """
import sys
from shmalloc import MemoryManager

m = MemoryManager.attach(sys.argv[1])
print(" ".join(str(m.allocate(16 + 16 * (i % 40))) for i in range(int(sys.argv[2]))), flush=True)
sys.stdin.readline()  # killed while it waits here
"""

MANY_FREER = """
import sys, threading
from shmalloc import InvalidAddress, MemoryManager

m = MemoryManager.attach(sys.argv[1])
m.deallocate(m.allocate(64))  # this process has its slot: it frees through its cache
addrs = [int(x) for x in sys.stdin.readline().split()]
gone, errors = [0], []


def free(mine):
    for a in mine:
        try:
            m.deallocate(a)
        except InvalidAddress:  # the owner died and a collection took it first
            gone[0] += 1
        except BaseException as e:
            errors.append(repr(e))


ts = [threading.Thread(target=free, args=(addrs[i::4],)) for i in range(4)]
for t in ts:
    t.start()
for t in ts:
    t.join()
m.close()
assert not errors, errors[:3]
print("ok", gone[0], flush=True)
"""


def test_threads_free_another_process_blocks_while_it_dies_and_others_collect(
    arena_name: str,
) -> None:
    """Four threads of one process free thousands of another process's blocks, which is killed
    meanwhile, while this process collects in a loop: afterwards every block is free exactly
    once (nothing used, one free block, the heap walk clean)."""
    with _arena_and_children(arena_name) as (m, start):
        for _ in range(3):
            owner = start(MANY_OWNER, arena_name, "4000")
            freer = start(MANY_FREER, arena_name)
            assert owner.stdout is not None and freer.stdin is not None
            freer.stdin.write(owner.stdout.readline())
            freer.stdin.flush()
            m.collect()
            owner.kill()  # while the freer's threads are at work
            owner.wait(TIMEOUT)
            while freer.poll() is None:
                m.collect()
            out, _ = freer.communicate(timeout=TIMEOUT)
            assert freer.returncode == 0 and out.startswith("ok"), out
            m.collect()
            st, rep = m.stats(), m.check()
            assert (st.used, rep.allocated_blocks, rep.free_blocks) == (0, 0, 1), (st, rep)
            assert m.processes() == []
