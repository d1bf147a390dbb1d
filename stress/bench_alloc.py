"""Allocation microbenchmark: shmalloc's allocate+deallocate pair beside its peers, in one run.

Nanoseconds per allocate+free pair, median [min-max] of interleaved trials (``measure``):

  public     ``mgr.deallocate(mgr.allocate(size))``: the Python API users call
  core       ``lib.shm_free(h, lib.shm_alloc(h, size, 0, slot))``: the C core through cffi,
             without the Python wrapper
  malloc     ``free(malloc(size))`` through a cffi API-mode module (``ffi.set_source``, built once
             per run): the compiled floor for "one C call each way" (ABI mode is ~2x slower)
  stdlib     ``SharedMemory(create=True, size=size)`` then ``close()`` and ``unlink()``: one
             segment per object, what shmalloc replaces
  collector  the public pair with ``mgr.set_collector(lambda e: None)`` against none

The pair's cost against the number of live blocks is ``python -m stress.bench_scaling``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from multiprocessing import shared_memory
from typing import Any

from shmalloc import MemoryManager
from shmalloc._binding import lib
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import KiB, MiB, col, progress

SIZES = [16, 64, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB]
COLLECTOR_SIZE = 1 * KiB
TARGETS = {"public_over_malloc": ("<=", 2.0), "stdlib_over_public": (">=", 100.0)}


def public_pair(mgr: MemoryManager, size: int) -> bench.Runner:
    return bench.pair_loop(mgr.allocate, mgr.deallocate, size)


def core_pair(mgr: MemoryManager, size: int) -> bench.Runner:
    """The C core's pair, handle and slot bound outside the loop: only the two C calls."""
    h, slot = bench.core_handle(mgr)
    sa, sf = lib.shm_alloc, lib.shm_free

    def run(n: int) -> int:
        t0 = time.perf_counter_ns()
        for _ in range(n):
            sf(h, sa(h, size, 0, slot))
        return time.perf_counter_ns() - t0

    return run


def stdlib_pair(size: int) -> bench.Runner:
    def create_unlink(s: int) -> Any:
        shm = shared_memory.SharedMemory(create=True, size=s)
        shm.close()
        shm.unlink()

    return bench.pair_loop(create_unlink, lambda _: None, size)


def bench_pairs(cfg: argparse.Namespace, arenas: bench.Arenas) -> dict[str, Any]:
    mgr = arenas.new(256 * MiB)
    used0 = mgr.stats().used
    c = bench.libc(api=True)[1]
    rows = []
    for size in SIZES:
        progress(f"pairs: size {size}")
        runners = {"public": public_pair(mgr, size), "core": core_pair(mgr, size)}
        runners["cffi_malloc"] = bench.pair_loop(c.malloc, c.free, size)
        fast = bench.measure(runners, cfg.ops, cfg.trials)
        bench.assert_balanced(mgr, used0, f"pair size {size}")
        slow = bench.measure({"stdlib_shm": stdlib_pair(size)}, cfg.stdlib_ops, cfg.trials)
        pub, core = fast["public"]["median"], fast["core"]["median"]
        row = {"size": size, **fast, **slow, "public_over_core": pub / core}
        row.update(wrapper_ns=pub - core, public_over_malloc=pub / fast["cffi_malloc"]["median"])
        rows.append({**row, "stdlib_over_public": slow["stdlib_shm"]["median"] / pub})
    empty = bench.measure({"loop": bench.pair_loop(id, id, 0)}, cfg.ops, cfg.trials)["loop"]
    return {"sizes": SIZES, "rows": rows, "two_calls_of_id_ns": empty}


