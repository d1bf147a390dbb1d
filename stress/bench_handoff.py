"""Array hand-off between two processes: shmalloc zero-copy beside pickling and stdlib segments.

One hand-off: the producer (this process) holds a numpy array; the consumer (one spawned
process) must end up with an ndarray of the same data, look at it (its first and last element)
and let it go; the producer learns that it has. Every method uses the same two Queues, so the
transport costs the same for all. Per hand-off, median of interleaved trials:

  memcpy      np.copyto(dst, src) of the same size within one process: the floor for one copy
  ping        a tiny message there and back: the floor for the transport
  shmalloc    share_array(mgr, a) (one copy into a block), put the handle; the consumer opens it
              (zero-copy, mgr.ndarray), reads it, frees the block
  stdlib_shm  SharedMemory(create=True, size), np.ndarray over .buf, copy in, put the name; the
              consumer attaches, builds np.ndarray over .buf, reads, closes; the producer closes
              and unlinks: one segment per array, what shmalloc.compat replaces
  compat_shm  the very same code with ``from shmalloc import compat as shared_memory``: each
              SharedMemory is a block of the benchmark's arena (compat.set_arena in both)
  pickle      put the array itself on the Queue (pickled, written through a pipe, unpickled)

Before timing, each method's delivery is checked once with a CRC of the whole array.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import sys
import time
import zlib
from multiprocessing import shared_memory
from types import ModuleType
from typing import Any

import numpy as np

from shmalloc import MemoryManager, compat
from shmalloc.arrays import SharedArray, share_array
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import KiB, MiB

SIZES = [64 * KiB, 1 * MiB, 64 * MiB]
METHODS = ["memcpy", "ping", "shmalloc", "compat_shm", "stdlib_shm", "pickle"]
SHM_MODULES: dict[str, ModuleType] = {"stdlib_shm": shared_memory, "compat_shm": compat}
# hand-offs per trial, by size: enough that one trial takes milliseconds, not microseconds
REPS = {"full": {SIZES[0]: 200, SIZES[1]: 50, SIZES[2]: 3}}
REPS["quick"] = {SIZES[0]: 20, SIZES[1]: 5, SIZES[2]: 1}
TARGETS = {"pickle_over_shmalloc": (">=", 10.0), "shmalloc_over_memcpy": ("<=", 2.0)}
TIMEOUT = 120.0
progress = bench.make_progress("bench_handoff")


# ------------------------------------------------------------------------------ the consumer
def _look(a: Any) -> float:
    return float(a.flat[0]) + float(a.flat[-1])


def _crc(a: Any) -> int:
    return zlib.crc32(np.ascontiguousarray(a).data.cast("B"))


def consumer(arena: str, requests: Any, replies: Any) -> None:
    """The other process: turn each request into an ndarray, look at it, let it go, reply."""
    mgr = MemoryManager.attach(arena)
    compat.set_arena(mgr)
    while True:
        kind, payload, check = requests.get()
        if kind == "stop":
            break
        if kind == "ping":
            replies.put(0)
            continue
        shm = handle = None
        if kind == "pickle":
            a = payload
        elif kind == "shmalloc":
            handle = payload
            a = handle.open(mgr)
        elif kind in SHM_MODULES:
            name, shape, dtype = payload
            shm = SHM_MODULES[kind].SharedMemory(name)
            a = np.ndarray(shape, dtype, buffer=shm.buf)
        else:
            raise ValueError(kind)
        r = _crc(a) if check else _look(a)
        del a, payload  # let go of it now, not when the next request arrives
        if handle is not None:
            handle.free(mgr)
        if shm is not None:
            shm.close()
        replies.put(r)
    mgr.close()


# ------------------------------------------------------------------------------ the producer
class Bench:
    def __init__(self, mgr: MemoryManager, requests: Any, replies: Any, proc: Any) -> None:
        self.mgr, self.requests, self.replies, self.proc = mgr, requests, replies, proc

    def _round_trip(self, kind: str, payload: Any, check: bool) -> Any:
        self.requests.put((kind, payload, check))
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                return self.replies.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    raise RuntimeError(f"the consumer died ({self.proc.exitcode})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer from the consumer in {TIMEOUT} s") from None

    def handoff(self, method: str, a: Any, check: bool = False) -> Any:
        """One hand-off of ``a`` by ``method``; returns the consumer's reply."""
        if method == "ping":
            return self._round_trip("ping", None, False)
        if method == "pickle":
            return self._round_trip("pickle", a, check)
        if method == "shmalloc":
            h: SharedArray = share_array(self.mgr, a)
            return self._round_trip("shmalloc", h, check)
        if method in SHM_MODULES:
            shm = SHM_MODULES[method].SharedMemory(create=True, size=a.nbytes)
            try:
                dst = np.ndarray(a.shape, a.dtype, buffer=shm.buf)
                np.copyto(dst, a)
                del dst
                return self._round_trip(method, (shm.name, a.shape, a.dtype.str), check)
            finally:
                shm.close()
                shm.unlink()
        raise ValueError(method)

    def runner(self, method: str, a: Any) -> bench.Runner:
        """A function that runs n hand-offs and returns the nanoseconds they took."""
        dst = np.empty_like(a) if method == "memcpy" else None

        def run(n: int) -> int:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                if dst is not None:
                    np.copyto(dst, a)
                else:
                    self.handoff(method, a)
            elapsed = time.perf_counter_ns() - t0
            if method == "pickle":
                # the Queue's feeder thread holds the last pickle until its next message: hand
                # it one now, untimed, so that freeing 64 MiB is not charged to the next method
                self.handoff("ping", a)
            return elapsed

        return run


