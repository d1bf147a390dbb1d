"""The commands that change or drive an arena: ``create``, ``gc``, ``destroy``, ``coordinator``
and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from ..manager import MemoryManager, validate_name
from ..sizes import count, format_bytes, parse_size
from .arena_access import EXIT_FAILED, EXIT_OK, CliError, attached, segment_path
from .snapshot import make_console

__all__ = ["bench_delegated", "cmd_bench", "cmd_coordinator", "cmd_create", "cmd_destroy", "cmd_gc"]


def cmd_create(args: argparse.Namespace) -> int:
    try:
        validate_name(args.name)
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        mode = int(args.mode, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise CliError(
            f"invalid mode {args.mode!r}: give the permission bits in octal, from 0000 to 0777 "
            "(e.g. 0600: only this user, the default; 0660: this user's group too)"
        )
    try:
        mgr = MemoryManager.create(args.name, args.capacity, mode=mode)
    except (FileExistsError, PermissionError, ValueError) as e:
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
        if kind == "targeted":
            rows = [p for p in mgr.processes() if p.pid == value]
            if not rows:
                raise CliError(
                    f"process {value} has no entry in arena {args.name!r} "
                    f"(see `shmalloc info {args.name}`)"
                )
            if any(p.alive for p in rows) and not args.force:
                raise CliError(
                    f"process {value} is alive: targeted=PID would free its "
                    f"{count(sum(p.allocations for p in rows), 'block')} under it (it would read "
                    "freed memory or crash); stop it first, or add --force if that is intended"
                )
        try:
            from ..gc import GcStrategy, GlobalGarbageCollector
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
        "reclaimed": [{"pid": pid, "bytes": nbytes} for pid, nbytes in result.reclaimed],
        "trimmed": list(result.trimmed),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.name}: gc {args.strategy} freed {count(out['freed_blocks'], 'block')} "
            f"({format_bytes(out['freed_bytes'])}) of {count(out['processes_cleaned'], 'process')} "
            f"in {out['duration'] * 1000:.1f} ms"
        )
        for pid, nbytes in result.reclaimed:
            print(f"  reclaimed {format_bytes(nbytes)} of process {pid}")
        if result.trimmed:
            pids = ", ".join(map(str, result.trimmed))
            print(
                f"  asked {count(len(result.trimmed), 'live process')} to trim: {pids} (their "
                "on_pressure callbacks run on their next allocation)"
            )
    return EXIT_OK


def cmd_destroy(args: argparse.Namespace) -> int:
    try:
        validate_name(args.name)
    except ValueError as e:
        raise CliError(str(e)) from None
    if not os.path.lexists(segment_path(args.name)):
        raise CliError(f"no arena named {args.name!r}: nothing to destroy (see `shmalloc list`)")
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
        from ..coordinator import main as coordinator_main
    except ImportError:
        raise CliError(
            "this installation has no shmalloc.coordinator module", EXIT_FAILED
        ) from None
    rc = coordinator_main(argv)
    return int(rc or 0)


# ------------------------------------------------------------------------------------ bench

_REPO_ROOT = Path(__file__).resolve().parents[2]  # shmalloc/cli/operations.py


def _stress_available() -> bool:
    return (_REPO_ROOT / "stress" / "bench_alloc.py").is_file()


def cmd_bench(args: argparse.Namespace) -> int:
    return _bench_builtin(args.ops, args.capacity)


def bench_delegated(argv: list[str]) -> int | None:
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
    console = make_console()
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
        "built-in benchmark; the full suite is `python -m stress.bench_alloc` in a repository "
        "checkout",
        style="dim",
    )
    return EXIT_OK
