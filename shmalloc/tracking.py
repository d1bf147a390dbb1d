"""Per-process tracking: the arena's process table as seen from Python.

Usage, peak and block counts are atomics in the segment (O(1) reads); listing a process's
blocks walks the heap under the lock. Whether a process is alive is decided here (``is_running``)
from its slot's life lock (native/life.c), which its process holds for as long as it is attached
and which the kernel marks when it dies, in whatever PID namespace it runs; only where nobody
holds the life lock (the process closed its last attachment while still owning blocks, or the
slot accounts for another pid) does (pid, start time) from /proc decide (process.py). A slot found
dead is marked DEAD in the segment so that collection may take its blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _binding as C
from . import process
from ._binding import SlotRow
from .attachment import Attachment, check_int

__all__ = [
    "MemoryBlock",
    "ProcessInfo",
    "SlotRow",
    "all_blocks",
    "block_info",
    "free_process_memory",
    "is_running",
    "live_and_dead",
    "mark_if_dead",
    "process_allocations",
    "process_memory",
    "process_peak",
    "processes",
    "read_slot",
    "reclaim_dead",
    "scan_slots",
    "set_process_limit",
    "slot_for",
]


@dataclass(frozen=True)
class MemoryBlock:
    """One allocated block: where, how big, whose, and its protection and references."""

    address: int
    size: int
    pid: int
    sealed: bool
    refcount: int
    persistent: bool = False


@dataclass(frozen=True)
class ProcessInfo:
    """One entry of the arena's process table."""

    pid: int
    alive: bool
    usage: int
    peak: int
    limit: int | None
    allocations: int
    start_time: int = 0
    total_allocations: int = 0
    total_frees: int = 0
    slot: int = -1


def _block(b: C.BlockInfo) -> MemoryBlock:
    return MemoryBlock(
        address=b.address,
        size=b.size,
        pid=b.pid,
        sealed=bool(b.flags & C.BLOCK_SEALED),
        refcount=b.refcount,
        persistent=bool(b.flags & C.BLOCK_PERSISTENT),
    )


# ------------------------------------------------------------ the process table


def read_slot(h: C.Handle, slot: int) -> SlotRow:
    """One slot of the table, as read without the lock."""
    return C.proc_info(h, slot)


def scan_slots(h: C.Handle) -> list[SlotRow]:
    """Every slot that is not FREE: attached processes, and dead ones not yet cleaned."""
    return [r for r in C.proc_rows(h) if r.state != C.PROC_FREE]


def is_running(h: C.Handle, row: SlotRow) -> bool:
    """Does the LIVE slot's process run? Its life lock says, in any PID namespace; /proc only
    where nobody holds the life lock (see the module's docstring)."""
    if row.state != C.PROC_LIVE:
        return False
    life = C.proc_life(h, row.slot)
    if life == C.LIFE_UNHELD:
        return process.is_alive(row.pid, row.start_time)
    return life == C.LIFE_HELD


def mark_if_dead(h: C.Handle, row: SlotRow, mark: bool = True) -> bool:
    """True if the slot's process has ended (``is_running``); with ``mark``, a LIVE slot is then
    marked DEAD in the segment, so that collection may take its blocks. The C core marks it only
    if its life lock is still not held: False then (it is alive after all), or if the slot went to
    another process meanwhile."""
    if row.state == C.PROC_DEAD:
        return True
    if row.state != C.PROC_LIVE or is_running(h, row):
        return False
    if not mark:
        return True
    if C.proc_mark_dead(h, row.slot, row.pid, row.start_time):
        row.state = C.PROC_DEAD
        return True
    return False


def live_and_dead(h: C.Handle) -> tuple[int, int]:
    """How many processes in the table run, and how many have ended (marked DEAD or not yet):
    the same answer ``processes()`` gives, so that check, info and top agree."""
    rows = scan_slots(h)
    live = sum(1 for r in rows if is_running(h, r))
    return live, len(rows) - live


def reclaim_dead(h: C.Handle, slot: int = -1) -> tuple[C.GcResult, list[tuple[int, int]]]:
    """Mark ended processes (or the one in ``slot``) dead and free their orphaned blocks.

    Returns what the C collection freed and, per process reclaimed, (pid, bytes)."""
    dead = [r for r in scan_slots(h) if (slot < 0 or r.slot == slot) and mark_if_dead(h, r)]
    res = C.gc(h, slot, False) or C.GcResult()
    reclaimed = []
    for r in dead:
        after = read_slot(h, r.slot)
        left = after.usage if after.state != C.PROC_FREE else 0
        if r.usage > left:
            reclaimed.append((r.pid, r.usage - left))
    return res, reclaimed


