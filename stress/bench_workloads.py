"""Allocator workloads from mimalloc-bench, ported from threads to processes sharing one arena.

Each workload runs with 1, 2 and 4 worker processes (spawned once; they attach to the arena by
name, as a user's processes would), beside baselines that do the same work without a shared
heap (``LABELS``). A figure is operations per second summed over the workers: operations / (last
worker's end - first worker's start), on one monotonic clock; the workers of a run start together
at a barrier, and trials interleave the (processes, method) pairs in a rotated order.

The workloads (Larson & Krishnan, ISMM 1998; Lever & Boreham, USENIX 2000; mimalloc's mstress;
Berger's Hoard cache-scratch):

  larson        server-like. Each worker owns an array of C live blocks (8..1000 B) and, C*5
                times a round, frees a random one and allocates one of random size, writing two
                bytes into it. The arrays live in a block of the arena; after every round worker
                w takes over the array worker w+1 used, so the blocks it frees first were
                allocated by another process (larson's "bleeding"); the first round frees blocks
                the parent allocated. One op = one free + one allocation.
  xmalloc-test  producers allocate 64 B objects (writing them), put their addresses in a batch
                block and pass the batch through a multiprocessing.Queue; consumers free every
                object and the batch. 1 process produces and consumes its own batches; P: P/2
                producers, P/2 consumers. One op = one object freed.
  mstress       many live blocks of mixed power-of-two sizes (8..512 B, 1 % x100, 0.1 % x1000,
                0.01 % x10000), rounds freeing a random half and reallocating; after each round
                every worker hands 5 % of its blocks to its neighbour through a table in the
                arena, so blocks are freed by a process that did not allocate them.
  cache-scratch each worker frees a small object the parent allocated for it, then repeatedly
                allocates an 8-byte object, writes into it many times, and frees it: two
                processes' objects in one cache line would contend (passive false sharing).

Target: larson with 2 processes >= 1.7x larson with 1 process.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from array import array
from typing import Any

from shmalloc import MemoryManager

from . import _common as bench
from ._common import Arenas, GiB, progress

clock = time.perf_counter
TARGET_LARSON = (">=", 1.7)
TARGETS = {"larson_2p_over_1p": TARGET_LARSON}
LABELS = {
    "shmalloc": "shmalloc public API, one shared arena",
    "malloc_private": "cffi malloc/free, private heap per process (no cross-process frees)",
    "bytearray_private": "Python bytearray, private per process (no cross-process frees)",
    "bytearray_pickled": "Python bytearray, batches pickled through the Queue (copies)",
    "forced_sharing": "calibration: all processes write into one 64 B line of the arena",
}
PRIVATE = ("shmalloc", "malloc_private", "bytearray_private")
METHODS = {"larson": PRIVATE, "xmalloc-test": ("shmalloc", "bytearray_pickled"), "mstress": PRIVATE}
METHODS["cache-scratch"] = ("shmalloc", "bytearray_private", "forced_sharing")
WORKLOADS = tuple(METHODS)
UNITS = {"larson": "free+allocate pairs/s", "xmalloc-test": "objects freed/s"}
UNITS.update({"mstress": "free+allocate pairs/s", "cache-scratch": "one-byte writes/s"})
Ctx, Pool, Out = bench.WorkerCtx, bench.WorkerPool, dict[str, Any]
SCALE_KEYS = ("larson_chunks", "larson_rounds", "larson_ops", "xm_batches", "xm_batch", "ms_live")
SCALE_KEYS += ("ms_rounds", "cs_iterations", "cs_writes")
SIZES = {"quick": (500, 4, 2500, 40, 128, 2000, 4, 10, 10_000)}  # by SCALE_KEYS
SIZES["full"] = (2000, 6, 10_000, 200, 256, 10_000, 8, 20, 50_000)
XM_SIZE = 64
STAMP = b"mstress!"
EXTRAS = {  # workload: what its shmalloc runs report beside the rates (key, format, meaning)
    "larson": ("remote_free_fraction", "{:.0%}", "share of frees of another process's block"),
    "mstress": ("migrated_blocks", "{:,.0f}", "blocks migrated between processes per run"),
    "cache-scratch": ("shared_line_objects", "{:.0f}", "objects in a 64 B line with another's"),
}


# =========================================================================== worker functions
# Module-level, so that the pool can send them to its spawn workers. Each returns at least ops,
# t0, t1 (perf_counter seconds). Scripts (sizes, victims) are drawn before the start barrier, so
# that the random generator is not timed; every method of a trial gets the same script.
def larson(ctx: Ctx, method: str, chunks: int, rounds: int, ops: int, seed: int, **shm: Any) -> Out:
    """Larson's rounds; with shmalloc the arrays sit in the arena's block ``shm["table"]`` and
    change hands every round, otherwise each worker keeps its own (made from ``seed`` alike)."""
    nw, me, ab, views = ctx.nworkers, ctx.index, b"ab", []
    rng = random.Random(seed * 1_000_003 + me)
    script = [
        ([rng.randrange(chunks) for _ in range(ops)], [rng.randint(8, 1000) for _ in range(ops)])
        for _ in range(rounds)
    ]
    if method == "shmalloc":
        mgr = ctx.attach(shm["arena"])
        views.append(mgr.view(shm["table"], nw * chunks * 8))
        views.append(q := views[0].cast("Q"))
        segs = [q[i * chunks : (i + 1) * chunks] for i in range(nw)]
        views += segs
        a, d, w, k = mgr.allocate, mgr.deallocate, mgr.write, 0  # k: write's offset
    else:
        ffi, c = bench.libc()
        a, d, w, k = c.malloc, c.free, ffi.memmove, 2  # k: memmove's length
        make = a if method == "malloc_private" else bytearray
        rng = random.Random(seed)
        segs = [[make(rng.randint(8, 1000)) for _ in range(chunks)]] * nw  # one array: its own
    try:
        with bench.untraced():
            ctx.wait()
            t0 = clock()
            for r, (victims, sizes) in enumerate(script):
                if r:
                    ctx.wait()  # everyone finished round r-1: arrays change hands
                seg = segs[(me + r) % nw]
                if method == "bytearray_private":
                    for v, s in zip(victims, sizes, strict=True):
                        seg[v] = p = bytearray(s)  # the old object is freed here
                        p[0:2] = ab
                    continue
                for v, s in zip(victims, sizes, strict=True):
                    d(seg[v])
                    seg[v] = p = a(s)
                    w(p, ab, k)
            t1 = clock()
    finally:
        for v in reversed(views):
            v.release()
    if method == "malloc_private":
        for p in segs[0]:
            d(p)
    # the first free of a slot in a round frees a block its previous holder allocated: the
    # parent in round 0, another worker afterwards when there is more than one
    remote = sum(len(set(v)) for r, (v, _) in enumerate(script) if r == 0 or nw > 1)
    return {"ops": rounds * ops, "t0": t0, "t1": t1, "remote_frees": remote * bool(views)}


def xmalloc(ctx: Ctx, *, method: str, batches: int, batch: int, arena: str = "") -> Out:
    """Producers make batches of objects, consumers free them (1 worker: both, in turn)."""
    pat = bytes(i & 255 for i in range(XM_SIZE))
    nbytes, r, queue = batch * 8, range(batch), ctx.queue
    made = freed = 0
    if method == "shmalloc":
        mgr = ctx.attach(arena)
        a, d, w, rd = mgr.allocate, mgr.deallocate, mgr.write, mgr.read

        def make() -> Any:
            objs = array("Q")
            for _ in r:
                p = a(XM_SIZE)
                w(p, pat)
                objs.append(p)
            b = a(nbytes)
            w(b, objs)
            return b

        def consume(b: Any) -> int:
            for p in array("Q", rd(b, nbytes)):
                d(p)
            d(b)
            return batch
    else:
        consume = len  # a batch arrives as a copy: its objects go when it does

        def make() -> Any:
            return [bytearray(pat) for _ in r]

    with bench.untraced():
        ctx.wait()
        t0 = clock()
        if ctx.nworkers == 1:  # both roles, in turn
            for _ in range(batches):
                freed += consume(make())
            made = freed
        elif ctx.index % 2 == 0:  # a producer
            try:
                for _ in range(batches):
                    queue.put(make(), timeout=60)
                    made += batch
            finally:
                queue.put(None, timeout=60)
        else:  # free whatever arrives until a producer says it is done
            while (b := queue.get(timeout=60)) is not None:
                freed += consume(b)
        t1 = clock()
    return {"ops": freed, "allocated": made, "t0": t0, "t1": t1}


def mstress_size(rng: random.Random, max_shift: int = 7) -> int:
    """mstress's sizes: 8 << k bytes (k < max_shift), 1 % of them x100, a tenth of those x1000
    instead, a hundredth x10000."""
    words = 1 << rng.randrange(max_shift)
    r = rng.random()
    if r < 0.01:
        words *= 10_000 if r < 0.0001 else 1_000 if r < 0.001 else 100
    return words * 8


def mstress(ctx: Ctx, method: str, live: int, rounds: int, seed: int, **shm: Any) -> Out:
    """mstress's rounds; with shmalloc, blocks migrate through the table ``shm["transfer"]``."""
    nfree, nmig, nw, me = live // 2, max(1, live // 20), ctx.nworkers, ctx.index
    rng = random.Random(seed * 1_000_003 + me)
    init = [mstress_size(rng) for _ in range(live)]
    script: list[tuple[list[int], ...]] = []  # per round: victims, their new sizes, migrants
    for _ in range(rounds):
        victims, sizes = rng.sample(range(live), nfree), [mstress_size(rng) for _ in range(nfree)]
        script.append((victims, sizes, rng.sample(range(live), nmig)))
    shared, private = method == "shmalloc", method == "bytearray_private"
    if shared:
        mgr = ctx.attach(shm["arena"])
        a, d, w, k = mgr.allocate, mgr.deallocate, mgr.write, 0  # k: write's offset
        view = mgr.view(shm["transfer"], nw * nmig * 8)
        q = view.cast("Q")
    else:
        ffi, c = bench.libc()
        a, d, w, k = c.malloc, c.free, ffi.memmove, 8  # k: memmove's length
    blocks = [bytearray(s) for s in init] if private else [a(s) for s in init]
    for p in [] if private else blocks:
        w(p, STAMP, k)
    ops = migrated = 0
    with bench.untraced():
        ctx.wait()
        t0 = clock()
        for victims, sizes, migrate in script:
            if private:
                for i, s in zip(victims, sizes, strict=True):
                    blocks[i] = p = bytearray(s)
                    p[0:8] = STAMP
            else:
                for i, s in zip(victims, sizes, strict=True):
                    d(blocks[i])
                    blocks[i] = p = a(s)
                    w(p, STAMP, k)
            ops += len(victims)
            if shared:  # publish some blocks, then take the neighbour's
                for j, i in enumerate(migrate):
                    q[me * nmig + j] = blocks[i]
            ctx.wait()
            if shared:
                for j, i in enumerate(migrate):
                    blocks[i] = q[((me + 1) % nw) * nmig + j]
                migrated += nmig
            ctx.wait()  # every worker has taken its neighbour's: the table may be reused
        t1 = clock()
    if shared:
        q.release()
        view.release()
    for p in [] if private else blocks:  # untimed: free what this worker holds now
        d(p)
    return {"ops": ops, "t0": t0, "t1": t1, "migrated": migrated if nw > 1 else 0}


