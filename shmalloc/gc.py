"""The global garbage collector: strategies for reclaiming memory across every process of an arena.

Any process attached to an arena may run a :class:`GlobalGarbageCollector`; the coordinator runs
one on a timer. Deciding *which* processes are dead happens here, in Python, by comparing each
process-table slot's (pid, start time) with /proc (process.py); a dead slot is then marked DEAD in
the segment (``shm_proc_mark_dead``) and its blocks are freed by the C core (``shm_gc``, gc.c).

Two collectors in different processes may run at once. Every step that changes the segment
happens inside one C call under the heap lock, and each such call reports what *it* freed, so the
figures of two concurrent collections add up to what was freed, never more: a block freed by one
collector is simply not seen by the other. Marking is idempotent (it only succeeds from LIVE with
the expected pid and start time).

The strategies:

=====================  ==========================================================================
``GLOBAL``             every dead process: its references are dropped, its blocks freed (unless a
                       live process retains one, or it is persistent), its slot given back.
                       Accounted per process: one ``memory.process_reclaimed`` for each.
``threshold(n)``       dead processes holding more than ``n`` bytes, as GLOBAL; live processes
                       holding more than ``n`` are asked to trim (their ``on_pressure`` callbacks
                       run the next time they enter the library).
``targeted(pid)``      every block of one process, alive or not, retained or not: an operator's
                       action (a live process then finds its blocks gone: the command line
                       refuses a live one without ``--force``).
``UNREFERENCED``       one sweep of the heap freeing the orphaned blocks that no live process
                       references. References die with their holder, so this frees the same
                       blocks as GLOBAL; it is one C call instead of one per process (a block of
                       a dead process retained only by another dead process goes in one pass),
                       and reports totals only: no ``memory.process_reclaimed``.
=====================  ==========================================================================
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from . import _binding as C
from . import events, process
from .attachment import Attachment, check_int
from .manager import MemoryManager, attachment_of
from .stats import MemoryPressure
from .tracking import SlotRow as _Row
from .tracking import mark_if_dead
from .tracking import scan_slots as scan

__all__ = ["DEFAULT_MIN_INTERVAL", "GcStats", "GcStrategy", "GlobalGarbageCollector"]

DEFAULT_MIN_INTERVAL = 5.0


@dataclass(frozen=True)
class GcStrategy:
    """What a :meth:`GlobalGarbageCollector.collect` reclaims.

    Use the constants ``GcStrategy.GLOBAL`` and ``GcStrategy.UNREFERENCED`` or the constructors
    ``GcStrategy.threshold(nbytes)`` and ``GcStrategy.targeted(pid)``.
    """

    kind: str
    nbytes: int | None = None
    pid: int | None = None

    GLOBAL: ClassVar[GcStrategy]
    UNREFERENCED: ClassVar[GcStrategy]

    @classmethod
    def threshold(cls, nbytes: int) -> GcStrategy:
        """Dead processes holding more than ``nbytes``; live ones above it are asked to trim."""
        return cls("threshold", nbytes=_non_negative_int(nbytes, "the threshold"))

    @classmethod
    def targeted(cls, pid: int) -> GcStrategy:
        """Every block of process ``pid``, alive or not."""
        pid = _non_negative_int(pid, "pid")
        if pid == 0:
            raise ValueError("pid must be positive, got 0")
        return cls("targeted", pid=pid)

    def __repr__(self) -> str:
        if self.kind == "threshold":
            return f"GcStrategy.threshold({self.nbytes})"
        if self.kind == "targeted":
            return f"GcStrategy.targeted({self.pid})"
        return f"GcStrategy.{self.kind.upper()}"


GcStrategy.GLOBAL = GcStrategy("global")
GcStrategy.UNREFERENCED = GcStrategy("unreferenced")
_KINDS = frozenset({"global", "threshold", "targeted", "unreferenced"})


@dataclass(frozen=True)
class GcStats:
    """What one collection did.

    ``freed_bytes`` counts usable bytes (as ``process_memory`` does), ``freed_blocks`` the blocks
    freed, ``duration`` seconds. ``processes_cleaned`` counts the processes this collection
    cleaned: each ended process whose slot it gave back and, under ``targeted(pid)``, the
    targeted process whether it was alive (its blocks freed, its slot kept) or not.
    ``reclaimed`` lists (pid, bytes) per process whose blocks were freed, ``trimmed`` the live
    processes asked to trim.
    """

    freed_bytes: int = 0
    freed_blocks: int = 0
    processes_cleaned: int = 0
    duration: float = 0.0
    reclaimed: tuple[tuple[int, int], ...] = ()
    trimmed: tuple[int, ...] = ()


def _non_negative_int(value: object, what: str) -> int:
    value = check_int(value, what)
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    return value


class GlobalGarbageCollector:
    """Reclaims memory across all the processes of an arena (see the module docstring).

    ``auto_collect()`` runs ``collect(GcStrategy.threshold(threshold))`` when the arena is under
    HIGH pressure or worse and at least ``min_interval`` seconds (default 5) passed since this
    collector's last run (any ``collect()`` counts; ``reclaim_dead()`` does not); the threshold
    (``set_threshold``, default 0) is the usage above which a live process is asked to trim.
    Thread-safe, and safe from a signal handler and in a fork child: it holds no Python lock
    (one that a handler interrupting its holder, or a child of a fork made while another thread
    held it, would wait on forever). Collections in several threads run as collections in
    several processes do (see above); auto_collect() skips a run while one of its own is under
    way in this process.
    """

    def __init__(self, manager: MemoryManager) -> None:
        self._manager = manager
        self._threshold = 0
        self._min_interval = DEFAULT_MIN_INTERVAL
        self._last_run: float | None = None  # time.monotonic() of the last collect()
        self._auto_pid = 0  # the pid running auto_collect(), 0 for none (a fork child: not it)

    @property
    def manager(self) -> MemoryManager:
        return self._manager

    @property
    def threshold(self) -> int:
        """Bytes a process may hold before auto_collect() asks it to trim."""
        return self._threshold

    @property
    def min_interval(self) -> float:
        """Seconds auto_collect() leaves between two runs."""
        return self._min_interval

    @property
    def last_run(self) -> float | None:
        """``time.monotonic()`` when this collector last collected, or None."""
        return self._last_run

    def set_threshold(self, nbytes: int) -> None:
        """Ask live processes holding more than ``nbytes`` to trim when auto_collect() runs, and
        reclaim only dead processes holding more than that."""
        self._threshold = _non_negative_int(nbytes, "the threshold")

    def set_min_interval(self, seconds: float) -> None:
        """Leave at least ``seconds`` between two automatic collections (default 5)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"the interval must be a number, not {type(seconds).__name__}")
        if not seconds >= 0:
            raise ValueError(f"the interval must be a non-negative number, got {seconds}")
        self._min_interval = float(seconds)

    # ------------------------------------------------------------ automatic collection

    def should_collect(self, level: MemoryPressure | None = None) -> bool:
        """True when auto_collect() would run now: pressure (the arena's, or ``level`` when
        given) is HIGH or worse and ``min_interval`` has passed since the last run."""
        if level is None:
            level = self._manager.stats().memory_pressure()
        if level < MemoryPressure.HIGH:
            return False
        last = self._last_run
        return last is None or time.monotonic() - last >= self._min_interval

    def auto_collect(self, level: MemoryPressure | None = None) -> GcStats | None:
        """Collect with ``GcStrategy.threshold(threshold)`` if should_collect(level); else None."""
        pid = process.current_pid()
        if self._auto_pid == pid or not self.should_collect(level):
            return None  # (two threads may both pass here: two collections are safe, see above)
        self._auto_pid = pid
        try:
            return self._collect(GcStrategy.threshold(self._threshold))
        finally:
            self._auto_pid = 0

    # ------------------------------------------------------------ collection

    def collect(self, strategy: GcStrategy = GcStrategy.GLOBAL) -> GcStats:
        """Reclaim what ``strategy`` names; emit ``memory.process_reclaimed`` for each process
        whose blocks were freed and one ``memory.gc_triggered``."""
        if not isinstance(strategy, GcStrategy) or strategy.kind not in _KINDS:
            raise TypeError(
                f"collect() takes a GcStrategy (GLOBAL, UNREFERENCED, threshold(n), targeted(pid)),"
                f" not {strategy!r}"
            )
        return self._collect(strategy)

    def reclaim_dead(self) -> GcStats:
        """GLOBAL, as the coordinator runs it whenever it sees a process end: it does not count
        as a run for auto_collect()'s interval, and emits events only if it freed a block or a
        slot (a retry that finds nothing to do stays silent)."""
        t0 = time.perf_counter()
        h = attachment_of(self._manager).handle()
        stats = self._reclaim(h, [r for r in scan(h) if mark_if_dead(h, r)], t0)
        if stats.freed_blocks or stats.processes_cleaned:
            self._emit_run(stats)
        return stats

    def _collect(self, strategy: GcStrategy) -> GcStats:
        t0 = time.perf_counter()
        h = attachment_of(self._manager).handle()
        try:
            if strategy.kind == "global":
                stats = self._reclaim(h, [r for r in scan(h) if mark_if_dead(h, r)], t0)
            elif strategy.kind == "threshold":
                stats = self._threshold_collect(h, strategy.nbytes or 0, t0)
            elif strategy.kind == "targeted":
                assert strategy.pid is not None
                stats = self._targeted(h, strategy.pid, t0)
            else:
                stats = self._unreferenced(h, t0)
        finally:
            self._last_run = time.monotonic()
        self._emit_run(stats)
        return stats

    def _emit_run(self, stats: GcStats) -> None:
        state: Attachment = attachment_of(self._manager)
        for pid, nbytes in stats.reclaimed:
            state.emit(events.PROCESS_RECLAIMED, pid=pid, bytes=nbytes)
        state.emit(events.GC_TRIGGERED, freed_blocks=stats.freed_blocks)

    @staticmethod
    def _gc(h: C.Handle, slot: int, all_blocks: bool, row: _Row | None = None) -> C.GcResult:
        """One C collection; with ``row``, only while the slot still holds that process (else
        nothing is freed: the slot was cleaned and claimed by a new process meanwhile)."""
        who = (row.pid, row.start_time) if row is not None else (0, 0)
        return C.gc(h, slot, all_blocks, who) or C.GcResult()

    def _reclaim(self, h: C.Handle, dead: list[_Row], t0: float) -> GcStats:
        """Free the blocks of the dead slots, one C call per slot so that each process's bytes
        are known exactly; repeat while a round frees something, since dropping one dead
        process's references may orphan another dead process's block."""
        freed_blocks = freed_bytes = cleaned = 0
        per_slot: dict[int, int] = {}
        pending = list(dead)
        for _ in range(len(dead) + 1):
            progress = False
            for r in pending:
                res = self._gc(h, r.slot, False, r)
                cleaned += res.procs_cleaned
                if res.freed_blocks:
                    progress = True
                    freed_blocks += res.freed_blocks
                    freed_bytes += res.freed_bytes
                    per_slot[r.slot] = per_slot.get(r.slot, 0) + int(res.freed_bytes)
            if not progress:
                break
            pending = [r for r in pending if self._still_dead_with_blocks(h, r)]
            if not pending:
                break
        pid_of = {r.slot: r.pid for r in dead}
        return GcStats(
            freed_bytes=int(freed_bytes),
            freed_blocks=int(freed_blocks),
            processes_cleaned=int(cleaned),
            duration=time.perf_counter() - t0,
            reclaimed=tuple((pid_of[s], b) for s, b in per_slot.items() if b),
        )

    @staticmethod
    def _still_dead_with_blocks(h: C.Handle, r: _Row) -> bool:
        now = C.proc_info(h, r.slot)
        return bool(
            now.state == C.PROC_DEAD
            and now.pid == r.pid
            and now.start_time == r.start_time
            and now.nblocks
        )

    def _threshold_collect(self, h: C.Handle, nbytes: int, t0: float) -> GcStats:
        dead: list[_Row] = []
        live: list[_Row] = []
        for r in scan(h):
            if r.usage <= nbytes:
                continue  # neither collected nor asked: no need to ask /proc about it
            (dead if mark_if_dead(h, r) else live).append(r)
        stats = self._reclaim(h, dead, t0)
        trimmed = []
        for r in live:
            try:
                self._manager.request_trim(r.pid)
            except ValueError:
                continue  # it detached meanwhile
            trimmed.append(r.pid)
        return GcStats(
            freed_bytes=stats.freed_bytes,
            freed_blocks=stats.freed_blocks,
            processes_cleaned=stats.processes_cleaned,
            duration=time.perf_counter() - t0,
            reclaimed=stats.reclaimed,
            trimmed=tuple(trimmed),
        )

    def _targeted(self, h: C.Handle, pid: int, t0: float) -> GcStats:
        freed_blocks = freed_bytes = cleaned = 0
        for r in scan(h):
            if r.pid != pid:
                continue
            mark_if_dead(h, r)  # a dead one's slot is then given back too
            res = C.gc(h, r.slot, True, (r.pid, r.start_time))
            if res is None:
                continue  # the slot went to another process meanwhile: nothing freed
            freed_blocks += res.freed_blocks
            freed_bytes += res.freed_bytes
            cleaned += 1  # the targeted process, alive (its slot stays) or not (given back)
        return GcStats(
            freed_bytes=int(freed_bytes),
            freed_blocks=int(freed_blocks),
            processes_cleaned=int(cleaned),
            duration=time.perf_counter() - t0,
            reclaimed=((pid, int(freed_bytes)),) if freed_bytes else (),
        )

    def _unreferenced(self, h: C.Handle, t0: float) -> GcStats:
        # One sweep reports only totals: which process a block belonged to is not returned, and
        # guessing it from usage before and after would count blocks another collector freed.
        for r in scan(h):
            mark_if_dead(h, r)
        res = self._gc(h, -1, False)
        return GcStats(
            freed_bytes=int(res.freed_bytes),
            freed_blocks=int(res.freed_blocks),
            processes_cleaned=int(res.procs_cleaned),
            duration=time.perf_counter() - t0,
        )
