"""Helpers shared by the benchmark drivers in ``stress/``: bookkeeping that destroys every arena
however a run ends, interleaved trials and their median/min/max, machine facts, table printing,
target verdicts, and a pool of long-lived worker processes for the multi-process workloads.

Nothing here measures anything by itself; each ``bench_*`` module says what it measures.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmalloc import MemoryManager

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "stress" / "results"

perf_counter_ns = time.perf_counter_ns

Runner = Callable[[int], int]  # runs n operations, returns elapsed nanoseconds


# --------------------------------------------------------------------------- bookkeeping


def make_progress(name: str) -> Callable[[str], None]:
    """A progress printer for one driver: ``[name HH:MM:SS] msg`` on stderr."""

    def progress(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return progress


class Arenas:
    """Every arena the benchmark makes, so that all of them are destroyed however it ends."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._live: list[MemoryManager] = []
        self._log = log or make_progress("bench")

    def new(self, capacity: int) -> MemoryManager:
        m = MemoryManager(capacity)
        self._live.append(m)
        return m

    def drop(self, m: MemoryManager) -> None:
        try:
            if not m.closed:
                m.close()
        finally:
            m.destroy()
            if m in self._live:
                self._live.remove(m)

    def drop_all(self) -> None:
        while self._live:
            m = self._live[-1]
            try:
                self.drop(m)
            except Exception as e:  # keep destroying the others
                self._log(f"warning: could not close arena {m.name}: {e!r}")
                if m in self._live:
                    self._live.remove(m)


_stop = threading.Event()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if Ctrl-C or SIGTERM arrived. Python swallows an exception raised
    by a signal handler while a finalizer (``__del__``) runs, so loops call this to be sure."""
    if _stop.is_set():
        raise KeyboardInterrupt("interrupted")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that the finally blocks destroy the arenas; both also set
    a flag that check_interrupt() turns into KeyboardInterrupt later if the first one was lost."""

    def handler(signum: int, frame: Any) -> None:
        _stop.set()
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:  # leave an ignored SIGINT ignored
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)


def summarize(per_op: list[float], n: int) -> dict[str, Any]:
    return {
        "median": statistics.median(per_op),
        "min": min(per_op),
        "max": max(per_op),
        "trials": per_op,
        "ops_per_trial": n,
    }


def summarize_rates(rates: Sequence[float], **extra: Any) -> dict[str, Any]:
    """median/min/max of per-trial rates (operations per second), plus anything in extra."""
    rates = list(rates)
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "trials": rates,
        **extra,
    }