def scratch(ctx: Ctx, method: str, iterations: int, writes: int, **shm: Any) -> Out:
    """Cache-scratch; ``shm["at"]`` is the table of the parent's objects (shmalloc) or the one
    shared line (forced_sharing)."""
    r, me, at = range(writes), ctx.index, shm.get("at", 0)
    mgr = ctx.attach(shm["arena"]) if shm else None
    addrs = []
    with bench.untraced():
        ctx.wait()
        t0 = clock()
        if method == "shmalloc":
            assert mgr is not None
            a, d, view = mgr.allocate, mgr.deallocate, mgr.view
            d(array("Q", mgr.read(at, 8, 8 * me))[0])  # the parent's object for this worker
            for _ in range(iterations):
                p = a(8)
                ta = clock()
                v = view(p)
                for j in r:
                    v[j & 7] = j & 255
                v.release()
                addrs.append((p, ta, clock()))
                d(p)
        elif mgr is None:
            for _ in range(iterations):
                v = memoryview(bytearray(8))
                for j in r:
                    v[j & 7] = j & 255
                v.release()
        else:  # forced sharing: byte `me` of the one shared line
            for _ in range(iterations):
                v = mgr.view(at, 64)
                for j in r:
                    v[me] = j & 255
                v.release()
        t1 = clock()
    return {"ops": iterations * writes, "t0": t0, "t1": t1, "addresses": addrs}


