"""What the runners in ``stress/`` share: arenas destroyed however a run ends, interleaved trials
and their median/min/max, malloc baselines, a PSS sampler, machine facts, tables, targets, the
JSON every benchmark writes, one progress bar, and a pool of long-lived worker processes.

Nothing here measures anything by itself; each runner says what it measures.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import gc
import hashlib
import importlib.util
import json
import math
import multiprocessing as mp
import operator
import os
import platform
import queue as queue_mod
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cffi
import psutil

import shmalloc
from shmalloc import MemoryManager
from shmalloc.manager import attachment_of
from shmalloc.tracking import own_slot

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "stress" / "results"
Runner = Callable[[int], int]  # runs n operations, returns elapsed nanoseconds
Fn = Callable[..., Any]
Column = tuple[str, Callable[[Any], str]]  # a table's header, and the cell of a row
COMPARE = {"<=": operator.le, "<": operator.lt, ">": operator.gt, ">=": operator.ge}


@functools.cache
def libc(api: bool = False) -> tuple[Any, Any]:
    """(ffi, lib) for glibc's malloc/free through cffi's ABI mode: the private-heap baseline of
    several benchmarks; with ``api`` through an API-mode module (``ffi.set_source``) compiled
    once per run: bench_alloc's floor for one C call each way (ABI mode is ~2x slower). Made on
    first use: parsing declarations imports pycparser."""
    ffi = cffi.FFI()
    ffi.cdef("void *malloc(size_t); void free(void *);")
    if not api:
        return ffi, ffi.dlopen(None)
    ffi.set_source("_bench_malloc_floor", "#include <stdlib.h>")
    with tempfile.TemporaryDirectory(prefix="shmalloc-bench-") as tmp:
        spec = importlib.util.spec_from_file_location("_bench_malloc_floor", ffi.compile(tmp))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod.ffi, mod.lib


# --------------------------------------------------------------------------- bookkeeping
def progress(msg: str) -> None:
    """``[bench_x HH:MM:SS] msg`` on stderr, named after the runner (bench_all shows the last)."""
    name = bench_name(sys.modules["__main__"])
    print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def bar(total: int, label: str) -> Iterator[Callable[[int, str], None]]:
    """A progress bar on stderr (rich's: redrawn in place on a terminal, drawn once at the end
    otherwise); yields ``update(done, status)``."""
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as p:
        task = p.add_task(label, total=total)
        yield lambda done, status: p.update(task, completed=done, description=f"{label} {status}")


class Arenas:
    """Every arena a benchmark makes, so that all of them are destroyed however it ends."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._live: list[MemoryManager] = []
        self._log = log

    def new(self, capacity: int) -> MemoryManager:
        m = MemoryManager(capacity)
        self._live.append(m)
        return m

    def drop(self, m: MemoryManager) -> None:
        if m in self._live:
            self._live.remove(m)
        try:
            if not m.closed:
                m.close()
        finally:
            m.destroy()

    def drop_all(self) -> None:
        while self._live:
            m = self._live[-1]
            try:
                self.drop(m)
            except Exception as e:  # noqa: BLE001 - say so, and keep destroying the others
                self._log(f"warning: could not close arena {m.name}: {e!r}")


_stop = threading.Event()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived. Python swallows an exception raised
    by a signal handler while a finalizer (``__del__``) runs, so loops call this to be sure."""
    if _stop.is_set():
        raise KeyboardInterrupt("interrupted")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks clean up; both also set a flag
    that check_interrupt() turns into KeyboardInterrupt later if the first one was lost."""

    def handler(signum: int, frame: Any) -> None:
        _stop.set()
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:  # leave an ignored SIGINT ignored
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)


# --------------------------------------------------------------------------- trials
def summarize(values: Sequence[float], **extra: Any) -> dict[str, Any]:
    """median/min/max of per-trial values (ns per operation, or operations per second)."""
    values = list(values)
    stats = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return {**stats, "trials": values, **extra}


def rotated(items: Sequence[Any], t: int) -> list[Any]:
    """items rotated left by t: the order of trial t in interleaved measurements."""
    items = list(items)
    k = t % len(items) if items else 0
    return items[k:] + items[:k]


