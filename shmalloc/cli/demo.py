"""``shmalloc demo``: the main job, on an embedded default, with nothing but the installed package.

Workers share an arena, hand blocks to each other and read a shared named block; one process is
killed with SIGKILL and the coordinator reclaims its memory; a producer process hands numpy arrays
to consumer processes through a shmalloc.Queue (zero-copy); the arena is then filled until the
pressure monitor reacts. Everything the demo creates is removed on the way out (Ctrl-C, SIGTERM
and errors included). Workers are started with the ``spawn`` method and attach by the arena's name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import psutil
from rich import box
from rich.markup import escape as _escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from .. import events
from ..errors import CorruptionDetected, ShmallocError
from ..manager import MemoryManager
from ..queues import Queue
from ..sizes import count, format_bytes
from ..stats import MemoryPressure
from .arena_access import EXIT_FAILED, EXIT_OK, CliError, segment_path
from .demo_processes import (
    CONFIG,
    demo_consumer,
    demo_producer,
    demo_victim,
    demo_worker,
    has_numpy,
)
from .snapshot import make_console, pressure_text

__all__ = ["Demo", "cmd_demo"]

_SILENCE = 60.0  # seconds without a message from any demo process before the demo gives up
_QUEUE_ITEMS = 32  # arrays the producer puts into the queue
_QUEUE_ITEM_BYTES = 1 << 20
_QUEUE_MAXSIZE = 8
_CONSUMERS = 2


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
class _Victim:
    """The worker the demo kills with SIGKILL, and how its memory came back."""

    pid: int = 0
    held: int = 0  # bytes it held when killed
    blocks: int = 0
    reclaimed: int = 0  # bytes the coordinator reclaimed
    seconds: float | None = None  # from the kill to the reclamation; NaN if it never came
    reclaimed_by: str = ""


@dataclass
class _DemoResult:
    ops: int = 0
    bytes: int = 0
    handed: int = 0
    results_read: int = 0
    victim: _Victim = field(default_factory=_Victim)
    note_survived: bool = False
    queue: str = ""  # what moved through the queue, for the summary
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
        self.console = make_console()
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
        self.queue: Queue | None = None
        self.queue_first = 0
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
            self.run_queue()
            self.fill_to_high(records)
            self.finish()
            self.summary()
            code = EXIT_OK if not self.res.problems else EXIT_FAILED
        except (KeyboardInterrupt, _Interrupted) as e:
            self.console.print(f"\n[bold]interrupted ({str(e) or 'Ctrl-C'}): cleaning up[/]")
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
        config = self.mgr.allocate(len(CONFIG))
        self.mgr.write(config, CONFIG)
        self.mgr.bind("demo.config", config)
        self.say(
            f"created arena [bold cyan]{self.name}[/] ({format_bytes(self.capacity)}) and bound "
            f"the named block [bold]demo.config[/] at {config:#x}"
        )

    def start_coordinator(self) -> None:
        assert self.mgr is not None and self.tmpdir is not None
        try:
            from ..coordinator import start_coordinator
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
                    demo_worker,
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
            self._spawn(ctx, demo_victim, "demo-victim", ballast)
            self.start_queue(ctx)  # they start meanwhile and wait for run_queue's word
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
            while pending or res.victim.seconds is None:  # it is set once the victim is killed
                if time.monotonic() - last_news > _SILENCE:
                    raise ShmallocError(f"the demo's processes sent no news for {_SILENCE:g} s")
                alive_conns = [c for c in self.ctl[: n + 1] if not c.closed]
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
                        res.victim.pid, res.victim.held, res.victim.blocks = (
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
                if killed_at is None and res.victim.pid and (under_way or not pending):
                    before = mgr.process_memory(victim.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    reclaim_deadline = killed_at + 15
                    victim.join(5)  # reap it: a zombie is dead to the process table too
                    res.victim.held = before
                    progress.update(victim_task, status="[red]killed with SIGKILL[/]")
                    self.say(
                        f"[red]killed[/] the victim (pid {victim.pid}) with SIGKILL while it held "
                        f"{format_bytes(before)} in {res.victim.blocks} blocks"
                    )
                if killed_at is not None and res.victim.seconds is None:
                    if self.coordinator_pid is None:
                        mgr.collect()  # no coordinator: this process collects
                    left = mgr.process_memory(victim.pid)
                    if left == 0:
                        res.victim.seconds = time.monotonic() - killed_at
                        res.victim.reclaimed = res.victim.held
                        res.victim.reclaimed_by = (
                            f"coordinator pid {self.coordinator_pid}"
                            if self.coordinator_pid
                            else "the demo process (no coordinator)"
                        )
                        progress.update(
                            victim_task,
                            status=f"[green]reclaimed {format_bytes(res.victim.reclaimed)} in "
                            f"{res.victim.seconds:.2f} s[/]",
                        )
                        self.say(
                            f"[green]reclaimed[/] {format_bytes(res.victim.reclaimed)} of the "
                            f"killed victim in {res.victim.seconds:.2f} s, by "
                            f"{res.victim.reclaimed_by}"
                        )
                        self.monitor()
                        self.check_while_running(len(pending))
                    elif time.monotonic() > reclaim_deadline:
                        res.problems.append(
                            f"the killed victim's {format_bytes(left)} were not reclaimed "
                            "within 15 s"
                        )
                        res.victim.seconds = float("nan")
        # every worker is done: let them go, then read what they left under their names
        for i in range(n):
            with contextlib.suppress(OSError):
                self.ctl[i].send("exit")
        for p in self.procs[:n]:
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
            f"all {n} workers finished: {res.ops:,} operations, "
            f"{format_bytes(res.bytes)} allocated, "
            f"{res.handed:,} parcels adopted; read their results from the named blocks "
            "demo.result.*; the victim's persistent note "
            + ("survived it" if res.note_survived else "[red]was lost[/]")
        )

    # -------------------------------------------------------------- queue

    def start_queue(self, ctx: Any) -> None:
        """Create the queue and start its producer and consumers; they wait for run_queue."""
        assert self.mgr is not None
        self.queue = Queue(_QUEUE_MAXSIZE, arena=self.mgr)
        self.queue_first = len(self.procs)
        # pickled here, not by Process (whose args would keep the queue alive in this process)
        args = (_QUEUE_ITEMS, _QUEUE_ITEM_BYTES, _CONSUMERS)
        self._spawn(ctx, demo_producer, "demo-producer", pickle.dumps(self.queue), *args)
        for i in range(_CONSUMERS):
            self._spawn(ctx, demo_consumer, f"demo-consumer-{i}", pickle.dumps(self.queue))

    def run_queue(self) -> None:
        """The producer puts numbered arrays into the shmalloc.Queue, the consumers get them
        (read-only views of the arena: zero-copy) and check every element; then the queue goes
        and check() finds no object left."""
        assert self.mgr is not None
        mgr, res, first = self.mgr, self.res, self.queue_first
        kind = "arrays" if has_numpy() else "bytes objects (numpy is not installed)"
        conns = self.ctl[first:]
        pids = [p.pid for p in self.procs[first:]]
        self.say(
            f"a producer (pid {pids[0]}) and {_CONSUMERS} consumers (pids "
            f"{', '.join(map(str, pids[1:]))}) share a shmalloc.Queue(maxsize={_QUEUE_MAXSIZE}) "
            "in the arena: go"
        )
        for c in conns:
            with contextlib.suppress(OSError):  # one that died is reported below
                c.send("go")
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + _SILENCE
        while len(replies) < len(conns):
            if time.monotonic() > deadline:
                raise ShmallocError(f"the queue's processes sent no news for {_SILENCE:g} s")
            for conn in wait_connections([c for c in conns if not c.closed], timeout=0.1):
                assert isinstance(conn, Connection)
                idx = conns.index(conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    conn.close()
                    p = self.procs[first + idx]
                    p.join(5)
                    raise ShmallocError(
                        f"queue process {p.pid} died unexpectedly ({_exit_text(p.exitcode)})"
                    ) from None
                if msg[0] == "error":
                    raise ShmallocError(msg[1])
                replies[idx] = msg
        for p in self.procs[first:]:
            p.join(10)
        self.queue = None  # this process held the queue last: it goes
        _, items, nbytes = replies[0]
        got = [replies[i][1] for i in range(1, len(conns))]
        zero_copy = all(replies[i][3] for i in range(1, len(conns)))
        moved = sum(replies[i][2] for i in range(1, len(conns)))
        if sum(got) != items or moved != nbytes:
            res.problems.append(f"the queue delivered {sum(got)} of {items} items")
        how = "zero-copy, read-only views of the arena" if zero_copy else "copied"
        split = " + ".join(map(str, got))
        self.say(
            f"the producer put {items} {kind} of {format_bytes(_QUEUE_ITEM_BYTES)}; the consumers "
            f"got {split} of them ({how}) and checked every element: {format_bytes(moved)} moved"
        )
        try:
            r = mgr.check()
        except CorruptionDetected as e:
            res.problems.append(f"check() after the queue: {e}")
            self.say(f"[red]check() found corruption at {e.offset:#x}: {_escape(e.detail)}[/]")
            return
        left = (
            "no object left" if r.objects + r.tickets == 0 else f"{count(r.objects, 'object')} left"
        )
        if r.objects + r.tickets:
            res.problems.append(f"the queue left {left} and {count(r.tickets, 'ticket')}")
        self.say(f"check() after the queue: [green]clean[/], {left}")
        res.queue = (
            f"{items} {kind} of {format_bytes(_QUEUE_ITEM_BYTES)}, pid {pids[0]} -> pids "
            f"{', '.join(map(str, pids[1:]))} ({split}), {how}; {left}"
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
                if name == events.PRESSURE_HIGH:
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
                if trim_requests and events.PRESSURE_HIGH in res.monitor_events:
                    break
                time.sleep(0.05)
            self.monitor()
            if events.PRESSURE_HIGH not in res.monitor_events:
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
        self.mgr.collect()  # this process's cache goes back to the heap too
        try:
            r = self.mgr.check()
            self.res.check_ok = True
            self.res.check = f"clean: {count(r.blocks, 'block')}, {r.allocated_blocks} allocated"
            if r.allocated_blocks == 0 and r.blocks == 1:
                self.res.check += " (everything freed and merged back)"
            elif r.allocated_blocks == 0:
                self.res.check += f" ({r.cached_blocks} free blocks still in caches)"
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
            "killed", f"pid {res.victim.pid} with SIGKILL, holding {format_bytes(res.victim.held)}"
        )
        if res.victim.seconds is not None and not math.isnan(res.victim.seconds):
            t.add_row(
                "reclaimed",
                f"{format_bytes(res.victim.reclaimed)} in {res.victim.seconds:.2f} s "
                f"by {res.victim.reclaimed_by}",
            )
        else:
            t.add_row("reclaimed", Text("not within the deadline", style="red"))
        t.add_row("persistent note", "survived its owner" if res.note_survived else "lost")
        t.add_row("queue", res.queue or Text("did not run", style="red"))
        t.add_row(
            "pressure reached",
            Text.assemble(pressure_text(res.pressure), f" ({res.pressure_pct:.1f} %)"),
        )
        reactions = []
        if res.warning_logged:
            reactions.append("WARNING logged")
        seen = sorted(
            {e for e in res.monitor_events if e in (events.PRESSURE_HIGH, events.PRESSURE_CRITICAL)}
        )
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
        left = os.path.exists(segment_path(self.name))
        if notes:
            self.say(
                "cleaned up: "
                + ", ".join(notes)
                + ("" if not left else " [red](segment still there!)[/]")
            )


def _stop_resource_tracker() -> None:
    """Stop the resource tracker that starting ``spawn`` children launched, and reap it, so that
    the demo leaves no process behind, not even for the moment after it exits. (It would stop by
    itself when this process exits, as an orphan for init to reap.) Private API, used
    defensively."""
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
    """SIGTERM ``pid`` and wait for it to end (SIGKILL after ``timeout``); it may not be our
    child."""
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
