"""Allocator workloads from mimalloc-bench, ported from threads to processes sharing one arena.

    python -m stress.bench_workloads [--quick] [--json PATH] [--plot PATH] [--workloads LIST]

Each workload runs with 1, 2 and 4 worker processes (long-lived spawn workers that attach to the
arena by name, as a user's processes would), side by side with baselines that do the same work
without a shared heap. A figure is operations per second summed over the workers: total
operations / (last worker's end - first worker's start), timed with one monotonic clock that
every process shares; each run's workers start together at a barrier. Trials are interleaved:
trial t runs every (processes, method) pair once, in a rotated method order, and the table
shows the median with [min-max] of the trials.

The workloads, written from their published descriptions (Larson & Krishnan, ISMM 1998; Lever &
Boreham, USENIX 2000; mimalloc's mstress; Berger's Hoard cache-scratch):

  larson        server-like. Each worker owns an array of C live blocks (8..1000 B) and, C*5 times
                a round, frees a random one and allocates a new one of random size, writing two
                bytes into it. Arrays of addresses live in a block of the arena; after every round
                (a barrier) worker w takes over the array worker w+1 used, so the blocks it frees
                first were allocated by another process (larson's "bleeding"). The first round
                frees blocks the parent allocated. One op = one free + one allocation.
  xmalloc-test  producers allocate, consumers free. Producers allocate 64 B objects (writing
                them), put the addresses in a batch block allocated from the arena and pass the
                batch's address through a multiprocessing.Queue; consumers free every object and
                the batch. With 1 process, the worker produces a batch and consumes it itself.
                With P processes: P/2 producers and P/2 consumers. One op = one object freed.
  mstress       many live blocks of mixed power-of-two sizes (8..512 B, 1 % of them x100, 0.1 %
                x1000, 0.01 % x10000), rounds of freeing a random half and reallocating; after each
                round every worker hands 5 % of its live blocks to its neighbour through an address
                table in the arena (two barriers), so blocks migrate between processes and are
                freed by a process that did not allocate them. One op = one free + one allocation.
  cache-scratch each worker frees a small object the parent allocated for it, then repeatedly
                allocates an 8-byte object, writes into it many times through a view, and frees
                it. If the allocator put two processes' objects in one cache line, the writes
                would contend (passive false sharing). One op = one one-byte write.

Baselines, labelled for what they are:
  malloc_private     cffi ``malloc``/``free`` in each process, on its own private heap: the same
                     loop, the same barriers, but no block ever crosses a process (it cannot)
  bytearray_private  plain Python ``bytearray`` objects in each process, likewise private
  bytearray_pickled  (xmalloc-test) producers make bytearray objects and pickle each batch
                     through the same Queue: the consumer frees copies, nothing is shared
  forced_sharing     (cache-scratch) a calibration, not an allocator: every process writes into
                     its own byte of ONE 64-byte cache line of the arena, to show what false
                     sharing would cost on this machine

The target (issue 7): larson with 2 processes >= 1.7x larson with 1 process (on 2 cores).
It is reported, never asserted; the exit code is 0 whether or not it is met. Every arena is
destroyed and every worker joined on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cffi

from shmalloc import MemoryManager

from ._common import (
    Arenas,
    GiB,
    RESULTS_DIR,
    WorkerCtx,
    WorkerPool,
    add_json_arg,
    drain_queue,
    finish_result,
    fmt_rate_stat,
    judge,
    load_pyplot,
    make_progress,
    new_result,
    noise_note,
    print_table,
    rotated,
    run_interruptible,
    save_figure,
    summarize_rates,
    target_row,
    verdict,
    write_results,
)

progress = make_progress("bench_workloads")
perf_counter = time.perf_counter

DEFAULT_JSON = RESULTS_DIR / "bench_workloads.json"
WORKLOADS = ("larson", "xmalloc-test", "mstress", "cache-scratch")
PROCS = (1, 2, 4)
TARGET_LARSON = (">=", 1.7)
ARENA_CAPACITY = 2 * GiB  # reserved lazily: only what the workloads touch costs memory

LABELS = {
    "shmalloc": "shmalloc public API, one shared arena",
    "malloc_private": "cffi malloc/free, private heap per process (no cross-process frees)",
    "bytearray_private": "Python bytearray, private per process (no cross-process frees)",
    "bytearray_pickled": "Python bytearray, batches pickled through the Queue (copies)",
    "forced_sharing": "calibration: all processes write into one 64 B line of the arena",
}
METHODS = {
    "larson": ("shmalloc", "malloc_private", "bytearray_private"),
    "xmalloc-test": ("shmalloc", "bytearray_pickled"),
    "mstress": ("shmalloc", "malloc_private", "bytearray_private"),
    "cache-scratch": ("shmalloc", "bytearray_private", "forced_sharing"),
}
UNITS = {
    "larson": "free+allocate pairs/s",
    "xmalloc-test": "objects freed/s",
    "mstress": "free+allocate pairs/s",
    "cache-scratch": "one-byte writes/s",
}

_ffi = cffi.FFI()
_ffi.cdef("void *malloc(size_t); void free(void *);")
_libc = _ffi.dlopen(None)


@dataclass(frozen=True)
class Config:
    quick: bool
    trials: int
    procs: tuple[int, ...]
    workloads: tuple[str, ...]
    seed: int
    # larson
    larson_chunks: int
    larson_rounds: int
    larson_ops_per_round: int
    # xmalloc-test
    xm_batches: int
    xm_batch: int
    xm_size: int
    # mstress
    ms_live: int
    ms_rounds: int
    # cache-scratch
    cs_iterations: int
    cs_writes: int

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Config:
        if a.quick:
            c: dict[str, Any] = {
                "trials": 3, "larson_chunks": 500, "larson_rounds": 4, "larson_ops_per_round": 2500,
                "xm_batches": 40, "xm_batch": 128, "ms_live": 2000, "ms_rounds": 4,
                "cs_iterations": 10, "cs_writes": 10_000,
            }
        else:
            c = {
                "trials": 5, "larson_chunks": 2000, "larson_rounds": 6,
                "larson_ops_per_round": 10_000, "xm_batches": 200, "xm_batch": 256,
                "ms_live": 10_000, "ms_rounds": 8, "cs_iterations": 20, "cs_writes": 50_000,
            }
        if a.trials is not None:
            c["trials"] = a.trials
        return cls(quick=a.quick, procs=a.procs, workloads=a.workloads, seed=a.seed, xm_size=64,
                   **c)


# =========================================================================== worker functions
# Module-level, so that the pool can send them to its spawn workers. Each returns a dict with
# at least ops, t0, t1 (perf_counter seconds). Scripts (sizes, victims) are drawn before the
# start barrier so that the random generator is not timed; every method of a trial gets the
# same script (same seed).


def _gc_off() -> bool:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    return was


def _larson_script(seed: int, index: int, rounds: int, ops: int, chunks: int,
                   lo: int, hi: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed * 1_000_003 + index)
    return [([rng.randrange(chunks) for _ in range(ops)], [rng.randint(lo, hi) for _ in range(ops)])
            for _ in range(rounds)]


def larson_shm(ctx: WorkerCtx, *, arena: str, table: int, chunks: int, rounds: int, ops: int,
               seed: int, lo: int, hi: int) -> dict[str, Any]:
    mgr = ctx.attach(arena)
    script = _larson_script(seed, ctx.index, rounds, ops, chunks, lo, hi)
    nw, me = ctx.nworkers, ctx.index
    view = mgr.view(table, nw * chunks * 8)
    q = view.cast("Q")
    segs = [q[i * chunks:(i + 1) * chunks] for i in range(nw)]
    a, d, w = mgr.allocate, mgr.deallocate, mgr.write
    ab = b"ab"
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for r, (victims, sizes) in enumerate(script):
            if r:
                ctx.wait()  # everyone finished round r-1: arrays change hands
            seg = segs[(me + r) % nw]
            for v, s in zip(victims, sizes):
                d(seg[v])
                p = a(s)
                seg[v] = p
                w(p, ab)
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
        for sv in segs:
            sv.release()
        q.release()
        view.release()
    # the first free of a slot in a round frees a block the array's previous holder allocated:
    # the parent in round 0, another worker afterwards when there is more than one
    remote = sum(len(set(v)) for r, (v, _) in enumerate(script) if r == 0 or nw > 1)
    return {"ops": rounds * ops, "t0": t0, "t1": t1, "remote_frees": remote}


def larson_malloc(ctx: WorkerCtx, *, chunks: int, rounds: int, ops: int, seed: int, lo: int,
                  hi: int) -> dict[str, Any]:
    script = _larson_script(seed, ctx.index, rounds, ops, chunks, lo, hi)
    ma, fr, mm = _libc.malloc, _libc.free, _ffi.memmove
    rng = random.Random(seed)
    seg = [ma(rng.randint(lo, hi)) for _ in range(chunks)]
    ab = b"ab"
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for r, (victims, sizes) in enumerate(script):
            if r:
                ctx.wait()  # same synchronisation as the shared version; the array stays private
            for v, s in zip(victims, sizes):
                fr(seg[v])
                p = ma(s)
                seg[v] = p
                mm(p, ab, 2)
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
        for p in seg:
            fr(p)
    return {"ops": rounds * ops, "t0": t0, "t1": t1, "remote_frees": 0}


def larson_bytearray(ctx: WorkerCtx, *, chunks: int, rounds: int, ops: int, seed: int, lo: int,
                     hi: int) -> dict[str, Any]:
    script = _larson_script(seed, ctx.index, rounds, ops, chunks, lo, hi)
    rng = random.Random(seed)
    seg = [bytearray(rng.randint(lo, hi)) for _ in range(chunks)]
    ab = b"ab"
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for r, (victims, sizes) in enumerate(script):
            if r:
                ctx.wait()
            for v, s in zip(victims, sizes):
                seg[v] = p = bytearray(s)  # the old object is freed here
                p[0:2] = ab
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": rounds * ops, "t0": t0, "t1": t1, "remote_frees": 0}


def _pattern(size: int) -> bytes:
    return bytes(i & 255 for i in range(min(size, 128)))


def xmalloc_shm(ctx: WorkerCtx, *, arena: str, batches: int, batch: int, size: int
                ) -> dict[str, Any]:
    mgr = ctx.attach(arena)
    a, d, w, rd = mgr.allocate, mgr.deallocate, mgr.write, mgr.read
    pat = _pattern(size)
    nbytes = batch * 8
    rng = range(batch)
    queue = ctx.queue
    made = freed = 0
    was = _gc_off()
    try:
        if ctx.nworkers == 1:  # produce a batch, then consume it
            ctx.wait()
            t0 = perf_counter()
            for _ in range(batches):
                objs = array("Q")
                for _ in rng:
                    p = a(size)
                    w(p, pat)
                    objs.append(p)
                b = a(nbytes)
                w(b, objs)
                for p in array("Q", rd(b, nbytes)):
                    d(p)
                d(b)
                freed += batch
            t1 = perf_counter()
            made = freed
        elif ctx.index % 2 == 0:  # producer
            ctx.wait()
            t0 = perf_counter()
            try:
                for _ in range(batches):
                    objs = array("Q")
                    for _ in rng:
                        p = a(size)
                        w(p, pat)
                        objs.append(p)
                    b = a(nbytes)
                    w(b, objs)
                    queue.put(b, timeout=60)
                    made += batch
            finally:
                queue.put(None, timeout=60)
            t1 = perf_counter()
        else:  # consumer: free whatever arrives until a producer says it is done
            ctx.wait()
            t0 = perf_counter()
            while True:
                b = queue.get(timeout=60)
                if b is None:
                    break
                for p in array("Q", rd(b, nbytes)):
                    d(p)
                d(b)
                freed += batch
            t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": freed, "allocated": made, "t0": t0, "t1": t1}


def xmalloc_pickled(ctx: WorkerCtx, *, batches: int, batch: int, size: int) -> dict[str, Any]:
    pat = _pattern(size)
    pad = bytes(max(0, size - len(pat)))
    rng = range(batch)
    queue = ctx.queue
    made = freed = 0
    was = _gc_off()
    try:
        if ctx.nworkers == 1:
            ctx.wait()
            t0 = perf_counter()
            for _ in range(batches):
                objs = [bytearray(pat) + pad for _ in rng]
                del objs
                freed += batch
            t1 = perf_counter()
            made = freed
        elif ctx.index % 2 == 0:
            ctx.wait()
            t0 = perf_counter()
            try:
                for _ in range(batches):
                    queue.put([bytearray(pat) + pad for _ in rng], timeout=60)
                    made += batch
            finally:
                queue.put(None, timeout=60)
            t1 = perf_counter()
        else:
            ctx.wait()
            t0 = perf_counter()
            while True:
                objs = queue.get(timeout=60)
                if objs is None:
                    break
                freed += len(objs)
                del objs
            t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": freed, "allocated": made, "t0": t0, "t1": t1}


def mstress_size(rng: random.Random, max_shift: int = 7) -> int:
    """mstress's size distribution: 8 << k bytes (k < max_shift), 1 % of them x100, a tenth of
    those x1000 instead, a hundredth x10000."""
    words = 1 << rng.randrange(max_shift)
    r = rng.random()
    if r < 0.01:
        words *= 10_000 if r < 0.0001 else 1_000 if r < 0.001 else 100
    return words * 8


def _mstress_script(seed: int, index: int, live: int, rounds: int
                    ) -> tuple[list[int], list[tuple[list[int], list[int], list[int]]]]:
    rng = random.Random(seed * 1_000_003 + index)
    init = [mstress_size(rng) for _ in range(live)]
    nfree, nmig = live // 2, max(1, live // 20)
    script = []
    for _ in range(rounds):
        victims = rng.sample(range(live), nfree)
        sizes = [mstress_size(rng) for _ in range(nfree)]
        migrate = rng.sample(range(live), nmig)
        script.append((victims, sizes, migrate))
    return init, script


def mstress_shm(ctx: WorkerCtx, *, arena: str, transfer: int, live: int, rounds: int, seed: int
                ) -> dict[str, Any]:
    mgr = ctx.attach(arena)
    init, script = _mstress_script(seed, ctx.index, live, rounds)
    nmig = len(script[0][2])
    a, d, w = mgr.allocate, mgr.deallocate, mgr.write
    stamp = b"mstress!"
    blocks = []
    for s in init:
        p = a(s)
        w(p, stamp)
        blocks.append(p)
    nw, me = ctx.nworkers, ctx.index
    view = mgr.view(transfer, nw * nmig * 8)
    q = view.cast("Q")
    mine = q[me * nmig:(me + 1) * nmig]
    theirs = q[((me + 1) % nw) * nmig:((me + 1) % nw + 1) * nmig]
    ops = migrated = 0
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for victims, sizes, migrate in script:
            for i, s in zip(victims, sizes):
                d(blocks[i])
                p = a(s)
                w(p, stamp)
                blocks[i] = p
            ops += len(victims)
            for j, i in enumerate(migrate):
                mine[j] = blocks[i]
            ctx.wait()  # every worker has published its blocks
            for j, i in enumerate(migrate):
                blocks[i] = theirs[j]
            migrated += nmig
            ctx.wait()  # every worker has taken its neighbour's: the tables may be reused
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
        mine.release()
        theirs.release()
        q.release()
        view.release()
        for p in blocks:  # untimed: free what this worker holds now (some came from others)
            d(p)
    return {"ops": ops, "t0": t0, "t1": t1, "migrated": migrated if nw > 1 else 0}


def mstress_malloc(ctx: WorkerCtx, *, live: int, rounds: int, seed: int) -> dict[str, Any]:
    init, script = _mstress_script(seed, ctx.index, live, rounds)
    ma, fr, mm = _libc.malloc, _libc.free, _ffi.memmove
    stamp = b"mstress!"
    blocks = []
    for s in init:
        p = ma(s)
        mm(p, stamp, 8)
        blocks.append(p)
    ops = 0
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for victims, sizes, _ in script:
            for i, s in zip(victims, sizes):
                fr(blocks[i])
                p = ma(s)
                mm(p, stamp, 8)
                blocks[i] = p
            ops += len(victims)
            ctx.wait()  # the shared version's two barriers per round; nothing migrates here
            ctx.wait()
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
        for p in blocks:
            fr(p)
    return {"ops": ops, "t0": t0, "t1": t1, "migrated": 0}


def mstress_bytearray(ctx: WorkerCtx, *, live: int, rounds: int, seed: int) -> dict[str, Any]:
    init, script = _mstress_script(seed, ctx.index, live, rounds)
    stamp = b"mstress!"
    blocks = [bytearray(s) for s in init]
    ops = 0
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for victims, sizes, _ in script:
            for i, s in zip(victims, sizes):
                blocks[i] = p = bytearray(s)
                p[0:8] = stamp
            ops += len(victims)
            ctx.wait()
            ctx.wait()
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": ops, "t0": t0, "t1": t1, "migrated": 0}


def scratch_shm(ctx: WorkerCtx, *, arena: str, table: int, size: int, iterations: int,
                writes: int) -> dict[str, Any]:
    mgr = ctx.attach(arena)
    given = array("Q", mgr.read(table, 8, 8 * ctx.index))[0]
    a, d, view = mgr.allocate, mgr.deallocate, mgr.view
    mask = min(size, 8) - 1
    rng = range(writes)
    addrs = []
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        d(given)  # the object the parent allocated for this worker
        for _ in range(iterations):
            p = a(size)
            ta = perf_counter()
            v = view(p)
            for j in rng:
                v[j & mask] = j & 255
            v.release()
            tf = perf_counter()
            d(p)
            addrs.append((p, ta, tf))
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": iterations * writes, "t0": t0, "t1": t1, "addresses": addrs}


def scratch_bytearray(ctx: WorkerCtx, *, size: int, iterations: int, writes: int
                      ) -> dict[str, Any]:
    mask = min(size, 8) - 1
    rng = range(writes)
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for _ in range(iterations):
            v = memoryview(bytearray(size))
            for j in rng:
                v[j & mask] = j & 255
            v.release()
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": iterations * writes, "t0": t0, "t1": t1}


def scratch_forced(ctx: WorkerCtx, *, arena: str, line: int, iterations: int, writes: int
                   ) -> dict[str, Any]:
    mgr = ctx.attach(arena)
    rng = range(writes)
    me = ctx.index
    was = _gc_off()
    try:
        ctx.wait()
        t0 = perf_counter()
        for _ in range(iterations):
            v = mgr.view(line, 64)
            for j in rng:
                v[me] = j & 255  # byte `me` of the one shared line
            v.release()
        t1 = perf_counter()
    finally:
        if was:
            gc.enable()
    return {"ops": iterations * writes, "t0": t0, "t1": t1}


# =========================================================================== parent side


class Bench:
    """One workload's runs: parent-side setup and teardown around each pool run. Teardown runs
    only after a run succeeded: after a failure or an interrupt the workers may still be using
    the blocks, and the whole arena is destroyed instead."""

    def __init__(self, cfg: Config, pool: WorkerPool, mgr: MemoryManager) -> None:
        self.cfg = cfg
        self.pool = pool
        self.mgr = mgr
        self.used0 = mgr.stats().used

    def balanced(self, what: str) -> None:
        used = self.mgr.stats().used
        if used != self.used0:
            raise RuntimeError(f"{what}: arena used bytes went {self.used0} -> {used} after the "
                               "run; a block was lost or freed twice")

    def fill(self, sizes: list[int]) -> int:
        """A table block holding the addresses of new blocks of the given sizes."""
        addrs = array("Q", (self.mgr.allocate(s) for s in sizes))
        table = self.mgr.allocate(max(16, len(addrs) * 8))
        self.mgr.write(table, addrs)
        return table

    def empty(self, table: int, n: int) -> None:
        """Free the n blocks whose addresses the table holds, and the table."""
        for p in array("Q", self.mgr.read(table, n * 8)):
            self.mgr.deallocate(p)
        self.mgr.deallocate(table)

    def run(self, workload: str, method: str, k: int, seed: int) -> tuple[list[dict[str, Any]],
                                                                          dict[str, Any]]:
        fn = getattr(self, "_" + workload.replace("-", "_"))
        results, extra = fn(method, k, seed)
        self.balanced(f"{workload}/{method}/{k}")
        return results, extra

    # ---- larson
    def _larson(self, method: str, k: int, seed: int
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        c = self.cfg
        kw: dict[str, Any] = {"chunks": c.larson_chunks, "rounds": c.larson_rounds,
                              "ops": c.larson_ops_per_round, "seed": seed, "lo": 8, "hi": 1000}
        if method == "shmalloc":
            rng = random.Random(seed)
            n = k * c.larson_chunks
            table = self.fill([rng.randint(8, 1000) for _ in range(n)])  # the parent's warm-up
            res = self.pool.run(larson_shm, k, arena=self.mgr.name, table=table, **kw)
            self.empty(table, n)  # not on failure: workers may still use it; the arena goes
            frees = sum(r["ops"] for r in res)
            return res, {"remote_free_fraction": sum(r["remote_frees"] for r in res) / frees}
        fn = larson_malloc if method == "malloc_private" else larson_bytearray
        return self.pool.run(fn, k, **kw), {"remote_free_fraction": 0.0}

    # ---- xmalloc-test
    def _xmalloc_test(self, method: str, k: int, seed: int
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        c = self.cfg
        if k > 1 and k % 2:
            raise ValueError("xmalloc-test needs 1 or an even number of processes")
        kw: dict[str, Any] = {"batches": c.xm_batches, "batch": c.xm_batch, "size": c.xm_size}
        try:
            if method == "shmalloc":
                res = self.pool.run(xmalloc_shm, k, arena=self.mgr.name, **kw)
            else:
                res = self.pool.run(xmalloc_pickled, k, **kw)
        except BaseException:
            drain_queue(self.pool.queue)
            raise
        made, freed = sum(r["allocated"] for r in res), sum(r["ops"] for r in res)
        if made != freed:
            raise RuntimeError(f"xmalloc-test/{method}/{k}: {made} objects made, {freed} freed")
        return res, {"producers": max(1, k // 2), "consumers": max(1, k // 2)}

    # ---- mstress
    def _mstress(self, method: str, k: int, seed: int
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        c = self.cfg
        kw: dict[str, Any] = {"live": c.ms_live, "rounds": c.ms_rounds, "seed": seed}
        if method == "shmalloc":
            nmig = max(1, c.ms_live // 20)
            transfer = self.mgr.allocate(k * nmig * 8)
            res = self.pool.run(mstress_shm, k, arena=self.mgr.name, transfer=transfer, **kw)
            self.mgr.deallocate(transfer)
            return res, {"migrated_blocks": sum(r["migrated"] for r in res)}
        fn = mstress_malloc if method == "malloc_private" else mstress_bytearray
        return self.pool.run(fn, k, **kw), {"migrated_blocks": 0}

    # ---- cache-scratch
    def _cache_scratch(self, method: str, k: int, seed: int
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        c = self.cfg
        kw: dict[str, Any] = {"iterations": c.cs_iterations, "writes": c.cs_writes}
        if method == "shmalloc":
            size = 8
            objs = [self.mgr.allocate(size) for _ in range(k)]  # consecutive: the worst case
            table = self.mgr.allocate(max(16, 8 * k))
            self.mgr.write(table, array("Q", objs))
            res = self.pool.run(scratch_shm, k, arena=self.mgr.name, table=table, size=size, **kw)
            self.mgr.deallocate(table)
            return res, {"shared_line_objects": _shared_lines(res, size), "object_size": size}
        if method == "forced_sharing":
            line = self.mgr.allocate(64, align=64)
            res = self.pool.run(scratch_forced, k, arena=self.mgr.name, line=line, **kw)
            self.mgr.deallocate(line)
            return res, {}
        return self.pool.run(scratch_bytearray, k, size=8, **kw), {}


def _shared_lines(res: list[dict[str, Any]], size: int) -> int:
    """How many objects (one per worker and iteration) lay in a 64-byte cache line that another
    worker's object occupied while both were being written: 0 means the allocator never set up
    passive false sharing. (Offsets from the segment start: the mapping is page-aligned.)"""
    objs = [(w, p // 64, (p + size - 1) // 64, ta, tf)
            for w, r in enumerate(res) for p, ta, tf in r["addresses"]]
    n = 0
    for w, lo, hi, ta, tf in objs:
        if any(w2 != w and lo2 <= hi and lo <= hi2 and ta2 < tf and ta < tf2
               for w2, lo2, hi2, ta2, tf2 in objs):
            n += 1
    return n


def run_workload(name: str, cfg: Config, pool: WorkerPool, arenas: Arenas) -> dict[str, Any]:
    mgr = arenas.new(ARENA_CAPACITY)
    methods = METHODS[name]
    procs = [k for k in cfg.procs if name != "xmalloc-test" or k == 1 or k % 2 == 0]
    rates: dict[str, dict[int, list[float]]] = {m: {k: [] for k in procs} for m in methods}
    extras: dict[str, dict[int, list[dict[str, Any]]]] = {m: {k: [] for k in procs}
                                                           for m in methods}
    walls: dict[str, dict[int, list[float]]] = {m: {k: [] for k in procs} for m in methods}
    try:
        bench = Bench(cfg, pool, mgr)
        for t in range(cfg.trials):
            seed = cfg.seed + t
            progress(f"{name}: trial {t + 1}/{cfg.trials}")
            for k in procs:
                for m in rotated(methods, t + k):
                    res, extra = bench.run(name, m, k, seed)
                    rate, _, wall = _throughput(res)
                    rates[m][k].append(rate)
                    walls[m][k].append(wall)
                    extras[m][k].append(extra)
        report = mgr.check()
    finally:
        try:
            pool.detach(mgr.name)
        finally:
            arenas.drop(mgr)
    out: dict[str, Any] = {"unit": UNITS[name], "procs": procs, "methods": {}}
    for m in methods:
        by: dict[str, Any] = {}
        for k in procs:
            extra = _merge_extras(extras[m][k])
            by[str(k)] = summarize_rates(rates[m][k], wall_seconds=statistics.median(walls[m][k]),
                                         **extra)
        scal = {f"{k}_over_1": by[str(k)]["median"] / by["1"]["median"]
                for k in procs if k != 1 and "1" in by}
        out["methods"][m] = {"label": LABELS[m], "by_procs": by, "scaling": scal}
    out["arena_check"] = {"blocks": report.blocks, "used": report.used}
    return out


def _throughput(res: list[dict[str, Any]]) -> tuple[float, int, float]:
    ops = sum(int(r["ops"]) for r in res)
    wall = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    return ops / wall, ops, wall


def _merge_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-trial extras folded into one value each (the mean of numbers)."""
    out: dict[str, Any] = {}
    for key in extras[0] if extras else ():
        vals = [e[key] for e in extras]
        numeric = all(isinstance(v, (int, float)) for v in vals)
        out[key] = statistics.fmean(vals) if numeric else vals
    return out