def bench_collector(cfg: argparse.Namespace, arenas: bench.Arenas) -> dict[str, Any]:
    mgr = arenas.new(64 * MiB)
    used0 = mgr.stats().used
    base = public_pair(mgr, COLLECTOR_SIZE)

    def with_collector(n: int) -> int:
        mgr.set_collector(lambda e: None)
        try:
            return base(n)
        finally:
            mgr.set_collector(None)

    progress(f"collector: size {COLLECTOR_SIZE}")
    res = bench.measure({"without": base, "with": with_collector}, cfg.ops, cfg.trials)
    bench.assert_balanced(mgr, used0, "collector")
    with_, without = res["with"]["median"], res["without"]["median"]
    out = {"size": COLLECTOR_SIZE, "collector": "lambda e: None", **res}
    return {**out, "ratio": with_ / without, "added_ns": with_ - without}


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if res.get("pair"):
        rows = res["pair"]["rows"]
        for key, worst in (("public_over_malloc", max), ("stdlib_over_public", min)):
            v, size = worst((r[key], r["size"]) for r in rows)
            geomean = math.exp(statistics.fmean(math.log(r[key]) for r in rows))
            d[key] = {**bench.judge(*TARGETS[key], v), "worst_size": size, "geomean": geomean}
            d[key]["aggregate"] = f"worst size ({worst.__name__})"
        value = statistics.median(r["public_over_core"] for r in rows)
        wrapper = statistics.median(r["wrapper_ns"] for r in rows)
        d["public_over_core"] = {"value": value, "aggregate": "median over sizes"}
        d["public_over_core"]["wrapper_ns_median"] = wrapper
    if res.get("collector"):
        c = res["collector"]
        d["collector_ratio"] = {"value": c["ratio"], "target": None, "added_ns": c["added_ns"]}
    return d


PARTS = {"pair": bench_pairs, "collector": bench_collector}
LABELS = {"public_over_malloc": "public allocate+free pair / cffi malloc+free"}
LABELS["stdlib_over_public"] = "stdlib SharedMemory create+unlink / public pair"


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label in LABELS.items():
        if j := res["derived"].get(key):
            note = f"worst size {format_bytes(j['worst_size'])}, geomean {j['geomean']:.2f}x"
            rows.append(bench.target_row(label, j, "x", note))
    return rows


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    cfg, j = res["config"], res["derived"].get("public_over_core")
    size, x2, ns = col("size", "size", format_bytes), "{:.2f}x".format, bench.fmt_ns
    if res.get("pair"):
        idle = res["pair"]["two_calls_of_id_ns"]["median"]
        title = f"ns per allocate+free pair, median of {cfg['trials']} trials [min-max] "
        title += f"({cfg['ops']:,} ops/trial; stdlib {cfg['stdlib_ops']:,}); the loop with "
        title += f"two calls of id(): {idle:.1f} ns (not subtracted)"
        cols = [size, col("public ns", "public"), col("core ns", "core")]
        cols += [col("cffi API malloc ns", "cffi_malloc")]
        cols += [col("stdlib SharedMemory ns", "stdlib_shm"), col("wrapper ns", "wrapper_ns", ns)]
        cols += [col("public/malloc", "public_over_malloc", x2)]
        cols += [col("stdlib/public", "stdlib_over_public", "{:.0f}x".format)]
        bench.print_columns(title, cols, res["pair"]["rows"])
    if res.get("collector"):
        title = "Event collector: public pair with mgr.set_collector(lambda e: None) vs None"
        cols = [size, col("without ns", "without"), col("with ns", "with")]
        cols += [col("with/without", "ratio", x2), col("added ns", "added_ns", ns)]
        bench.print_columns(title, cols, [res["collector"]])
    bench.print_targets(res)
    if j:
        print(f"  public pair / core pair: {j['value']:.2f}x median ", end="")
        print(f"(the Python wrapper adds ~{j['wrapper_ns_median']:.0f} ns/pair)")


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "few iterations (a CI smoke run, ~10 s)")
    parts = bench.csv(PARTS)
    p.add_argument("--parts", type=parts, default=list(PARTS), help="pair and/or collector")
    p.scaled("--trials", 5, 9, "trials per measurement")
    p.scaled("--ops", 20_000, 50_000, "operations per trial")
    a = p.parse(argv)
    a.stdlib_ops = min(a.ops, 200 if a.quick else 1000)

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        for part in a.parts:
            res[part] = PARTS[part](a, arenas)

    config = {k: getattr(a, k) for k in ("trials", "ops", "stdlib_ops", "parts")}
    config["unit"] = "ns per allocate+free pair"
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
