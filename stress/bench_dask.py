"""shmalloc.dask against plain Dask distributed: hand-off, (x + x.T).sum(), two hosts.

Every configuration is a fresh cluster of worker processes (nannies, one thread each); the
shmalloc one registers ShmallocPlugin. Trials are interleaved, figures are medians:

  handoff   a 256 MiB float64 array made on worker 0 (not timed), then summed on worker 1:
            the time from submitting the consumer to its result (plain: the bytes go through
            Dask's comms; shmalloc: a reference)
  xxt       (x + x.T).sum() of a random n x n array whose chunks move between 4 workers: wall
            time, and the peak of the summed PSS of the worker processes (sampled every 0.2 s)
  xxt_2h    the same on 4 workers split in two simulated hosts (SHMALLOC_DASK_HOST=hostA/hostB)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import dask.array as da
import distributed
import numpy as np
import psutil
from distributed import Nanny, Scheduler, SpecCluster

from shmalloc.dask import HOST_ENV, ShmallocPlugin
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import GiB, MiB

TARGETS = {
    "handoff_speedup": (">=", 5.0),
    "xxt_speedup": (">=", 1.5),
    "xxt_pss_ratio": ("<=", 0.6),
    "xxt_2h_speedup": (">=", 1.0),
}
progress = bench.make_progress("bench_dask")
KINDS = ["plain", "shmalloc"]


def cluster(kind: str, hosts: list[str]) -> tuple[SpecCluster, distributed.Client]:
    workers = {
        i: {"cls": Nanny, "options": {"nthreads": 1, "env": {HOST_ENV: h}}}
        for i, h in enumerate(hosts)
    }
    sched = {"cls": Scheduler, "options": {"dashboard_address": None}}
    spec = SpecCluster(workers=workers, scheduler=sched, silence_logs=40)
    client = distributed.Client(spec)
    client.wait_for_workers(len(hosts))
    if kind == "shmalloc":
        client.register_plugin(ShmallocPlugin())
    return spec, client


class PssPeak:
    """Samples the summed PSS of some processes in a thread; ``peak`` is its maximum."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            total = 0
            for p in self.procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            if self._stop.wait(0.2):
                return

    def __enter__(self) -> PssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def handoff(client: distributed.Client, nbytes: int) -> float:
    w0, w1 = sorted(client.scheduler_info()["workers"])[:2]
    made = client.submit(np.ones, nbytes // 8, workers=[w0], pure=False)
    distributed.wait(made)
    t0 = time.perf_counter()
    total = client.submit(lambda a: float(a.sum()), made, workers=[w1], pure=False).result()
    dt = time.perf_counter() - t0
    assert total == nbytes // 8, total
    del made
    return dt


def xxt(client: distributed.Client, n: int, chunk: int) -> tuple[float, int, float]:
    pids = list(client.run(os.getpid).values())
    x = da.random.RandomState(0).random((n, n), chunks=(chunk, chunk))
    with PssPeak(pids) as pss:
        t0 = time.perf_counter()
        total = float(client.compute((x + x.T).sum()).result())
        dt = time.perf_counter() - t0
    return dt, pss.peak, total


def run_kind(kind: str, hosts: list[str], a: Any, what: str) -> dict[str, Any]:
    spec, client = cluster(kind, hosts)
    arenas: list[str] = []
    if kind == "shmalloc":  # so that the smoke test can see them go
        names = client.run(lambda dask_worker: dask_worker.plugins["shmalloc"].report()["arena"])
        arenas = sorted(set(names.values()))
    try:
        if what == "handoff":
            return {"time": handoff(client, a.handoff_mib * MiB), "arenas": arenas}
        dt, peak, total = xxt(client, a.n, a.chunk)
        return {"time": dt, "pss_peak": peak, "result": total, "arenas": arenas}
    finally:
        client.close()
        spec.close()


def measure(what: str, hosts: list[str], a: Any) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for t in range(a.trials):
        for kind in bench.rotated(KINDS, t):
            progress(f"{what}: trial {t + 1}/{a.trials}, {kind}")
            runs[kind].append(run_kind(kind, hosts, a, what))
    row: dict[str, Any] = {"what": what, "hosts": sorted(set(hosts))}
    row["arenas"] = [n for r in runs["shmalloc"] for n in r["arenas"]]
    for kind in KINDS:
        row[kind] = bench.summarize([r["time"] for r in runs[kind]])
        if "pss_peak" in runs[kind][0]:
            row[kind]["pss_peak"] = bench.summarize([r["pss_peak"] for r in runs[kind]])
            results = {r["result"] for r in runs[kind]}
            row[kind]["result"] = results.pop()
    if "pss_peak" in row["plain"]:
        assert np.isclose(row["plain"]["result"], row["shmalloc"]["result"]), row
    return row


def derive(res: dict[str, Any]) -> dict[str, Any]:
    rows = {r["what"]: r for r in res["rows"]}
    d: dict[str, Any] = {}
    for what, r in rows.items():
        d[f"{what}_speedup"] = r["plain"]["median"] / r["shmalloc"]["median"]
        if "pss_peak" in r["plain"]:
            plain, shm = r["plain"]["pss_peak"]["median"], r["shmalloc"]["pss_peak"]["median"]
            d[f"{what}_pss_ratio"] = shm / plain
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, (op, target) in TARGETS.items():
        j = bench.judge(op, target, res["derived"].get(key))
        out.append(bench.target_row(key, j))
    return out


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    rows = []
    for r in res["rows"]:
        pss = [
            format_bytes(int(r[k]["pss_peak"]["median"])) if "pss_peak" in r[k] else "-"
            for k in KINDS
        ]
        rows.append(
            [
                r["what"],
                "+".join(r["hosts"]),
                *(f"{r[k]['median']:.3f} s" for k in KINDS),
                f"{r['plain']['median'] / r['shmalloc']['median']:.2f}x",
                *pss,
            ]
        )
    head = ["workload", "hosts", "plain", "shmalloc", "plain/shmalloc", "PSS plain", "PSS shm"]
    bench.print_table(head, rows, "median wall time and peak summed worker PSS per run")
    for t in res["targets_summary"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['name']:16} {value:>6}  {bench.verdict(t)}")


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "small sizes, one trial (< 1 min)")
    p.scaled("--trials", 1, 3, "trials per configuration")
    p.scaled("--n", 2048, 23170, "side of the square array of (x + x.T).sum()")
    p.scaled("--chunk", 512, 2896, "side of its square chunks")
    p.scaled("--handoff-mib", 16, 256, "size of the hand-off array in MiB")
    a = p.parse(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # the nannies' INFO lines
    one, two = ["local"] * 4, ["hostA", "hostA", "hostB", "hostB"]
    if a.quick:  # two workers start faster than four
        one, two = one[:2], ["hostA", "hostB"]

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        res["rows"] = [
            measure("handoff", one[:2], a),
            measure("xxt", one, a),
            measure("xxt_2h", two, a),
        ]

    config = dict(trials=a.trials, n=a.n, chunk=a.chunk, handoff_bytes=a.handoff_mib * MiB)
    config.update(array_bytes=a.n * a.n * 8, chunk_bytes=a.chunk * a.chunk * 8, workers=len(one))
    config["array"] = format_bytes(a.n * a.n * 8) + (" (>= 4 GiB)" if a.n**2 * 8 >= 4 * GiB else "")
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