# =========================================================================== report


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    lar = res["workloads"].get("larson")
    if lar and "2_over_1" in lar["methods"]["shmalloc"]["scaling"]:
        op, target = TARGET_LARSON
        j = judge(op, target, lar["methods"]["shmalloc"]["scaling"]["2_over_1"])
        j["baselines"] = {m: v["scaling"].get("2_over_1") for m, v in lar["methods"].items()
                          if m != "shmalloc"}
        base = j["baselines"].get("malloc_private")
        # what the machine gave: the same loop on private heaps is the ceiling shmalloc can reach
        j["share_of_private_malloc_scaling"] = j["value"] / base if base else None
        d["larson_2p_over_1p"] = j
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    j = res["derived"].get("larson_2p_over_1p")
    if j:
        base = j["baselines"].get("malloc_private")
        note = (f"the same loop on private cffi malloc heaps scaled {base:.2f}x in this run "
                "(the machine's ceiling)") if base else ""
        rows.append(target_row("larson: 2 processes / 1 process", j, "x", note))
    return rows


def report(res: dict[str, Any]) -> None:
    m = res["machine"]
    cfg = res["config"]
    print(f"shmalloc bench_workloads{' (--quick)' if cfg['quick'] else ''}: "
          f"{m.get('cpu_model', '?')} x{m['cpu_count']}, Python {m['python_version']}, "
          f"{m['platform']}")
    note = noise_note(m)
    if note:
        print(f"NOTE: {note}")
    print(f"operations per second summed over processes: median of {cfg['trials']} trials "
          "[min-max]")
    for name, w in res["workloads"].items():
        procs = w["procs"]
        rows = []
        for meth, v in w["methods"].items():
            row = [meth]
            for k in procs:
                row.append(fmt_rate_stat(v["by_procs"][str(k)]))
            for k in procs:
                if k != 1:
                    row.append(f"{v['scaling'][f'{k}_over_1']:.2f}x")
            rows.append(row)
        headers = ["method"] + [f"{k} proc{'s' if k > 1 else ''}" for k in procs] + \
                  [f"{k}p/1p" for k in procs if k != 1]
        print_table(headers, rows, f"{name} ({w['unit']})")
        sh = w["methods"]["shmalloc"]["by_procs"]
        if name == "larson":
            fr = ", ".join(f"{k}p {sh[str(k)]['remote_free_fraction']:.0%}" for k in procs)
            print(f"  share of shmalloc frees that freed another process's block: {fr}")
        if name == "mstress":
            mg = ", ".join(f"{k}p {sh[str(k)]['migrated_blocks']:,.0f}" for k in procs if k > 1)
            print(f"  blocks migrated between processes per run (shmalloc): {mg}")
        if name == "cache-scratch":
            sl = ", ".join(f"{k}p {sh[str(k)]['shared_line_objects']:.0f}" for k in procs)
            print(f"  shmalloc objects sharing a 64 B line with another process's object: {sl}")
        if name == "xmalloc-test":
            print("  1 process produces and consumes its own batches; 2 and 4: half producers, "
                  "half consumers")
    print("\nbaselines: " + "; ".join(f"{k} = {v}" for k, v in LABELS.items()))
    d = res["derived"]
    if "larson_2p_over_1p" in d:
        j = d["larson_2p_over_1p"]
        base = ", ".join(f"{k} {v:.2f}x" for k, v in j["baselines"].items() if v)
        print(f"\nlarson, 2 processes / 1 process (shmalloc): {j['value']:.2f}x   "
              f"target >= {j['target']:g}x  {verdict(j)}   (baselines: {base})")


