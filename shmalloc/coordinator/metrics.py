"""The coordinator's Prometheus exporter: what ``/metrics`` shows, and the server that shows it.

The coordinator's loop fills a :class:`MetricsSnapshot` every tick and hands a copy to the
:class:`MetricsExporter`, whose HTTP thread only reads it. prometheus_client is imported only when
an exporter is made (the ``metrics`` extra).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _binding as C
from ..errors import ShmallocError

__all__ = ["MetricsExporter", "MetricsSnapshot"]


@dataclass
class MetricsSnapshot:
    """What /metrics shows, refreshed by the coordinator's loop (the HTTP thread only reads it)."""

    stats: C.RawStats | None = None  # the arena's counters, as last read
    levels: dict[str, int] = field(default_factory=dict)  # pressure level by resource
    usage: dict[int, int] = field(default_factory=dict)  # usable bytes by pid
    processes: dict[str, int] = field(default_factory=dict)  # "live", "dead": how many
    # what the events drained so far add up to ("gc_runs", "gc_freed_blocks", "reclaimed_bytes",
    # "processes_reclaimed"), and "dropped_events", the ring's own count
    totals: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # events drained, by name


# The single-valued metrics, by where their value is: a field of the arena's counters, a key of
# the snapshot's process counts or of its totals. Each: (name after "shmalloc_", help text, True
# for a counter (it only grows), False for a gauge).
_FROM_STATS: dict[str, tuple[str, str, bool]] = {
    "used": ("used_bytes", "Usable bytes of allocated blocks", False),
    "peak": ("peak_bytes", "Highest used_bytes seen", False),
    "capacity": ("capacity_bytes", "Size of the shared-memory segment", False),
    "total": ("heap_bytes", "Bytes of the segment the heap may use", False),
    "available": ("available_bytes", "Usable bytes of free blocks", False),
    "allocated_blocks": ("allocated_blocks", "Blocks allocated now", False),
    "free_blocks": ("free_blocks", "Free blocks now", False),
    "allocations": ("allocations", "Allocations in the arena", True),
    "deallocations": ("deallocations", "Deallocations in the arena", True),
}
_FROM_PROCESSES = {
    "live": ("live_processes", "Processes attached and running", False),
    "dead": ("dead_processes", "Ended processes whose memory is not reclaimed yet", False),
}
_FROM_TOTALS = {
    "gc_runs": ("gc_runs", "Collections run by any process (memory.gc_triggered)", True),
    "gc_freed_blocks": ("gc_freed_blocks", "Blocks freed by collections", True),
    "reclaimed_bytes": (
        "gc_freed_bytes",
        "Bytes reclaimed from processes (memory.process_reclaimed)",
        True,
    ),
    "processes_reclaimed": ("processes_reclaimed", "Process reclamations", True),
    "dropped_events": ("dropped_events", "Events lost to a full ring", True),
}


def _scalars(snap: MetricsSnapshot) -> Iterator[tuple[str, str, bool, int]]:
    """(name, help, is a counter, value) of every single-valued metric."""
    for key, (name, doc, counter) in _FROM_STATS.items():
        yield name, doc, counter, int(getattr(snap.stats, key)) if snap.stats is not None else 0
    for table, values in ((_FROM_PROCESSES, snap.processes), (_FROM_TOTALS, snap.totals)):
        for key, (name, doc, counter) in table.items():
            yield name, doc, counter, values.get(key, 0)


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
                for name, doc, is_counter, value in _scalars(s):
                    family = CounterMetricFamily if is_counter else GaugeMetricFamily
                    yield family(f"shmalloc_{name}", doc, value=value)
                yield GaugeMetricFamily(
                    "shmalloc_pressure_level",
                    "Arena pressure: 0 LOW, 1 MEDIUM, 2 HIGH, 3 CRITICAL",
                    value=s.levels.get("arena", 0),
                )
                sysp = GaugeMetricFamily(
                    "shmalloc_system_pressure_level",
                    "System pressure by resource: 0 LOW, 1 MEDIUM, 2 HIGH, 3 CRITICAL",
                    labels=["resource"],
                )
                sysp.add_metric(["memory"], s.levels.get("system memory", 0))
                sysp.add_metric(["shm_filesystem"], s.levels.get("/dev/shm", 0))
                yield sysp
                per = GaugeMetricFamily(
                    "shmalloc_process_usage_bytes",
                    "Usable bytes owned by each process",
                    labels=["pid"],
                )
                for pid, nbytes in sorted(usage.items()):
                    per.add_metric([str(pid)], nbytes)
                yield per
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
