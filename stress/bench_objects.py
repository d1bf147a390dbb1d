"""Objects between processes beside their peers: array hand-off, records, small round trips.

Every figure side by side in one run (methods interleaved trial by trial; medians, and min, max,
every trial in the JSON). shmalloc.Queue against np.copyto (the floor), multiprocessing.Queue,
LMDB (writemap, no sync, /dev/shm), Ray's object store, a stdlib or compat SharedMemory per array;
an array made in place by mgr.empty(); records, one call each, against LMDB; a small round trip
against a Pipe. Each method in detail: docs/interop.md, "Figures". Peers of the `bench` extra
that are not installed are reported so; --quick leaves Ray out (slow to start).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress
from multiprocessing import shared_memory
from typing import Any

import numpy as np

import shmalloc
from shmalloc import MemoryManager, ObjectRef, compat
from shmalloc.sizes import format_bytes

from . import _common as bench
from ._common import KiB, MiB, progress

SIZES = [64 * KiB, 1 * MiB, 64 * MiB]
FIGS = ["latency", "stream"]
OPTIONAL = ["lmdb", "ray"]
SHM = {"shm": shared_memory, "compat": compat}
BOUND = 4
LMDB = dict(map_size=2 << 30, writemap=True, sync=False, metasync=False)
REPS = {"full": {SIZES[0]: 200, SIZES[1]: 50, SIZES[2]: 4}}
REPS["quick"] = {SIZES[0]: 20, SIZES[1]: 5, SIZES[2]: 1}
RECORDS = {"full": [(100_000, 100), (10_000, 10 * KiB)], "quick": [(2_000, 100), (200, 10 * KiB)]}
PINGS = {"full": 2_000, "quick": 100}
SMALL = (7, "job", 2.5)  # the round trip's object: answered 9.5, its first and last added up
TIMEOUT = 120.0
IN_PLACE, ROUND_TRIP = "64 MiB made in place", "small round trip"
TARGETS = {  # in targets_summary's order
    "lmdb_over_shmalloc": (">=", 1.5),  # every size, latency and stream
    "ray_over_shmalloc_to_1MiB": (">=", 10.0),
    "ray_over_shmalloc_64MiB": (">=", 2.0),
    "mp_over_shmalloc_1MiB": (">=", 20.0),
    "memcpy_over_in_place_64MiB": (">=", 1.0),
    "lmdb_over_shmalloc_records": (">=", 1.5),
    "pipe_over_shmalloc_round_trip": (">=", 5.0),
    "shmalloc_over_memcpy_1MiB": ("<=", 2.0),  # issue 7's, one at a time
}
ns = time.perf_counter_ns


def _look(a: Any) -> float:
    return float(a[0]) + float(a[-1])


def _take(item: Any, mgr: MemoryManager, env: Any) -> float:
    """Look at one handed-off item and let it go: the consumer's side of every method."""
    if isinstance(item, ObjectRef):  # an array made in place
        return _look(mgr.get(item))
    if not isinstance(item, list):  # an array (shmalloc, mp) or the round trip's object
        return _look(item)
    method, key, shape = item
    if method == "lmdb":
        with env.begin(write=True, buffers=True) as txn:
            got = _look(np.frombuffer(txn.get(key), "f8"))
            txn.delete(key)
        return got
    shm = SHM[method].SharedMemory(key)
    got = _look(np.ndarray(shape, "f8", buffer=shm.buf))
    shm.close()
    return got


def _records(n: int, q: Any, env: Any) -> tuple[int, int, int]:
    """Get n records from ``q``, or from LMDB a read txn each, then all in one: (ns, ns, bytes)."""
    keys, total, t0 = [b"%08d" % i for i in range(n)], 0, ns()
    for k in keys:
        if q is not None:
            total += len(q.get())
        else:
            with env.begin() as txn:
                total += len(txn.get(k))
    t1 = ns()
    if q is None:
        with env.begin() as txn:
            total += sum(len(txn.get(k)) for k in keys)
    return t1 - t0, ns() - t1, total


def consumer(arena: str, db: str | None, ctl: Any, data: Any, back: Any) -> None:
    """A consumer process: serves (op, n, arg) requests on ``ctl`` until None. Its channels are
    queues (get/put) or one Pipe (recv/send)."""
    mgr = MemoryManager.attach(arena)
    compat.set_arena(mgr)
    env = importlib.import_module("lmdb").open(db, **LMDB) if db else None
    take, get = (getattr(q, "get", None) or q.recv for q in (ctl, data))
    send = getattr(back, "put", None) or back.send
    while (req := take()) is not None:
        op, n, arg = req
        if op == "records":
            send(_records(n, arg, env))
            continue
        for _ in range(n):  # "one" or "stream" of n items; arg: answer every one
            got = _take(get(), mgr, env)
            if op == "one" or arg:
                send(got)
        if op == "stream" and not arg:
            send(got)
    mgr.close()


