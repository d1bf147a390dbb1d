"""``shmalloc top``: a live per-process view of an arena, redrawn in place on a terminal and as
self-describing lines when the output is a pipe or a file."""

from __future__ import annotations

import argparse
import os
import select
import sys
import time

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..manager import MemoryManager
from ..sizes import format_bytes
from .arena_access import EXIT_OK, attached, segment_path
from .snapshot import PRESSURE_STYLE, Snapshot, make_console, pressure_text, process_table

__all__ = ["cmd_top"]


def _top_view(snap: Snapshot, prev: Snapshot | None, interval: float) -> RenderableType:
    rate = ""
    if prev is not None and snap.taken > prev.taken:
        dt = snap.taken - prev.taken
        allocs = (snap.stats.allocations - prev.stats.allocations) / dt
        frees = (snap.stats.deallocations - prev.stats.deallocations) / dt
        rate = f"   {allocs:,.0f} alloc/s  {frees:,.0f} free/s"
    s = snap.stats
    head = Text.assemble(
        ("shmalloc top ", "bold"),
        (snap.name, "bold cyan"),
        f"   {format_bytes(s.used)} used of {format_bytes(s.total)} "
        f"({s.usage_percentage():.1f} %)   pressure ",
        pressure_text(snap.pressure),
        f"   fragmentation {s.fragmentation_ratio():.3f}",
    )
    live = sum(p.alive for p in snap.processes)
    coord = "none" if snap.coordinator is None else f"pid {snap.coordinator[0]}"
    line2 = Text(
        f"blocks {s.allocated_blocks} used / {s.free_blocks} free   "
        f"cached {format_bytes(snap.cached)}   processes {live} live, "
        f"{len(snap.processes) - live} dead   coordinator {coord}{rate}"
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text("usage"),
        ProgressBar(
            total=100.0,
            completed=s.usage_percentage(),
            width=50,
            complete_style=PRESSURE_STYLE[snap.pressure],
        ),
        Text(f"{s.usage_percentage():5.1f} %"),
    )
    foot = Text(
        f"q quits · refresh every {interval:g} s · {time.strftime('%H:%M:%S')}", style="dim"
    )
    return Group(head, line2, bar, process_table(snap), foot)


def _plain_lines(snap: Snapshot) -> list[str]:
    """top without a terminal: one line for the arena, one per process, each self-describing."""
    s = snap.stats
    stamp = time.strftime("%H:%M:%S")
    coord = "-" if snap.coordinator is None else str(snap.coordinator[0])
    lines = [
        (
            f"{stamp} arena={snap.name} used={s.used} ({format_bytes(s.used)}) total={s.total} "
            f"usage={s.usage_percentage():.1f}% pressure={snap.pressure.name} "
            f"fragmentation={s.fragmentation_ratio():.3f} blocks={s.allocated_blocks} "
            f"free_blocks={s.free_blocks} processes={len(snap.processes)} coordinator={coord}"
        )
    ]
    for p in snap.processes:
        lines.append(
            f"{stamp}   pid={p.pid} alive={'yes' if p.alive else 'no'} usage={p.usage} "
            f"({format_bytes(p.usage)}) peak={p.peak} "
            f"limit={'-' if p.limit is None else p.limit} blocks={p.allocations}"
        )
    return lines


def _wait_for_key(fd: int | None, timeout: float) -> bytes:
    """Wait up to ``timeout`` seconds for keys on ``fd`` (a terminal in cbreak mode)."""
    if fd is None:
        time.sleep(timeout)
        return b""
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 64) if ready else b""


def cmd_top(args: argparse.Namespace) -> int:
    with attached(args.name) as mgr:
        if sys.stdout.isatty():
            return _top_live(mgr, args.interval, args.iterations)
        return _top_plain(mgr, args.interval, args.iterations)


def _top_plain(mgr: MemoryManager, interval: float, iterations: int | None) -> int:
    n = 0
    while True:
        for line in _plain_lines(Snapshot.read(mgr)):
            print(line)
        sys.stdout.flush()
        n += 1
        if iterations is not None and n >= iterations:
            return EXIT_OK
        if not os.path.exists(segment_path(mgr.name)):
            print(f"arena {mgr.name} was destroyed", file=sys.stderr)
            return EXIT_OK
        time.sleep(interval)


def _top_live(mgr: MemoryManager, interval: float, iterations: int | None) -> int:
    import termios
    import tty

    fd: int | None = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    console = make_console()
    gone = False
    try:
        if fd is not None:
            tty.setcbreak(fd)
        prev: Snapshot | None = None
        n = 0
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                snap = Snapshot.read(mgr)
                live.update(_top_view(snap, prev, interval), refresh=True)
                prev, n = snap, n + 1
                if iterations is not None and n >= iterations:
                    break
                if not os.path.exists(segment_path(mgr.name)):
                    gone = True
                    break
                if b"q" in _wait_for_key(fd, interval).lower():
                    break
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    if gone:
        print(f"arena {mgr.name} was destroyed", file=sys.stderr)
    return EXIT_OK
