"""The Coordinator: the loop that serves one arena, tying together the lease (lease.py), the
process watch (watch.py), pressure (pressure.py) and the exporters of events (a JSON-lines file,
the log) and of metrics (metrics.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import IO, Any

from .. import _binding as C
from .. import events, lease
from ..attachment import own_arena_mode
from ..errors import CorruptionDetected, ShmallocError
from ..events import Event
from ..gc import GcStats, GlobalGarbageCollector
from ..manager import MemoryManager, attachment_of
from ..stats import MemoryPressure
from .metrics import MetricsExporter, MetricsSnapshot
from .pressure import SHM_DIR, PressureLevels, system_usage
from .watch import ProcessWatch

__all__ = ["DEFAULT_INTERVAL", "LOG_LEVELS", "Coordinator"]

logger = logging.getLogger("shmalloc.coordinator")  # one logger for every part of the coordinator

DEFAULT_INTERVAL = 0.25
_DRAIN_LIMIT = 2 * C.RING_SLOTS  # events per tick at most (two laps of the ring)
LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


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
            if log_level.upper() not in LOG_LEVELS:
                raise ValueError(
                    f"unknown log level {log_level!r}: use one of {', '.join(LOG_LEVELS)}"
                )
            self.log_level = LOG_LEVELS[log_level.upper()]
        else:
            self.log_level = int(log_level)
        self.trim_threshold = trim_threshold
        self.min_interval = min_interval
        self._stopping = threading.Event()
        self._wake_lock = threading.Lock()
        self._wake_r = self._wake_w = -1  # the self-pipe, open while run() runs
        self.lost_lease = False
        self.truncated: CorruptionDetected | None = None  # the segment shrank: run() raises it
        # what the loop keeps between ticks
        self._processes: ProcessWatch | None = None  # while run() runs
        self._counts = MetricsSnapshot()
        self._last_error = ""
        self._signal: int | None = None
        self._events: IO[str] | None = None
        self._metrics: MetricsExporter | None = None

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask run() to return (from any thread or a signal handler)."""
        self._stopping.set()
        # Never wait for the lock: a signal handler may have interrupted its holder in this very
        # thread. When it is busy, its holder is another stop() (which wakes the loop) or run()
        # opening or closing the pipe (the loop tests _stopping before it first waits).
        if not self._wake_lock.acquire(blocking=False):
            return
        try:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass  # the pipe is full: the loop is woken already
        finally:
            self._wake_lock.release()

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
        if self.truncated is not None:
            raise self.truncated
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
        real = [h for h in shm_logger.handlers if not isinstance(h, logging.NullHandler)]
        if not logging.getLogger().handlers and not real:
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
            manager = MemoryManager.attach(self.name, mode=own_arena_mode(self.name))
            try:
                me = lease.acquire(attachment_of(manager))
                logger.info(
                    "coordinator of arena %s: pid %d, interval %.3gs",
                    self.name,
                    me[0],
                    self.interval,
                )
                try:
                    self._serve(manager, me)
                finally:
                    if not self.lost_lease and self.truncated is None:
                        lease.release(attachment_of(manager), me)
                    logger.info("coordinator of arena %s stopped", self.name)
            finally:
                if self._processes is not None:
                    self._processes.close()
                    self._processes = None
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
        self._h = attachment_of(manager).handle()
        self._gc = GlobalGarbageCollector(manager)
        self._gc.set_threshold(self.trim_threshold)
        self._gc.set_min_interval(self.min_interval)
        self._pressure = PressureLevels(self.name)
        self._me = me
        self._counts = MetricsSnapshot()
        # the segment this process mapped (not whatever the name points at by now: the arena may
        # have been destroyed between the attach and this line)
        self._inode: int | None = os.fstat(attachment_of(manager).fd).st_ino
        with contextlib.ExitStack() as stack:
            if self.events_path is not None:
                self._events = stack.enter_context(open(self.events_path, "a", encoding="utf-8"))
            if self.metrics_port is not None:
                self._metrics = MetricsExporter(self.name, self.metrics_host, self.metrics_port)
                stack.callback(self._metrics.close)
                logger.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            procs = self._processes = ProcessWatch(self._h, self._gc, poller)
            next_tick = time.monotonic()
            while not self._stopping.is_set():
                timeout = max(0.0, next_tick - time.monotonic())
                ready = poller.poll(timeout * 1000.0)
                ended = False
                for fd, _ in ready:
                    if fd == self._wake_r:
                        self._drain_wake()
                    elif procs.owns(fd):
                        procs.ended(fd)
                        ended = True
                if self._stopping.is_set():
                    break
                if ended and self._intact():
                    self._step("reclaiming", procs.reclaim)
                now = time.monotonic()
                if now >= next_tick:
                    self._tick()
                    next_tick = max(next_tick + self.interval, now)
            if self._signal is not None:
                logger.info("received %s: stopping", signal.Signals(self._signal).name)
            # a last drain so that nothing emitted before the stop is lost
            if self.truncated is None:
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

    def _intact(self) -> bool:
        """Is the segment still as long as the mapping? One fstat before the tick touches it: a
        truncated segment (outside the threat model: a process of the same user shrank it) is
        reported and the coordinator stops, instead of dying of SIGBUS on a page that is gone.
        A truncation racing an access already under way cannot be caught."""
        try:
            C.segment_check(self._h)
        except CorruptionDetected as e:
            logger.critical("coordinator of arena %s: %s: stopping", self.name, e)
            self.truncated = e
            self.stop()
            return False
        return True

    def _tick(self) -> None:
        if not self._intact():
            return
        self._step("checking the lease and the arena", self._check_role)
        if self._stopping.is_set():
            return
        assert self._processes is not None
        self._step("scanning processes", self._processes.scan)
        self._step("monitoring pressure", self._monitor)
        self._step("draining events", self._drain_events)
        self._step("expiring references in transit", lambda: C.objects_expire(self._h))
        if self._metrics is not None:
            self._step("updating metrics", self._update_metrics)

    def _check_role(self) -> None:
        held = lease.read_lease(self._h)
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

    # ------------------------------------------------------------ pressure

    def _monitor(self) -> None:
        s = C.stats_read(self._h)
        total, available = s.total, s.available
        arena_pct = C.usage_percent(total, available)
        mem_pct, shm_pct = system_usage()
        p = self._pressure
        p.observe("arena", arena_pct)
        p.observe("system memory", mem_pct)
        p.observe("/dev/shm", shm_pct)
        self._counts.stats = s
        self._counts.levels = {resource: int(level) for resource, level in p.levels.items()}
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
        c.totals["dropped_events"] = C.event_dropped(self._h)
        if not evs:
            return
        mine = os.getpid()
        t = c.totals
        for ev in evs:
            c.events[ev.name] = c.events.get(ev.name, 0) + 1
            if ev.name == events.GC_TRIGGERED:
                t["gc_runs"] = t.get("gc_runs", 0) + 1
                t["gc_freed_blocks"] = t.get("gc_freed_blocks", 0) + int(
                    ev.fields.get("freed_blocks", 0)
                )
            elif ev.name == events.PROCESS_RECLAIMED:
                t["processes_reclaimed"] = t.get("processes_reclaimed", 0) + 1
                t["reclaimed_bytes"] = t.get("reclaimed_bytes", 0) + int(ev.fields.get("bytes", 0))
            level = logging.DEBUG if ev.pid == mine else events.KINDS[ev.name].log_level
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
        assert self._processes is not None
        c = self._counts
        usage: dict[int, int] = {}
        live = dead = 0
        for r in self._processes.rows:
            usage[r.pid] = usage.get(r.pid, 0) + r.usage
            if r.state == C.PROC_LIVE and (r.pid, r.start_time) not in self._processes.exited:
                live += 1
            else:
                dead += 1
        self._metrics.update(
            dataclasses.replace(
                c,
                usage=usage,
                events=dict(c.events),
                totals=dict(c.totals),
                processes={"live": live, "dead": dead},
            )
        )


def _event_line(ev: Event) -> str:
    return json.dumps({"name": ev.name, "pid": ev.pid, "time": ev.time, "fields": ev.fields}) + "\n"