class Consumer:
    """A consumer process and this end of its channels: shmalloc or multiprocessing queues
    (requests, data bounded at BOUND, answers), or one multiprocessing Pipe."""

    def __init__(self, kind: str, mgr: MemoryManager, db: str | None) -> None:
        ctx = mp.get_context("spawn")
        self.kind, self.pipe = kind, kind == "pipe"
        if self.pipe:
            mine, theirs = ctx.Pipe()
            ends, args = [mine] * 3, [theirs] * 3
        else:
            make = (lambda n=0: shmalloc.Queue(n, arena=mgr)) if kind == "shmalloc" else ctx.Queue
            ends = args = [make(), make(BOUND), make()]
        self.ctl, self.data, self.back = ends
        self.proc = ctx.Process(target=consumer, args=(mgr.name, db, *args), daemon=True)
        self.proc.start()
        if self.pipe:
            theirs.close()
        self.request = getattr(self.ctl, "put", None) or self.ctl.send
        self.send = getattr(self.data, "put", None) or self.data.send

    def answer(self) -> Any:
        for _ in range(int(TIMEOUT)):  # a second at a time, to see a consumer that died
            with suppress(queue.Empty):
                if not self.pipe or self.back.poll(1.0):
                    return self.back.recv() if self.pipe else self.back.get(timeout=1.0)
            if not self.proc.is_alive():
                break
        raise RuntimeError(f"no answer from the {self.kind} consumer ({self.proc.exitcode})")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.request(None)
            self.proc.join(TIMEOUT)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


class Via:
    """One method of hand-off: send() an item, answer() the reply to the oldest one sent."""

    def __init__(self, method: str, c: Consumer | None = None, store: Any = None) -> None:
        self.method, self.c, self.store = method, c, store  # env, ray, arena or memcpy's dst
        self.acks = c is None or c.pipe  # answers every item, also when streamed
        self.pending: deque[Any] = deque()  # SharedMemory not answered for, or Ray's tasks
        self.fills: list[int] = []  # in place: ns spent filling, the producer's own work
        if method == "ray":

            class Taker:  # made here so that Ray ships it by value: its workers need not import us
                def take(self, refs: list[Any]) -> float:
                    a = store.get(refs[0])
                    return float(a[0]) + float(a[-1])

            self.actor = store.remote(Taker).remote()

    def send(self, a: Any, i: int) -> None:
        m, c, store = self.method, self.c, self.store
        if m == "memcpy":
            np.copyto(store, a)
        elif m == "ray":
            self.pending.append(self.actor.take.remote([store.put(a)]))
        elif m == "in place":
            arr, ref = store.empty(a.shape, a.dtype)
            t = ns()
            np.copyto(arr, a)
            self.fills.append(ns() - t)
            c.send(ref)
        elif m == "lmdb":
            key = b"%d" % (i % (2 * BOUND + 2))  # at most BOUND + 1 in flight
            with store.begin(write=True) as txn:
                txn.put(key, a)
            c.send(["lmdb", key, None])
        elif m in SHM:
            shm = SHM[m].SharedMemory(create=True, size=a.nbytes)
            np.ndarray(a.shape, a.dtype, buffer=shm.buf)[...] = a
            self.pending.append(shm)
            c.send([m, shm.name, a.shape])
        else:
            c.send(a)

    def answer(self) -> Any:
        if self.method == "memcpy":
            return _look(self.store)
        if self.method == "ray":
            return self.store.get(self.pending.popleft(), timeout=TIMEOUT)
        got = self.c.answer()
        if self.pending:
            shm = self.pending.popleft()
            shm.close()
            shm.unlink()
        return got


def _check(got: Any, want: Any, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what} delivered {got!r}, not {want!r}")


def handoff(m: Via, a: Any, fig: str) -> bench.Runner:
    """n hand-offs of ``a`` by ``m``, one at a time (latency) or streamed; fills not counted."""
    want = _look(a)

    def run(n: int) -> int:
        t0, filled = ns(), len(m.fills)
        if m.c is not None:
            m.c.request(("one" if fig == "latency" else "stream", n, m.acks))
        for i in range(n):
            m.send(a, i)
            if fig == "latency" or (m.acks and i >= BOUND):
                _check(m.answer(), want, m.method)
        for _ in range(0 if fig == "latency" else min(n, BOUND) if m.acks else 1):
            _check(m.answer(), want, m.method)
        return ns() - t0 - sum(m.fills[filled:])

    return run