def measure(runners: dict[str, Runner], n: int, trials: int) -> dict[str, dict[str, Any]]:
    """Interleaved trials: trial t runs every runner once (in a rotated order), n ops each.

    One untimed warm-up run each first. The cyclic GC is off while the loops run."""
    labels = list(runners)
    per_op: dict[str, list[float]] = {k: [] for k in labels}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for k in labels:
            runners[k](max(1, n // 10))
        for t in range(trials):
            order = labels[t % len(labels):] + labels[: t % len(labels)]
            for k in order:
                per_op[k].append(runners[k](n) / n)
    finally:
        if was_enabled:
            gc.enable()
    return {k: summarize(v, n) for k, v in per_op.items()}


def rotated(items: Sequence[Any], t: int) -> list[Any]:
    """items rotated left by t: the order of trial t in interleaved measurements."""
    items = list(items)
    if not items:
        return items
    k = t % len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import cffi

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()),
        "cffi_version": cffi.__version__,
    }
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import shmalloc

        info["shmalloc_version"] = shmalloc.__version__
    except AttributeError:
        pass
    try:  # which build of the C core was measured (it is rebuilt in place by pip install -e)
        import hashlib

        from shmalloc import _native

        so = Path(_native.__file__)
        info["native_build"] = {
            "path": str(so),
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(so.stat().st_mtime)),
            "sha256": hashlib.sha256(so.read_bytes()).hexdigest()[:16],
        }
    except (OSError, AttributeError, TypeError):
        pass
    try:
        git = ["git", "-C", str(REPO_ROOT)]
        info["git_commit"] = subprocess.run(
            git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = subprocess.run(
            git + ["status", "--porcelain", "--", "shmalloc", "native"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        info["core_tree_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def noise_note(machine: dict[str, Any]) -> str | None:
    """A warning line when the machine is small or busy enough to make the figures noisy."""
    cpus = machine.get("cpus_usable") or machine.get("cpu_count") or 1
    load = machine.get("loadavg_at_start")
    parts = []
    if cpus <= 2:
        parts.append(f"only {cpus} usable cores: multi-process figures beyond {cpus} processes "
                     "measure time-sharing, not parallelism")
    if load and load[0] > 0.25 * cpus:
        parts.append(f"1-minute load average was {load[0]:.2f} at the start: other work was "
                     "running, so figures are noisy")
    return "; ".join(parts) or None


# --------------------------------------------------------------------------- formatting


def fmt_ns(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_stat(s: dict[str, Any]) -> str:
    return f"{fmt_ns(s['median'])} [{fmt_ns(s['min'])}-{fmt_ns(s['max'])}]"


def fmt_rate(x: float) -> str:
    """Operations per second, compactly: 1.23M, 456k, 789."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_rate_stat(s: dict[str, Any]) -> str:
    return f"{fmt_rate(s['median'])} [{fmt_rate(s['min'])}-{fmt_rate(s['max'])}]"


def fmt_count(n: int) -> str:
    """1000 -> '1e3', 1000000 -> '1e6', anything else with separators."""
    e = round(math.log10(n)) if n > 0 else 0
    return f"1e{e}" if n == 10**e else f"{n:,}"


def fmt_size(n: int) -> str:
    for unit, div in (("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB', 73400320 -> '70.0 MiB'."""
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def print_table(headers: list[str], rows: list[list[str]], title: str) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


# --------------------------------------------------------------------------- targets


def judge(op: str, target: float, value: float | None) -> dict[str, Any]:
    """{"value", "target", "op", "met"}: met is None when there is no value."""
    if value is None:
        return {"value": None, "target": target, "op": op, "met": None}
    met = value <= target if op == "<=" else value < target if op == "<" else (
        value > target if op == ">" else value >= target)
    return {"value": value, "target": target, "op": op, "met": met}


def verdict(j: dict[str, Any]) -> str:
    if j.get("met") is None:
        return "(not judged)"
    return "MET" if j["met"] else "MISSED"


def target_row(name: str, j: dict[str, Any], unit: str = "x", note: str = "") -> dict[str, Any]:
    """One line of a driver's ``targets_summary``: what bench_all puts in its combined table."""
    return {
        "name": name,
        "op": j["op"],
        "target": j["target"],
        "value": j["value"],
        "unit": unit,
        "met": j["met"],
        "note": note,
    }


def write_json(path: Path, res: dict[str, Any], *, default: Callable[[Any], Any] | None = None
               ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=default) + "\n")
    os.replace(tmp, path)


def write_results(path: Path, res: dict[str, Any], *, default: Callable[[Any], Any] | None = None
                  ) -> None:
    """Write res as JSON to path (atomically) and say so, with the run's total time."""
    write_json(path, res, default=default)
    print(f"\nJSON written to {path} ({res['elapsed_seconds']:.1f} s total)")


# --------------------------------------------------------------------------- driver scaffolding


def new_result(benchmark: str, config: dict[str, Any], targets: dict[str, Any] | None = None,
               *, machine: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The head every driver's JSON starts with: benchmark, schema, timestamp, machine, config,
    targets (left out when None), then anything in extra, in that order."""
    res: dict[str, Any] = {
        "benchmark": benchmark,
        "schema": 1,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info() if machine is None else machine,
        "config": config,
    }
    if targets is not None:
        res["targets"] = targets
    res.update(extra)
    return res


def run_interruptible(body: Callable[[], None], note: str,
                      arenas: Arenas | None = None) -> bool:
    """Run body() with SIGTERM unwinding like Ctrl-C, destroying every arena in ``arenas``
    however it ends. On an interrupt print ``interrupted: <note>`` and return False."""
    try:
        with sigterm_as_interrupt():
            try:
                body()
            finally:
                if arenas is not None:
                    arenas.drop_all()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {note}", file=sys.stderr)
        return False
    return True


def finish_result(res: dict[str, Any], t_start: float, *,
                  derive: Callable[[dict[str, Any]], Any] | None = None,
                  targets_summary: Callable[[dict[str, Any]], Any] | None = None,
                  noise: bool = True) -> None:
    """Add noise_note, derived, targets_summary (each if asked for) and elapsed_seconds."""
    if noise:
        res["noise_note"] = noise_note(res["machine"])
    if derive is not None:
        res["derived"] = derive(res)
    if targets_summary is not None:
        res["targets_summary"] = targets_summary(res)
    res["elapsed_seconds"] = time.perf_counter() - t_start


def add_json_arg(p: Any, default: Path, help: str | None = None) -> None:
    """The --json PATH option every driver has."""
    p.add_argument("--json", type=Path, default=default, metavar="PATH",
                   help=help or f"where to write the results (default: "
                   f"{default.relative_to(REPO_ROOT)})")


def save_figure(plt: Any, fig: Any, path: Path, *, dpi: int = 100,
                log: Callable[[str], None] | None = None) -> None:
    """tight_layout, write fig to path (making its folder), close it, and log that it was."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if log is not None:
        log(f"plot written to {path}")


def signame(rc: int | None) -> str:
    """A child's return code in words: running, exit N, or the name of the signal that ended it."""
    if rc is None:
        return "running"
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit {rc}"


def child_env(fault: str | None = None) -> dict[str, str]:
    """os.environ for a child interpreter: SHMALLOC_FAULT set to fault (or removed when None),
    the repository first on PYTHONPATH."""
    env = dict(os.environ)
    env.pop("SHMALLOC_FAULT", None)
    if fault is not None:
        env["SHMALLOC_FAULT"] = fault
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def load_pyplot(what: str) -> Any:
    """matplotlib.pyplot with the Agg backend, or None (and a note on stderr) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{what}: matplotlib is not installed (pip install 'shmalloc[bench]'); "
              "no plot written (the table and JSON were)", file=sys.stderr)
        return None
    return plt


# --------------------------------------------------------------------------- worker pool
# Long-lived worker processes (spawn start method, so each attaches to arenas by name the way a
# user's process would). The parent sends a module-level function and its keyword arguments to
# the first k workers; they run it together, synchronised by a barrier of k parties, and send
# back its result. Workers ignore SIGINT: Ctrl-C reaches the parent, which tears them down.


@dataclass
class WorkerCtx:
    """What a function run by a pool worker receives besides its own arguments."""

    index: int  # 0 .. nworkers-1
    nworkers: int  # how many workers run this function together
    barrier: Any  # multiprocessing.Barrier of nworkers parties
    queue: Any  # one multiprocessing.Queue shared by the whole pool (hand-off workloads)
    managers: dict[str, MemoryManager] = field(default_factory=dict)

    def attach(self, name: str) -> MemoryManager:
        """The arena ``name``, attached once per worker process and kept until detached."""
        m = self.managers.get(name)
        if m is None or m.closed:
            m = self.managers[name] = MemoryManager.attach(name)
        return m

    def wait(self, timeout: float = 60.0) -> None:
        """Wait at the barrier of this run's workers."""
        self.barrier.wait(timeout)


def _worker_main(index: int, conn: Any, barriers: dict[int, Any], queue: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    managers: dict[str, MemoryManager] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                return
            if msg is None:
                return
            func, nworkers, kwargs = msg
            ctx = WorkerCtx(index, nworkers, barriers[nworkers], queue, managers)
            try:
                gc.collect()
                result = func(ctx, **kwargs)
                conn.send(("ok", result))
            except BaseException:
                conn.send(("err", traceback.format_exc()))
    finally:
        for m in managers.values():
            try:
                m.close()
            except Exception:
                pass


def _detach(ctx: WorkerCtx, name: str) -> None:
    m = ctx.managers.pop(name, None)
    if m is not None and not m.closed:
        m.close()


class WorkerPool:
    """n worker processes; ``run(func, k, ...)`` runs ``func(ctx, **kwargs)`` on workers 0..k-1."""

    def __init__(self, n: int, *, queue_size: int = 16, timeout: float = 600.0) -> None:
        ctx = mp.get_context("spawn")
        self.n = n
        self.timeout = timeout
        self.barriers = {k: ctx.Barrier(k) for k in range(1, n + 1)}
        self.queue = ctx.Queue(maxsize=queue_size)
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._busy = False  # a run was sent and not all of its replies came back
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(i, child, self.barriers, self.queue),
                                name=f"bench-worker-{i}", daemon=True)
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def run(self, func: Callable[..., Any], k: int,
            per_worker: Sequence[dict[str, Any]] | None = None, **kwargs: Any) -> list[Any]:
        """Run func on workers 0..k-1 (kwargs, updated by per_worker[i] for worker i) and return
        their results in worker order. A failure in any worker raises RuntimeError here, after
        the others were released from the barrier."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} workers asked of a pool of {self.n}")
        if self._busy:
            raise RuntimeError("the pool's previous run did not finish; close the pool")
        check_interrupt()
        self._busy = True
        for i in range(k):
            kw = dict(kwargs)
            if per_worker is not None:
                kw.update(per_worker[i])
            self._conns[i].send((func, k, kw))
        results: list[Any] = [None] * k
        pending = set(range(k))
        errors: list[str] = []
        deadline = time.monotonic() + self.timeout
        while pending:
            check_interrupt()
            ready = mpc.wait([self._conns[i] for i in pending], timeout=0.5)
            for c in ready:
                i = self._conns.index(c)
                try:
                    status, value = self._conns[i].recv()
                except EOFError:
                    status, value = "err", f"worker {i} died (exit code {self._procs[i].exitcode})"
                pending.discard(i)
                if status == "ok":
                    results[i] = value
                else:
                    errors.append(f"worker {i}:\n{value}")
                    self.barriers[k].abort()  # release the others from the barrier
            for i in list(pending):
                if not self._procs[i].is_alive():
                    pending.discard(i)
                    errors.append(f"worker {i} died (exit code {self._procs[i].exitcode})")
                    self.barriers[k].abort()
            if pending and time.monotonic() > deadline:
                self.barriers[k].abort()
                raise RuntimeError(f"workers {sorted(pending)} did not finish within "
                                   f"{self.timeout:.0f} s")
        self._busy = False
        if errors:
            self.barriers[k].reset()
            raise RuntimeError(f"{func.__name__} failed in a worker:\n" + "\n".join(errors))
        return results

    def detach(self, name: str) -> None:
        """Every worker closes its mapping of arena ``name`` (before the parent destroys it).
        Skipped when a run was interrupted: close() then stops the workers, mappings and all."""
        if not self._busy and self._procs and all(p.is_alive() for p in self._procs):
            self.run(_detach, self.n, name=name)

    def close(self) -> None:
        """Stop every worker: ask, then terminate whoever did not leave within 5 s; join all."""
        if self._busy:  # an interrupted run: release whoever waits at a barrier
            for b in self.barriers.values():
                b.abort()
        for c, p in zip(self._conns, self._procs):
            if p.is_alive():
                try:
                    c.send(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self._procs:
            if p.is_alive():
                p.terminate()
                p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self._conns:
            c.close()
        self._procs.clear()
        self._conns.clear()
        try:
            self.queue.close()
            self.queue.join_thread()
        except (OSError, ValueError, AssertionError):
            pass


def throughput(results: Sequence[dict[str, Any]]) -> tuple[float, int, float]:
    """(ops per second, total ops, wall seconds) of workers that each returned {ops, t0, t1}
    measured with time.perf_counter (CLOCK_MONOTONIC: one clock for every process)."""
    ops = sum(int(r["ops"]) for r in results)
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return (ops / wall if wall > 0 else float("inf")), ops, wall


def drain_queue(q: Any) -> int:
    """Empty a multiprocessing.Queue left non-empty by a failed run; returns items dropped."""
    n = 0
    while True:
        try:
            q.get(timeout=0.05)
        except Exception:
            return n
        n += 1
