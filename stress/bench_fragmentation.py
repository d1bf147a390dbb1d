"""Fragmentation: peak arena footprint over peak live bytes on mixed-size allocation traces.

    python -m stress.bench_fragmentation [--quick] [--json PATH] [--traces LIST] [--seeds N]

Each trace is a deterministic list of allocate/free events, synthesised with the size and
lifetime distributions of the workloads in ``bench_workloads`` (and one more), and replayed into
a fresh arena by one process:

  larson           C live blocks of 8..1000 B (uniform); each step frees a random one and
                   allocates a new one
  mstress          many live blocks of power-of-two sizes with mstress's rare x100 / x1000 /
                   x10000 giants; rounds free a random half and reallocate, and each round also
                   allocates long-lived ("retained") blocks that live to the end
  xmalloc          batches of objects of xmalloc-test's mixed sizes (8..2048 B) plus the batch's
                   own address array, a few batches in flight, freed in FIFO order
  random-lifetime  sizes log-uniform between 16 B and 1 MiB, each block living an exponentially
                   distributed number of allocations (mean --lifetime)

Definitions (per trace and seed):
  live       sum of the *requested* bytes of the blocks live at a moment; peak live is its maximum
  footprint  highest byte ever handed out: max(address + size_of(address)) - heap start, over the
             whole replay (the heap start is the C core's header size); peak footprint is that
  ratio      peak footprint / peak live: the target is <= 1.25 on every trace
It is split into two factors that multiply to it (approximately: the peaks can fall at different
moments): headers+rounding = peak of the live blocks' whole sizes (usable size + block header)
/ peak live, and placement = peak footprint / that. Also given: ``reserved``, the tmpfs pages the
arena fallocated (1 MiB steps) over peak live, and the same trace replayed through glibc
``malloc`` by the C program of ``bench_c`` (``bench_c replay``; its footprint is mallinfo2's
arena + mmapped bytes less what was in use before, sampled every 16 events and at every new live
peak, with M_TOP_PAD 0): a reference for what the trace allows. Without a C compiler the glibc
column is skipped.

Targets are reported, never asserted; the exit code is 0 whether or not they are met. Every
arena is destroyed on the way out, Ctrl-C included.
"""

from __future__ import annotations

import heapq
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

from ._common import (
    Arenas,
    GiB,
    MiB,
    bench_args,
    check_interrupt,
    judge,
    make_progress,
    print_header,
    print_table,
    run_bench,
    target_row,
    verdict,
)
from .bench_c import BuildError, build_core
from .bench_workloads import mstress_size

progress = make_progress("bench_fragmentation")
TRACES = ("larson", "mstress", "xmalloc", "random-lifetime")
TARGET = ("<=", 1.25)
TARGETS = {"footprint_over_live": TARGET}
XMALLOC_SIZES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
Event = tuple[int, int, int]  # (+1 allocate | -1 free, block id, size); size is 0 for frees


# --------------------------------------------------------------------------- traces


def trace_larson(rng: random.Random, scale: float) -> Iterator[Event]:
    chunks, steps = int(2000 * scale), int(100_000 * scale)
    slots = list(range(chunks))
    for i in slots:
        yield 1, i, rng.randint(8, 1000)
    nxt = chunks
    for _ in range(steps):
        v = rng.randrange(chunks)
        yield -1, slots[v], 0
        slots[v] = nxt
        yield 1, nxt, rng.randint(8, 1000)
        nxt += 1
    for b in slots:
        yield -1, b, 0