def own_slot(a: Attachment) -> int:
    """This process's slot, claimed on first use (and again after fork).

    No Python lock guards the claim: a fork child, or a signal handler that interrupted the
    claim, would wait forever on a lock held by a thread that does not exist in the child or by
    the very code it interrupted. None is needed: the C claim is idempotent for (pid, start
    time), under the heap lock, so threads and handlers racing here all get the same slot, the
    one the segment says is this process's. A handler that forks between the claim and the
    assignment leaves the child with its parent's identity: the pid is checked again after the
    assignment, and the child claims its own slot."""
    while True:
        pid, started = process.self_identity()
        slot = _claim(a.handle(), pid, started)
        a.slot_pid = pid
        a.slot = slot
        if os.getpid() == pid:
            return slot


def slot_for(a: Attachment, pid: int | None) -> int:
    """The slot that accounts for ``pid`` (None: this process), claimed if new."""
    if pid is None or pid == process.current_pid():
        slot = a.slot
        return slot if slot >= 0 else own_slot(a)
    pid = check_int(pid, "pid")
    if pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    started = process.start_time(pid)
    if started is None:
        raise ValueError(f"no process with pid {pid}: memory can only be accounted to a live one")
    return _claim(a.handle(), pid, started)


def _claim(h: C.Handle, pid: int, started: int) -> int:
    """Claim (or find) the slot of (pid, started); when the table is full, reclaim the slots of
    dead processes once and try again."""
    slot = C.proc_attach(h, pid, started)
    if slot is None:
        reclaim_dead(h)
        slot = C.proc_attach(h, pid, started)
    if slot is None:
        C.raise_status(C.EPROCS)
    return slot


# ------------------------------------------------------------ what users ask


def _rows_for(a: Attachment, pid: int) -> list[SlotRow]:
    pid = check_int(pid, "pid")
    return [r for r in scan_slots(a.handle()) if r.pid == pid]


def processes(a: Attachment) -> list[ProcessInfo]:
    """Every process in the table: attached, or dead with blocks not yet collected."""
    return [
        ProcessInfo(
            pid=r.pid,
            alive=is_running(a.handle(), r),
            usage=r.usage,
            peak=r.peak,
            limit=r.limit or None,
            allocations=r.nblocks,
            start_time=r.start_time,
            total_allocations=r.nallocs,
            total_frees=r.nfrees,
            slot=r.slot,
        )
        for r in scan_slots(a.handle())
    ]


def process_memory(a: Attachment, pid: int) -> int:
    """Usable bytes of the blocks ``pid`` owns (0 for a process the arena never saw)."""
    return sum(r.usage for r in _rows_for(a, pid))


def process_peak(a: Attachment, pid: int) -> int:
    """The high-water mark of process_memory(pid)."""
    return max((r.peak for r in _rows_for(a, pid)), default=0)


def process_allocations(a: Attachment, pid: int) -> list[MemoryBlock]:
    """The blocks ``pid`` owns, in address order."""
    blocks: list[MemoryBlock] = []
    for r in _rows_for(a, pid):
        blocks += [_block(b) for b in C.blocks_list(a.handle(), r.slot, r.nblocks)]
    return sorted(blocks, key=lambda b: b.address)


def block_info(a: Attachment, address: int) -> MemoryBlock:
    """The live block at ``address``: size, owner, seal and references."""
    return _block(C.block_info(a.handle(), address))


def all_blocks(a: Attachment) -> list[MemoryBlock]:
    """Every allocated block of the arena, in address order."""
    return [_block(b) for b in C.blocks_list(a.handle(), -2, 1024)]


def free_process_memory(a: Attachment, pid: int) -> int:
    """Free every block ``pid`` owns, alive or not; return the bytes freed."""
    freed = 0
    for r in _rows_for(a, pid):
        res = C.gc(a.handle(), r.slot, True, (r.pid, r.start_time))
        if res is not None:  # None: the slot went to another process meanwhile, not ours
            freed += res.freed_bytes
    return freed


def set_process_limit(a: Attachment, pid: int, nbytes: int | None) -> None:
    """Cap the bytes ``pid`` may own (None: no cap)."""
    if nbytes is not None:
        nbytes = check_int(nbytes, "a limit (or None)")
        if not 0 < nbytes <= C.U64_MAX:
            raise ValueError(
                f"a limit must be a positive number of bytes below 2**64 (or None for none), "
                f"got {nbytes}"
            )
    C.proc_set_limit(a.handle(), slot_for(a, pid), nbytes or 0)