# =========================================================================== parent side
def shared_lines(res: list[dict[str, Any]], size: int = 8) -> int:
    """How many objects (one per worker and iteration) lay in a 64-byte cache line that another
    worker's object occupied while both were being written: 0 means the allocator never set up
    passive false sharing (offsets from the segment start, which is page-aligned)."""
    addrs = [(w, p, ta, tf) for w, r in enumerate(res) for p, ta, tf in r["addresses"]]
    objs = [(w, p // 64, (p + size - 1) // 64, ta, tf) for w, p, ta, tf in addrs]  # lines, times
    n = 0
    for w, lo, hi, ta, tf in objs:  # another worker's object, in a common line at the same time
        n += any(v != w and a <= hi and lo <= b and s < tf and ta < e for v, a, b, s, e in objs)
    return n


def run_once(
    name: str, method: str, k: int, seed: int, c: dict[str, int], pool: Pool, mgr: MemoryManager
) -> tuple[list[Out], Out]:
    """One (workload, method, processes) run: the parent's setup, the workers, its teardown
    (only after a success: after a failure the workers may still use the blocks, and the
    whole arena is destroyed instead). Returns the workers' results and the run's extras."""
    shm = method == "shmalloc"
    if name == "larson":
        kw = dict(chunks=c["larson_chunks"], rounds=c["larson_rounds"], ops=c["larson_ops"])
        kw["seed"] = seed
        if not shm:
            return pool.run(larson, k, method=method, **kw), {"remote_free_fraction": 0}
        rng = random.Random(seed)
        sizes = [rng.randint(8, 1000) for _ in range(k * c["larson_chunks"])]
        blocks = array("Q", map(mgr.allocate, sizes))
        table = mgr.allocate(len(blocks) * 8)
        mgr.write(table, blocks)
        res = pool.run(larson, k, method=method, arena=mgr.name, table=table, **kw)
        for p in array("Q", mgr.read(table, len(blocks) * 8)):
            mgr.deallocate(p)
        mgr.deallocate(table)
        frees = sum(r["ops"] for r in res)
        return res, {"remote_free_fraction": sum(r["remote_frees"] for r in res) / frees}
    if name == "xmalloc-test":
        kw = dict(batches=c["xm_batches"], batch=c["xm_batch"], arena=mgr.name)
        res = pool.run(xmalloc, k, method=method, **kw)
        made, freed = sum(r["allocated"] for r in res), sum(r["ops"] for r in res)
        if made != freed:
            raise RuntimeError(f"xmalloc-test/{method}/{k}: {made} objects made, {freed} freed")
        return res, {"producers": max(1, k // 2), "consumers": max(1, k // 2)}
    if name == "mstress":
        kw = dict(live=c["ms_live"], rounds=c["ms_rounds"], seed=seed)
        if not shm:
            return pool.run(mstress, k, method=method, **kw), {"migrated_blocks": 0}
        transfer = mgr.allocate(k * max(1, c["ms_live"] // 20) * 8)
        res = pool.run(mstress, k, method=method, arena=mgr.name, transfer=transfer, **kw)
        mgr.deallocate(transfer)
        return res, {"migrated_blocks": sum(r["migrated"] for r in res)}
    kw = dict(iterations=c["cs_iterations"], writes=c["cs_writes"])
    if method == "bytearray_private":
        return pool.run(scratch, k, method=method, **kw), {}
    if method == "forced_sharing":
        line = mgr.allocate(64, align=64)
        res = pool.run(scratch, k, method=method, arena=mgr.name, at=line, **kw)
        mgr.deallocate(line)
        return res, {}
    objs = array("Q", (mgr.allocate(8) for _ in range(k)))  # consecutive: the worst case
    table = mgr.allocate(max(16, 8 * k))
    mgr.write(table, objs)
    res = pool.run(scratch, k, method=method, arena=mgr.name, at=table, **kw)
    mgr.deallocate(table)
    return res, {"shared_line_objects": shared_lines(res), "object_size": 8}


def run_workload(name: str, c: dict[str, Any], procs: list[int], pool: Pool, arenas: Arenas) -> Out:
    mgr = arenas.new(2 * GiB)  # reserved lazily: only what the workloads touch costs memory
    methods = METHODS[name]
    procs = [k for k in procs if name != "xmalloc-test" or k == 1 or k % 2 == 0]
    runs: dict[tuple[str, int], list[Any]] = {(m, k): [] for m in methods for k in procs}
    used0 = mgr.stats().used
    for t in range(c["trials"]):
        progress(f"{name}: trial {t + 1}/{c['trials']}")
        for k in procs:
            for m in bench.rotated(methods, t + k):
                res, extra = run_once(name, m, k, c["seed"] + t, c, pool, mgr)
                bench.assert_balanced(mgr, used0, f"{name}/{m}/{k}")
                runs[m, k].append((*bench.throughput(res), extra))
    report = mgr.check()
    pool.detach(mgr.name)
    arenas.drop(mgr)
    out: dict[str, Any] = {"unit": UNITS[name], "procs": procs, "methods": {}}
    out["arena_check"] = {"blocks": report.blocks, "used": report.used}
    for m in methods:
        by = {}
        for k in procs:
            rates, walls, extras = zip(*runs[m, k], strict=True)
            means = {key: statistics.fmean(e[key] for e in extras) for key in extras[0]}
            by[str(k)] = bench.summarize(rates, wall_seconds=statistics.median(walls), **means)
        scaling = {f"{k}_over_1": by[str(k)]["median"] / by["1"]["median"] for k in procs[1:]}
        out["methods"][m] = {"label": LABELS[m], "by_procs": by, "scaling": scaling}
    return out


def derive(res: dict[str, Any]) -> dict[str, Any]:
    lar = res["workloads"].get("larson")
    if not lar or "2_over_1" not in lar["methods"]["shmalloc"]["scaling"]:
        return {}
    j = bench.judge(*TARGET_LARSON, lar["methods"]["shmalloc"]["scaling"]["2_over_1"])
    others = {m: v for m, v in lar["methods"].items() if m != "shmalloc"}
    j["baselines"] = {m: v["scaling"].get("2_over_1") for m, v in others.items()}
    base = j["baselines"].get("malloc_private")
    # what the machine gave: the same loop on private heaps is the ceiling shmalloc can reach
    j["share_of_private_malloc_scaling"] = j["value"] / base if base else None
    return {"larson_2p_over_1p": j}


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    j = res["derived"].get("larson_2p_over_1p")
    if not j:
        return []
    base = j["baselines"].get("malloc_private")
    ceiling = "the same loop on private cffi malloc heaps scaled {:.2f}x in this run"
    note = ceiling.format(base) if base else ""
    return [bench.target_row("larson: 2 processes / 1 process", j, "x", note)]


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    trials = res["config"]["trials"]
    print(f"operations per second summed over processes: median of {trials} trials [min-max]")
    for name, w in res["workloads"].items():
        procs, sh = w["procs"], w["methods"]["shmalloc"]["by_procs"]
        by = {m: v["by_procs"] for m, v in w["methods"].items()}
        bench.procs_table(f"{name} ({w['unit']})", procs, by)
        if name in EXTRAS:
            key, fmt, label = EXTRAS[name]
            got = ", ".join(f"{k}p {fmt.format(sh[str(k)][key])}" for k in procs)
            print(f"  {label} (shmalloc): {got}")
    print("\nbaselines: " + "; ".join(f"{k} = {v}" for k, v in LABELS.items()))
    bench.print_targets(res)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "small runs, 3 trials (a CI smoke run)")
    which = f"comma-separated subset of {','.join(WORKLOADS)} (default: all)"
    p.add_argument("--workloads", type=bench.csv(WORKLOADS), default=list(WORKLOADS), help=which)
    procs = "comma-separated process counts (default 1,2,4; 1 is always added)"
    p.add_argument("--procs", type=bench.csv(range(1, 65), int), default=[1, 2, 4], help=procs)
    p.scaled("--trials", 3, 5, "trials per figure")
    p.add_argument("--seed", type=int, default=4141, help="random seed (larson's default)")
    a = p.parse(argv)
    a.procs = sorted({1, *a.procs})
    c = dict(zip(SCALE_KEYS, SIZES["quick" if a.quick else "full"], strict=True))
    c.update(seed=a.seed, trials=a.trials)

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        progress(f"starting {max(a.procs)} worker processes")
        with bench.WorkerPool(max(a.procs)) as pool:
            res["workloads"] = {w: run_workload(w, c, a.procs, pool, arenas) for w in a.workloads}

    config = {**c, "procs": a.procs, "workloads": a.workloads, "units": UNITS, "labels": LABELS}
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
