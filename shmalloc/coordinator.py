"""The coordinator: one process per arena that reclaims the memory of dead processes, watches
pressure, and turns the event ring into logs, a JSON-lines file and Prometheus metrics.

Run it with ``shmalloc coordinator NAME``, ``python -m shmalloc.coordinator NAME``,
``Coordinator(name).run()`` or, detached, ``start_coordinator(manager)``.

The lease. The role is held through a lease in the segment: the (pid, start time) of the holder,
read and swapped under the heap lock (``shm_lease_get``/``shm_lease_swap``). A coordinator takes
it from (0, 0), or from a holder that /proc says has ended (even by ``kill -9``): the swap only
succeeds from the values it read, so two contenders cannot both take over. A holder that is
still running makes a new coordinator refuse (:class:`CoordinatorRunning`, exit status 3). On a
clean stop the holder swaps the lease back to (0, 0). Workers never wait for the coordinator:
if none runs, nothing but reclamation of dead processes' memory is delayed.

Finding dead processes. Each LIVE slot of the process table gets a pidfd (``pidfd_open``): the
main loop sleeps in ``poll()`` on them and on a self-pipe (signals, ``stop()``), so a death wakes
it at once instead of at the next tick, and an idle arena costs one table scan per tick. The
slot's start time is compared with /proc right after opening, so a recycled pid is never
watched in place of the process that held the slot. Where pidfds are not available the tick
asks /proc instead. Either way the collection itself (``GlobalGarbageCollector.reclaim_dead``)
decides again from /proc which slots are dead before anything is freed.

Every tick (``interval``, default 0.25 s) the coordinator also: checks that it still holds the
lease and that the arena still exists (an unlinked arena stops it: exit 0); reads arena usage,
``psutil.virtual_memory()`` and ``psutil.disk_usage('/dev/shm')``, logs each level change and,
at HIGH or worse, runs ``auto_collect()`` (which asks live processes over the trim threshold to
trim); drains the event ring. The coordinator never allocates in the arena, so a full arena
does not stop it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

import psutil

from . import process
from ._binding import ffi, lib, raise_status
from .errors import ShmallocError
from .events import Event
from .gc import GcStats, GlobalGarbageCollector, handle_of
from .manager import MemoryManager
from .stats import MemoryPressure
from .tracking import scan_slots as scan

__all__ = [
    "EXIT_LEASE_HELD",
    "Coordinator",
    "CoordinatorRunning",
    "coordinator_command",
    "lease_holder",
    "main",
    "start_coordinator",
]

logger = logging.getLogger("shmalloc.coordinator")

DEFAULT_INTERVAL = 0.25
EXIT_ERROR = 1
EXIT_LEASE_HELD = 3
SHM_DIR = "/dev/shm"
_START_TIMEOUT = 15.0  # seconds start_coordinator waits for the child to show in the lease
_DRAIN_LIMIT = 2 * 4096  # events per tick at most (two laps of the ring)
_LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
_EVENT_LEVELS = {
    "memory.allocated": logging.DEBUG,
    "memory.deallocated": logging.DEBUG,
    "memory.oom": logging.WARNING,
    "memory.pressure_high": logging.WARNING,
    "memory.pressure_critical": logging.CRITICAL,
    "memory.gc_triggered": logging.INFO,
    "memory.process_reclaimed": logging.INFO,
}


class CoordinatorRunning(ShmallocError):
    """The arena already has a live coordinator: the process ``pid`` holds the lease."""

    _fields = ("name", "pid", "start_time")

    def __init__(self, name: str, pid: int, start_time: int = 0) -> None:
        self.name, self.pid, self.start_time = name, pid, start_time
        super().__init__(
            f"arena {name!r} already has a coordinator: process {pid} holds the lease; "
            f"leave it running, or stop it (kill {pid}) and start a new one"
        )


# ---------------------------------------------------------------------------------- the lease


def _lease(h: Any) -> tuple[int, int]:
    pid, start = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    rc = lib.shm_lease_get(h, pid, start)
    if rc < 0:
        raise_status(rc)
    return int(pid[0]), int(start[0])


def lease_holder(manager: MemoryManager) -> int | None:
    """The pid of the arena's live coordinator, or None when no running process holds the lease."""
    pid, start = _lease(handle_of(manager))
    if pid and process.is_alive(pid, start):
        return pid
    return None


