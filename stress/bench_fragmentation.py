"""Fragmentation: peak arena footprint over peak live bytes on mixed-size allocation traces.

Each trace is a deterministic list of allocate/free events with the size and lifetime
distributions of ``bench_workloads`` (larson, mstress with its rare giants and long-lived blocks,
xmalloc-test's batches in FIFO order) and one more (random-lifetime: log-uniform sizes from 16 B
to 1 MiB, exponential lifetimes), replayed into a fresh arena by one process.

  live       sum of the *requested* bytes of the live blocks; peak live is its maximum
  footprint  the highest byte ever handed out, less the heap start: its peak over the replay
  ratio      peak footprint / peak live (target <= 1.25 on every trace), about the product of
             headers+rounding (peak of the live blocks' whole sizes / peak live) and placement
             (peak footprint / that)

Also given: ``reserved`` (the tmpfs pages the arena fallocated, over peak live), the ratio with
the caches off, and the same trace through glibc malloc (``bench_c replay``: mallinfo2's arena +
mmapped bytes, M_TOP_PAD 0) as a reference for what the trace allows; skipped without a compiler.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import math
import random
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shmalloc._binding import ffi, lib
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import Arenas, GiB, MiB, progress
from .bench_c import BuildError, build_core
from .bench_workloads import mstress_size

TRACES = ("larson", "mstress", "xmalloc", "random-lifetime")
TARGETS = {"footprint_over_live": ("<=", 1.25)}
CAPACITY = 4 * GiB  # reserved lazily; the traces touch well under 1 GiB
XMALLOC_SIZES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
Event = tuple[int, int, int]  # (+1 allocate | -1 free, block id, size); size is 0 for frees


# --------------------------------------------------------------------------- traces
def trace_larson(rng: random.Random, scale: float) -> Iterator[Event]:
    chunks, steps = int(2000 * scale), int(100_000 * scale)
    slots = list(range(chunks))
    for i in slots:
        yield 1, i, rng.randint(8, 1000)
    for nxt in range(chunks, chunks + steps):
        v = rng.randrange(chunks)
        yield -1, slots[v], 0
        slots[v] = nxt
        yield 1, nxt, rng.randint(8, 1000)
    for b in slots:
        yield -1, b, 0


def trace_mstress(rng: random.Random, scale: float) -> Iterator[Event]:
    live, rounds = int(10_000 * scale), 8
    data = list(range(live))
    for i in data:
        yield 1, i, mstress_size(rng, 5)
    new, retained = itertools.count(live), []
    for _ in range(rounds):
        for v in rng.sample(range(live), live // 2):
            yield -1, data[v], 0
            data[v] = next(new)
            yield 1, data[v], mstress_size(rng, 5)
        for _ in range(live // 16):  # long-lived blocks, up to 512 B as in mstress
            retained.append(next(new))
            yield 1, retained[-1], mstress_size(rng, 7)
    for b in data + retained:
        yield -1, b, 0


def trace_xmalloc(rng: random.Random, scale: float) -> Iterator[Event]:
    batches, batch, in_flight = int(200 * scale), 256, 4
    queue: list[range] = []
    for n in range(batches):
        ids = range(n * (batch + 1), (n + 1) * (batch + 1))  # its objects, then the batch
        for i in ids[:-1]:
            yield 1, i, rng.choice(XMALLOC_SIZES)
        yield 1, ids[-1], batch * 8  # the batch's address array
        queue.append(ids)
        if len(queue) > in_flight:
            for b in queue.pop(0):
                yield -1, b, 0
    for b in itertools.chain(*queue):
        yield -1, b, 0


def trace_random_lifetime(rng: random.Random, scale: float) -> Iterator[Event]:
    lifetime = 500.0  # mean, in allocations
    n = int(50_000 * scale)
    lo, hi = math.log(16), math.log(1 * MiB)
    deaths: list[tuple[int, int]] = []
    for step in range(n):
        while deaths and deaths[0][0] <= step:
            yield -1, heapq.heappop(deaths)[1], 0
        yield 1, step, int(math.exp(rng.uniform(lo, hi)))
        heapq.heappush(deaths, (step + 1 + int(rng.expovariate(1.0 / lifetime)), step))
    while deaths:
        yield -1, heapq.heappop(deaths)[1], 0


GENERATORS: dict[str, Callable[[random.Random, float], Iterator[Event]]] = {}
GENERATORS.update(larson=trace_larson, mstress=trace_mstress, xmalloc=trace_xmalloc)
GENERATORS["random-lifetime"] = trace_random_lifetime


# --------------------------------------------------------------------------- replays
def replay_shmalloc(trace: list[Event], arenas: Arenas, caches: bool = True) -> dict[str, Any]:
    """Replay into a fresh arena; caches=False turns the per-process caches off (heap only)."""
    mgr = arenas.new(CAPACITY)
    try:
        if not caches:
            mgr.set_cache_limit(0)
        heap_start = int(lib.shm_header_size())
        hdr = ffi.sizeof("shm_block_t")
        a, d, size_of = mgr.allocate, mgr.deallocate, mgr.size_of
        held: dict[int, tuple[int, int, int]] = {}  # id: address, requested and whole size
        live = peak_live = blocks = peak_blocks = top = 0
        t0 = time.perf_counter()
        for op, i, size in trace:
            if op > 0:
                p = a(size)
                u = size_of(p)
                held[i] = (p, size, u + hdr)
                live += size
                blocks += u + hdr
                top, peak_live = max(top, p + u), max(peak_live, live)
                peak_blocks = max(peak_blocks, blocks)
            else:
                p, size, whole = held.pop(i)
                d(p)
                live, blocks = live - size, blocks - whole
        elapsed = time.perf_counter() - t0
        st = mgr.stats()
        if st.allocated_blocks != 0 or held:
            raise RuntimeError(f"replay left {st.allocated_blocks} blocks allocated")
        mgr.check()
        footprint, reserved = top - heap_start, st.reserved - heap_start
        out = dict(peak_live=peak_live, peak_block_bytes=peak_blocks, peak_footprint=footprint)
        out.update(reserved=reserved, ratio=footprint / peak_live)
        out.update(headers_and_rounding=peak_blocks / peak_live, placement=footprint / peak_blocks)
        out.update(reserved_ratio=reserved / peak_live, replay_seconds=elapsed)
        return {**out, "allocations": st.allocations}
    finally:
        arenas.drop(mgr)


def replay_glibc(trace: list[Event], binary: Path) -> dict[str, Any]:
    """Replay the trace through glibc malloc in bench_c's ``replay`` mode (a fresh C process)."""
    rec = struct.Struct("<IIQ")
    with tempfile.NamedTemporaryFile(prefix="shmalloc-trace-", suffix=".bin") as f:
        buf = bytearray(rec.size * len(trace))
        for n, (op, i, size) in enumerate(trace):
            rec.pack_into(buf, n * rec.size, 1 if op > 0 else 2, i, size)
        f.write(buf)
        f.flush()
        cmd = [str(binary), "replay", f.name]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"glibc replay failed ({r.returncode}): {r.stderr.strip()}")
    out = json.loads(r.stdout)
    return {**out, "ratio": out["peak_footprint"] / out["peak_live"]}


