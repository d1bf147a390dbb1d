"""What the commands show about an arena: a :class:`Snapshot` read at one moment, and its rich
renderings (the overview grid and the process table that ``info`` and ``top`` print)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import process
from ..lease import read_lease
from ..manager import MemoryManager, attachment_of
from ..sizes import count, format_bytes
from ..stats import MemoryPressure, MemoryStats
from ..tracking import ProcessInfo

__all__ = [
    "PRESSURE_STYLE",
    "Snapshot",
    "coordinator_of",
    "make_console",
    "overview",
    "pressure_text",
    "process_table",
]

PRESSURE_STYLE = {
    MemoryPressure.LOW: "green",
    MemoryPressure.MEDIUM: "yellow",
    MemoryPressure.HIGH: "bold red",
    MemoryPressure.CRITICAL: "bold white on red",
}


def coordinator_of(mgr: MemoryManager) -> tuple[int, bool] | None:
    """(pid, alive) of the process holding the arena's coordinator lease, None when nobody does."""
    pid, started = read_lease(attachment_of(mgr).handle())
    if pid == 0:
        return None
    return pid, process.is_alive(pid, started)


@dataclass(frozen=True)
class Snapshot:
    """Everything the read-only commands show about one arena, read at one moment."""

    name: str
    capacity: int
    stats: MemoryStats
    processes: list[ProcessInfo]
    coordinator: tuple[int, bool] | None
    names: list[str]
    cached: int = 0  # bytes in per-process caches (inside stats.available)
    cache_limit: int = 0
    taken: float = field(default_factory=time.monotonic)

    @classmethod
    def read(cls, mgr: MemoryManager) -> Snapshot:
        return cls(
            name=mgr.name,
            capacity=mgr.capacity,
            stats=mgr.stats(),
            processes=sorted(mgr.processes(), key=lambda p: (-p.usage, p.pid)),
            coordinator=coordinator_of(mgr),
            names=mgr.names(),
            cached=mgr.cached_bytes,
            cache_limit=mgr.cache_limit,
        )

    @property
    def pressure(self) -> MemoryPressure:
        return self.stats.memory_pressure()

    def as_json(self) -> dict[str, Any]:
        s = self.stats
        coord = None
        if self.coordinator is not None:
            coord = {"pid": self.coordinator[0], "alive": self.coordinator[1]}
        return {
            "name": self.name,
            "capacity": self.capacity,
            "stats": asdict(s),
            "usage_percentage": round(s.usage_percentage(), 3),
            "pressure": self.pressure.name,
            "fragmentation_ratio": round(s.fragmentation_ratio(), 6),
            "cached_bytes": self.cached,
            "cache_limit": self.cache_limit,
            "coordinator": coord,
            "processes": [
                {
                    "pid": p.pid,
                    "alive": p.alive,
                    "usage": p.usage,
                    "peak": p.peak,
                    "limit": p.limit,
                    "blocks": p.allocations,
                    "allocations": p.total_allocations,
                    "frees": p.total_frees,
                }
                for p in self.processes
            ],
            "named_blocks": self.names,
        }


def pressure_text(p: MemoryPressure) -> Text:
    return Text(p.name, style=PRESSURE_STYLE[p])


def overview(snap: Snapshot) -> Table:
    """The arena's figures as a two-column grid: what info and top show above the processes."""
    s = snap.stats
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("arena", snap.name)
    grid.add_row("capacity", f"{format_bytes(snap.capacity)} (heap {format_bytes(s.total)})")
    grid.add_row(
        "used",
        f"{format_bytes(s.used)} in {count(s.allocated_blocks, 'block')}, "
        f"{s.usage_percentage():.1f} % of the heap unavailable",
    )
    grid.add_row(
        "free",
        f"{format_bytes(s.available)} in {count(s.free_blocks, 'block')}, largest "
        f"{format_bytes(s.largest_free_block)}",
    )
    grid.add_row(
        "caches",
        f"{format_bytes(snap.cached)} of the free bytes held in per-process caches "
        f"(up to {format_bytes(snap.cache_limit)} each)"
        if snap.cache_limit
        else Text("off (every allocation takes the heap lock)", style="dim"),
    )
    grid.add_row("peak", format_bytes(s.peak))
    grid.add_row("pressure", pressure_text(snap.pressure))
    grid.add_row("fragmentation", f"{s.fragmentation_ratio():.3f}")
    grid.add_row("operations", f"{s.allocations} allocations, {s.deallocations} deallocations")
    if snap.coordinator is None:
        coord = Text("none (start one: shmalloc coordinator NAME)", style="dim")
    else:
        pid, alive = snap.coordinator
        coord = Text(f"pid {pid}" + ("" if alive else " (dead: a new one may take over)"))
    grid.add_row("coordinator", coord)
    return grid


def process_table(snap: Snapshot, title: str | None = None) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for col in ("PID", "ALIVE", "USAGE", "PEAK", "LIMIT", "BLOCKS", "ALLOCS", "FREES"):
        t.add_column(col, justify="left" if col == "ALIVE" else "right", no_wrap=True)
    for p in snap.processes:
        t.add_row(
            str(p.pid),
            Text("yes", style="green") if p.alive else Text("dead", style="red"),
            format_bytes(p.usage),
            format_bytes(p.peak),
            "-" if p.limit is None else format_bytes(p.limit),
            str(p.allocations),
            str(p.total_allocations),
            str(p.total_frees),
        )
    if not snap.processes:
        t.caption = "no process is attached"
    return t


def make_console() -> Console:
    """Rich output; 100 columns when writing to a pipe or a file (unless COLUMNS says)."""
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 100
    return Console(highlight=False, width=width)