def records(cs: dict[str, Consumer], mgr: MemoryManager, env: Any, n: int, size: int, trials: int):
    """n records of ``size`` bytes put here and got by a consumer, one call per record."""
    rec, rq, parts = os.urandom(size), shmalloc.Queue(arena=mgr), {}

    def runner(m: str) -> bench.Runner:
        def run(n: int) -> int:
            keys, t0 = [b"%08d" % i for i in range(n)], ns()
            for k in keys:
                if m == "shmalloc":
                    rq.put(rec)
                else:
                    with env.begin(write=True) as txn:
                        txn.put(k, rec)
            put = ns() - t0
            c, q = (cs["shmalloc"], rq) if m == "shmalloc" else (cs["pipe"], None)
            c.request(("records", n, q))
            get, get1, total = c.answer()
            _check(total, n * size * (1 + (m == "lmdb")), f"{m} records (bytes)")
            if m == "lmdb":
                with env.begin(write=True) as txn:
                    txn.drop(env.open_db(), delete=False)
            parts.setdefault(m, []).append((put / n, get / n, get1 / n))
            return put + get

        return run

    row = bench.measure({m: runner(m) for m in ["shmalloc", "lmdb"][: 1 + bool(env)]}, n, trials)
    for m, got in parts.items():  # got[0]: the warm-up
        for i, what in enumerate(["put", "get", "get, 1 txn"][: 2 + (m == "lmdb")]):
            row[f"{m} {what}"] = bench.summarize([g[i] for g in got[1:]])
    return row


def _us(x: float) -> str:
    return f"{x / 1e3:,.{2 if x < 1e4 else 1 if x < 1e7 else 0}f}"


