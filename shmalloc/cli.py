"""The ``shmalloc`` command line: look at arenas, operate them, and show what they do.

    shmalloc list | create | info | top | check | gc | destroy | coordinator | demo | bench

Every command opens arenas through MemoryManager.attach() and only reads unless it is asked to
change something: ``list``, ``info``, ``top`` and ``check`` never claim a slot in the process
table, so looking at an arena does not show up in it.

Exit codes, the same for every command:
  0  done (``check``: the heap is clean)
  1  the arena is unhealthy or the operation failed (``check`` found corruption, the demo saw
     something go wrong)
  2  the command could not run: a bad argument or size string, no such arena, a segment that is
     not a shmalloc arena (or one of another layout version), a permission problem
Errors are one line on stderr, never a traceback (``SHMALLOC_TRACEBACK=1`` adds it, for bugs).

``demo`` and its worker processes live here too, so that ``shmalloc demo`` needs nothing but the
installed package; workers are started with the ``spawn`` method and attach by the arena's name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import psutil
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape as _escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import process
from ._binding import ffi, lib
from .errors import CorruptionDetected, ShmallocError
from .manager import MemoryManager, validate_name
from .stats import MemoryPressure, MemoryStats
from .tracking import ProcessInfo

__all__ = ["format_bytes", "main", "parse_size"]

SHM_DIR = "/dev/shm"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_MAGIC = int(lib.SHM_MAGIC).to_bytes(8, "little")
_LAYOUT_VERSION = int(lib.SHM_LAYOUT_VERSION)
_PRESSURE_STYLE = {
    MemoryPressure.LOW: "green",
    MemoryPressure.MEDIUM: "yellow",
    MemoryPressure.HIGH: "bold red",
    MemoryPressure.CRITICAL: "bold white on red",
}


class CliError(Exception):
    """A failure to report to a person: one line on stderr and ``code`` as the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------ sizes