def trace_mstress(rng: random.Random, scale: float) -> Iterator[Event]:
    live, rounds = int(10_000 * scale), 8
    data = list(range(live))
    for i in data:
        yield 1, i, mstress_size(rng, 5)
    nxt = live
    retained = []
    for _ in range(rounds):
        for v in rng.sample(range(live), live // 2):
            yield -1, data[v], 0
            data[v] = nxt
            yield 1, nxt, mstress_size(rng, 5)
            nxt += 1
        for _ in range(live // 16):  # long-lived blocks, up to 512 B as in mstress
            retained.append(nxt)
            yield 1, nxt, mstress_size(rng, 7)
            nxt += 1
    for b in data + retained:
        yield -1, b, 0


def trace_xmalloc(rng: random.Random, scale: float) -> Iterator[Event]:
    batches, batch, in_flight = int(200 * scale), 256, 4
    queue: list[list[int]] = []
    nxt = 0
    for _ in range(batches):
        ids = []
        for _ in range(batch):
            ids.append(nxt)
            yield 1, nxt, rng.choice(XMALLOC_SIZES)
            nxt += 1
        ids.append(nxt)
        yield 1, nxt, batch * 8  # the batch's address array
        nxt += 1
        queue.append(ids)
        if len(queue) > in_flight:
            for b in queue.pop(0):
                yield -1, b, 0
    for ids in queue:
        for b in ids:
            yield -1, b, 0


def trace_random_lifetime(
    rng: random.Random, scale: float, lifetime: float = 500.0
) -> Iterator[Event]:
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


GENERATORS: dict[str, Callable[[random.Random, float], Iterator[Event]]] = {
    "larson": trace_larson,
    "mstress": trace_mstress,
    "xmalloc": trace_xmalloc,
    "random-lifetime": trace_random_lifetime,
}


# --------------------------------------------------------------------------- replays


def replay_shmalloc(
    trace: list[Event], arenas: Arenas, capacity: int, caches: bool = True
) -> dict[str, Any]:
    """Replay into a fresh arena; caches=False turns the per-process caches off (heap only)."""
    mgr = arenas.new(capacity)
    try:
        if not caches:
            mgr.set_cache_limit(0)
        heap_start = int(lib.shm_header_size())
        hdr = ffi.sizeof("shm_block_t")
        a, d, size_of = mgr.allocate, mgr.deallocate, mgr.size_of
        addr: dict[int, int] = {}
        req: dict[int, int] = {}
        whole: dict[int, int] = {}
        live = peak_live = blocks = peak_blocks = top = 0
        t0 = time.perf_counter()
        for op, i, size in trace:
            if op > 0:
                p = a(size)
                u = size_of(p)
                addr[i], req[i], whole[i] = p, size, u + hdr
                live += size
                blocks += u + hdr
                if p + u > top:
                    top = p + u
                if live > peak_live:
                    peak_live = live
                if blocks > peak_blocks:
                    peak_blocks = blocks
            else:
                d(addr.pop(i))
                live -= req.pop(i)
                blocks -= whole.pop(i)
        elapsed = time.perf_counter() - t0
        st = mgr.stats()
        if st.allocated_blocks != 0 or addr:
            raise RuntimeError(f"replay left {st.allocated_blocks} blocks allocated")
        mgr.check()
        footprint = top - heap_start
        return {
            "peak_live": peak_live,
            "peak_block_bytes": peak_blocks,
            "peak_footprint": footprint,
            "reserved": st.reserved - heap_start,
            "ratio": footprint / peak_live,
            "headers_and_rounding": peak_blocks / peak_live,
            "placement": footprint / peak_blocks,
            "reserved_ratio": (st.reserved - heap_start) / peak_live,
            "replay_seconds": elapsed,
            "allocations": st.allocations,
        }
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
        r = subprocess.run(
            [str(binary), "replay", f.name],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if r.returncode != 0:
        raise RuntimeError(f"glibc replay failed ({r.returncode}): {r.stderr.strip()}")
    out: dict[str, Any] = json.loads(r.stdout)
    out["ratio"] = out["peak_footprint"] / out["peak_live"]
    return out


# --------------------------------------------------------------------------- driver


def run(a: Any, arenas: Arenas) -> dict[str, Any]:
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
            check_interrupt()
            trace = list(GENERATORS[name](random.Random(f"{name}:{seed}"), a.scale))
            progress(f"{name}: seed {seed}, {sum(e[0] > 0 for e in trace):,} allocations")
            r = replay_shmalloc(trace, arenas, a.capacity)
            r.update(
                no_caches=replay_shmalloc(trace, arenas, a.capacity, caches=False),
                seed=seed,
                events=len(trace),
                glibc=replay_glibc(trace, binary) if binary is not None else None,
            )
            per_seed.append(r)
        worst = max(per_seed, key=lambda r: r["ratio"])
        out[name] = {"seeds": per_seed, "worst_ratio": worst["ratio"], "worst_seed": worst["seed"]}
    return out


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d = {
        f"fragmentation_{name}": {
            **judge(*TARGET, t["worst_ratio"]),
            "trace": name,
            "aggregate": "worst seed (max)",
        }
        for name, t in res["traces"].items()
    }
    worst = max(d.values(), key=lambda j: j["value"])
    d["fragmentation_worst"] = {**worst, "aggregate": "worst trace"}
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, t in res["traces"].items():
        w = next(s for s in t["seeds"] if s["seed"] == t["worst_seed"])
        note = (
            f"headers+rounding {w['headers_and_rounding']:.2f}x, placement "
            f"{w['placement']:.2f}x; caches off {w['no_caches']['ratio']:.2f}x"
        )
        if w["glibc"]:
            note += f"; glibc {w['glibc']['ratio']:.2f}x"
        rows.append(
            target_row(
                f"fragmentation, {name} trace (footprint/live)",
                res["derived"][f"fragmentation_{name}"],
                "x",
                note,
            )
        )
    return rows


def report(res: dict[str, Any]) -> None:
    print_header(res)
    rows = [
        [
            name,
            str(r["seed"]),
            f"{r['events']:,}",
            format_bytes(r["peak_live"]),
            format_bytes(r["peak_footprint"]),
            f"{r['ratio']:.3f}",
            f"{r['headers_and_rounding']:.3f}",
            f"{r['placement']:.3f}",
            f"{r['reserved_ratio']:.2f}",
            f"{r['no_caches']['ratio']:.3f}",
            f"{r['glibc']['ratio']:.3f}" if r["glibc"] else "-",
        ]
        for name, t in res["traces"].items()
        for r in t["seeds"]
    ]
    print_table(
        [
            "trace",
            "seed",
            "events",
            "peak live",
            "peak footprint",
            "ratio",
            "hdr+round",
            "placement",
            "reserved",
            "caches off",
            "glibc ratio",
        ],
        rows,
        "Peak footprint / peak live bytes (target <= 1.25 on every trace); ratio ~= "
        "hdr+round x placement; caches off = the same trace with set_cache_limit(0)",
    )
    print()
    for key, j in res["derived"].items():
        if key != "fragmentation_worst":
            print(
                f"  {j['trace']:<16} worst ratio {j['value']:.3f}   target <= {j['target']:g}"
                f"  {verdict(j)}"
            )


def main(argv: list[str] | None = None) -> int:
    p = bench_args(sys.modules[__name__], "shorter traces, one seed")
    p.add_argument(
        "--traces", default=",".join(TRACES), help=f"comma-separated subset of {','.join(TRACES)}"
    )
    p.add_argument("--seeds", type=int, help="seeds per trace (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.add_argument("--scale", type=float, help="trace length multiplier (default 1; quick 0.2)")
    p.add_argument("--no-glibc", action="store_true", help="skip the glibc malloc reference")
    a = p.parse_args(argv)
    a.traces = [t for t in a.traces.split(",") if t]
    if not a.traces or set(a.traces) - set(TRACES):
        p.error(f"--traces takes a subset of {', '.join(TRACES)}")
    a.seeds = a.seeds or (1 if a.quick else 3)
    a.scale = a.scale or (0.2 if a.quick else 1.0)
    if a.seeds < 1 or a.scale <= 0:
        p.error("--seeds and --scale must be positive")
    a.capacity = 4 * GiB  # reserved lazily; the traces touch well under 1 GiB

    def body(res: dict[str, Any], arenas: Arenas) -> None:
        res["traces"] = run(a, arenas)

    config = {
        "traces": a.traces,
        "seeds": a.seeds,
        "first_seed": a.seed,
        "scale": a.scale,
        "glibc": not a.no_glibc,
        "block_header_bytes": ffi.sizeof("shm_block_t"),
        "heap_start": int(lib.shm_header_size()),
        "random_lifetime_sizes": [16, 1 * MiB],
    }
    return run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
