"""Scaling curves: cost per operation against live blocks, and throughput against processes.

live   ns per allocate+free pair (public API and C core, bench_alloc's loops; 64 B to 256 KiB)
       with 1e3 .. 1e6 other blocks live (16..1024 B, a quarter freed at random first to
       fragment the heap). Every level's arena is populated first and all levels are timed in
       the same interleaved trials. Target: cost at 1e6 live within 1.2x of 1e3 (judged only
       when the run reaches 1e6; --quick stops at 1e5).
procs  throughput of a loop (allocate 256 B, write 64 B into it, free it) in 1, 2 and 4
       processes on one shared arena, beside the same loop on a private cffi malloc heap per
       process: summed operations per second; no target of its own (see bench_workloads).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from shmalloc import MemoryManager
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import GiB, KiB, MiB, progress
from .bench_alloc import core_pair, public_pair

SIZES = [64, 1 * KiB, 16 * KiB, 256 * KiB]
FREE_FRACTION = 0.25
LOOP_SIZE, LOOP_WRITE = 256, 64
METHODS = {"shmalloc": "shmalloc public API, one shared arena"}
METHODS["malloc_private"] = "cffi malloc/free + memmove, private heap per process"
KINDS = ("public", "core")  # the pair through the Python API, and through the C core
TARGETS = {"scaling_max_over_1e3": ("<=", 1.2)}


def populate(mgr: MemoryManager, live: int, rng: random.Random) -> dict[str, Any]:
    """Allocate live/(1-f) blocks of 16..1024 bytes, then free the fraction f of them at random."""
    total = round(live / (1.0 - FREE_FRACTION))
    t0 = time.perf_counter()
    addrs = [mgr.allocate(rng.randint(16, 1024)) for _ in range(total)]
    for i in rng.sample(range(total), total - live):
        mgr.deallocate(addrs[i])
    st = mgr.stats()
    if st.allocated_blocks != live:
        raise RuntimeError(f"{live} live blocks expected, the arena says {st.allocated_blocks}")
    out = dict(live=live, allocated=total, setup_seconds=time.perf_counter() - t0)
    out.update(used_bytes=st.used, free_blocks=st.free_blocks)
    return {**out, "fragmentation_ratio": st.fragmentation_ratio()}


def loop(ctx: bench.WorkerCtx, *, n: int, arena: str = "") -> dict[str, Any]:
    """n times: allocate, write, free; in ``arena``, or on a private malloc heap without one."""
    if arena:
        mgr = ctx.attach(arena)
        a, d, w, k = mgr.allocate, mgr.deallocate, mgr.write, 0  # k: write's offset
    else:
        ffi, c = bench.libc()
        a, d, w, k = c.malloc, c.free, ffi.memmove, LOOP_WRITE  # k: memmove's length
    data, r = bytes(range(LOOP_WRITE)), range(n)
    ctx.wait()
    t0 = time.perf_counter()
    for _ in r:
        p = a(LOOP_SIZE)
        w(p, data, k)
        d(p)
    return {"ops": n, "t0": t0, "t1": time.perf_counter()}


def part_live(a: Any, arenas: bench.Arenas) -> dict[str, Any]:
    rng = random.Random(a.seed)
    levels, mgrs, runners = [], [], {}
    for live in a.live_levels:
        # 1e6 blocks of <= 1 KiB need ~0.8 GiB; capacity is reserved lazily, so be generous
        mgr = arenas.new(max(256 * MiB, min(1 << 40, live * 4 * KiB)))
        mgrs.append(mgr)
        progress(f"live: populating {live:,} live blocks")
        levels.append(populate(mgr, live, rng))
        for size in SIZES:
            runners[f"{live}/public/{size}"] = public_pair(mgr, size)
            runners[f"{live}/core/{size}"] = core_pair(mgr, size)
    progress(f"live: timing {len(runners)} pair loops, all levels interleaved")
    res = bench.measure(runners, a.live_ops, a.trials)
    for info, mgr in zip(levels, mgrs, strict=True):
        live = info["live"]
        bench.assert_balanced(mgr, info["used_bytes"], f"scaling {live}")
        for kind in KINDS:
            info[kind] = {str(s): res[f"{live}/{kind}/{s}"] for s in SIZES}
        arenas.drop(mgr)
    base, top = levels[0], levels[-1]
    out = dict(sizes=SIZES, free_fraction=FREE_FRACTION, block_sizes=[16, 1024], levels=levels)
    out.update(base_live=base["live"], max_live=top["live"])
    ratio = {k: {s: top[k][s]["median"] / base[k][s]["median"] for s in top[k]} for k in KINDS}
    return {**out, "ratio_max_over_base": ratio}


def part_procs(a: Any, arenas: bench.Arenas) -> dict[str, Any]:
    mgr = arenas.new(1 * GiB)
    rates: dict[str, dict[int, list[float]]] = {m: {k: [] for k in a.procs} for m in METHODS}
    progress(f"procs: starting {max(a.procs)} worker processes")
    with bench.WorkerPool(max(a.procs)) as pool:
        used0 = mgr.stats().used
        for t in range(a.trials):
            progress(f"procs: trial {t + 1}/{a.trials}")
            for k in a.procs:
                for m in bench.rotated(list(METHODS), t + k):
                    arena = mgr.name if m == "shmalloc" else ""
                    res = pool.run(loop, k, n=a.loop_ops, arena=arena)
                    rates[m][k].append(bench.throughput(res)[0])
        bench.assert_balanced(mgr, used0, "procs")
        pool.detach(mgr.name)
    out = dict(procs=list(a.procs), size=LOOP_SIZE, write=LOOP_WRITE, ops_per_process=a.loop_ops)
    out["unit"] = "allocate+write+free loops/s"
    by = {m: {str(k): bench.summarize(rates[m][k]) for k in a.procs} for m in METHODS}
    speedup = {m: {k: v["median"] / by[m]["1"]["median"] for k, v in by[m].items()} for m in by}
    methods = {m: {"label": METHODS[m], "by_procs": by[m], "speedup": speedup[m]} for m in by}
    return {**out, "methods": methods}


PARTS = {"live": part_live, "procs": part_procs}


def derive(res: dict[str, Any]) -> dict[str, Any]:
    """The live-blocks target; procs has none (its speed-ups are in res["procs"])."""
    sc = res.get("live")
    if not sc:
        return {}
    ratios = sc["ratio_max_over_base"]["public"]
    worst = max(ratios, key=lambda k: ratios[k])
    j = bench.judge(*TARGETS["scaling_max_over_1e3"], ratios[worst])
    if sc["max_live"] < 1_000_000:
        j["met"] = None  # the target is about 1e6 live blocks; --quick stops short of it
    lv, core = sc["levels"], sc["ratio_max_over_base"]["core"]
    j.update(aggregate="worst size (max), public pair", worst_size=int(worst))
    j.update(base_live=sc["base_live"], max_live=sc["max_live"], core_worst=max(core.values()))
    # the same ratio over each level's fastest trial: less sensitive to a busy machine
    fastest = (lv[-1]["public"][s]["min"] / lv[0]["public"][s]["min"] for s in lv[0]["public"])
    return {"scaling_max_over_1e3": {**j, "min_ratio_worst": max(fastest)}}


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    j = res["derived"].get("scaling_max_over_1e3")
    if not j:
        return []
    note = f"worst size {format_bytes(j['worst_size'])}; C core {j['core_worst']:.2f}x; "
    note += f"fastest trials {j['min_ratio_worst']:.2f}x; levels timed interleaved"
    if j["met"] is None:
        note += " (not judged: the target is at 1e6 live)"
    levels = f"{j['max_live']:,} live / at {j['base_live']:,}"
    return [bench.target_row(f"pair cost at {levels} live", j, "x", note)]


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    sc, pr = res.get("live"), res.get("procs")
    if sc:
        base = {s: sc["levels"][0]["public"][str(s)]["median"] for s in SIZES}
        lvs, stat, fmt = sc["levels"], bench.fmt_stat, format_bytes
        rows = [(lv, s, lv["public"][str(s)], lv["core"][str(s)]) for lv in lvs for s in SIZES]
        cols = [("live blocks", lambda r: f"{r[0]['live']:,}"), ("size", lambda r: fmt(r[1]))]
        cols += [("public ns", lambda r: stat(r[2])), ("core ns", lambda r: stat(r[3]))]
        cols += [(f"vs {sc['base_live']:,} live", lambda r: f"{r[2]['median'] / base[r[1]]:.2f}x")]
        cols += [("frag", lambda r: f"{r[0]['fragmentation_ratio']:.2f}")]
        title = "ns per allocate+free pair with N other blocks live (median [min-max])"
        bench.print_columns(title, cols, rows)
    if pr:
        loop = f"allocate {LOOP_SIZE} B + write {LOOP_WRITE} B + free"
        by = {m: v["by_procs"] for m, v in pr["methods"].items()}
        bench.procs_table(f"Throughput of {loop}, summed over processes (loops/s)", pr["procs"], by)
        print("  " + "; ".join(f"{k} = {v}" for k, v in METHODS.items()))
    bench.print_targets(res)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "1e3..1e5 live blocks, short loops, 3 trials")
    p.add_argument("--parts", type=bench.csv(PARTS), default=list(PARTS), help="live and/or procs")
    p.scaled("--trials", 3, 7, "trials per figure")
    p.scaled("--max-live", 100_000, 1_000_000, "largest live-block level")
    procs = "process counts (default 1,2,4; 1 is always added)"
    p.add_argument("--procs", type=bench.csv(range(1, 65), int), default=[1, 2, 4], help=procs)
    p.add_argument("--seed", type=int, default=12345)
    a = p.parse(argv)
    a.procs = sorted({1, *a.procs})
    levels = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
    a.live_levels = [n for n in levels if n <= a.max_live] or [1_000]
    a.live_ops = 10_000 if a.quick else 30_000
    a.loop_ops = 20_000 if a.quick else 100_000

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        for part in a.parts:
            res[part] = PARTS[part](a, arenas)

    keys = ("parts", "trials", "live_levels", "live_ops", "procs", "loop_ops", "seed")
    return bench.run_bench(sys.modules[__name__], a, {k: getattr(a, k) for k in keys}, body)


if __name__ == "__main__":
    sys.exit(main())
