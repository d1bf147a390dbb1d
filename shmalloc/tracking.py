"""Per-process tracking: the process table as seen from Python.

A mixin of MemoryManager. Usage, peak and block counts are atomics in the segment (O(1) reads);
listing a process's blocks walks the heap under the lock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import process
from ._binding import ffi, lib, raise_status


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


@dataclass
class SlotRow:
    """One slot of the process table as read (without the lock: each field is atomic)."""

    slot: int
    state: int
    pid: int
    start_time: int
    usage: int
    peak: int
    limit: int
    nblocks: int
    nallocs: int
    nfrees: int


def read_slot(h: Any, slot: int) -> SlotRow:
    info = ffi.new("shm_proc_info_t *")
    rc = lib.shm_proc_info(h, slot, info)
    if rc < 0:
        raise_status(rc)
    return SlotRow(
        slot,
        int(info.state),
        int(info.pid),
        int(info.start_time),
        int(info.usage),
        int(info.peak),
        int(info.limit),
        int(info.nblocks),
        int(info.nallocs),
        int(info.nfrees),
    )


def scan_slots(h: Any) -> list[SlotRow]:
    """Every slot that is not FREE: attached processes, and dead ones not yet cleaned."""
    rows = (read_slot(h, slot) for slot in range(lib.SHM_MAX_PROCS))
    return [r for r in rows if r.state != lib.SHM_PROC_FREE]


def mark_if_dead(h: Any, row: SlotRow, mark: bool = True) -> bool:
    """True if the slot's process has ended (pid and start time, from /proc); with ``mark``, a
    LIVE slot is then marked DEAD in the segment, so that collection may take its blocks."""
    if row.state == lib.SHM_PROC_DEAD:
        return True
    if row.state != lib.SHM_PROC_LIVE or process.is_alive(row.pid, row.start_time):
        return False
    if mark:
        rc = lib.shm_proc_mark_dead(h, row.slot, row.pid, row.start_time)
        if rc < 0:
            raise_status(rc)
        row.state = lib.SHM_PROC_DEAD
    return True


def _block(b: Any) -> MemoryBlock:
    return MemoryBlock(
        address=b.address,
        size=b.size,
        pid=b.pid,
        sealed=bool(b.flags & lib.SHM_BF_SEALED),
        refcount=b.refcount,
        persistent=bool(b.flags & lib.SHM_BF_PERSIST),
    )


class TrackingMixin:
    _h: Any

    def _handle(self) -> Any: ...
    def _slot_for(self, pid: int | None) -> int: ...
    def _block_size(self, address: int, for_write: int) -> int: ...

    def _rows_for(self, pid: int) -> list[SlotRow]:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise TypeError(f"pid must be an int, not {type(pid).__name__}")
        return [r for r in scan_slots(self._handle()) if r.pid == pid]

    def processes(self) -> list[ProcessInfo]:
        """Every process in the table: attached, or dead with blocks not yet collected."""
        out = []
        for r in scan_slots(self._handle()):
            alive = r.state == lib.SHM_PROC_LIVE and process.is_alive(r.pid, r.start_time)
            out.append(
                ProcessInfo(
                    pid=r.pid,
                    alive=alive,
                    usage=r.usage,
                    peak=r.peak,
                    limit=r.limit or None,
                    allocations=r.nblocks,
                    start_time=r.start_time,
                    total_allocations=r.nallocs,
                    total_frees=r.nfrees,
                    slot=r.slot,
                )
            )
        return out

    def process_memory(self, pid: int) -> int:
        """Usable bytes of the blocks ``pid`` owns (0 for a process the arena never saw)."""
        return sum(r.usage for r in self._rows_for(pid))

    def process_peak(self, pid: int) -> int:
        """The high-water mark of process_memory(pid)."""
        return max((r.peak for r in self._rows_for(pid)), default=0)

    def process_allocations(self, pid: int) -> list[MemoryBlock]:
        """The blocks ``pid`` owns, in address order."""
        blocks: list[MemoryBlock] = []
        for r in self._rows_for(pid):
            blocks += self._blocks_of(r.slot, r.nblocks)
        return sorted(blocks, key=lambda b: b.address)

    def _blocks_of(self, slot: int, hint: int) -> list[MemoryBlock]:
        h = self._handle()
        count = ffi.new("uint64_t *")
        cap = max(16, min(hint, 1 << 16) + 16)  # hint comes from the segment: do not trust it
        while True:
            buf = ffi.new("shm_block_info_t[]", cap)
            rc = lib.shm_blocks_list(h, slot, buf, cap, count)
            if rc < 0:
                raise_status(rc)
            if count[0] <= cap:
                return [_block(buf[i]) for i in range(count[0])]
            cap = count[0] + 16

    def block_info(self, address: int) -> MemoryBlock:
        """The live block at ``address``: size, owner, seal and references."""
        self._block_size(address, 0)
        out = ffi.new("shm_block_info_t *")
        rc = lib.shm_block_info(self._handle(), address, out)
        if rc < 0:
            raise_status(rc, address)
        return _block(out)

    def all_blocks(self) -> list[MemoryBlock]:
        """Every allocated block of the arena, in address order."""
        return self._blocks_of(-2, 1024)

    def free_process_memory(self, pid: int) -> int:
        """Free every block ``pid`` owns, alive or not; return the bytes freed."""
        freed = 0
        for r in self._rows_for(pid):
            res = ffi.new("shm_gc_result_t *")
            rc = lib.shm_gc(self._handle(), r.slot, 1, r.pid, r.start_time, res)
            if rc == lib.SHM_ENOENT:  # the slot went to another process meanwhile: not ours
                continue
            if rc < 0:
                raise_status(rc)
            freed += res.freed_bytes
        return freed

    def set_process_limit(self, pid: int, nbytes: int | None) -> None:
        """Cap the bytes ``pid`` may own (None: no cap); beyond it allocate() raises
        ProcessLimitExceeded."""
        if nbytes is not None:
            if isinstance(nbytes, bool) or not isinstance(nbytes, int):
                raise TypeError(f"a limit must be an int or None, not {type(nbytes).__name__}")
            if nbytes <= 0:
                raise ValueError(f"a limit must be positive (or None for none), got {nbytes}")
        rc = lib.shm_proc_set_limit(self._handle(), self._slot_for(pid), nbytes or 0)
        if rc < 0:
            raise_status(rc)