_UNITS = {"": 0, "b": 0, "k": 1, "kib": 1, "m": 2, "mib": 2, "g": 3, "gib": 3, "t": 4, "tib": 4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from a size a person typed: ``4096``, ``64K``, ``64M``, ``1.5G``, ``64MiB``.

    K, M, G and T are binary (1024-based), like KiB, MiB, GiB and TiB; the letter's case does not
    matter. ``MB``-style units are refused rather than guessed at.
    """
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: write a number of bytes, optionally with a unit K, M, G, T "
            "or KiB, MiB, GiB, TiB (all 1024-based), e.g. 64M"
        )
    try:
        value = Decimal(m.group(1)) * (1024 ** _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimal numbers
        raise ValueError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: it is not a whole number of bytes")
    return int(value)


def format_bytes(n: float) -> str:
    """``512 B``, ``3.0 KiB``, ``64.0 MiB``: what a person reads."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def _count(n: int, noun: str) -> str:
    """``1 block``, ``2 blocks``, ``0 processes``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


# ------------------------------------------------------------------------------ arena access


def _segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _read_header(name: str) -> bytes | None:
    """The first 12 bytes of /dev/shm/NAME (magic, layout version), or None if it is gone.
    PermissionError when this user may not read it."""
    try:
        fd = os.open(_segment_path(name), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 12)
    finally:
        os.close(fd)


def _identify(name: str) -> str:
    """Classify /dev/shm/NAME: ``arena``, ``formatting`` (magic not yet written), ``foreign`` or
    ``version`` (ours, another layout). CliError when it is missing or unreadable."""
    try:
        head = _read_header(name)
    except PermissionError:
        raise CliError(
            f"arena {name!r} exists but this user may not open it; {_owner_hint(name)}"
        ) from None
    if head is None:
        raise CliError(f"no arena named {name!r} (see `shmalloc list`); create it first")
    if head[:8] == _MAGIC:
        version = int.from_bytes(head[8:12], "little") if len(head) >= 12 else -1
        return "arena" if version == _LAYOUT_VERSION else "version"
    if head == b"\0" * len(head):
        return "formatting"
    return "foreign"


def _owner_hint(name: str) -> str:
    try:
        st = os.stat(_segment_path(name))
    except OSError:
        return "run as the user who created it"
    return f"it belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:04o}; run as that user"


def open_arena(name: str) -> MemoryManager:
    """Attach to the arena ``name`` for a command, turning every way that can fail into one
    CliError that says what was found."""
    try:
        validate_name(name)
    except ValueError as e:
        raise CliError(str(e)) from None
    kind = _identify(name)
    if kind == "foreign":
        raise CliError(
            f"{_segment_path(name)} is not a shmalloc arena (its first bytes are not shmalloc's "
            "magic); leave it alone or pick another name"
        )
    if kind == "version":
        raise CliError(
            f"arena {name!r} was made by a shmalloc with another segment layout (this one reads "
            f"layout {_LAYOUT_VERSION}); use the shmalloc version that created it"
        )
    try:
        return MemoryManager.attach(name)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    except PermissionError:
        raise CliError(
            f"arena {name!r} exists but this user may not open it; {_owner_hint(name)}"
        ) from None
    except CorruptionDetected as e:
        raise CliError(f"arena {name!r} cannot be opened: {e}", EXIT_FAILED) from None


@contextlib.contextmanager
def attached(name: str) -> Iterator[MemoryManager]:
    mgr = open_arena(name)
    try:
        yield mgr
    finally:
        mgr.close()


def coordinator_of(mgr: MemoryManager) -> tuple[int, bool] | None:
    """(pid, alive) of the process holding the arena's coordinator lease, None when nobody does."""
    pid, started = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.shm_lease_get(mgr._handle(), pid, started) != 0 or pid[0] == 0:
        return None
    return int(pid[0]), process.is_alive(int(pid[0]), int(started[0]))


@dataclass(frozen=True)
class Snapshot:
    """Everything the read-only commands show about one arena, read at one moment."""

    name: str
    capacity: int
    stats: MemoryStats
    processes: list[ProcessInfo]
    coordinator: tuple[int, bool] | None
    names: list[str]
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


def _pressure_text(p: MemoryPressure) -> Text:
    return Text(p.name, style=_PRESSURE_STYLE[p])


def _overview(snap: Snapshot) -> Table:
    """The arena's figures as a two-column grid: what info and top show above the processes."""
    s = snap.stats
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("arena", snap.name)
    grid.add_row("capacity", f"{format_bytes(snap.capacity)} (heap {format_bytes(s.total)})")
    grid.add_row(
        "used",
        f"{format_bytes(s.used)} in {_count(s.allocated_blocks, 'block')}, "
        f"{s.usage_percentage():.1f} % of the heap unavailable",
    )
    grid.add_row(
        "free",
        f"{format_bytes(s.available)} in {_count(s.free_blocks, 'block')}, largest "
        f"{format_bytes(s.largest_free_block)}",
    )
    grid.add_row("peak", format_bytes(s.peak))
    grid.add_row("pressure", _pressure_text(snap.pressure))
    grid.add_row("fragmentation", f"{s.fragmentation_ratio():.3f}")
    grid.add_row("operations", f"{s.allocations} allocations, {s.deallocations} deallocations")
    if snap.coordinator is None:
        coord = Text("none (start one: shmalloc coordinator NAME)", style="dim")
    else:
        pid, alive = snap.coordinator
        coord = Text(f"pid {pid}" + ("" if alive else " (dead: a new one may take over)"))
    grid.add_row("coordinator", coord)
    return grid


def _process_table(snap: Snapshot, title: str | None = None) -> Table:
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


def _console() -> Console:
    """Rich output; 100 columns when writing to a pipe or a file (unless COLUMNS says)."""
    width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 100
    return Console(highlight=False, width=width)


# ---------------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    unreadable = 0
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except OSError as e:
        raise CliError(f"cannot read {SHM_DIR}: {e.strerror}") from None
    for entry in entries:
        path = _segment_path(entry)
        if entry.startswith("sem.") or not os.path.isfile(path):
            continue
        try:
            head = _read_header(entry)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue
        if head is None or head[:8] != _MAGIC:
            continue
        row: dict[str, Any] = {"name": entry}
        version = int.from_bytes(head[8:12], "little")
        if version != _LAYOUT_VERSION:
            row["status"] = f"layout {version} (this shmalloc reads {_LAYOUT_VERSION})"
            rows.append(row)
            continue
        try:
            mgr = MemoryManager.attach(entry)
        except FileNotFoundError:
            continue  # destroyed between listdir and attach
        except PermissionError:
            unreadable += 1
            continue
        except (ShmallocError, ValueError, OSError) as e:
            row["status"] = f"cannot open: {e}"
            rows.append(row)
            continue
        try:
            s = mgr.stats()
            procs = mgr.processes()
        except (ShmallocError, ValueError, OSError) as e:
            row["status"] = f"cannot read: {e}"
            rows.append(row)
            continue
        finally:
            mgr.close()
        row.update(
            status="ok",
            capacity=mgr.capacity,
            used=s.used,
            usage_percentage=round(s.usage_percentage(), 3),
            pressure=s.memory_pressure().name,
            processes=sum(p.alive for p in procs),
            dead_processes=sum(not p.alive for p in procs),
        )
        rows.append(row)
    if args.json:
        print(json.dumps({"arenas": rows, "unreadable": unreadable}, indent=2))
        return EXIT_OK
    longest = max((len(r["name"]) for r in rows), default=0)
    console = _console()
    if not console.is_terminal:
        console.width = max(console.width, longest + 72)  # a pipe or a file: never cut a name
    if not rows:
        console.print(f"no shmalloc arenas in {SHM_DIR}")
    else:
        t = Table(box=box.SIMPLE_HEAD)
        t.add_column("NAME", no_wrap=True, min_width=longest)
        for col in ("CAPACITY", "USED", "USE %", "PRESSURE", "PROCESSES"):
            t.add_column(col, justify="right", no_wrap=True)
        for r in rows:
            if r["status"] != "ok":
                continue
            attached = str(r["processes"])
            if r["dead_processes"]:
                attached += f" (+{r['dead_processes']} dead)"
            t.add_row(
                r["name"],
                format_bytes(r["capacity"]),
                format_bytes(r["used"]),
                f"{r['usage_percentage']:.1f}",
                _pressure_text(MemoryPressure[r["pressure"]]),
                attached,
            )
        if any(r["status"] == "ok" for r in rows):
            console.print(t)
        for r in rows:
            if r["status"] != "ok":
                console.print(Text.assemble(r["name"], ": ", (r["status"], "yellow")))
    if unreadable:
        console.print(
            f"({unreadable} segment(s) in {SHM_DIR} could not be read by this user)", style="dim"
        )
    return EXIT_OK


def cmd_create(args: argparse.Namespace) -> int:
    try:
        validate_name(args.name)
        mode = int(args.mode, 8)
    except ValueError as e:
        raise CliError(str(e) if "mode" not in str(e) else f"invalid mode {args.mode!r}") from None
    try:
        mgr = MemoryManager.create(args.name, args.capacity, mode=mode)
    except FileExistsError as e:
        raise CliError(str(e)) from None
    except PermissionError as e:
        raise CliError(str(e)) from None
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        s = mgr.stats()
        print(
            f"created arena {mgr.name}: {format_bytes(mgr.capacity)} "
            f"({mgr.capacity} bytes, heap {format_bytes(s.total)}), mode {mode:04o}"
        )
    finally:
        mgr.close()
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with attached(args.name) as mgr:
        snap = Snapshot.read(mgr)
    if args.json:
        print(json.dumps(snap.as_json(), indent=2))
        return EXIT_OK
    console = _console()
    console.print(_overview(snap))
    console.print(_process_table(snap, title=f"processes ({len(snap.processes)})"))
    if snap.names:
        shown = ", ".join(snap.names[:20]) + (" ..." if len(snap.names) > 20 else "")
        console.print(Text.assemble(("named blocks", "bold"), f" ({len(snap.names)}): {shown}"))
    return EXIT_OK


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
        _pressure_text(snap.pressure),
        f"   fragmentation {s.fragmentation_ratio():.3f}",
    )
    live = sum(p.alive for p in snap.processes)
    coord = "none" if snap.coordinator is None else f"pid {snap.coordinator[0]}"
    line2 = Text(
        f"blocks {s.allocated_blocks} used / {s.free_blocks} free   processes {live} live, "
        f"{len(snap.processes) - live} dead   coordinator {coord}{rate}"
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text("usage"),
        ProgressBar(
            total=100.0,
            completed=s.usage_percentage(),
            width=50,
            complete_style=_PRESSURE_STYLE[snap.pressure],
        ),
        Text(f"{s.usage_percentage():5.1f} %"),
    )
    foot = Text(
        f"q quits · refresh every {interval:g} s · {time.strftime('%H:%M:%S')}", style="dim"
    )
    return Group(head, line2, bar, _process_table(snap), foot)


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
        if not os.path.exists(_segment_path(mgr.name)):
            print(f"arena {mgr.name} was destroyed", file=sys.stderr)
            return EXIT_OK
        time.sleep(interval)