def _ratio(by: dict[str, Any], m: str, base: str = "shmalloc") -> float:
    return float(by[m]["median"] / by[base]["median"])


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    print("\n".join(f"{peer}: {status}" for peer, status in res["peers"].items()))
    rows, ms = res["handoff"], list(res["handoff"][0]["latency"])
    peers = [m for m in ms if m != "shmalloc"]
    for f in FIGS:
        cells = []
        for r in rows:
            shown = [_us(r[f][m]["median"]) for m in ms]
            if f == "stream":  # bytes per ns = GB/s
                shown = [f"{r['size'] / r[f][m]['median']:.2f}" for m in ms]
            ratios = [f"{_ratio(r[f], m):.1f}x" for m in peers]
            cells.append([format_bytes(r["size"]), *shown, *ratios])
        how = "one at a time, µs each" if f == "latency" else f"streamed ({BOUND} in flight), GB/s"
        head = ["size", *ms, *(f"{m}/s" for m in peers)]
        bench.print_table(head, cells, f"array hand-off, {how}; x/s = x's time over shmalloc's")
    lines = []
    for fig, by in res["figures"].items():
        first = next(iter(by))
        for m in by:
            ratio = f"{_ratio(by, m, first):.2f}x"
            lines.append([fig * (m == first), m, _us(by[m]["median"]), ratio])
    title = "objects and records (median; records: per record); x/1st = x's time over the first's"
    bench.print_table(["figure", "method", "µs", "x/1st"], lines, title)
    bench.print_targets(res)


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows, figs, hand = res["handoff"], res["figures"], "array hand-off, latency and stream:"

    def ratios(peer: str, sizes: list[int]) -> list[float]:
        found = [r for r in rows if r["size"] in sizes and peer in r["latency"]]
        return [_ratio(r[f], peer) for r in found for f in FIGS]

    recs = [_ratio(by, "lmdb") for fig, by in figs.items() if "records" in fig and "lmdb" in by]
    in_place, one = [_ratio(figs[IN_PLACE], "memcpy", "in place")], ratios("memcpy", [MiB])[:1]
    found = [
        (f"{hand} LMDB / shmalloc, every size", ratios("lmdb", SIZES)),
        (f"{hand} Ray / shmalloc, 64 KiB and 1 MiB", ratios("ray", SIZES[:2])),
        (f"{hand} Ray / shmalloc, 64 MiB", ratios("ray", SIZES[2:])),
        (f"{hand} mp.Queue / shmalloc, 1 MiB", ratios("mp", [MiB])),
        ("64 MiB made in place: one memcpy / its hand-off", in_place),
        ("records of 100 B, 10 KiB: LMDB put+get / shmalloc Queue put+get", recs),
        ("small object round trip: Pipe / shmalloc Queues", [_ratio(figs[ROUND_TRIP], "Pipe")]),
        ("1 MiB hand-off, one at a time / one memcpy", [1 / r for r in one]),
    ]
    out = []
    for (name, values), (op, target) in zip(found, TARGETS.values(), strict=True):
        value = (max if op == "<=" else min)(values) if values else None
        note = ", ".join(f"{v:.2f}x" for v in values) or "not measured"
        out.append(bench.target_row(name, bench.judge(op, target, value), note=note))
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "few trials and repetitions, no Ray (seconds)")
    p.scaled("--trials", 2, 7, "trials per figure")
    choose = "optional peers to measure if installed (default lmdb,ray; quick: lmdb)"
    p.add_argument("--peers", type=bench.csv(OPTIONAL), help=choose)
    a = p.parse(argv)
    mode, chosen = "quick" if a.quick else "full", a.peers or OPTIONAL[: 2 - a.quick]
    out = "left out (it takes seconds to start); --peers lmdb,ray measures it"
    missing = "not installed (pip install 'shmalloc[bench]')"
    found = {k: importlib.util.find_spec(k) is not None for k in OPTIONAL}
    peers = {k: missing if not found[k] else "measured" if k in chosen else out for k in OPTIONAL}
    use = {k: importlib.metadata.version(k) for k, v in peers.items() if v == "measured"}

    def body(res: dict[str, Any], arenas: bench.Arenas) -> None:
        res["peers"], res["handoff"], figs = peers, [], {}
        mgr = arenas.new(1 << 30)  # arrays in flight, compat's segments, 10,000 records of 10 KiB
        compat.set_arena(mgr)
        db = tempfile.mkdtemp(prefix="bench-objects-", dir="/dev/shm") if "lmdb" in use else None
        env, ray, cs = importlib.import_module("lmdb").open(db, **LMDB) if db else None, None, {}
        try:
            for kind in ("shmalloc", "mp", "pipe"):
                cs[kind] = Consumer(kind, mgr, db if kind == "pipe" else None)
            vias = {"memcpy": Via("memcpy"), "shmalloc": Via("shmalloc", cs["shmalloc"])}
            if env is not None:
                vias["lmdb"] = Via("lmdb", cs["pipe"], env)
            if "ray" in use:
                progress("starting Ray")
                import ray

                ray.init(num_cpus=2, include_dashboard=False, object_store_memory=8 * max(SIZES))
                vias["ray"] = Via("ray", None, ray)
            vias.update({m: Via(m, cs["mp" if m == "mp" else "pipe"]) for m in ("mp", *SHM)})
            for size, reps in REPS[mode].items():
                progress(f"hand-off of {format_bytes(size)}: {a.trials} trials x {reps}")
                arr = np.random.default_rng(size).standard_normal(size // 8)
                vias["memcpy"].store = np.empty_like(arr)
                runners = {(f, m): handoff(v, arr, f) for f in FIGS for m, v in vias.items()}
                got = bench.measure(runners, reps, a.trials)
                row = {f: {m: got[f, m] for m in vias} for f in FIGS}
                res["handoff"].append({"size": size, "reps": reps, **row})
            if ray is not None:  # its daemons would share the 2 CPUs with the figures below
                ray.shutdown()
                ray = None
            progress(IN_PLACE)
            big = np.random.default_rng(0).standard_normal(max(SIZES) // 8)
            made = Via("in place", cs["shmalloc"], mgr)
            trio = {"in place": made, "memcpy": vias["memcpy"], "Queue.put(a)": vias["shmalloc"]}
            runners = {m: handoff(v, big, "latency") for m, v in trio.items()}
            figs[IN_PLACE] = bench.measure(runners, REPS[mode][max(SIZES)], a.trials)
            figs[IN_PLACE]["fill (apart)"] = bench.summarize(made.fills)
            for n, size in RECORDS[mode]:
                progress(name := f"{n:,} records of {format_bytes(size)}")
                figs[name] = records(cs, mgr, env, n, size, a.trials)
            progress(ROUND_TRIP)
            duo = {"shmalloc": Via("shmalloc", cs["shmalloc"]), "Pipe": Via("pipe", cs["pipe"])}
            pings = {m: handoff(v, SMALL, "latency") for m, v in duo.items()}
            figs[ROUND_TRIP] = bench.measure(pings, PINGS[mode], a.trials)
            res["figures"] = figs
        finally:
            for c in cs.values():
                c.stop()
            if ray is not None:
                ray.shutdown()
            if env is not None:
                env.close()
            if db is not None:
                shutil.rmtree(db)
            compat.set_arena(None)

    config = dict(trials=a.trials, sizes=SIZES, reps={str(k): v for k, v in REPS[mode].items()})
    config.update(bound=BOUND, records=RECORDS[mode], pings=PINGS[mode], lmdb=LMDB, peers=use)
    return bench.run_bench(sys.modules[__name__], a, config, body)


if __name__ == "__main__":
    sys.exit(main())
