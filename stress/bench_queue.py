"""Array hand-off through shmalloc.Queue beside multiprocessing.Queue: latency and throughput.

The producer (this process) hands numpy float64 arrays of 64 KiB, 1 MiB and 64 MiB to a consumer
(one spawned process per queue kind, started once), which gets each, reads its first and last
element and lets it go. Two figures per size and queue kind, side by side in the same run
(kinds interleaved trial by trial; the median of the trials, min and max also kept):

  latency     one array at a time: put it, the consumer gets it and answers through a second
              queue of the same kind; the producer waits for the answer (ns per hand-off)
  throughput  a stream of arrays put back to back into a queue bounded at 4 items; the
              consumer answers once at the end (hand-offs per second, and bytes per second)

  shmalloc    shmalloc.Queue(4, arena=...): put copies the array into the arena once; the
              consumer's get is a zero-copy, read-only view over it
  mp          multiprocessing.Queue(4): pickle protocol 5 through a pipe, by a feeder thread

The ratios (mp over shmalloc) are what to read: both kinds ran in the same run on the same
machine. Output: a table on stdout (progress on stderr) and JSON (default
stress/results/bench_queue.json). The arena is destroyed and the consumers stopped on the way
out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from typing import Any

import numpy as np

import shmalloc
from shmalloc import MemoryManager
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import KiB, MiB

SIZES = [64 * KiB, 1 * MiB, 64 * MiB]
KINDS = ["shmalloc", "mp"]
BOUND = 4
TIMEOUT = 120.0
# hand-offs per trial: (latency, throughput), by size
REPS = {"full": {64 * KiB: (400, 2000), 1 * MiB: (200, 500), 64 * MiB: (10, 24)}}
REPS["quick"] = {64 * KiB: (50, 200), 1 * MiB: (30, 60), 64 * MiB: (3, 8)}
# at 1 MiB, shmalloc.Queue is no slower than multiprocessing.Queue, one at a time or streamed
TARGETS = {"latency_mp_over_shmalloc": (">=", 1.0), "throughput_shmalloc_over_mp": (">=", 1.0)}
progress = bench.make_progress("bench_queue")


def consumer(requests: Any, replies: Any) -> None:
    """Answer ("one", None): get an array, touch it, reply; ("many", n): get n, reply once."""
    while True:
        op, n = requests.get()
        if op == "stop":
            return
        for _ in range(1 if op == "one" else n):
            a = requests.get()
            float(a[0]) + float(a[-1])
            del a
        replies.put(True)


class Kind:
    """One queue kind: its request and reply queues and its consumer."""

    def __init__(self, name: str, mgr: MemoryManager) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        if name == "shmalloc":
            self.requests: Any = shmalloc.Queue(BOUND, arena=mgr)
            self.replies: Any = shmalloc.Queue(arena=mgr)
        else:
            self.requests, self.replies = ctx.Queue(BOUND), ctx.Queue()
        self.proc = ctx.Process(target=consumer, args=(self.requests, self.replies), daemon=True)
        self.proc.start()

    def latency(self, a: np.ndarray, n: int) -> float:
        """ns per hand-off, one at a time."""
        t = time.perf_counter_ns()
        for _ in range(n):
            self.requests.put(("one", None))
            self.requests.put(a)
            self.replies.get(timeout=TIMEOUT)
        return (time.perf_counter_ns() - t) / n

    def throughput(self, a: np.ndarray, n: int) -> float:
        """Hand-offs per second, streamed."""
        t = time.perf_counter_ns()
        self.requests.put(("many", n))
        for _ in range(n):
            self.requests.put(a)
        self.replies.get(timeout=TIMEOUT)
        return n / ((time.perf_counter_ns() - t) / 1e9)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.requests.put(("stop", None))
            self.proc.join(TIMEOUT)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def bench_size(kinds: list[Kind], size: int, trials: int, reps: tuple[int, int]) -> dict[str, Any]:
    a = np.random.default_rng(size).random(size // 8)
    for k in kinds:  # warm-up: the consumers' imports, the arena's pages
        k.latency(a, 2)
    lat: dict[str, list[float]] = {k.name: [] for k in kinds}
    thr: dict[str, list[float]] = {k.name: [] for k in kinds}
    with bench.untraced():
        for t in range(trials):
            for k in bench.rotated(kinds, t):
                bench.check_interrupt()
                lat[k.name].append(k.latency(a, reps[0]))
                thr[k.name].append(k.throughput(a, reps[1]))
    row: dict[str, Any] = {"size": size, "reps": list(reps)}
    for name in lat:
        row[name] = {"latency_ns": bench.summarize(lat[name])}
        row[name]["throughput_per_s"] = bench.summarize(thr[name])
    s, m = ({k: v["median"] for k, v in row[name].items()} for name in KINDS)
    row["latency_mp_over_shmalloc"] = m["latency_ns"] / s["latency_ns"]
    row["throughput_shmalloc_over_mp"] = s["throughput_per_s"] / m["throughput_per_s"]
    return row


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    rows = []
    for r in res["rows"]:
        lat = [f"{r[k]['latency_ns']['median'] / 1e3:,.1f}" for k in KINDS]
        gbs = [f"{r[k]['throughput_per_s']['median'] * r['size'] / 1e9:,.2f}" for k in KINDS]
        ratios = [r["latency_mp_over_shmalloc"], r["throughput_shmalloc_over_mp"]]
        rows.append([format_bytes(r["size"]), *lat, f"{ratios[0]:.1f}x", *gbs, f"{ratios[1]:.1f}x"])
    headers = ["size", "shmalloc us", "mp us", "mp/shmalloc"]
    headers += ["shmalloc GB/s", "mp GB/s", "shmalloc/mp"]
    title = "array hand-off: latency (one at a time, with the answer) and throughput (streamed)"
    bench.print_table(headers, rows, title)


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    row = next(r for r in res["rows"] if r["size"] == 1 * MiB)
    labels = {"latency_mp_over_shmalloc": "latency mp / shmalloc"}
    labels["throughput_shmalloc_over_mp"] = "throughput shmalloc / mp"
    rows = [(f"1 MiB Queue hand-off: {v}", TARGETS[k], row[k]) for k, v in labels.items()]
    return [bench.target_row(name, bench.judge(*target, value)) for name, target, value in rows]


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "fewer trials and hand-offs (< 30 s)")
    p.scaled("--trials", 2, 5, "trials per kind and size")
    a = p.parse(argv)
    reps = REPS["quick" if a.quick else "full"]

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        mgr = arenas.new(max(SIZES) * (BOUND + 4))
        kinds: list[Kind] = []
        try:
            for name in KINDS:
                kinds.append(Kind(name, mgr))
            res["rows"] = []
            for size in SIZES:
                progress(f"{format_bytes(size)}: {a.trials} trials x {reps[size]} hand-offs")
                res["rows"].append(bench_size(kinds, size, a.trials, reps[size]))
        finally:
            for k in kinds:
                k.stop()

    config = dict(trials=a.trials, reps={str(k): v for k, v in reps.items()}, sizes=SIZES)
    config.update(kinds=KINDS, bound=BOUND, dtype="float64")
    config["consumer"] = "spawned process, reads first and last element"
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