@contextmanager
def untraced() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def measure(runners: dict[str, Runner], n: int, trials: int) -> dict[str, dict[str, Any]]:
    """Interleaved trials: trial t runs every runner once (in a rotated order), n ops each.
    One untimed warm-up run each first. The cyclic GC is off while the loops run."""
    per_op: dict[str, list[float]] = {k: [] for k in runners}
    with untraced():
        for run in runners.values():
            run(max(1, n // 10))
        for t in range(trials):
            for k in rotated(runners, t):
                per_op[k].append(runners[k](n) / n)
    return {k: summarize(v, ops_per_trial=n) for k, v in per_op.items()}


def pair_loop(alloc: Callable[[int], Any], free: Callable[[Any], Any], size: int) -> Runner:
    """n ``free(alloc(size))`` pairs through local names: every pair row has this one shape."""

    def run(n: int) -> int:
        r = range(n)
        t0 = time.perf_counter_ns()
        for _ in r:
            free(alloc(size))
        return time.perf_counter_ns() - t0

    return run


def core_handle(mgr: MemoryManager) -> tuple[Any, int]:
    """The C handle and this process's slot behind ``mgr``, for loops that call the C core
    directly (``lib.shm_alloc(h, size, 0, slot)``) to time it without the Python wrapper."""
    state = attachment_of(mgr)
    return state.handle(), own_slot(state)


def assert_balanced(mgr: MemoryManager, used_before: int, what: str) -> None:
    """The loops free what they allocate; a call that failed silently would show here."""
    used = mgr.stats().used
    if used != used_before:
        raise RuntimeError(f"{what}: arena used bytes went {used_before} -> {used}")


@contextmanager
def pss_peak() -> Iterator[list[int]]:
    """Samples the summed PSS of this process's descendants every 0.05 s in a thread; yields a
    list whose one item is the peak so far."""
    peak, stop, me = [0], threading.Event(), psutil.Process()

    def sample() -> None:
        while True:
            total = 0
            for p in me.children(recursive=True):
                with suppress(psutil.Error):  # it ended meanwhile: it holds nothing now
                    total += p.memory_full_info().pss
            peak[0] = max(peak[0], total)
            if stop.wait(0.05):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = dict(cpu_count=os.cpu_count(), cpus_usable=len(os.sched_getaffinity(0)))
    info.update(python_version=platform.python_version(), platform=platform.platform())
    info.update(machine=platform.machine(), libc=" ".join(platform.libc_ver()))
    info.update(cffi_version=cffi.__version__, shmalloc_version=shmalloc.__version__)
    info["loadavg_at_start"] = list(os.getloadavg())
    with open("/proc/cpuinfo") as f:
        models = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    info["cpu_model"] = (models or ["?"])[0]
    # which build of the C core was measured (pip install -e rebuilds it in place)
    so = next(Path(shmalloc.__file__).parent.glob("_native.*"), None)
    if so is not None:
        mtime = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(so.stat().st_mtime))
        sha = hashlib.sha256(so.read_bytes()).hexdigest()[:16]
        info["native_build"] = {"path": str(so), "mtime": mtime, "sha256": sha}

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout

    try:
        info["git_commit"] = git("rev-parse", "HEAD").strip()
        info["core_tree_dirty"] = bool(git("status", "--porcelain", "--", "shmalloc", "native"))
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None  # no git, or not a checkout: the figures stand without it
    return info


def noise_note(machine: dict[str, Any]) -> str | None:
    cpus = machine.get("cpus_usable") or machine.get("cpu_count") or 1
    load = machine.get("loadavg_at_start")
    small = f"only {cpus} usable cores: multi-process figures beyond {cpus} processes measure"
    small += " time-sharing, not parallelism"
    busy = f"1-minute load average was {load[0]:.2f} at the start: " if load else ""
    busy += "other work was running, so figures are noisy"
    parts = [small] * (cpus <= 2) + [busy] * bool(load and load[0] > 0.25 * cpus)
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- formatting
def fmt_ns(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_stat(s: dict[str, Any], fmt: Callable[[float], str] = fmt_ns) -> str:
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def fmt_rate(x: float) -> str:
    """Operations per second, compactly: 1.23M, 456k, 789."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def print_table(headers: list[str], rows: list[list[str]], title: str, left: bool = False) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    for r in [headers, ["-" * w for w in widths], *rows]:
        cells = (c.ljust(w) if left else c.rjust(w) for c, w in zip(r, widths, strict=True))
        print("  ".join(cells).rstrip())


def col(header: str, key: str, fmt: Callable[[Any], str] = fmt_stat) -> Column:
    """A column of print_columns: ``fmt(row[key])`` (median [min-max]), "-" where that is None."""
    return header, lambda r: "-" if r[key] is None else fmt(r[key])


def print_columns(title: str, columns: list[Column], rows: Any) -> None:
    """print_table of one row per item of ``rows``, a column per (header, cell of an item)."""
    print_table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in rows], title)


def procs_table(title: str, procs: list[int], series: dict[str, dict[str, Any]]) -> None:
    """Rates by process count (median [min-max]) and the speed-up over 1 process, one row per
    method: ``series[method] = {str(k): summary}``."""
    more = [k for k in procs if k != 1]
    head = ["method", *(f"{k} proc{'s' * (k > 1)}" for k in procs), *(f"{k}p/1p" for k in more)]
    rows = []
    for m, by in series.items():
        ratios = [f"{by[str(k)]['median'] / by['1']['median']:.2f}x" for k in more]
        rows.append([m, *(fmt_stat(by[str(k)], fmt_rate) for k in procs), *ratios])
    print_table(head, rows, title)


def print_header(res: dict[str, Any]) -> None:
    m, quick = res["machine"], " (--quick)" if res["config"].get("quick") else ""
    cpu = f"{m.get('cpu_model', '?')} x{m['cpu_count']}, Python {m['python_version']}"
    print(f"shmalloc {res['benchmark']}{quick}: {cpu}, {m['platform']}")
    if res.get("noise_note"):
        print(f"NOTE: {res['noise_note']}")


# --------------------------------------------------------------------------- targets
def judge(op: str, target: float, value: float | None) -> dict[str, Any]:
    """{"value", "target", "op", "met"}: met is None when there is no value."""
    met = None if value is None else COMPARE[op](value, target)
    return {"value": value, "target": target, "op": op, "met": met}


def print_targets(res: dict[str, Any]) -> None:
    print()
    for r in res["targets_summary"]:
        value = "-" if r["value"] is None else f"{r['value']:.2f}{r['unit']}"
        met = "(not judged)" if r["met"] is None else "MET" if r["met"] else "MISSED"
        note = f"  ({r['note']})" if r["note"] else ""
        print(f"  {r['name']}: {value}   target {r['op']} {r['target']:g}{r['unit']}  {met}{note}")


def target_row(name: str, j: dict[str, Any], unit: str = "x", note: str = "") -> dict[str, Any]:
    """One line of a runner's ``targets_summary``: what bench_all puts in its combined table."""
    row = {k: j[k] for k in ("op", "target", "value", "met")}
    return {"name": name, **row, "unit": unit, "note": note}


# --------------------------------------------------------------------------- results
def write_json(path: Path, res: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def bench_name(mod: ModuleType) -> str:
    """bench_x for stress.bench_x, also when it runs as ``__main__`` (python -m)."""
    return (mod.__spec__.name if mod.__spec__ else mod.__name__).rsplit(".", 1)[-1]


class Parser(argparse.ArgumentParser):
    """A runner's command line, described by the first line of its module's docstring: --quick,
    --json (into stress/results/ by default with ``results``, optional without, absent with
    None) and ``scaled`` options, whose default depends on --quick."""

    def __init__(self, mod: ModuleType, quick: str, results: bool | None = True) -> None:
        name, doc = bench_name(mod), (mod.__doc__ or "").strip().splitlines()[0]
        super().__init__(prog=f"python -m stress.{name}", description=doc)
        self.add_argument("--quick", action="store_true", help=quick)
        default = RESULTS_DIR / f"{name}.json" if results else None
        where = f" (default: {default.relative_to(REPO_ROOT)})" if default else ""
        help = "write the results as JSON here" + where
        if results is not None:
            self.add_argument("--json", type=Path, default=default, metavar="PATH", help=help)
        self.scaled_defaults: dict[str, tuple[Any, Any, float]] = {}

    def scaled(self, flag: str, quick: Any, full: Any, what: str, least: float = 1) -> None:
        """``flag`` takes a number of ``full``'s type, at least ``least``; by default ``full``,
        or ``quick`` with --quick."""
        self.scaled_defaults[flag[2:].replace("-", "_")] = (quick, full, least)
        help = f"{what} (default {full:,}; quick {quick:,})"
        self.add_argument(flag, type=type(full), metavar="N", help=help)

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        a = self.parse_args(argv)
        for key, (quick, full, least) in self.scaled_defaults.items():
            if getattr(a, key) is None:
                setattr(a, key, quick if a.quick else full)
            elif getattr(a, key) < least:
                self.error(f"--{key.replace('_', '-')} must be at least {least:g}")
        return a


def csv(choices: Sequence[Any] = (), of: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """An argparse type: a non-empty comma-separated list of ``of``, drawn from ``choices``."""

    def parse(text: str) -> list[Any]:
        got = [of(x) for x in text.split(",") if x]
        if not got or set(got) - set(choices or got):
            among = f" of {','.join(map(str, choices))}" if choices else ""
            if isinstance(choices, range):
                among = f" of numbers from {choices[0]} to {choices[-1]}"
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list{among}")
        return got

    return parse


def run_bench(mod: ModuleType, args: argparse.Namespace, config: dict[str, Any], body: Any) -> int:
    """A benchmark's run from start to exit code: the JSON's head (benchmark, schema, timestamp,
    machine, config, the module's TARGETS), ``body(res, arenas)`` with SIGTERM unwinding like
    Ctrl-C and every arena destroyed however it ends, then the module's ``derive(res)`` and
    ``targets_summary(res)`` (when it has them), its ``report(res)`` on stdout, and the JSON.
    130 if interrupted, else 0: targets are reported, never asserted."""
    t0, name = time.perf_counter(), bench_name(mod)
    machine = machine_info()
    res: dict[str, Any] = {"benchmark": name, "schema": 1, "machine": machine}
    res.update(timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"), noise_note=noise_note(machine))
    res["config"] = {"quick": args.quick, **config}
    targets = getattr(mod, "TARGETS", {}).items()
    res["targets"] = {k: {"op": op, "value": v} for k, (op, v) in targets}
    arenas = Arenas(progress)
    try:
        with sigterm_as_interrupt():
            try:
                body(res, arenas)
            finally:
                arenas.drop_all()
    except KeyboardInterrupt:
        msg = f"\ninterrupted: {name} stopped its workers and arenas; nothing written"
        print(msg, file=sys.stderr)
        return 130
    res["machine"]["loadavg_at_end"] = list(os.getloadavg())
    res["derived"] = mod.derive(res) if hasattr(mod, "derive") else {}
    res["targets_summary"] = mod.targets_summary(res) if hasattr(mod, "targets_summary") else []
    res["elapsed_seconds"] = time.perf_counter() - t0
    mod.report(res)
    write_json(args.json, res)
    print(f"\nJSON written to {args.json} ({res['elapsed_seconds']:.1f} s total)")
    return 0


def run_check(args: argparse.Namespace, run: Fn, report: Fn, stopped: str, *cleanup: Fn) -> int:
    """A storm's or a fuzz's run to its exit code: ``run()`` with SIGTERM unwinding like Ctrl-C
    (130, saying what was ``stopped``), the ``cleanup`` calls however it ends, ``report(res)``,
    the JSON with --json; 0 if ``res["ok"]``, else 1."""
    try:
        with sigterm_as_interrupt():
            res = run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {stopped}", file=sys.stderr)
        return 130
    finally:
        for clean in cleanup:
            clean()
    report(res)
    if args.json:
        write_json(args.json, res)
    return 0 if res["ok"] else 1


def pattern(address: int, gen: int, n: int) -> bytes:
    """The content a storm or fuzz writes into a block: (address, generation) repeated over its
    n usable bytes, so that a block moved or overwritten by another one does not pass."""
    return (struct.pack("<QQ", address, gen) * (n // 16 + 1))[:n]


def signame(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit {rc}"


def spawn(mod: str, *args: Any, **popen: Any) -> subprocess.Popen[Any]:
    """``python -m stress.<mod> args`` from the checkout, stdin /dev/null unless given, without
    SHMALLOC_FAULT: the child of a run under a fault hook runs clean."""
    env = {k: v for k, v in os.environ.items() if k != "SHMALLOC_FAULT"}
    cmd = [sys.executable, "-m", f"stress.{mod}", *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, **{"stdin": subprocess.DEVNULL, **popen})


# --------------------------------------------------------------------------- worker pool
# Long-lived worker processes: a ProcessPoolExecutor with the spawn start method, so that each
# attaches to arenas by name the way a user's process would. run(func, k) submits k calls of a
# module-level function; they start together at a barrier of k parties, so each call holds a
# worker of its own (a worker waiting at the barrier takes no other call). Workers ignore SIGINT:
# Ctrl-C reaches the parent, which tears them down. A run fails after RUN_TIMEOUT seconds.
RUN_TIMEOUT = 600.0


@dataclass
class WorkerCtx:
    """What a function run by a pool worker receives besides its own arguments."""

    index: int  # 0 .. nworkers-1
    nworkers: int  # how many workers run this function together
    barrier: Any  # multiprocessing.Barrier of nworkers parties
    queue: Any  # one multiprocessing.Queue shared by the whole pool (hand-off workloads)
    managers: dict[str, MemoryManager]  # the arenas this worker process has attached

    def attach(self, name: str) -> MemoryManager:
        """The arena ``name``, attached once per worker process and kept until detached."""
        m = self.managers.get(name)
        if m is None or m.closed:
            m = self.managers[name] = MemoryManager.attach(name)
        return m

    def wait(self) -> None:
        self.barrier.wait(60.0)


_worker: dict[str, Any] = {"managers": {}}  # in a worker: its barriers, queue and arenas


def _worker_init(barriers: dict[int, Any], queue: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker.update(barriers=barriers, queue=queue)


def _worker_call(func: Fn, index: int, k: int, kwargs: dict[str, Any]) -> Any:
    w = _worker
    gc.collect()
    return func(WorkerCtx(index, k, w["barriers"][k], w["queue"], w["managers"]), **kwargs)


def _started(ctx: WorkerCtx) -> int:
    ctx.wait()  # n calls at a barrier of n: every worker runs one
    return os.getpid()


def _detach(ctx: WorkerCtx, name: str) -> None:
    m = ctx.managers.pop(name, None)
    if m is not None and not m.closed:
        m.close()
    ctx.wait()


class WorkerPool:
    """n worker processes; ``run(func, k, ...)`` runs ``func(ctx, **kwargs)`` on k of them."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.n, self.barriers = n, {k: ctx.Barrier(k) for k in range(1, n + 1)}
        self.queue = ctx.Queue(maxsize=16)
        init = (self.barriers, self.queue)
        self.executor = cf.ProcessPoolExecutor(n, ctx, initializer=_worker_init, initargs=init)
        self.pids: list[int] = []
        self._busy = False  # a run was submitted and did not finish
        try:
            self.pids = self.run(_started, n)  # all n started now, and known to close()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, func: Callable[..., Any], k: int, **kwargs: Any) -> list[Any]:
        """Run func(ctx, **kwargs) on k workers and return their results in index order. A
        failure in any worker raises RuntimeError here, after the others left the barrier and
        what the failed run left in the queue was dropped."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} workers asked of a pool of {self.n}")
        if self._busy:
            raise RuntimeError("the pool's previous run did not finish; close the pool")
        check_interrupt()
        self._busy = True
        futures = [self.executor.submit(_worker_call, func, i, k, kwargs) for i in range(k)]
        pending, errors = set(futures), []
        deadline = time.monotonic() + RUN_TIMEOUT
        while pending:
            check_interrupt()
            if time.monotonic() > deadline:
                self.barriers[k].abort()
                raise RuntimeError(f"{len(pending)} workers did not finish in {RUN_TIMEOUT:.0f} s")
            done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_EXCEPTION)
            for f in done:
                if (e := f.exception()) is not None:
                    why = "".join(traceback.format_exception(e))
                    errors.append(f"worker {futures.index(f)}:\n{why}")
                    self.barriers[k].abort()  # release the others from the barrier
        self._busy = False
        if errors:
            self.barriers[k].reset()
            with suppress(queue_mod.Empty):  # get() raises it once the queue stays empty
                while True:
                    self.queue.get(timeout=0.05)
            raise RuntimeError(f"{func.__name__} failed in a worker:\n" + "\n".join(errors))
        return [f.result() for f in futures]

    def detach(self, name: str) -> None:
        """Every worker closes its mapping of arena ``name`` (before the parent destroys it).
        Skipped when a run was interrupted: close() then stops the workers, mappings and all."""
        if not self._busy:
            self.run(_detach, self.n, name=name)

    def close(self) -> None:
        """Stop every worker; those of an interrupted run are released and terminated."""
        if self._busy:
            for b in self.barriers.values():
                b.abort()
            for pid in self.pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.queue.close()
        self.queue.join_thread()


def throughput(results: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(ops per second, wall seconds) of workers that each returned {ops, t0, t1} measured with
    time.perf_counter (CLOCK_MONOTONIC: one clock for every process)."""
    ops = sum(int(r["ops"]) for r in results)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return (ops / wall if wall > 0 else math.inf), wall
