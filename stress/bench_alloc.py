"""Allocation microbenchmark: shmalloc's allocate+deallocate pair beside its peers, in one run.

    python -m stress.bench_alloc [--quick] [--json PATH] [--plot PATH]

What is measured, side by side (each figure is nanoseconds per allocate+free pair, the median
of several trials of N operations, with min and max; methods are interleaved trial by trial so
that clock drift and noisy neighbours hit all of them alike):

  public   ``mgr.deallocate(mgr.allocate(size))``: the Python API users call
  core     ``lib.shm_free(h, lib.shm_alloc(h, size, 0, slot))``: the C core through cffi, without
           the Python wrapper (handle and slot looked up once, outside the loop)
  malloc   a cffi ABI-mode ``free(malloc(size))`` from Python: the floor for "one C call each way"
  stdlib   ``multiprocessing.shared_memory.SharedMemory(create=True, size=size)`` then
           ``close()`` and ``unlink()``: one segment per object, what shmalloc replaces
  scaling  the public (and core) pair with 1e3 .. 1e6 other blocks live, randomly sized
           16..1024 bytes, a fraction of them freed at random to fragment the heap first
  collector  the public pair with ``mgr.set_collector(lambda e: None)`` against none

Output: a table on stdout (progress goes to stderr), JSON (default
``stress/results/bench_alloc.json``) and, with ``--plot``, a PNG (needs matplotlib).
The targets come from issues 3 and 7; they are reported, never asserted: the exit code is 0
whether or not they are met. Every arena this creates is destroyed on the way out, Ctrl-C
and SIGTERM included.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import cffi

from shmalloc import MemoryManager
from shmalloc._native import lib

from ._common import (
    Arenas,
    KiB,
    MiB,
    REPO_ROOT,
    Runner,
    add_json_arg,
    finish_result,
    fmt_count,
    fmt_ns,
    fmt_size,
    fmt_stat,
    make_progress,
    measure,
    new_result,
    print_table,
    run_interruptible,
    save_figure,
    verdict,
    write_results,
)
from ._common import judge as _judge

perf_counter_ns = time.perf_counter_ns

SIZES = [16, 64, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB]
SCALING_SIZES = [64, 1 * KiB, 16 * KiB, 256 * KiB]
COLLECTOR_SIZE = 1 * KiB
DEFAULT_JSON = REPO_ROOT / "stress" / "results" / "bench_alloc.json"

TARGETS = {
    "public_over_malloc": ("<=", 2.0),
    "stdlib_over_public": (">=", 100.0),
    "scaling_max_over_1e3": ("<=", 1.2),
}

@dataclass(frozen=True)
class Config:
    quick: bool
    trials: int
    ops: int  # operations per trial for public / core / malloc pairs
    stdlib_ops: int  # operations per trial for stdlib SharedMemory
    scaling_ops: int
    live_levels: tuple[int, ...]
    free_fraction: float
    seed: int
    parts: tuple[str, ...]

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        if a.quick:
            c = dict(trials=5, ops=20_000, stdlib_ops=200, scaling_ops=10_000,
                     live_levels=(1_000, 10_000, 100_000))
        else:
            c = dict(trials=9, ops=50_000, stdlib_ops=1_000, scaling_ops=30_000,
                     live_levels=(1_000, 10_000, 100_000, 1_000_000))
        if a.trials is not None:
            c["trials"] = a.trials
        if a.ops is not None:
            c["ops"] = a.ops
            c["scaling_ops"] = a.ops
        if a.max_live is not None:
            c["live_levels"] = tuple(n for n in (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
                                     if n <= a.max_live) or (1_000,)
        parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
        return cls(quick=a.quick, free_fraction=a.free_fraction, seed=a.seed, parts=parts, **c)


# --------------------------------------------------------------------------- bookkeeping


progress = make_progress("bench_alloc")


# --------------------------------------------------------------------------- the timed loops
# Each loop has the same shape (one range iteration, two calls through local names) so that
# the rows differ only by what is being called.


def public_pair(mgr: MemoryManager, size: int) -> Runner:
    a, d = mgr.allocate, mgr.deallocate

    def run(n: int) -> int:
        r = range(n)
        t0 = perf_counter_ns()
        for _ in r:
            d(a(size))
        return perf_counter_ns() - t0

    return run


def core_pair(mgr: MemoryManager, size: int) -> Runner:
    sa, sf = lib.shm_alloc, lib.shm_free
    h, slot = mgr._h, mgr._own_slot()

    def run(n: int) -> int:
        r = range(n)
        t0 = perf_counter_ns()
        for _ in r:
            sf(h, sa(h, size, 0, slot))
        return perf_counter_ns() - t0

    return run


_libc_ffi = cffi.FFI()
_libc_ffi.cdef("void *malloc(size_t); void free(void *);")
_libc = _libc_ffi.dlopen(None)


def malloc_pair(size: int) -> Runner:
    ma, fr = _libc.malloc, _libc.free

    def run(n: int) -> int:
        r = range(n)
        t0 = perf_counter_ns()
        for _ in r:
            fr(ma(size))
        return perf_counter_ns() - t0

    return run


def stdlib_pair(size: int) -> Runner:
    SM = shared_memory.SharedMemory

    def run(n: int) -> int:
        r = range(n)
        pending = None
        try:
            t0 = perf_counter_ns()
            for _ in r:
                pending = s = SM(create=True, size=size)
                s.close()
                s.unlink()
                pending = None
            return perf_counter_ns() - t0
        finally:
            if pending is not None:  # interrupted between create and unlink
                try:
                    pending.close()
                    pending.unlink()
                except (FileNotFoundError, BufferError):
                    pass

    return run


def empty_loop() -> Runner:
    def run(n: int) -> int:
        r = range(n)
        t0 = perf_counter_ns()
        for _ in r:
            pass
        return perf_counter_ns() - t0

    return run


def with_collector(mgr: MemoryManager, inner: Runner, collector: Callable[[Any], None]) -> Runner:
    def run(n: int) -> int:
        mgr.set_collector(collector)
        try:
            return inner(n)
        finally:
            mgr.set_collector(None)

    return run


def assert_balanced(mgr: MemoryManager, used_before: int, what: str) -> None:
    """The loops free what they allocate; a core call that failed silently would show here."""
    used = mgr.stats().used
    if used != used_before:
        raise RuntimeError(f"{what}: arena used bytes went {used_before} -> {used}; "
                           "a pair did not free what it allocated")


# --------------------------------------------------------------------------- the parts


def bench_pairs(cfg: Config, arenas: Arenas) -> dict[str, Any]:
    mgr = arenas.new(256 * MiB)
    used0 = mgr.stats().used
    loop = measure({"empty_loop": empty_loop()}, cfg.ops, cfg.trials)["empty_loop"]
    rows = []
    for size in SIZES:
        progress(f"pairs: size {size}")
        fast = measure(
            {
                "public": public_pair(mgr, size),
                "core": core_pair(mgr, size),
                "cffi_malloc": malloc_pair(size),
            },
            cfg.ops,
            cfg.trials,
        )
        assert_balanced(mgr, used0, f"pair size {size}")
        slow = measure({"stdlib_shm": stdlib_pair(size)}, cfg.stdlib_ops, cfg.trials)
        row: dict[str, Any] = {"size": size, **fast, **slow}
        pub = fast["public"]["median"]
        row["public_over_malloc"] = pub / fast["cffi_malloc"]["median"]
        row["public_over_core"] = pub / fast["core"]["median"]
        row["wrapper_ns"] = pub - fast["core"]["median"]
        row["stdlib_over_public"] = slow["stdlib_shm"]["median"] / pub
        rows.append(row)
    report = mgr.check()
    return {
        "sizes": SIZES,
        "empty_loop_ns": loop,
        "rows": rows,
        "arena_check": {"blocks": report.blocks, "used": report.used},
    }


def populate(mgr: MemoryManager, live: int, frac: float, rng: random.Random) -> dict[str, Any]:
    """Allocate live/(1-frac) blocks of 16..1024 bytes, then free frac of them at random."""
    total = round(live / (1.0 - frac))
    a, d = mgr.allocate, mgr.deallocate
    randint = rng.randint
    t0 = time.perf_counter()
    addrs = [a(randint(16, 1024)) for _ in range(total)]
    for i in rng.sample(range(total), total - live):
        d(addrs[i])
    setup_s = time.perf_counter() - t0
    st = mgr.stats()
    if st.allocated_blocks != live:
        raise RuntimeError(f"expected {live} live blocks after setup, the arena says "
                           f"{st.allocated_blocks}")
    return {
        "live": live,
        "allocated": total,
        "freed": total - live,
        "setup_seconds": setup_s,
        "used_bytes": st.used,
        "free_blocks": st.free_blocks,
        "fragmentation_ratio": st.fragmentation_ratio(),
    }


def bench_scaling(cfg: Config, arenas: Arenas) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    levels = []
    for live in cfg.live_levels:
        # 1e6 blocks of <= 1 KiB need ~0.8 GiB; capacity is lazy, so be generous
        capacity = max(256 * MiB, min(1 << 40, live * 4 * KiB))
        mgr = arenas.new(capacity)
        try:
            progress(f"scaling: {live:,} live blocks (setup)")
            info = populate(mgr, live, cfg.free_fraction, rng)
            progress(f"scaling: {live:,} live blocks (setup {info['setup_seconds']:.1f} s), timing")
            runners: dict[str, Runner] = {}
            for size in SCALING_SIZES:
                runners[f"public/{size}"] = public_pair(mgr, size)
                runners[f"core/{size}"] = core_pair(mgr, size)
            res = measure(runners, cfg.scaling_ops, cfg.trials)
            assert_balanced(mgr, info["used_bytes"], f"scaling {live}")
            info["public"] = {str(s): res[f"public/{s}"] for s in SCALING_SIZES}
            info["core"] = {str(s): res[f"core/{s}"] for s in SCALING_SIZES}
            info["capacity"] = capacity
            levels.append(info)
        finally:
            arenas.drop(mgr)  # give the tmpfs pages back before the next level
    base = levels[0]
    top = levels[-1]
    ratios = {
        kind: {
            str(s): top[kind][str(s)]["median"] / base[kind][str(s)]["median"] for s in SCALING_SIZES
        }
        for kind in ("public", "core")
    }
    return {
        "sizes": SCALING_SIZES,
        "free_fraction": cfg.free_fraction,
        "block_sizes": [16, 1024],
        "levels": levels,
        "base_live": base["live"],
        "max_live": top["live"],
        "ratio_max_over_base": ratios,
    }


def bench_collector(cfg: Config, arenas: Arenas) -> dict[str, Any]:
    mgr = arenas.new(64 * MiB)
    used0 = mgr.stats().used

    def collector(e: Any) -> None:
        return None

    progress(f"collector: size {COLLECTOR_SIZE}")
    base = public_pair(mgr, COLLECTOR_SIZE)
    res = measure(
        {"without": base, "with": with_collector(mgr, base, collector)}, cfg.ops, cfg.trials
    )
    assert_balanced(mgr, used0, "collector")
    return {
        "size": COLLECTOR_SIZE,
        "collector": "lambda e: None",
        "without": res["without"],
        "with": res["with"],
        "ratio": res["with"]["median"] / res["without"]["median"],
        "added_ns": res["with"]["median"] - res["without"]["median"],
    }


# --------------------------------------------------------------------------- report


def judge(name: str, value: float | None) -> dict[str, Any]:
    op, target = TARGETS[name]
    return _judge(op, target, value)


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    pairs = res.get("pair")
    if pairs:
        rows = pairs["rows"]
        r_m = [(r["public_over_malloc"], r["size"]) for r in rows]
        r_s = [(r["stdlib_over_public"], r["size"]) for r in rows]
        worst_m, worst_m_size = max(r_m)
        worst_s, worst_s_size = min(r_s)
        d["public_over_malloc"] = {
            **judge("public_over_malloc", worst_m),
            "aggregate": "worst size (max)",
            "worst_size": worst_m_size,
            "geomean": math.exp(statistics.fmean(math.log(v) for v, _ in r_m)),
        }
        d["stdlib_over_public"] = {
            **judge("stdlib_over_public", worst_s),
            "aggregate": "worst size (min)",
            "worst_size": worst_s_size,
            "geomean": math.exp(statistics.fmean(math.log(v) for v, _ in r_s)),
        }
        d["public_over_core"] = {
            "value": statistics.median(r["public_over_core"] for r in rows),
            "aggregate": "median over sizes",
            "wrapper_ns_median": statistics.median(r["wrapper_ns"] for r in rows),
        }
    sc = res.get("scaling")
    if sc:
        ratios = sc["ratio_max_over_base"]["public"]
        worst_size = max(ratios, key=lambda k: ratios[k])
        j = judge("scaling_max_over_1e3", ratios[worst_size])
        if sc["max_live"] < 1_000_000:
            j["met"] = None  # the target is about 1e6 live blocks; --quick stops short of it
        d["scaling_max_over_1e3"] = {
            **j,
            "aggregate": "worst size (max), public pair",
            "worst_size": int(worst_size),
            "base_live": sc["base_live"],
            "max_live": sc["max_live"],
            "core_worst": max(sc["ratio_max_over_base"]["core"].values()),
        }
    col = res.get("collector")
    if col:
        d["collector_ratio"] = {"value": col["ratio"], "target": None, "added_ns": col["added_ns"]}
    return d


def report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"shmalloc bench_alloc{' (--quick)' if res['config']['quick'] else ''}: "
          f"{m.get('cpu_model', '?')} x{m['cpu_count']}, Python {m['python_version']}, "
          f"{m['platform']}")
    print(f"ns per allocate+free pair: median of {res['config']['trials']} trials "
          f"[min-max of trials]")
    pairs = res.get("pair")
    if pairs:
        rows = []
        for r in pairs["rows"]:
            rows.append([
                fmt_size(r["size"]),
                fmt_stat(r["public"]),
                fmt_stat(r["core"]),
                fmt_stat(r["cffi_malloc"]),
                fmt_stat(r["stdlib_shm"]),
                fmt_ns(r["wrapper_ns"]),
                f"{r['public_over_malloc']:.2f}x",
                f"{r['stdlib_over_public']:.0f}x",
            ])
        print_table(
            ["size", "public ns", "core ns", "cffi malloc ns", "stdlib SharedMemory ns",
             "wrapper ns", "public/malloc", "stdlib/public"],
            rows,
            f"Allocate+free pairs ({res['config']['ops']:,} ops/trial; stdlib "
            f"{res['config']['stdlib_ops']:,}); empty Python loop: "
            f"{pairs['empty_loop_ns']['median']:.1f} ns/iter (not subtracted)",
        )
    sc = res.get("scaling")
    if sc:
        base = {s: sc["levels"][0]["public"][str(s)]["median"] for s in sc["sizes"]}
        rows = []
        for lv in sc["levels"]:
            for s in sc["sizes"]:
                p = lv["public"][str(s)]
                rows.append([
                    f"{lv['live']:,}",
                    fmt_size(s),
                    fmt_stat(p),
                    fmt_stat(lv["core"][str(s)]),
                    f"{p['median'] / base[s]:.2f}x",
                    f"{lv['free_blocks']:,}",
                    f"{lv['fragmentation_ratio']:.2f}",
                ])
        print_table(
            ["live blocks", "size", "public ns", "core ns", f"vs {sc['base_live']:,} live",
             "free blocks", "frag"],
            rows,
            f"Scaling: pair cost with N other blocks live (16..1024 B, "
            f"{sc['free_fraction']:.0%} of them freed at random first)",
        )
    col = res.get("collector")
    if col:
        print_table(
            ["size", "without ns", "with ns", "with/without", "added ns"],
            [[fmt_size(col["size"]), fmt_stat(col["without"]), fmt_stat(col["with"]),
              f"{col['ratio']:.2f}x", fmt_ns(col["added_ns"])]],
            "Event collector: public pair with mgr.set_collector(lambda e: None) vs None",
        )
    d = res["derived"]
    print("\nDerived figures")
    if "public_over_malloc" in d:
        j = d["public_over_malloc"]
        print(f"  public pair / cffi malloc pair : {j['value']:.2f}x worst "
              f"(at {fmt_size(j['worst_size'])}), {j['geomean']:.2f}x geomean   "
              f"target <= {j['target']:g}x  {verdict(j)}")
        j = d["stdlib_over_public"]
        print(f"  stdlib SharedMemory / public   : {j['value']:.0f}x worst "
              f"(at {fmt_size(j['worst_size'])}), {j['geomean']:.0f}x geomean   "
              f"target >= {j['target']:g}x  {verdict(j)}")
        j = d["public_over_core"]
        print(f"  public pair / core pair        : {j['value']:.2f}x median "
              f"(Python wrapper adds ~{j['wrapper_ns_median']:.0f} ns/pair)")
    if "scaling_max_over_1e3" in d:
        j = d["scaling_max_over_1e3"]
        label = f"cost at {fmt_count(j['max_live'])} live / at {fmt_count(j['base_live'])} live"
        print(f"  {label:<31}: "
              f"{j['value']:.2f}x worst (at {fmt_size(j['worst_size'])}; core {j['core_worst']:.2f}x)"
              f"   target <= {j['target']:g}x (at 1e6)  {verdict(j)}")
    if "collector_ratio" in d:
        j = d["collector_ratio"]
        print(f"  with collector / without       : {j['value']:.2f}x "
              f"(+{j['added_ns']:.0f} ns/pair; no target)")


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed; `pip install matplotlib` "
              "and run again (the table and JSON were written anyway)", file=sys.stderr)
        return
    panels = [p for p in ("pair", "scaling") if res.get(p)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    ax_iter = iter(axes[0])
    if res.get("pair"):
        ax = next(ax_iter)
        rows = res["pair"]["rows"]
        sizes = [r["size"] for r in rows]
        for key, label in (("public", "shmalloc public API"), ("core", "shmalloc C core (cffi)"),
                           ("cffi_malloc", "cffi malloc+free"),
                           ("stdlib_shm", "stdlib SharedMemory")):
            med = [r[key]["median"] for r in rows]
            lo = [r[key]["median"] - r[key]["min"] for r in rows]
            hi = [r[key]["max"] - r[key]["median"] for r in rows]
            ax.errorbar(sizes, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block size (bytes)")
        ax.set_ylabel("ns per allocate+free pair")
        ax.set_title("Allocate+free pair, by size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if res.get("scaling"):
        ax = next(ax_iter)
        sc = res["scaling"]
        lives = [lv["live"] for lv in sc["levels"]]
        for s in sc["sizes"]:
            med = [lv["public"][str(s)]["median"] for lv in sc["levels"]]
            ax.plot(lives, med, marker="o", label=f"public, {fmt_size(s)}")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("other blocks live (fragmented)")
        ax.set_ylabel("ns per allocate+free pair")
        ax.set_title("Pair cost vs live blocks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = res["machine"]
    fig.suptitle(f"shmalloc bench_alloc: {m.get('cpu_model', '')} x{m['cpu_count']}, "
                 f"Python {m['python_version']}", fontsize=10)
    save_figure(plt, fig, path, dpi=110, log=progress)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.bench_alloc",
        description="Benchmark shmalloc's allocate+deallocate pair against the shmalloc C core "
        "alone, a cffi malloc+free and stdlib SharedMemory, plus scaling with live blocks and "
        "the cost of an event collector. Prints a table, writes JSON (and a PNG with --plot).",
    )
    p.add_argument("--quick", action="store_true",
                   help="few iterations, scaling only to 1e5 live blocks (a CI smoke run, ~15 s)")
    add_json_arg(p, DEFAULT_JSON)
    p.add_argument("--plot", type=Path, metavar="PATH",
                   help="also write a PNG plot here (needs matplotlib)")
    p.add_argument("--parts", default="pair,scaling,collector",
                   help="comma-separated parts to run: pair, scaling, collector (default: all)")
    p.add_argument("--trials", type=int, help="trials per measurement (default 9; quick 5)")
    p.add_argument("--ops", type=int,
                   help="operations per trial for the fast pairs (default 50000; quick 20000)")
    p.add_argument("--max-live", type=int, metavar="N",
                   help="largest live-block level for scaling (default 1e6; quick 1e5)")
    p.add_argument("--free-fraction", type=float, default=0.25,
                   help="fraction of the scaling blocks freed at random to fragment (default 0.25)")
    p.add_argument("--seed", type=int, default=12345, help="random seed for the scaling setup")
    a = p.parse_args(argv)
    bad = set(a.parts.split(",")) - {"pair", "scaling", "collector", ""}
    if bad:
        p.error(f"unknown part(s) {sorted(bad)}; choose from pair, scaling, collector")
    if not 0.0 <= a.free_fraction < 1.0:
        p.error("--free-fraction must be in [0, 1)")
    if a.trials is not None and a.trials < 1 or a.ops is not None and a.ops < 1:
        p.error("--trials and --ops must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.from_args(args)
    t_start = time.perf_counter()
    res = new_result(
        "bench_alloc",
        {
            "quick": cfg.quick, "trials": cfg.trials, "ops": cfg.ops,
            "stdlib_ops": cfg.stdlib_ops, "scaling_ops": cfg.scaling_ops,
            "live_levels": list(cfg.live_levels), "free_fraction": cfg.free_fraction,
            "seed": cfg.seed, "parts": list(cfg.parts), "unit": "ns per allocate+free pair",
            "statistic": "median of trials (min, max also given)",
        },
        {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
    )
    arenas = Arenas(progress)

    def body() -> None:
        if "pair" in cfg.parts:
            res["pair"] = bench_pairs(cfg, arenas)
        if "scaling" in cfg.parts:
            res["scaling"] = bench_scaling(cfg, arenas)
        if "collector" in cfg.parts:
            res["collector"] = bench_collector(cfg, arenas)

    if not run_interruptible(body, "all arenas destroyed, nothing written", arenas):
        return 130
    finish_result(res, t_start, derive=derive, noise=False)
    report(res)
    write_results(args.json, res)
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