def plot(res: dict[str, Any], path: Path) -> None:
    plt = load_pyplot(f"--plot {path}")
    if plt is None:
        return
    names = list(res["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        w = res["workloads"][name]
        for meth, v in w["methods"].items():
            med = [v["by_procs"][str(k)]["median"] for k in w["procs"]]
            lo = [a - v["by_procs"][str(k)]["min"] for a, k in zip(med, w["procs"])]
            hi = [v["by_procs"][str(k)]["max"] - a for a, k in zip(med, w["procs"])]
            ax.errorbar(w["procs"], med, yerr=[lo, hi], marker="o", capsize=3, label=meth)
        ax.set_xticks(w["procs"])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("processes")
        ax.set_ylabel(w["unit"])
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"shmalloc bench_workloads: {m.get('cpu_model', '')} x{m['cpu_count']}",
                 fontsize=10)
    save_figure(plt, fig, path, log=progress)


# =========================================================================== main


def _csv(kind: Callable[[str], Any], allowed: tuple[Any, ...] | None = None
         ) -> Callable[[str], tuple[Any, ...]]:
    def parse(s: str) -> tuple[Any, ...]:
        items = tuple(kind(x.strip()) for x in s.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.bench_workloads",
        description="mimalloc-bench allocator workloads (larson, xmalloc-test, mstress, "
        "cache-scratch) ported to processes sharing one shmalloc arena, with 1, 2 and 4 "
        "processes, beside private-heap baselines. Prints a table, writes JSON (and a PNG "
        "with --plot).",
    )
    p.add_argument("--quick", action="store_true", help="small runs, 3 trials (a CI smoke run)")
    add_json_arg(p, DEFAULT_JSON)
    p.add_argument("--plot", type=Path, metavar="PATH", help="also write a PNG (needs matplotlib)")
    p.add_argument("--workloads", type=_csv(str, WORKLOADS), default=WORKLOADS,
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    p.add_argument("--procs", type=_csv(int), default=PROCS,
                   help="comma-separated process counts (default 1,2,4; 1 is always added)")
    p.add_argument("--trials", type=int, help="trials per figure (default 5; quick 3)")
    p.add_argument("--seed", type=int, default=4141, help="random seed (larson's default)")
    a = p.parse_args(argv)
    if a.trials is not None and a.trials < 1:
        p.error("--trials must be positive")
    if any(k < 1 or k > 64 for k in a.procs):
        p.error("--procs values must be between 1 and 64")
    a.procs = tuple(sorted({1, *a.procs}))
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = Config.from_args(args)
    t_start = time.perf_counter()
    res = new_result(
        "bench_workloads",
        {**cfg.__dict__, "procs": list(cfg.procs), "workloads": list(cfg.workloads),
         "statistic": "median of trials (min, max also given)",
         "units": UNITS, "labels": LABELS},
        {"larson_2p_over_1p": {"op": TARGET_LARSON[0], "value": TARGET_LARSON[1]}},
        workloads={},
    )
    arenas = Arenas(progress)

    def body() -> None:
        pool: WorkerPool | None = None
        try:
            progress(f"starting {max(cfg.procs)} worker processes")
            pool = WorkerPool(max(cfg.procs))
            for name in cfg.workloads:
                res["workloads"][name] = run_workload(name, cfg, pool, arenas)
        finally:
            if pool is not None:
                pool.close()

    if not run_interruptible(body, "workers joined, all arenas destroyed, nothing written",
                             arenas):
        return 130
    try:
        res["machine"]["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
    finish_result(res, t_start, derive=derive, targets_summary=targets_summary)
    report(res)
    write_results(args.json, res)
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