def _top_live(mgr: MemoryManager, interval: float, iterations: int | None) -> int:
    import termios
    import tty

    fd: int | None = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    console = _console()
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
                if not os.path.exists(_segment_path(mgr.name)):
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


def cmd_check(args: argparse.Namespace) -> int:
    with attached(args.name) as mgr:
        try:
            report = mgr.check()
        except CorruptionDetected as e:
            if args.json:
                print(
                    json.dumps(
                        {"name": args.name, "ok": False, "offset": e.offset, "detail": e.detail}
                    )
                )
            else:
                print(f"{args.name}: CORRUPT at offset {e.offset:#x}: {e.detail}")
            return EXIT_FAILED
    if args.json:
        print(json.dumps({"name": args.name, "ok": True, **asdict(report)}))
    else:
        print(
            f"{args.name}: clean: {_count(report.blocks, 'block')} ({report.allocated_blocks} allocated, "
            f"{report.free_blocks} free), {format_bytes(report.used)} used, "
            f"{format_bytes(report.free_bytes)} free, largest free {format_bytes(report.largest_free)}, "
            f"{report.live_processes} live and {report.dead_processes} dead processes"
        )
    return EXIT_OK


def _parse_strategy(text: str) -> tuple[str, int | None]:
    kind, _, value = text.partition("=")
    kind = kind.strip().lower()
    if kind in ("global", "unreferenced") and not value:
        return kind, None
    if kind == "threshold" and value:
        try:
            return kind, parse_size(value)
        except ValueError as e:
            raise ValueError(f"invalid strategy {text!r}: {e}") from None
    if kind == "targeted" and value.strip().isdigit():
        return kind, int(value)
    raise ValueError(
        f"invalid strategy {text!r}: use global, unreferenced, threshold=SIZE (e.g. threshold=10M) "
        "or targeted=PID"
    )


def cmd_gc(args: argparse.Namespace) -> int:
    try:
        kind, value = _parse_strategy(args.strategy)
    except ValueError as e:
        raise CliError(str(e)) from None
    with attached(args.name) as mgr:
        if kind == "targeted" and all(p.pid != value for p in mgr.processes()):
            raise CliError(
                f"process {value} has no entry in arena {args.name!r} (see `shmalloc info {args.name}`)"
            )
        try:
            from .gc import GcStrategy, GlobalGarbageCollector
        except ImportError:
            raise CliError(
                "this installation has no shmalloc.gc module (the global garbage collector)",
                EXIT_FAILED,
            ) from None
        strategy: Any
        if kind == "global":
            strategy = GcStrategy.GLOBAL
        elif kind == "unreferenced":
            strategy = GcStrategy.UNREFERENCED
        elif kind == "threshold":
            assert value is not None
            strategy = GcStrategy.threshold(value)
        else:
            assert value is not None
            strategy = GcStrategy.targeted(value)
        result = GlobalGarbageCollector(mgr).collect(strategy)
    out = {
        "name": args.name,
        "strategy": args.strategy,
        "freed_bytes": int(result.freed_bytes),
        "freed_blocks": int(result.freed_blocks),
        "processes_cleaned": int(result.processes_cleaned),
        "duration": float(result.duration),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.name}: gc {args.strategy} freed {_count(out['freed_blocks'], 'block')} "
            f"({format_bytes(out['freed_bytes'])}) of {_count(out['processes_cleaned'], 'process')} "
            f"in {out['duration'] * 1000:.1f} ms"
        )
    return EXIT_OK


