"""The commands that only look: ``list``, ``info`` and ``check``. They attach without claiming a
slot in the process table, so looking at an arena does not show up in it."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from .. import _binding as C
from ..errors import CorruptionDetected, ShmallocError
from ..manager import MemoryManager
from ..sizes import count, format_bytes
from ..stats import MemoryPressure
from .arena_access import (
    EXIT_FAILED,
    EXIT_OK,
    SHM_DIR,
    CliError,
    attached,
    read_header,
    segment_path,
)
from .snapshot import Snapshot, make_console, overview, pressure_text, process_table

__all__ = ["cmd_check", "cmd_info", "cmd_list"]


def cmd_list(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    unreadable = 0
    try:
        entries = sorted(os.listdir(SHM_DIR))
    except OSError as e:
        raise CliError(f"cannot read {SHM_DIR}: {e.strerror}") from None
    for entry in entries:
        path = segment_path(entry)
        if entry.startswith(("sem.", ".")) or not os.path.isfile(path):
            continue  # semaphores; dot names: no arena's (one being created is one)
        try:
            head = read_header(entry)
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue
        kind = C.segment_probe(head) if head is not None else C.SEG_FOREIGN
        if kind not in (C.SEG_ARENA, C.SEG_OTHER_VERSION):
            continue
        row: dict[str, Any] = {"name": entry}
        if kind == C.SEG_OTHER_VERSION:
            row["status"] = f"another segment layout (this shmalloc reads {C.layout_version()})"
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
    console = make_console()
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
                pressure_text(MemoryPressure[r["pressure"]]),
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


def cmd_info(args: argparse.Namespace) -> int:
    with attached(args.name) as mgr:
        snap = Snapshot.read(mgr)
    if args.json:
        print(json.dumps(snap.as_json(), indent=2))
        return EXIT_OK
    console = make_console()
    console.print(overview(snap))
    console.print(process_table(snap, title=f"processes ({len(snap.processes)})"))
    if snap.names:
        shown = ", ".join(snap.names[:20]) + (" ..." if len(snap.names) > 20 else "")
        console.print(Text.assemble(("named blocks", "bold"), f" ({len(snap.names)}): {shown}"))
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
            f"{args.name}: clean: {count(report.blocks, 'block')} "
            f"({report.allocated_blocks} allocated, "
            f"{report.free_blocks} free"
            + (f", {report.cached_blocks} cached" if report.cached_blocks else "")
            + f"), {format_bytes(report.used)} used, "
            f"{format_bytes(report.free_bytes)} free, "
            f"largest free {format_bytes(report.largest_free)}, "
            f"{report.live_processes} live and {report.dead_processes} dead processes"
        )
    return EXIT_OK