def bench_size(b: Bench, size: int, trials: int, reps: int) -> dict[str, Any]:
    a = np.random.default_rng(size).standard_normal(size // 8)
    expected = _crc(a)
    for m in METHODS[2:]:  # every method delivers the very same bytes
        got = b.handoff(m, a, check=True)
        if got != expected:
            raise AssertionError(f"{m} delivered different data (crc {got:#x} != {expected:#x})")
    row = {"size": size, "reps": reps, "verified": True}
    row.update(bench.measure({m: b.runner(m, a) for m in METHODS}, reps, trials))
    med = {m: row[m]["median"] for m in METHODS}
    row["pickle_over_shmalloc"] = med["pickle"] / med["shmalloc"]
    row["stdlib_over_shmalloc"] = med["stdlib_shm"] / med["shmalloc"]
    row["stdlib_over_compat"] = med["stdlib_shm"] / med["compat_shm"]
    row["shmalloc_over_memcpy"] = med["shmalloc"] / med["memcpy"]
    row["shmalloc_over_memcpy_plus_ping"] = med["shmalloc"] / (med["memcpy"] + med["ping"])
    return row


def fmt_time(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms" if ns >= 1e6 else f"{ns / 1e3:.1f} µs"


RATIOS = {"pickle/shmalloc": "pickle_over_shmalloc", "stdlib/shmalloc": "stdlib_over_shmalloc"}
RATIOS["stdlib/compat"] = "stdlib_over_compat"


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    rows = []
    for r in res["rows"]:
        times = [fmt_time(r[m]["median"]) for m in METHODS]
        rows.append([format_bytes(r["size"]), *times, *(f"{r[k]:.1f}x" for k in RATIOS.values())])
    title = "per hand-off, median of trials; ping = transport floor, memcpy = one copy in "
    title += "one process; a/b = how many times a takes b's time"
    bench.print_table(["size", *METHODS, *RATIOS], rows, title)


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7's two 1 MiB targets."""
    row = next(r for r in res["rows"] if r["size"] == 1 * MiB)
    labels = {"pickle_over_shmalloc": "Queue (pickle) / shmalloc"}
    labels["shmalloc_over_memcpy"] = "shmalloc / one memcpy"
    rows = [(f"1 MiB hand-off: {v}", bench.judge(*TARGETS[k], row[k])) for k, v in labels.items()]
    return [bench.target_row(*r) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "fewer trials and repetitions (< 20 s)")
    p.scaled("--trials", 3, 7, "trials per method and size")
    a = p.parse(argv)
    reps = REPS["quick" if a.quick else "full"]

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        mgr = arenas.new(max(SIZES) * 4)
        ctx = mp.get_context("spawn")
        requests, replies = ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=consumer, args=(mgr.name, requests, replies), daemon=True)
        proc.start()
        compat.set_arena(mgr)
        try:
            b = Bench(mgr, requests, replies, proc)
            res["rows"] = []
            for size in SIZES:
                progress(f"{format_bytes(size)}: {a.trials} trials x {reps[size]} hand-offs")
                res["rows"].append(bench_size(b, size, a.trials, reps[size]))
            requests.put(("stop", None, False))
            proc.join(TIMEOUT)
        finally:
            compat.set_arena(None)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    config = dict(trials=a.trials, reps={str(k): v for k, v in reps.items()}, sizes=SIZES)
    config.update(methods=METHODS, unit="ns per hand-off", dtype="float64")
    config["consumer"] = "spawned process, reads first and last element"
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
