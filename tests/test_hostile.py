"""Hostile surroundings: another user, damaged lock bytes, damaged ring numbers."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmalloc import CorruptionDetected, MemoryManager, Queue
from shmalloc import _binding as C
from shmalloc._binding import ffi, lib
from shmalloc.events import GC_TRIGGERED
from shmalloc.manager import attachment_of

NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_user_cannot_attach(mgr: MemoryManager) -> None:
    st = os.stat(f"/dev/shm/{mgr.name}")
    assert st.st_mode & 0o777 == 0o600
    # fork (the interpreter and shmalloc are loaded already), become nobody, try to attach
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, leave with os._exit
        os.close(r)
        outcome = b"attached"
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            MemoryManager.attach(mgr.name)
        except PermissionError as e:
            outcome = b"refused: " + str(e).encode()
        except BaseException as e:  # report anything else to the parent, which fails the test
            outcome = b"other: " + repr(e).encode()
        os.write(w, outcome)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    assert outcome.startswith("refused"), outcome
    assert mgr.name in outcome


def _poke(mgr: MemoryManager, offset: int, data: bytes) -> None:
    with open(f"/dev/shm/{mgr.name}", "r+b") as f, mmap.mmap(f.fileno(), mgr.capacity) as m:
        m[offset : offset + len(data)] = data


@pytest.mark.parametrize("which", ["heap", "slot"])
def test_lock_held_by_a_thread_that_does_not_exist_is_corruption(
    mgr: MemoryManager, which: str
) -> None:
    """The heap lock (taken to free a large block) or this process's slot lock (taken to free a
    small one into its cache), damaged to name a thread that does not exist."""
    a = mgr.allocate(1 << 20 if which == "heap" else 100)
    # a pid that does not exist: beyond the kernel's pid_max
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    ghost = pid_max + 7
    if ghost >= 1 << 30:
        pytest.skip("pid_max leaves no room for a ghost thread id")
    if which == "heap":
        lock = -1
    else:
        lock = attachment_of(mgr).slot  # claimed by the allocation above
        assert lock >= 0
        assert mgr.cache_limit > 0  # small frees go through the cache, under the slot lock
    h = attachment_of(mgr).handle()
    C.debug_lock_forge(h, lock, ghost)  # as a holder the kernel never cleaned up would leave it
    assert C.lock_owner(h, lock) == ghost
    with pytest.raises(CorruptionDetected) as ei:
        mgr.deallocate(a)
    assert ei.value.offset == C.lock_offset(lock)
    assert str(ghost) in ei.value.detail
    C.debug_lock_forge(h, lock, 0)  # repaired, so that the fixture can clean up


def test_damaged_ring_numbers_do_not_hang(mgr: MemoryManager) -> None:
    slots = ffi.offsetof("shm_arena_t", "ring") + ffi.offsetof("shm_ring_t", "slots")
    # every cell claims to be far in the future: producers and consumers must give up, not spin
    cell = ffi.sizeof("shm_event_t")
    for i in range(4096):
        _poke(mgr, slots + i * cell, (1 << 62).to_bytes(8, "little"))
    with pytest.raises(CorruptionDetected) as ei:  # reported, neither spun on nor ignored
        mgr.drain_events()
    assert ei.value.offset == ffi.offsetof("shm_arena_t", "ring")
    # a rare event goes to the ring: the damage is reported, not spun on and not ignored
    with pytest.raises(CorruptionDetected) as ei:
        attachment_of(mgr).emit(GC_TRIGGERED, freed_blocks=1)
    assert ei.value.offset == ffi.offsetof("shm_arena_t", "ring")
    assert mgr.dropped_events() >= 1


@pytest.mark.parametrize("value", ["small", "array"])
def test_a_damaged_object_header_is_corruption_for_get_and_queue_get(
    mgr: MemoryManager, value: str
) -> None:
    """The combined calls (shm_object_get, native/handoff.c) copy bytes whose lengths they read
    from the segment: a header that claims more than its block holds is reported, not copied."""
    obj: Any = b"x" * 100 if value == "small" else np.arange(1000)
    h = attachment_of(mgr).handle()
    ref = mgr.put(obj)
    q = Queue(arena=mgr)
    q.put(obj)  # a value of its own in the queue
    objects = [b.address for b in C.blocks_list(h, -2, 0) if b.flags & lib.SHM_BF_OBJECT]
    [item] = set(objects) - {ref.address, q._ref.address}
    field = ffi.offsetof("shm_object_t", "pickle_len")
    for at, read in ((ref.address, lambda: mgr.get(ref)), (item, q.get_nowait)):
        saved = bytes(attachment_of(mgr).mm[at + field : at + field + 8])
        _poke(mgr, at + field, (1 << 40).to_bytes(8, "little"))
        with pytest.raises(CorruptionDetected):
            read()
        _poke(mgr, at + field, saved)
    # (queue.c leaves the damaged item out of the queue: only the reference reads again)
    assert np.array_equal(np.asarray(mgr.get(ref)), np.asarray(obj))
