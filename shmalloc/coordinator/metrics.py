"""The coordinator's Prometheus exporter: what ``/metrics`` shows, and the server that shows it.

The coordinator's loop fills a :class:`MetricsSnapshot` every tick and hands a copy to the
:class:`MetricsExporter`, whose HTTP thread only reads it. prometheus_client is imported only when
an exporter is made (the ``metrics`` extra).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShmallocError

__all__ = ["MetricsExporter", "MetricsSnapshot"]


@dataclass
class MetricsSnapshot:
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


class MetricsExporter:
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
        self._snap = MetricsSnapshot()
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

    def update(self, snap: MetricsSnapshot) -> None:
        with self._lock:
            self._snap = snap

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