def cmd_destroy(args: argparse.Namespace) -> int:
    with attached(args.name) as mgr:
        live = [p.pid for p in mgr.processes() if p.alive]
        mgr.destroy()
    print(f"destroyed arena {args.name}")
    if live:
        pids = ", ".join(map(str, live[:10])) + (" ..." if len(live) > 10 else "")
        print(
            f"note: {len(live)} process(es) still had it mapped ({pids}); their mappings keep "
            "working until they close",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_coordinator(argv: list[str]) -> int:
    try:
        from .coordinator import main as coordinator_main
    except ImportError:
        raise CliError(
            "this installation has no shmalloc.coordinator module", EXIT_FAILED
        ) from None
    rc = coordinator_main(argv)
    return int(rc or 0)


# ------------------------------------------------------------------------------------ bench

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _stress_available() -> bool:
    return (_REPO_ROOT / "stress" / "bench_alloc.py").is_file()


def cmd_bench(args: argparse.Namespace) -> int:
    return _bench_builtin(args.ops, args.capacity)


def _bench_delegated(argv: list[str]) -> int | None:
    """``shmalloc bench ARGS`` runs ``python -m stress.bench_alloc ARGS`` from the repository
    checkout when there is one (None when the built-in benchmark is wanted instead)."""
    if not _stress_available() or {"-h", "--help", "--builtin"} & set(argv):
        return None
    cmd = [sys.executable, "-m", "stress.bench_alloc", *argv]
    print(f"running {' '.join(cmd[1:])} in {_REPO_ROOT}", file=sys.stderr)
    return subprocess.call(cmd, cwd=_REPO_ROOT)


def _bench_builtin(ops: int, capacity: int) -> int:
    """allocate+deallocate pairs through the public API, per size: the median of 5 trials."""
    from multiprocessing import shared_memory

    sizes = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20]
    console = _console()
    t = Table(
        title=f"allocate + deallocate pairs, {ops} per trial, median of 5", box=box.SIMPLE_HEAD
    )
    for col in ("SIZE", "NS/PAIR", "PAIRS/S", "STDLIB NS/SEGMENT"):
        t.add_column(col, justify="right")
    with MemoryManager(capacity) as mgr:
        alloc, free = mgr.allocate, mgr.deallocate
        free(alloc(64))  # claim this process's slot outside the timing
        for size in sizes:
            trials = []
            for _ in range(5):
                t0 = time.perf_counter_ns()
                for _ in range(ops):
                    free(alloc(size))
                trials.append((time.perf_counter_ns() - t0) / ops)
            ns = sorted(trials)[2]
            n_std = max(10, ops // 100)
            t0 = time.perf_counter_ns()
            for _ in range(n_std):
                seg = shared_memory.SharedMemory(create=True, size=size)
                seg.close()
                seg.unlink()
            std = (time.perf_counter_ns() - t0) / n_std
            t.add_row(format_bytes(size), f"{ns:,.0f}", f"{1e9 / ns:,.0f}", f"{std:,.0f}")
    console.print(t)
    console.print(
        "built-in benchmark; the full suite is `python -m stress.bench_alloc` in a repository checkout",
        style="dim",
    )
    return EXIT_OK


# ------------------------------------------------------------------------------------- demo
#
# The demo's processes:
#   main     creates the arena, binds "demo.config", starts the coordinator and the workers,
#            draws the progress, kills the victim, fills the arena, prints the summary, cleans up
#   worker i churns private blocks (allocate, write, read back, free), hands a parcel to worker
#            i+1 through a pipe every round (i+1 adopts it, verifies it and frees it), retains
#            and reads the shared config, and at the end binds "demo.result.i" for main to read
#   victim   holds ballast blocks and one named note, then waits to be killed with SIGKILL
# Workers talk to main over one duplex pipe each: ("progress", rounds, ops, bytes), ("done",
# ...), ("error", text); main answers "exit" once every worker is done, so that no parcel is
# left orphaned by a worker that exited before its neighbour adopted it.

_CHURN = 6  # private allocate/write/read/free cycles per round
_PARCEL_TIMEOUT = 30.0  # seconds a worker waits for its neighbour's parcel
_SILENCE = 60.0  # seconds without a message from any demo process before the demo gives up
_CONFIG = b"shmalloc demo configuration: every worker reads this named block" * 8


def _fill(tag: int, size: int) -> bytes:
    """A block's expected contents: 8 bytes of tag, then one repeated byte derived from it."""
    return tag.to_bytes(8, "little") + bytes([tag % 251]) * (size - 8)


def _demo_worker(
    mgr: MemoryManager,
    index: int,
    rounds: int,
    churn_max: int,
    seed: int,
    to_next: Connection,
    from_prev: Connection,
    ctl: Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    rng = random.Random(seed * 1009 + index)
    pid = os.getpid()
    ops = nbytes = handed = 0
    try:
        config = mgr.lookup("demo.config")
        ops += 1
        for r in range(rounds):
            for _ in range(_CHURN):
                size = rng.randint(64, churn_max)
                tag = (pid << 24) | (r << 4) | rng.randrange(16)
                data = _fill(tag, size)
                a = mgr.allocate(size)
                mgr.write(a, data)
                if mgr.read(a, size) != data:
                    raise AssertionError(f"block {a:#x} read back different bytes")
                mgr.deallocate(a)
                ops += 4
                nbytes += size
            # hand a parcel to the next worker, take one from the previous
            size = rng.randint(256, 16384)
            a = mgr.allocate(size)
            mgr.write(a, _fill(pid + r, size))
            to_next.send((a, size, r))
            ops += 2
            nbytes += size
            if not from_prev.poll(_PARCEL_TIMEOUT):
                raise TimeoutError(f"no parcel from the previous worker for round {r}")
            pa, psize, pr = from_prev.recv()
            mgr.adopt(pa)
            got = mgr.read(pa, psize)
            sender = int.from_bytes(got[:8], "little") - pr
            if got != _fill(sender + pr, psize):
                raise AssertionError(f"parcel {pa:#x} from pid {sender} is damaged")
            mgr.deallocate(pa)
            ops += 3
            handed += 1
            if r % 8 == 0:  # hold a reference on the shared config while reading it
                mgr.retain(config)
                if mgr.read(config, len(_CONFIG)) != _CONFIG:
                    raise AssertionError("the named block demo.config changed")
                mgr.release(config)
                ops += 3
            if r % 10 == 9 or r == rounds - 1:
                ctl.send(("progress", r + 1, ops, nbytes))
        result = json.dumps({"pid": pid, "ops": ops, "bytes": nbytes, "adopted": handed}).encode()
        a = mgr.allocate(4 + len(result))
        mgr.write(a, len(result).to_bytes(4, "little") + result)
        mgr.bind(f"demo.result.{index}", a)
        ops += 3
        ctl.send(("done", ops, nbytes, handed))
        ctl.recv()  # "exit": every worker is done, no parcel is in flight
    except (EOFError, BrokenPipeError):
        pass  # the main process went away: just leave
    except Exception as e:  # noqa: BLE001 - any failure is reported; the main process decides
        with contextlib.suppress(OSError):
            ctl.send(("error", f"worker {index} (pid {pid}): {type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(BufferError):
            mgr.close()


def _demo_victim(mgr: MemoryManager, ballast: int, ctl: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chunk = 256 << 10
    held: list[int] = []
    try:
        while len(held) * chunk < ballast:
            a = mgr.allocate(chunk)
            mgr.write(a, b"\xa5" * chunk)  # touch the pages: this is real memory
            held.append(a)
        note = mgr.allocate(64)
        mgr.write(note, b"written by the victim before it was killed".ljust(64, b"."))
        mgr.bind("demo.victim.note", note)
        ctl.send(("holding", mgr.process_memory(os.getpid()), len(held)))
        ctl.recv()  # never answered: the main process kills this one
    except (EOFError, BrokenPipeError):
        pass
    except Exception as e:  # noqa: BLE001 - any failure is reported; the main process decides
        with contextlib.suppress(OSError):
            ctl.send(("error", f"victim (pid {os.getpid()}): {type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(BufferError):
            mgr.close()


class _Records(logging.Handler):
    """Keeps the shmalloc logger's records of this process for the demo to show."""

    def __init__(self, show: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.show(f"[yellow]logged[/] {record.levelname}: {_escape(record.getMessage())}")


class _Interrupted(Exception):
    """SIGTERM or SIGHUP while the demo runs: clean up like for Ctrl-C."""


@dataclass
class _DemoResult:
    ops: int = 0
    bytes: int = 0
    handed: int = 0
    results_read: int = 0
    victim_pid: int = 0
    victim_held: int = 0
    victim_blocks: int = 0
    reclaimed: int = 0
    reclaim_seconds: float | None = None
    reclaimed_by: str = ""
    note_survived: bool = False
    pressure_pct: float = 0.0
    pressure: MemoryPressure = MemoryPressure.LOW
    warning_logged: bool = False
    trimmed: int = 0
    monitor_events: list[str] = field(default_factory=list)
    check: str = ""
    check_ok: bool = False
    problems: list[str] = field(default_factory=list)


class Demo:
    """``shmalloc demo``: the main job on an embedded default, with everything it creates
    removed on the way out (Ctrl-C, SIGTERM and errors included)."""

    def __init__(self, workers: int, rounds: int, capacity: int, seed: int) -> None:
        self.n_workers = workers
        self.rounds = rounds
        self.capacity = capacity
        self.seed = seed
        self.console = _console()
        self.name = f"shmalloc-demo-{os.getpid()}-{random.getrandbits(24):06x}"
        self.mgr: MemoryManager | None = None
        self.coordinator_pid: int | None = None
        self.tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.events_path: Path | None = None
        self.log_path: Path | None = None
        self.read_upto: dict[Path, int] = {}
        self.procs: list[Any] = []
        self.ctl: list[Connection] = []
        self.res = _DemoResult()
        self.started = time.monotonic()

    # -------------------------------------------------------------- output

    def say(self, markup: str) -> None:
        elapsed = time.monotonic() - self.started
        self.console.print(f"[dim]{elapsed:5.1f}s[/] {markup}", soft_wrap=True)

    # -------------------------------------------------------------- run

    def run(self) -> int:
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

        def interrupted(signum: int, frame: FrameType | None) -> NoReturn:
            raise _Interrupted(signal.Signals(signum).name)

        for s in old:
            signal.signal(s, interrupted)
        records = _Records(self.say)
        log = logging.getLogger("shmalloc")
        log.addHandler(records)
        code = EXIT_FAILED
        try:
            self.setup()
            self.start_coordinator()
            self.run_workers()
            self.fill_to_high(records)
            self.finish()
            self.summary()
            code = EXIT_OK if not self.res.problems else EXIT_FAILED
        except (KeyboardInterrupt, _Interrupted) as e:
            self.console.print(f"\n[bold]interrupted ({e or 'Ctrl-C'}): cleaning up[/]")
            code = 130
        finally:
            log.removeHandler(records)
            try:
                self.cleanup()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        for p in self.res.problems:
            print(f"shmalloc demo: {p}", file=sys.stderr)
        return code

    def setup(self) -> None:
        self.console.rule("[bold]shmalloc demo")
        self.mgr = MemoryManager.create(self.name, self.capacity)
        self.tmpdir = tempfile.TemporaryDirectory(prefix="shmalloc-demo-")
        self.events_path = Path(self.tmpdir.name) / "events.jsonl"
        config = self.mgr.allocate(len(_CONFIG))
        self.mgr.write(config, _CONFIG)
        self.mgr.bind("demo.config", config)
        self.say(
            f"created arena [bold cyan]{self.name}[/] ({format_bytes(self.capacity)}) and bound "
            f"the named block [bold]demo.config[/] at {config:#x}"
        )

    def start_coordinator(self) -> None:
        assert self.mgr is not None and self.tmpdir is not None
        try:
            from .coordinator import start_coordinator
        except ImportError:
            self.say(
                "[yellow]shmalloc.coordinator is not installed: this demo process runs the "
                "collection itself[/]"
            )
            return
        self.log_path = Path(self.tmpdir.name) / "coordinator.log"
        self.coordinator_pid = int(
            start_coordinator(
                self.mgr,
                interval=0.2,
                events_path=str(self.events_path),
                log_path=str(self.log_path),
                log_level="INFO",
            )
        )
        self.say(
            f"started the coordinator: pid [bold]{self.coordinator_pid}[/] (it holds the lease)"
        )

    # -------------------------------------------------------------- workers

    def _spawn(self, ctx: Any, target: Callable[..., None], name: str, *args: Any) -> Connection:
        assert self.mgr is not None
        mine, theirs = ctx.Pipe()
        p = ctx.Process(target=target, args=(self.mgr, *args, theirs), name=name, daemon=True)
        p.start()
        theirs.close()
        self.procs.append(p)
        self.ctl.append(mine)
        return cast(Connection, mine)

    def run_workers(self) -> None:
        assert self.mgr is not None
        mgr, res = self.mgr, self.res
        ctx = multiprocessing.get_context("spawn")
        n = self.n_workers
        links = [ctx.Pipe(duplex=False) for _ in range(n)]  # links[i]: worker i -> worker i+1
        churn_max = max(1024, min(64 << 10, self.capacity // 256))
        ballast = self.capacity // 8
        progress = Progress(
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[rounds]}"),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        tasks: dict[int, TaskID] = {}
        victim_task: TaskID | None = None
        with progress:
            for i in range(n):
                reader_from_prev = links[(i - 1) % n][0]
                writer_to_next = links[i][1]
                self._spawn(
                    ctx,
                    _demo_worker,
                    f"demo-worker-{i}",
                    i,
                    self.rounds,
                    churn_max,
                    self.seed,
                    writer_to_next,
                    reader_from_prev,
                )
            for r, w in links:
                r.close()
                w.close()
            self._spawn(ctx, _demo_victim, "demo-victim", ballast)
            for i, p in enumerate(self.procs[:n]):
                tasks[i] = progress.add_task(
                    f"worker {p.pid}",
                    total=self.rounds,
                    rounds=f"   0/{self.rounds}",
                    status="starting",
                )
            victim = self.procs[n]
            victim_task = progress.add_task(
                f"victim {victim.pid}", total=None, rounds=" " * 8, status="starting"
            )
            self.say(f"started {n} workers and one victim (spawn), all attached to {self.name}")
            pending = set(range(n))
            done_rounds = dict.fromkeys(range(n), 0)
            killed_at: float | None = None
            reclaim_deadline = 0.0
            last_news = time.monotonic()
            while pending or res.reclaim_seconds is None:  # it is set once the victim is killed
                if time.monotonic() - last_news > _SILENCE:
                    raise ShmallocError(f"the demo's processes sent no news for {_SILENCE:g} s")
                alive_conns = [c for c in self.ctl if not c.closed]
                for conn in wait_connections(alive_conns, timeout=0.05):
                    assert isinstance(conn, Connection)
                    idx = self.ctl.index(conn)
                    last_news = time.monotonic()
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        conn.close()
                        if idx in pending:
                            w = self.procs[idx]
                            w.join(5)
                            raise ShmallocError(
                                f"worker {w.pid} died unexpectedly ({_exit_text(w.exitcode)})"
                            ) from None
                        continue
                    kind = msg[0]
                    if kind == "error":
                        raise ShmallocError(msg[1])
                    if kind == "progress":
                        _, rounds_done, ops, _b = msg
                        done_rounds[idx] = rounds_done
                        progress.update(
                            tasks[idx],
                            completed=rounds_done,
                            rounds=f"{rounds_done:>4}/{self.rounds}",
                            status=f"{ops:,} ops",
                        )
                    elif kind == "done":
                        _, ops, nbytes, handed = msg
                        res.ops += ops
                        res.bytes += nbytes
                        res.handed += handed
                        pending.discard(idx)
                        progress.update(
                            tasks[idx],
                            completed=self.rounds,
                            rounds=f"{self.rounds:>4}/{self.rounds}",
                            status=f"{ops:,} ops, done",
                        )
                    elif kind == "holding":
                        _, held, blocks = msg
                        res.victim_pid, res.victim_held, res.victim_blocks = (
                            victim.pid,
                            held,
                            blocks,
                        )
                        progress.update(
                            victim_task, status=f"holding {format_bytes(held)} in {blocks} blocks"
                        )
                self.monitor()
                # kill the victim once the workers are well under way
                under_way = min(done_rounds.values()) >= min(500, self.rounds * 0.3)
                if killed_at is None and res.victim_pid and (under_way or not pending):
                    before = mgr.process_memory(victim.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    reclaim_deadline = killed_at + 15
                    victim.join(5)  # reap it: a zombie is dead to the process table too
                    res.victim_held = before
                    progress.update(victim_task, status="[red]killed with SIGKILL[/]")
                    self.say(
                        f"[red]killed[/] the victim (pid {victim.pid}) with SIGKILL while it held "
                        f"{format_bytes(before)} in {res.victim_blocks} blocks"
                    )
                if killed_at is not None and res.reclaim_seconds is None:
                    if self.coordinator_pid is None:
                        mgr.collect()  # no coordinator: this process collects
                    left = mgr.process_memory(victim.pid)
                    if left == 0:
                        res.reclaim_seconds = time.monotonic() - killed_at
                        res.reclaimed = res.victim_held
                        res.reclaimed_by = (
                            f"coordinator pid {self.coordinator_pid}"
                            if self.coordinator_pid
                            else "the demo process (no coordinator)"
                        )
                        progress.update(
                            victim_task,
                            status=f"[green]reclaimed {format_bytes(res.reclaimed)} in "
                            f"{res.reclaim_seconds:.2f} s[/]",
                        )
                        self.say(
                            f"[green]reclaimed[/] {format_bytes(res.reclaimed)} of the killed "
                            f"victim in {res.reclaim_seconds:.2f} s, by {res.reclaimed_by}"
                        )
                        self.monitor()
                        self.check_while_running(len(pending))
                    elif time.monotonic() > reclaim_deadline:
                        res.problems.append(
                            f"the killed victim's {format_bytes(left)} were not reclaimed within 15 s"
                        )
                        res.reclaim_seconds = float("nan")
        # every worker is done: let them go, then read what they left under their names
        for i in range(n):
            with contextlib.suppress(OSError):
                self.ctl[i].send("exit")
        for p in self.procs:
            p.join(10)
        for i in range(n):
            a = mgr.lookup(f"demo.result.{i}")
            n_json = int.from_bytes(mgr.read(a, 4), "little")
            got = json.loads(mgr.read(a, n_json, offset=4))
            if got["pid"] != self.procs[i].pid:
                res.problems.append(
                    f"demo.result.{i} names pid {got['pid']}, not {self.procs[i].pid}"
                )
            mgr.unbind(f"demo.result.{i}")
            mgr.deallocate(a)
            res.results_read += 1
        note = mgr.lookup("demo.victim.note")
        res.note_survived = mgr.read(note, 42) == b"written by the victim before it was killed"
        mgr.unbind("demo.victim.note")
        mgr.deallocate(note)
        self.say(
            f"all {n} workers finished: {res.ops:,} operations, {format_bytes(res.bytes)} allocated, "
            f"{res.handed:,} parcels adopted; read their results from the named blocks "
            "demo.result.*; the victim's persistent note "
            + ("survived it" if res.note_survived else "[red]was lost[/]")
        )

    def _new_lines(self, path: Path | None) -> list[str]:
        """Lines appended to ``path`` since the last call (complete lines only)."""
        if path is None:
            return []
        try:
            with open(path, "rb") as f:
                f.seek(self.read_upto.get(path, 0))
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.read_upto[path] = self.read_upto.get(path, 0) + end
        return chunk[:end].decode("utf-8", "replace").splitlines()

    def monitor(self) -> None:
        """Show what the coordinator logged and record the events it drained from the ring."""
        for line in self._new_lines(self.log_path):
            # "<date> <time> shmalloc.coordinator[pid] LEVEL message": keep LEVEL and message
            m = re.search(r"\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)", line)
            if m is None or m.group(2).startswith(("coordinator of arena", "event memory.")):
                continue
            style = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}.get(
                m.group(1), ""
            )
            level = f"[{style}]{m.group(1)}[/]" if style else m.group(1)
            self.say(f"[magenta]coordinator[/] {level} {_escape(m.group(2))}")
        for line in self._new_lines(self.events_path):
            with contextlib.suppress(ValueError, AttributeError):
                ev = json.loads(line)
                name = str(ev.get("name"))
                self.res.monitor_events.append(name)
                if name == "memory.pressure_high":
                    self.say(
                        f"[magenta]coordinator[/] drained the event {name} from pid {ev.get('pid')}"
                    )

    # -------------------------------------------------------------- pressure

    def fill_to_high(self, records: _Records) -> None:
        """Allocate until the arena is under HIGH pressure, show the monitor's reaction (the
        WARNING this process logs, the coordinator's log and events, and its request to trim,
        which this process answers by freeing its filler), then free what is left."""
        assert self.mgr is not None
        mgr, res = self.mgr, self.res
        chunk = max(64 << 10, self.capacity // 64)
        held: list[int] = []
        trim_requests: list[float] = []
        mgr.on_pressure(lambda: trim_requests.append(time.monotonic()))
        logged_before = len(records.records)
        self.say("filling the arena until it is under [bold red]HIGH[/] pressure")
        try:
            with Progress(
                TextColumn("arena usage", style="bold"),
                BarColumn(bar_width=40),
                TextColumn("{task.percentage:>5.1f} %  {task.fields[level]}"),
                console=self.console,
            ) as progress:
                task = progress.add_task("fill", total=100.0, level="LOW")
                while mgr.stats().memory_pressure() < MemoryPressure.HIGH:
                    a = mgr.allocate(chunk)
                    mgr.write(a, b"\x5a" * 4096)
                    held.append(a)
                    s = mgr.stats()
                    progress.update(
                        task, completed=s.usage_percentage(), level=s.memory_pressure().name
                    )
            s = mgr.stats()
            res.pressure, res.pressure_pct = s.memory_pressure(), s.usage_percentage()
            res.warning_logged = len(records.records) > logged_before
            self.say(
                f"usage {res.pressure_pct:.1f} % with {len(held)} filler blocks of "
                f"{format_bytes(chunk)}: pressure [bold red]{res.pressure.name}[/]"
            )
            if self.coordinator_pid is None:
                res.monitor_events += [e.name for e in mgr.drain_events()]
                return
            # the coordinator notices at its next tick, logs, collects and asks us to trim; the
            # request reaches this process the next time it allocates
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                self.monitor()
                mgr.deallocate(mgr.allocate(64))
                if trim_requests and "memory.pressure_high" in res.monitor_events:
                    break
                time.sleep(0.05)
            self.monitor()
            if "memory.pressure_high" not in res.monitor_events:
                res.problems.append(
                    "the coordinator drained no memory.pressure_high event within 15 s"
                )
            if trim_requests:
                res.trimmed = sum(mgr.deallocate(a) for a in held)
                held.clear()
                self.say(
                    f"the coordinator asked this process to trim: its on_pressure callback ran, "
                    f"so it freed its filler ({format_bytes(res.trimmed)})"
                )
        finally:
            for a in held:
                mgr.deallocate(a)
        s = mgr.stats()
        self.say(f"usage back to {s.usage_percentage():.1f} %, pressure {s.memory_pressure().name}")

    def check_while_running(self, running: int) -> None:
        assert self.mgr is not None
        try:
            r = self.mgr.check()
        except CorruptionDetected as e:
            self.res.problems.append(f"check() with {running} workers running: {e}")
            self.say(f"[red]check() found corruption at {e.offset:#x}: {_escape(e.detail)}[/]")
            return
        self.say(
            f"check() with {running} workers running: [green]clean[/], {r.blocks} blocks "
            f"({r.allocated_blocks} allocated), {r.live_processes} live processes"
        )

    def finish(self) -> None:
        assert self.mgr is not None
        config = self.mgr.lookup("demo.config")
        self.mgr.unbind("demo.config")
        self.mgr.deallocate(config)
        try:
            r = self.mgr.check()
            self.res.check_ok = True
            self.res.check = f"clean: {_count(r.blocks, 'block')}, {r.allocated_blocks} allocated"
            if r.allocated_blocks == 0:
                self.res.check += " (everything freed and merged back)"
        except CorruptionDetected as e:
            self.res.check = f"CORRUPT at {e.offset:#x}: {e.detail}"
            self.res.problems.append(f"check() failed: {e}")

    def summary(self) -> None:
        res = self.res
        t = Table(
            title="demo summary", box=box.SIMPLE_HEAD, title_style="bold", title_justify="left"
        )
        t.add_column("what", style="bold")
        t.add_column("result")
        t.add_row("arena", f"{self.name} ({format_bytes(self.capacity)})")
        t.add_row("workers", f"{self.n_workers} x {self.rounds} rounds, plus 1 victim")
        t.add_row("operations", f"{res.ops:,}")
        t.add_row("bytes allocated", f"{format_bytes(res.bytes)} in total")
        t.add_row(
            "parcels adopted",
            f"{res.handed:,} (allocated by one worker, adopted and freed by the next)",
        )
        t.add_row(
            "named blocks",
            f"demo.config retained by every worker; {res.results_read} demo.result.* read back",
        )
        t.add_row(
            "killed", f"pid {res.victim_pid} with SIGKILL, holding {format_bytes(res.victim_held)}"
        )
        if res.reclaim_seconds is not None and not math.isnan(res.reclaim_seconds):
            t.add_row(
                "reclaimed",
                f"{format_bytes(res.reclaimed)} in {res.reclaim_seconds:.2f} s by {res.reclaimed_by}",
            )
        else:
            t.add_row("reclaimed", Text("not within the deadline", style="red"))
        t.add_row("persistent note", "survived its owner" if res.note_survived else "lost")
        t.add_row(
            "pressure reached",
            Text.assemble(_pressure_text(res.pressure), f" ({res.pressure_pct:.1f} %)"),
        )
        reactions = []
        if res.warning_logged:
            reactions.append("WARNING logged")
        seen = sorted({e for e in res.monitor_events if e.startswith("memory.pressure")})
        if seen:
            who = "coordinator drained " if self.coordinator_pid else "events "
            reactions.append(who + ", ".join(seen))
        if res.trimmed:
            reactions.append(f"asked to trim: freed {format_bytes(res.trimmed)}")
        t.add_row("monitor", "; ".join(reactions) or Text("no reaction seen", style="red"))
        t.add_row("check()", Text(res.check, style="green" if res.check_ok else "red"))
        t.add_row("time", f"{time.monotonic() - self.started:.1f} s")
        self.console.print(t)

    # -------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Stop and reap every process this demo started, then destroy the arena. Runs always,
        with SIGINT and SIGTERM held off so that an impatient second Ctrl-C cannot cut it short."""
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._cleanup()
        finally:
            for s, h in held.items():
                signal.signal(s, h)

    def _cleanup(self) -> None:
        notes = []
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        for c in self.ctl:
            c.close()
        if self.procs:
            notes.append(f"{len(self.procs)} worker processes joined")
        if self.coordinator_pid is not None:
            _stop(self.coordinator_pid)
            notes.append(f"coordinator {self.coordinator_pid} stopped (SIGTERM)")
        if self.mgr is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.mgr.close()
            self.mgr.destroy()
            notes.append(f"arena {self.name} destroyed")
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
        _stop_resource_tracker()
        left = os.path.exists(_segment_path(self.name))
        if notes:
            self.say(
                "cleaned up: "
                + ", ".join(notes)
                + ("" if not left else " [red](segment still there!)[/]")
            )


def _stop_resource_tracker() -> None:
    """Stop the resource tracker that starting ``spawn`` children launched, and reap it, so that
    the demo leaves no process behind, not even for the moment after it exits. (It would stop by
    itself when this process exits, as an orphan for init to reap.) Private API, used defensively."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None and getattr(tracker, "_pid", None) is not None:
        with contextlib.suppress(Exception):
            stop()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` and wait for it to end (SIGKILL after ``timeout``); it may not be our child."""
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(5)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.capacity < 16 << 20:
        raise CliError("the demo needs at least 16M of capacity")
    return Demo(args.workers, args.rounds, args.capacity, args.seed).run()


# ------------------------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="shmalloc",
        description="Inspect and operate shmalloc shared-memory arenas.",
        epilog="exit codes: 0 done; 1 the arena is unhealthy or the operation failed; "
        "2 the command could not run (bad arguments, no such arena, not an arena, permission)",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"shmalloc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, help: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add("list", "list the shmalloc arenas in /dev/shm", cmd_list)
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("create", "create a named arena", cmd_create)
    sp.add_argument("name", help="the arena's name (what processes attach by)")
    sp.add_argument(
        "--capacity",
        type=_size_arg,
        default=64 << 20,
        metavar="SIZE",
        help="size such as 64M, 1G, 512KiB or a number of bytes (default 64M)",
    )
    sp.add_argument("--mode", default="0600", help="permission bits, octal (default 0600)")

    sp = add("info", "show an arena's statistics, pressure and processes", cmd_info)
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("top", "live per-process view of an arena (q quits)", cmd_top)
    sp.add_argument("name")
    sp.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    sp.add_argument(
        "--iterations",
        type=_positive_int,
        metavar="N",
        help="stop after N refreshes (default: until q or Ctrl-C)",
    )

    sp = add("check", "walk the heap and verify every invariant", cmd_check)
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("gc", "run the global garbage collector once", cmd_gc)
    sp.add_argument("name")
    sp.add_argument(
        "--strategy",
        default="global",
        metavar="STRATEGY",
        help="global (every dead process, the default), unreferenced (orphaned blocks "
        "without a live reference), threshold=SIZE (dead processes holding more than "
        "SIZE), targeted=PID (all of one process's blocks, alive or not)",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("destroy", "unlink an arena (open mappings keep working until closed)", cmd_destroy)
    sp.add_argument("name")

    sub.add_parser(
        "coordinator",
        add_help=False,
        help="run the arena's coordinator in the foreground (see: shmalloc coordinator --help)",
    )

    sp = add(
        "demo",
        "the main job: workers share an arena, one is killed, the coordinator "
        "reclaims its memory, the pressure monitor reacts",
        cmd_demo,
    )
    sp.add_argument("--workers", type=_positive_int, default=4, help="worker processes (default 4)")
    sp.add_argument(
        "--rounds", type=_positive_int, default=8000, help="rounds per worker (default 8000)"
    )
    sp.add_argument(
        "--capacity",
        type=_size_arg,
        default=64 << 20,
        metavar="SIZE",
        help="arena size (default 64M)",
    )
    sp.add_argument("--seed", type=int, default=1, help="random seed (default 1)")

    sp = add("bench", "allocation benchmark", cmd_bench)
    sp.description = (
        "Runs `python -m stress.bench_alloc` (the full benchmark) when the stress package is in "
        "the repository checkout, passing it every argument (try `shmalloc bench --quick`; "
        "its options: `python -m stress.bench_alloc --help`); otherwise, or with --builtin, a "
        "small built-in benchmark of allocate+deallocate pairs with the options below."
    )
    sp.add_argument("--builtin", action="store_true", help="run the built-in benchmark")
    sp.add_argument("--ops", type=_positive_int, default=20000, help="built-in: pairs per trial")
    sp.add_argument(
        "--capacity",
        type=_size_arg,
        default=256 << 20,
        metavar="SIZE",
        help="built-in: arena size (default 256M)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] == "coordinator":
            return cmd_coordinator(args_list[1:])
        parser = build_parser()
        if args_list and args_list[0] == "bench":
            rc = _bench_delegated(args_list[1:])
            if rc is not None:
                return rc
        args = parser.parse_args(args_list)
        return int(args.func(args))
    except CliError as e:
        _error(args_list, str(e))
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (shmalloc top | head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if os.environ.get("SHMALLOC_TRACEBACK"):
            raise
        _error(
            args_list,
            f"{type(e).__name__}: {e}" if not isinstance(e, (ShmallocError, OSError)) else str(e),
        )
        return EXIT_FAILED


def _error(argv: list[str], message: str) -> None:
    cmd = next((a for a in argv if not a.startswith("-")), "")
    print(f"shmalloc{' ' + cmd if cmd else ''}: error: {message}", file=sys.stderr)