# --------------------------------------------------------------------------- driver
def run(a: Any, res: dict[str, Any], arenas: Arenas) -> None:
    out: dict[str, Any] = {}
    binary = None
    if not a.no_glibc:
        try:
            binary, _ = build_core()
        except BuildError as e:
            progress(f"glibc reference skipped: {e}")
    for name in a.traces:
        per_seed = []
        for seed in range(a.seed, a.seed + a.seeds):
            bench.check_interrupt()
            trace = list(GENERATORS[name](random.Random(f"{name}:{seed}"), a.scale))
            progress(f"{name}: seed {seed}, {sum(e[0] > 0 for e in trace):,} allocations")
            r = replay_shmalloc(trace, arenas)
            r["no_caches"] = replay_shmalloc(trace, arenas, caches=False)
            glibc = replay_glibc(trace, binary) if binary is not None else None
            r.update(seed=seed, events=len(trace), glibc=glibc)
            per_seed.append(r)
        worst = max(per_seed, key=lambda r: r["ratio"])
        out[name] = {"seeds": per_seed, "worst_ratio": worst["ratio"], "worst_seed": worst["seed"]}
    res["traces"] = out


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d = {}
    for name, t in res["traces"].items():
        j = bench.judge(*TARGETS["footprint_over_live"], t["worst_ratio"])
        d[f"fragmentation_{name}"] = {**j, "trace": name, "aggregate": "worst seed (max)"}
    worst = max(d.values(), key=lambda j: j["value"])
    d["fragmentation_worst"] = {**worst, "aggregate": "worst trace"}
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, t in res["traces"].items():
        w = next(s for s in t["seeds"] if s["seed"] == t["worst_seed"])
        note = f"headers+rounding {w['headers_and_rounding']:.2f}x, placement "
        note += f"{w['placement']:.2f}x; caches off {w['no_caches']['ratio']:.2f}x"
        if w["glibc"]:
            note += f"; glibc {w['glibc']['ratio']:.2f}x"
        j = res["derived"][f"fragmentation_{name}"]
        rows.append(bench.target_row(f"fragmentation, {name} trace (footprint/live)", j, "x", note))
    return rows


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    title = "Peak footprint / peak live bytes (target <= 1.25 on every trace); ratio ~= "
    title += "hdr+round x placement; caches off = the same trace with set_cache_limit(0)"
    fb, f3, col = format_bytes, "{:.3f}".format, bench.col
    cols = [col("trace", "trace", str), col("seed", "seed", str)]
    cols += [col("events", "events", "{:,}".format), col("peak live", "peak_live", fb)]
    cols += [col("peak footprint", "peak_footprint", fb), col("ratio", "ratio", f3)]
    cols += [col("hdr+round", "headers_and_rounding", f3), col("placement", "placement", f3)]
    cols += [col("reserved", "reserved_ratio", "{:.2f}".format)]
    cols += [col("caches off", "no_caches", lambda r: f3(r["ratio"]))]
    cols += [col("glibc ratio", "glibc", lambda r: f3(r["ratio"]))]
    rows = [{"trace": name, **r} for name, t in res["traces"].items() for r in t["seeds"]]
    bench.print_columns(title, cols, rows)
    bench.print_targets(res)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "shorter traces, one seed")
    p.add_argument("--traces", type=bench.csv(TRACES), default=list(TRACES), help=",".join(TRACES))
    p.scaled("--seeds", 1, 3, "seeds per trace")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.scaled("--scale", 0.2, 1.0, "trace length multiplier", least=0.001)
    p.add_argument("--no-glibc", action="store_true", help="skip the glibc malloc reference")
    a = p.parse(argv)
    config = dict(traces=a.traces, seeds=a.seeds, first_seed=a.seed, scale=a.scale)
    config.update(glibc=not a.no_glibc, block_header_bytes=ffi.sizeof("shm_block_t"))
    config.update(heap_start=int(lib.shm_header_size()), random_lifetime_sizes=[16, 1 * MiB])
    return bench.run_bench(sys.modules[__name__], a, config, functools.partial(run, a))


if __name__ == "__main__":
    sys.exit(main())
