"""Processes in another PID namespace (two containers sharing /dev/shm), for real: a child made by
``unshare -p -f --mount-proc`` numbers itself 1 and sees its own /proc, so the host sees its pid
as another process (here: the host's init). Liveness must come from its life lock, not its pid."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shmalloc import (
    CorruptionDetected,
    GcStrategy,
    GlobalGarbageCollector,
    InvalidAddress,
    MemoryManager,
)
from shmalloc import _binding as C
from shmalloc.coordinator.watch import ProcessWatch
from shmalloc.manager import attachment_of

CHILD = Path(__file__).resolve().parent / "ns_child.py"
TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace needs root and unshare(1)",
)


@dataclass
class NsChild:
    proc: subprocess.Popen[str]
    small: int
    big: int
    pid: int  # as the child numbers itself, and registered itself in the arena
    slot: int
    host_pid: int  # as the host numbers it

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        os.kill(self.host_pid, signal.SIGKILL)  # pid 1 of its namespace: the namespace ends
        self.proc.wait(TIMEOUT)


@pytest.fixture
def ns_child(mgr: MemoryManager) -> Iterator[NsChild]:
    cmd = ["unshare", "-p", "-f", "--mount-proc", sys.executable, str(CHILD), mgr.name]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        assert words and words[0] == "ready", words
        small, big, pid, slot = (int(w) for w in words[1:])
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        yield NsChild(proc, small, big, pid, slot, int(children[0]))
    finally:
        if proc.poll() is None:  # kill pid 1 of the namespace (which ends it), then unshare
            for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(c), signal.SIGKILL)
            proc.kill()
        proc.wait(TIMEOUT)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()


def test_a_live_process_of_another_pid_namespace_is_never_reclaimed(
    mgr: MemoryManager, ns_child: NsChild
) -> None:
    c = ns_child
    assert c.pid != c.host_pid  # it numbers itself differently from how the host sees it
    info = next(p for p in mgr.processes() if p.slot == c.slot)
    assert (info.pid, info.alive) == (c.pid, True)  # its pid as it registered; alive
    assert mgr.check().live_processes == 1  # the host has no slot yet: it allocated nothing

    # every collector the host has, and a coordinator's process watch
    mgr.collect()
    mgr.force_collect()
    stats = GlobalGarbageCollector(mgr).collect(GcStrategy.GLOBAL)
    assert stats.processes_cleaned == 0 and stats.freed_blocks == 0
    GlobalGarbageCollector(mgr).collect(GcStrategy.UNREFERENCED)
    gc = GlobalGarbageCollector(mgr)
    watch = ProcessWatch(attachment_of(mgr).handle(), gc, select.poll())
    try:
        watch.scan()
        watch.reclaim()
        assert (c.pid, info.start_time) in watch.foreign  # its pid shows another process here
    finally:
        watch.close()

    assert mgr.block_info(c.small).pid == c.pid
    assert mgr.block_info(c.big).pid == c.pid
    # the host allocates the same sizes again and again: it never gets the child's blocks
    mine = [mgr.allocate(n) for n in (100, 200_000) for _ in range(50)]
    assert c.small not in mine and c.big not in mine
    for a in mine:
        mgr.write(a, b"h" * 100)
    assert c.ask("check") == "ok"
    assert next(p for p in mgr.processes() if p.slot == c.slot).alive
    assert mgr.check().live_processes == 2

    # kill -9: its life lock says so at once, whatever its pid shows; its blocks are reclaimed
    c.kill()
    info = next(p for p in mgr.processes() if p.slot == c.slot)
    assert info.alive is False
    report = mgr.check()
    assert (report.live_processes, report.dead_processes) == (1, 1)
    assert mgr.collect() >= 2
    assert all(p.slot != c.slot or p.pid != c.pid for p in mgr.processes())
    for a in (c.small, c.big):
        with pytest.raises(InvalidAddress):
            mgr.block_info(a)
    for a in mine:
        mgr.deallocate(a)
    assert mgr.stats().used == 0


def test_the_coordinator_reclaims_a_process_of_another_namespace_only_once_it_ends(
    mgr: MemoryManager, ns_child: NsChild
) -> None:
    from shmalloc.coordinator import Coordinator

    c = ns_child
    coord = Coordinator(mgr.name, interval=0.02)
    t = threading.Thread(target=coord.run)
    t.start()
    try:
        # a coordinator ticks every 20 ms; give it 50 ticks to (wrongly) reclaim the child
        time.sleep(1.0)
        assert t.is_alive()
        assert mgr.block_info(c.big).pid == c.pid
        assert c.ask("check") == "ok"
        c.kill()
        deadline = time.monotonic() + TIMEOUT
        while any(p.slot == c.slot and p.pid == c.pid for p in mgr.processes()):
            assert time.monotonic() < deadline, "the coordinator never reclaimed the child"
            time.sleep(0.02)
        with pytest.raises(InvalidAddress):
            mgr.block_info(c.big)
    finally:
        coord.stop()
        t.join(TIMEOUT)


def _lock_in_thread(mgr: MemoryManager, address: int) -> tuple[threading.Thread, list[object]]:
    """Free ``address`` (a large block: the heap lock) in a thread; what it raised, if anything,
    lands in the list."""
    out: list[object] = []

    def run() -> None:
        try:
            mgr.deallocate(address)
            out.append("done")
        except Exception as e:  # the test asserts on it
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_lock_held_from_another_namespace_is_waited_for_not_called_corrupt(
    mgr: MemoryManager, ns_child: NsChild
) -> None:
    """The heap lock, stamped by a holder of the child's namespace and slot, naming a thread id
    that does not exist here: the holder runs (its life lock is held), so a waiter waits, past
    the one-second looks at the holder; once the child is dead the same lock is a ghost."""
    c = ns_child
    h = attachment_of(mgr).handle()
    its_ns = os.stat(f"/proc/{c.host_pid}/ns/pid").st_ino
    assert its_ns != C.pid_namespace()
    ghost = int(Path("/proc/sys/kernel/pid_max").read_text()) + 7  # no such thread here
    a = mgr.allocate(1 << 20)
    C.debug_lock_forge(h, -1, ghost, its_ns, c.slot)
    t, out = _lock_in_thread(mgr, a)
    try:
        time.sleep(2.5)  # the waiter looks at the holder every second; two looks make a ghost
        assert t.is_alive() and out == []
    finally:
        C.debug_lock_forge(h, -1, 0)
        t.join(TIMEOUT)
    assert out == ["done"]

    c.kill()  # its life lock's holder died: a lock it stamped and still names is a ghost
    b = mgr.allocate(1 << 20)
    C.debug_lock_forge(h, -1, ghost, its_ns, c.slot)
    with pytest.raises(CorruptionDetected) as ei:
        mgr.deallocate(b)
    assert ei.value.offset == C.lock_offset(-1)
    C.debug_lock_forge(h, -1, 0)
    mgr.deallocate(b)


def test_a_coordinator_in_another_namespace_is_not_taken_over(mgr: MemoryManager) -> None:
    """The lease's holder runs in another PID namespace, where it is pid 1 (on the host, pid 1 is
    init): its life lock, not its pid, says it runs; once it is killed, the lease can be taken."""
    from shmalloc.coordinator import CoordinatorRunning, lease_holder

    cmd = ["unshare", "-p", "-f", "--mount-proc"]
    cmd += [sys.executable, "-m", "shmalloc.coordinator", mgr.name, "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h = attachment_of(mgr).handle()
        deadline = time.monotonic() + TIMEOUT
        while C.lease_get(h)[0] == 0:  # waits for the coordinator to take the lease
            assert proc.poll() is None and time.monotonic() < deadline, "it never took the lease"
            time.sleep(0.01)
        held_pid = C.lease_get(h)[0]
        assert lease_holder(mgr) == held_pid  # alive, though this pid here is another process
        with pytest.raises(CoordinatorRunning):
            mgr.start_coordinator(timeout=TIMEOUT)
        inner = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.kill(int(inner[0]), signal.SIGKILL)  # pid 1 of its namespace: the namespace ends
        proc.wait(TIMEOUT)
        assert lease_holder(mgr) is None  # its life lock says it ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
