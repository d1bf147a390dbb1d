"""shmalloc.dask against plain Dask distributed: hand-off, (x + x.T).sum(), two hosts.

Every configuration is a fresh cluster of worker processes (nannies, one thread each): plain
Dask, ShmallocPlugin with its defaults ("shmalloc": values of 1 MiB or more go into the arena
when stored) and with every value put when a peer of the host first asks for it ("on-demand").
Trials are interleaved, figures are medians:

  handoff   a 256 MiB float64 array made on worker 0 (not timed), then summed on worker 1:
            the time from submitting the consumer to its result (plain: the bytes go through
            Dask's comms; shmalloc: a reference)
  xxt       x = a random n x n array persisted on 4 workers (its time reported apart, as
            "make x"), then (x + x.T).sum(), whose transposed chunks move between the workers:
            its wall time, and the peak of the summed PSS of every process the run started
            (workers, host coordinators), sampled every 0.05 s from before x is made
  xxt_2h    the same on 4 workers split in two simulated hosts (SHMALLOC_DASK_HOST=hostA/hostB)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import dask.array as da
import distributed
import numpy as np
from distributed import Nanny, Scheduler, SpecCluster

from shmalloc.dask import HOST_ENV, ShmallocPlugin
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import GiB, MiB, progress

TARGETS = {"handoff_speedup": (">=", 5.0), "xxt_speedup": (">=", 1.5)}
TARGETS.update(xxt_pss_ratio=("<=", 0.6), xxt_2h_speedup=(">=", 1.0))
KINDS = ["plain", "shmalloc", "on-demand"]
EAGER_SIZE = {"shmalloc": 1 << 20, "on-demand": float("inf")}


def cluster(kind: str, hosts: list[str]) -> tuple[SpecCluster, distributed.Client]:
    opts = [{"nthreads": 1, "env": {HOST_ENV: h}} for h in hosts]
    workers = {i: {"cls": Nanny, "options": o} for i, o in enumerate(opts)}
    sched = {"cls": Scheduler, "options": {"dashboard_address": None}}
    spec = SpecCluster(workers=workers, scheduler=sched, silence_logs=40)
    client = distributed.Client(spec)
    client.wait_for_workers(len(hosts))
    if kind != "plain":
        client.register_plugin(ShmallocPlugin(eager_size=EAGER_SIZE[kind]))
    return spec, client


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


def xxt(client: distributed.Client, n: int, chunk: int) -> dict[str, Any]:
    with bench.pss_peak() as pss:
        t0 = time.perf_counter()
        x = da.random.RandomState(0).random((n, n), chunks=(chunk, chunk)).persist()
        distributed.wait(x)
        t1 = time.perf_counter()
        total = float(client.compute((x + x.T).sum()).result())
        t2 = time.perf_counter()
    return {"time": t2 - t1, "make_x": t1 - t0, "pss_peak": pss[0], "result": total}


def run_kind(kind: str, hosts: list[str], a: Any, what: str) -> dict[str, Any]:
    spec, client = cluster(kind, hosts)
    arenas: list[str] = []
    if kind != "plain":  # so that the smoke test can see them go
        names = client.run(lambda dask_worker: dask_worker.plugins["shmalloc"].report()["arena"])
        arenas = sorted(set(names.values()))
    try:
        if what == "handoff":
            return {"time": handoff(client, a.handoff_mib * MiB), "arenas": arenas}
        return {**xxt(client, a.n, a.chunk), "arenas": arenas, "load": os.getloadavg()[0]}
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
    row["arenas"] = [n for k in KINDS[1:] for r in runs[k] for n in r["arenas"]]
    for kind in KINDS:
        row[kind] = bench.summarize([r["time"] for r in runs[kind]])
        for extra in ("pss_peak", "make_x", "load"):
            if extra in runs[kind][0]:
                row[kind][extra] = bench.summarize([r[extra] for r in runs[kind]])
        if "result" in runs[kind][0]:
            row[kind]["result"] = runs[kind][0]["result"]
            assert np.isclose(row["plain"]["result"], row[kind]["result"]), row
    return row


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for r in res["rows"]:
        for kind in KINDS[1:]:
            tail = "" if kind == "shmalloc" else f"_{kind}"
            d[f"{r['what']}_speedup{tail}"] = r["plain"]["median"] / r[kind]["median"]
            if "pss_peak" in r["plain"]:
                plain, shm = r["plain"]["pss_peak"]["median"], r[kind]["pss_peak"]["median"]
                d[f"{r['what']}_pss_ratio{tail}"] = shm / plain
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    d = res["derived"]
    return [bench.target_row(k, bench.judge(op, t, d.get(k))) for k, (op, t) in TARGETS.items()]


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    rows = []
    for r in res["rows"]:
        plain = r["plain"]["median"]
        cells = [r["what"], "+".join(r["hosts"]), f"{plain:.3f} s"]
        cells += [f"{r[k]['median']:.3f} s ({plain / r[k]['median']:.2f}x)" for k in KINDS[1:]]
        for k in KINDS:
            pss = r[k].get("pss_peak")
            cells.append("-" if pss is None else format_bytes(int(pss["median"])))
        make = [f"{r[k]['make_x']['median']:.1f}" for k in KINDS if "make_x" in r[k]]
        cells.append("/".join(make) or "-")
        rows.append(cells)
    head = ["workload", "hosts", *KINDS, *(f"PSS {k}" for k in KINDS), "make x (s)"]
    bench.print_table(head, rows, "median wall time (speedup: plain/shmalloc), peak summed PSS")
    bench.print_targets(res)


SCALED = (  # option, its --quick value, its full value, what it is
    ("--trials", 1, 3, "trials per configuration"),
    ("--n", 2048, 23170, "side of the square array of (x + x.T).sum()"),
    ("--chunk", 512, 2896, "side of its square chunks"),
    ("--handoff-mib", 16, 256, "size of the hand-off array in MiB"),
)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "small sizes, one trial (< 1 min)")
    for flag, quick, full, what in SCALED:
        p.scaled(flag, quick, full, what)
    a = p.parse(argv)
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # the nannies' INFO lines
    one, two = ["local"] * 4, ["hostA", "hostA", "hostB", "hostB"]
    if a.quick:  # two workers start faster than four
        one, two = one[:2], ["hostA", "hostB"]

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        work = [("handoff", one[:2]), ("xxt", one), ("xxt_2h", two)]
        res["rows"] = [measure(what, hosts, a) for what, hosts in work]

    config = dict(trials=a.trials, n=a.n, chunk=a.chunk, handoff_bytes=a.handoff_mib * MiB)
    config.update(array_bytes=a.n * a.n * 8, chunk_bytes=a.chunk * a.chunk * 8, workers=len(one))
    config["array"] = format_bytes(a.n * a.n * 8) + (" (>= 4 GiB)" if a.n**2 * 8 >= 4 * GiB else "")
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