def _acquire_lease(manager: MemoryManager) -> tuple[int, int]:
    """Take the lease for this process; CoordinatorRunning if a live process holds it."""
    h = handle_of(manager)
    me = process.self_identity()
    for _ in range(100):  # each failed swap means another contender moved first: look again
        held = _lease(h)
        if held == me:
            return me
        if held[0] and process.is_alive(*held):
            raise CoordinatorRunning(manager.name, *held)
        if held[0]:
            logger.warning(
                "taking over the coordinator lease of arena %s from process %d, which has ended",
                manager.name,
                held[0],
            )
        rc = lib.shm_lease_swap(h, held[0], held[1], me[0], me[1])
        if rc < 0:
            raise_status(rc)
        if rc == 1:
            return me
    raise ShmallocError(
        f"could not take the coordinator lease of arena {manager.name!r}: contended"
    )


def _release_lease(manager: MemoryManager, me: tuple[int, int]) -> bool:
    rc = lib.shm_lease_swap(handle_of(manager), me[0], me[1], 0, 0)
    if rc < 0:
        raise_status(rc)
    return bool(rc == 1)


# ---------------------------------------------------------------------------------- metrics


@dataclass
class _Snapshot:
    """What /metrics shows, refreshed by the coordinator's loop (the HTTP thread only reads it)."""

    used: int = 0
    peak: int = 0
    capacity: int = 0
    heap: int = 0
    available: int = 0
    allocated_blocks: int = 0
    free_blocks: int = 0
    allocations: int = 0
    deallocations: int = 0
    pressure: int = 0
    system_memory_pressure: int = 0
    shm_filesystem_pressure: int = 0
    usage: dict[int, int] = field(default_factory=dict)
    live_processes: int = 0
    dead_processes: int = 0
    gc_runs: int = 0
    gc_freed_blocks: int = 0
    reclaimed_bytes: int = 0
    processes_reclaimed: int = 0
    events: dict[str, int] = field(default_factory=dict)
    dropped_events: int = 0


class _Metrics:
    """The Prometheus exporter: a custom collector over a snapshot, served on (host, port)."""

    def __init__(self, arena: str, host: str, port: int) -> None:
        try:
            from prometheus_client import start_http_server
            from prometheus_client.core import (
                CounterMetricFamily,
                GaugeMetricFamily,
                InfoMetricFamily,
            )
            from prometheus_client.registry import CollectorRegistry
        except ImportError:
            raise ShmallocError(
                "--metrics-port needs prometheus_client: pip install 'shmalloc[metrics]'"
            ) from None
        self._lock = threading.Lock()
        self._snap = _Snapshot()
        outer = self

        class _Collector:
            def collect(self) -> Any:
                with outer._lock:
                    s = outer._snap
                    usage = dict(s.usage)
                    events = dict(s.events)
                info = InfoMetricFamily("shmalloc_arena", "The arena this coordinator serves")
                info.add_metric([], {"name": arena})
                yield info
                for name, doc, value in (
                    ("used_bytes", "Usable bytes of allocated blocks", s.used),
                    ("peak_bytes", "Highest used_bytes seen", s.peak),
                    ("capacity_bytes", "Size of the shared-memory segment", s.capacity),
                    ("heap_bytes", "Bytes of the segment the heap may use", s.heap),
                    ("available_bytes", "Usable bytes of free blocks", s.available),
                    ("allocated_blocks", "Blocks allocated now", s.allocated_blocks),
                    ("free_blocks", "Free blocks now", s.free_blocks),
                    (
                        "pressure_level",
                        "Arena pressure: 0 LOW, 1 MEDIUM, 2 HIGH, 3 CRITICAL",
                        s.pressure,
                    ),
                    ("live_processes", "Processes attached and running", s.live_processes),
                    (
                        "dead_processes",
                        "Ended processes whose memory is not reclaimed yet",
                        s.dead_processes,
                    ),
                ):
                    yield GaugeMetricFamily(f"shmalloc_{name}", doc, value=value)
                sysp = GaugeMetricFamily(
                    "shmalloc_system_pressure_level",
                    "System pressure by resource: 0 LOW, 1 MEDIUM, 2 HIGH, 3 CRITICAL",
                    labels=["resource"],
                )
                sysp.add_metric(["memory"], s.system_memory_pressure)
                sysp.add_metric(["shm_filesystem"], s.shm_filesystem_pressure)
                yield sysp
                per = GaugeMetricFamily(
                    "shmalloc_process_usage_bytes",
                    "Usable bytes owned by each process",
                    labels=["pid"],
                )
                for pid, nbytes in sorted(usage.items()):
                    per.add_metric([str(pid)], nbytes)
                yield per
                for name, doc, value in (
                    ("allocations", "Allocations in the arena", s.allocations),
                    ("deallocations", "Deallocations in the arena", s.deallocations),
                    ("gc_runs", "Collections run by any process (memory.gc_triggered)", s.gc_runs),
                    ("gc_freed_blocks", "Blocks freed by collections", s.gc_freed_blocks),
                    (
                        "gc_freed_bytes",
                        "Bytes reclaimed from processes (memory.process_reclaimed)",
                        s.reclaimed_bytes,
                    ),
                    ("processes_reclaimed", "Process reclamations", s.processes_reclaimed),
                    ("dropped_events", "Events lost to a full ring", s.dropped_events),
                ):
                    yield CounterMetricFamily(f"shmalloc_{name}", doc, value=value)
                ev = CounterMetricFamily(
                    "shmalloc_events", "Events drained from the ring, by name", labels=["name"]
                )
                for name, n in sorted(events.items()):
                    ev.add_metric([name], n)
                yield ev

        self.registry = CollectorRegistry()
        self.registry.register(_Collector())
        started = start_http_server(port, addr=host, registry=self.registry)
        # prometheus_client >= 0.17 returns (server, thread); older ones nothing to shut down
        self._server = started[0] if isinstance(started, tuple) else None

    def update(self, snap: _Snapshot) -> None:
        with self._lock:
            self._snap = snap

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# ---------------------------------------------------------------------------------- pressure


def _level_name(level: int) -> str:
    return MemoryPressure(level).name


class _Pressure:
    """Pressure levels by source, logging each change."""

    SOURCES = ("arena", "system memory", "/dev/shm")

    def __init__(self, arena: str) -> None:
        self._arena = arena
        self.levels: dict[str, int] = {}

    def observe(self, source: str, pct: float | None) -> int:
        level = MemoryPressure.LOW if pct is None else MemoryPressure.from_percentage(pct)
        old = self.levels.get(source)
        self.levels[source] = level
        if old is None and level == MemoryPressure.LOW:
            return level
        if old != level:
            where = f"arena {self._arena}" if source == "arena" else source
            severity = (
                logging.CRITICAL
                if level == MemoryPressure.CRITICAL
                else logging.WARNING
                if level == MemoryPressure.HIGH and (old or 0) < level
                else logging.INFO
            )
            logger.log(
                severity,
                "pressure of %s: %s -> %s (%.1f%% used)",
                where,
                "start" if old is None else _level_name(old),
                level.name,
                pct or 0.0,
            )
        return level

    @property
    def worst(self) -> MemoryPressure:
        return MemoryPressure(max(self.levels.values(), default=0))


def _system_usage() -> tuple[float | None, float | None]:
    try:
        mem: float | None = float(psutil.virtual_memory().percent)
    except OSError:
        mem = None
    try:
        shm: float | None = float(psutil.disk_usage(SHM_DIR).percent)
    except OSError:
        shm = None
    return mem, shm


# ---------------------------------------------------------------------------------- coordinator


class Coordinator:
    """The coordinator of the arena ``name``: ``run()`` serves in the foreground until SIGTERM,
    SIGINT or ``stop()``.

    ``interval``: seconds between two ticks (death is noticed at once where pidfds exist).
    ``metrics_port``/``metrics_host``: serve Prometheus metrics there (needs the ``metrics``
    extra). ``events_path``: append every drained event to this JSON-lines file.
    ``trim_threshold``: under HIGH pressure, live processes owning more bytes are asked to trim.
    ``min_interval``: seconds between two automatic collections.
    """

    def __init__(
        self,
        name: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        events_path: str | os.PathLike[str] | None = None,
        log_level: str | int = "INFO",
        trim_threshold: int = 0,
        min_interval: float = 5.0,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"interval must be a number, not {type(interval).__name__}")
        if not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval}")
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {metrics_port}")
        self.name = name
        self.interval = float(interval)
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.events_path = None if events_path is None else os.fspath(events_path)
        if isinstance(log_level, str):
            if log_level.upper() not in _LOG_LEVELS:
                raise ValueError(
                    f"unknown log level {log_level!r}: use one of {', '.join(_LOG_LEVELS)}"
                )
            self.log_level = _LOG_LEVELS[log_level.upper()]
        else:
            self.log_level = int(log_level)
        self.trim_threshold = trim_threshold
        self.min_interval = min_interval
        self._stopping = threading.Event()
        self._wake_lock = threading.Lock()
        self._wake_r = self._wake_w = -1  # the self-pipe, open while run() runs
        self.lost_lease = False
        # what the loop keeps between ticks
        self._watch: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, start time)
        self._watched: dict[tuple[int, int], int] = {}  # (pid, start time) -> pidfd
        self._exited: set[tuple[int, int]] = set()  # seen ending; /proc decides from now on
        self._pidfd_ok = hasattr(os, "pidfd_open")
        self._counts = _Snapshot()
        self._rows: list[Any] = []
        self._tried: set[tuple[int, int]] = set()  # DEAD slots left after the last reclaim
        self._retry_at = 0.0
        self._last_error = ""
        self._signal: int | None = None
        self._events: IO[str] | None = None
        self._metrics: _Metrics | None = None

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask run() to return (from any thread or a signal handler)."""
        self._stopping.set()
        with self._wake_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # the pipe is full: the loop is woken already

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum  # logged by the loop: no logging inside a signal handler
        self.stop()

    def run(self) -> None:
        """Serve until stopped. Raises CoordinatorRunning if another live process holds the
        lease, FileNotFoundError if there is no such arena, ShmallocError if the lease was
        taken away while serving."""
        with self._wake_lock:
            if self._wake_r >= 0:
                raise RuntimeError("this Coordinator is already running")
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._run()
        finally:
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
        if self.lost_lease:
            raise ShmallocError(
                f"the coordinator of arena {self.name!r} lost its lease to another process and "
                "stopped; only one coordinator may serve an arena"
            )

    def _run(self) -> None:
        shm_logger = logging.getLogger("shmalloc")
        old_level = shm_logger.level
        shm_logger.setLevel(self.log_level)
        handler = None
        if not logging.getLogger().handlers and not shm_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
            )
            shm_logger.addHandler(handler)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            manager = MemoryManager.attach(self.name)
            try:
                me = _acquire_lease(manager)
                logger.info(
                    "coordinator of arena %s: pid %d, interval %.3gs",
                    self.name,
                    me[0],
                    self.interval,
                )
                try:
                    self._serve(manager, me)
                finally:
                    if not self.lost_lease:
                        _release_lease(manager, me)
                    logger.info("coordinator of arena %s stopped", self.name)
            finally:
                self._close_watches()
                manager.close()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if handler is not None:
                shm_logger.removeHandler(handler)
            shm_logger.setLevel(old_level)

    # ------------------------------------------------------------ the loop

    def _serve(self, manager: MemoryManager, me: tuple[int, int]) -> None:
        self._manager = manager
        self._h = handle_of(manager)
        self._gc = GlobalGarbageCollector(manager)
        self._gc.set_threshold(self.trim_threshold)
        self._gc.set_min_interval(self.min_interval)
        self._pressure = _Pressure(self.name)
        self._me = me
        self._counts = _Snapshot(capacity=manager.capacity)
        try:
            self._inode: int | None = os.stat(os.path.join(SHM_DIR, self.name)).st_ino
        except OSError:
            self._inode = None
        with contextlib.ExitStack() as stack:
            if self.events_path is not None:
                self._events = stack.enter_context(open(self.events_path, "a", encoding="utf-8"))
            if self.metrics_port is not None:
                self._metrics = _Metrics(self.name, self.metrics_host, self.metrics_port)
                stack.callback(self._metrics.close)
                logger.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
            self._poller = select.poll()
            self._poller.register(self._wake_r, select.POLLIN)
            next_tick = time.monotonic()
            while not self._stopping.is_set():
                timeout = max(0.0, next_tick - time.monotonic())
                ready = self._poller.poll(timeout * 1000.0)
                ended = False
                for fd, _ in ready:
                    if fd == self._wake_r:
                        self._drain_wake()
                    elif fd in self._watch:
                        self._exited.add(self._unwatch(fd))
                        ended = True
                if self._stopping.is_set():
                    break
                if ended:
                    self._step("reclaiming", self._reclaim)
                now = time.monotonic()
                if now >= next_tick:
                    self._tick()
                    next_tick = max(next_tick + self.interval, now)
            if self._signal is not None:
                logger.info("received %s: stopping", signal.Signals(self._signal).name)
            # a last drain so that nothing emitted before the stop is lost
            self._step("draining events", self._drain_events)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _step(self, what: str, fn: Any) -> None:
        """Run one part of a tick; log a failure (once while it repeats) and carry on."""
        try:
            fn()
        except Exception as e:  # the coordinator outlives any one failing step
            text = f"{what}: {type(e).__name__}: {e}"
            if text != self._last_error:
                logger.exception("coordinator of arena %s: %s", self.name, text)
                self._last_error = text

    def _tick(self) -> None:
        self._step("checking the lease and the arena", self._check_role)
        if self._stopping.is_set():
            return
        self._step("scanning processes", self._scan)
        self._step("monitoring pressure", self._monitor)
        self._step("draining events", self._drain_events)
        if self._metrics is not None:
            self._step("updating metrics", self._update_metrics)

    def _check_role(self) -> None:
        held = _lease(self._h)
        if held != self._me:
            logger.error(
                "coordinator of arena %s lost its lease to process %d: stopping", self.name, held[0]
            )
            self.lost_lease = True
            self.stop()
            return
        try:
            inode: int | None = os.stat(os.path.join(SHM_DIR, self.name)).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            logger.info("arena %s was destroyed: stopping", self.name)
            self.stop()

    # ------------------------------------------------------------ processes

    def _scan(self) -> None:
        """Watch the LIVE slots, drop watches of slots that went, and reclaim if a process ended.

        A DEAD slot that a reclaim left behind (a live process retains one of its blocks) is
        tried again once a second, not every tick."""
        rows = self._rows = scan(self._h)
        live = set()
        ended = False
        for r in rows:
            key = (r.pid, r.start_time)
            if r.state == lib.SHM_PROC_DEAD:
                if key not in self._tried or time.monotonic() >= self._retry_at:
                    ended = True
                continue
            live.add(key)
            if key in self._watched:
                continue
            if key in self._exited or not self._pidfd_ok:
                if not process.is_alive(*key):
                    ended = True
                continue
            if not self._open_watch(key):
                ended = True
        for key in [k for k in self._watched if k not in live]:
            self._unwatch(self._watched[key])
        self._exited &= live
        if ended:
            self._reclaim()

    def _open_watch(self, key: tuple[int, int]) -> bool:
        """Watch (pid, start time) with a pidfd; False if that process has already ended."""
        try:
            fd = os.pidfd_open(key[0])
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                logger.info("pidfds are not available (%s): asking /proc every tick", e)
                self._pidfd_ok = False
            else:  # EMFILE and such: ask /proc for this one
                self._exited.add(key)
            return process.is_alive(*key)
        if process.start_time(key[0]) != key[1]:
            os.close(fd)  # the pid now names another process: the slot's one has ended
            return False
        self._watch[fd] = key
        self._watched[key] = fd
        self._poller.register(fd, select.POLLIN)
        return True

    def _unwatch(self, fd: int) -> tuple[int, int]:
        key = self._watch.pop(fd)
        del self._watched[key]
        self._poller.unregister(fd)
        os.close(fd)
        return key

    def _close_watches(self) -> None:
        for fd in list(self._watch):
            self._unwatch(fd)

    def _reclaim(self) -> None:
        stats = self._gc.reclaim_dead()
        for pid, nbytes in stats.reclaimed:
            logger.info("reclaimed %d bytes of process %d, which has ended", nbytes, pid)
        self._rows = scan(self._h)
        self._tried = {(r.pid, r.start_time) for r in self._rows if r.state == lib.SHM_PROC_DEAD}
        self._retry_at = time.monotonic() + 1.0

    # ------------------------------------------------------------ pressure

    def _monitor(self) -> None:
        s = ffi.new("shm_stats_t *")
        lib.shm_stats_read(self._h, s)
        total, available = int(s.total), int(s.available)
        arena_pct = 100.0 * (total - available) / total if total else 0.0
        mem_pct, shm_pct = _system_usage()
        p = self._pressure
        p.observe("arena", arena_pct)
        p.observe("system memory", mem_pct)
        p.observe("/dev/shm", shm_pct)
        c = self._counts
        c.used, c.peak, c.heap, c.available = int(s.used), int(s.peak), total, available
        c.allocated_blocks, c.free_blocks = int(s.allocated_blocks), int(s.free_blocks)
        c.allocations, c.deallocations = int(s.allocations), int(s.deallocations)
        c.pressure = p.levels["arena"]
        c.system_memory_pressure = p.levels["system memory"]
        c.shm_filesystem_pressure = p.levels["/dev/shm"]
        stats = self._gc.auto_collect(p.worst)
        if stats is not None:
            self._log_auto(stats, p.worst)

    def _log_auto(self, stats: GcStats, level: MemoryPressure) -> None:
        logger.info(
            "automatic collection under %s pressure: %d blocks, %d bytes freed, %d processes "
            "cleaned, %d asked to trim, in %.1f ms",
            level.name,
            stats.freed_blocks,
            stats.freed_bytes,
            stats.processes_cleaned,
            len(stats.trimmed),
            stats.duration * 1e3,
        )

    # ------------------------------------------------------------ events

    def _drain_events(self) -> None:
        evs = self._manager.drain_events(_DRAIN_LIMIT)
        c = self._counts
        c.dropped_events = int(lib.shm_event_dropped(self._h))
        if not evs:
            return
        mine = os.getpid()
        for ev in evs:
            c.events[ev.name] = c.events.get(ev.name, 0) + 1
            if ev.name == "memory.gc_triggered":
                c.gc_runs += 1
                c.gc_freed_blocks += int(ev.fields.get("freed_blocks", 0))
            elif ev.name == "memory.process_reclaimed":
                c.processes_reclaimed += 1
                c.reclaimed_bytes += int(ev.fields.get("bytes", 0))
            level = logging.DEBUG if ev.pid == mine else _EVENT_LEVELS.get(ev.name, logging.INFO)
            if logger.isEnabledFor(level):
                logger.log(
                    level,
                    "event %s from process %d: %s",
                    ev.name,
                    ev.pid,
                    " ".join(f"{k}={v}" for k, v in ev.fields.items()),
                )
        if self._events is not None:
            self._events.write("".join(_event_line(ev) for ev in evs))
            self._events.flush()

    def _update_metrics(self) -> None:
        assert self._metrics is not None
        c = self._counts
        usage: dict[int, int] = {}
        live = dead = 0
        for r in self._rows:
            usage[r.pid] = usage.get(r.pid, 0) + r.usage
            if r.state == lib.SHM_PROC_LIVE and (r.pid, r.start_time) not in self._exited:
                live += 1
            else:
                dead += 1
        self._metrics.update(
            dataclasses.replace(
                c, usage=usage, events=dict(c.events), live_processes=live, dead_processes=dead
            )
        )


def _event_line(ev: Event) -> str:
    return json.dumps({"name": ev.name, "pid": ev.pid, "time": ev.time, "fields": ev.fields}) + "\n"


# ---------------------------------------------------------------------------------- detached


def coordinator_command(
    name: str,
    *,
    interval: float | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    events_path: str | os.PathLike[str] | None = None,
    log_level: str | None = None,
    trim_threshold: int | None = None,
    min_interval: float | None = None,
) -> list[str]:
    """The argv that runs a coordinator for ``name`` with this interpreter."""
    cmd = [sys.executable, "-m", "shmalloc.coordinator", name]
    for flag, value in (
        ("--interval", interval),
        ("--metrics-port", metrics_port),
        ("--metrics-host", metrics_host),
        ("--events", None if events_path is None else os.fspath(events_path)),
        ("--log-level", log_level),
        ("--trim-threshold", trim_threshold),
        ("--min-interval", min_interval),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def start_coordinator(
    manager: MemoryManager,
    *,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = _START_TIMEOUT,
    **kwargs: Any,
) -> int:
    """Start a detached coordinator for ``manager``'s arena; return its pid once it holds the
    lease.

    ``kwargs`` are Coordinator's (interval, metrics_port, metrics_host, events_path, log_level,
    trim_threshold, min_interval). Its output goes to ``log_path`` (appended) or nowhere. Raises
    CoordinatorRunning if the arena already has one, ShmallocError if the child exits or does not
    take the lease within ``timeout`` seconds.
    """
    holder = lease_holder(manager)
    if holder is not None:
        raise CoordinatorRunning(manager.name, holder)
    cmd = coordinator_command(manager.name, **kwargs)
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            out = stack.enter_context(open(log_path, "ab"))
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    h = handle_of(manager)
    deadline = time.monotonic() + timeout
    while True:
        pid, _ = _lease(h)
        if pid == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            see = f"; see {os.fspath(log_path)}" if log_path is not None else ""
            if code == EXIT_LEASE_HELD and pid and pid != proc.pid:
                raise CoordinatorRunning(manager.name, pid)
            raise ShmallocError(
                f"the coordinator for arena {manager.name!r} exited with status {code} before "
                f"taking the lease{see}; run `{' '.join(cmd)}` to see why"
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ShmallocError(
                f"the coordinator for arena {manager.name!r} (pid {proc.pid}) did not take the "
                f"lease within {timeout:g} s; it was killed"
            )
        time.sleep(0.01)
    # reap it when it ends, so that it never lingers as a zombie of this process
    threading.Thread(target=proc.wait, name=f"reap-coordinator-{proc.pid}", daemon=True).start()
    return proc.pid


# ---------------------------------------------------------------------------------- command line


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return v


def _non_negative(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, not {text}")
    return v


def build_parser(prog: str = "shmalloc coordinator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the coordinator of an arena in the foreground: reclaim the memory of "
        "dead processes, monitor pressure, export events and metrics. Stops on SIGTERM/SIGINT.",
        epilog=f"Exit status: 0 on a clean stop, {EXIT_LEASE_HELD} if another coordinator holds "
        f"the arena, {EXIT_ERROR} on other errors.",
    )
    p.add_argument("name", help="the arena's name")
    p.add_argument(
        "--interval",
        type=_positive,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"seconds between two ticks (default {DEFAULT_INTERVAL})",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="P",
        help="serve Prometheus metrics on this port (needs shmalloc[metrics])",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="H",
        help="address the metrics server binds (default 127.0.0.1)",
    )
    p.add_argument("--events", metavar="FILE", help="append every event to FILE as JSON lines")
    p.add_argument(
        "--log-level",
        default="INFO",
        metavar="L",
        choices=list(_LOG_LEVELS),
        type=str.upper,
        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
    )
    p.add_argument(
        "--trim-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="under HIGH pressure, ask processes owning more than this to trim "
        "(default 0: all that own memory)",
    )
    p.add_argument(
        "--min-interval",
        type=_non_negative,
        default=5.0,
        metavar="S",
        help="seconds between two automatic collections (default 5)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``shmalloc coordinator NAME ...``: returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    try:
        Coordinator(
            args.name,
            interval=args.interval,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            events_path=args.events,
            log_level=args.log_level,
            trim_threshold=args.trim_threshold,
            min_interval=args.min_interval,
        ).run()
    except CoordinatorRunning as e:
        print(f"shmalloc coordinator: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except (ShmallocError, OSError, ValueError) as e:
        print(f"shmalloc coordinator: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    # run the module's importable copy, so that its classes are the ones the package uses
    from shmalloc.coordinator import main as _main

    sys.exit(_main())
