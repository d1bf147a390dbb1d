"""Corruption fuzz: damage scratch arenas on purpose, then use them from a child process.

Each scratch arena (1 MiB) is handled by one child process, which populates it (blocks of known
content, some freed, retained, sealed, persistent, named, owned by the parent or by processes
that died meanwhile, one with blocks in its cache and on its remote list), damages it (1 to 3
mutations of a region: a bit flip, random bytes or an "interesting" value; a block header may
get its checksum recomputed, a lock may be left to a dead holder; offsets from ``ffi.offsetof``),
then attaches afresh and runs a batch of operations. Undamaged, the batch raises nothing
(``--no-corrupt`` checks that). The child prints its mutations, then its outcome.

Each arena is classified by how its child ended: ``clean``, ``detected`` (CorruptionDetected),
``other_error`` (another ShmallocError, ValueError, KeyError, OSError: refused), ``error`` (any
other exception: a bug in the Python layer), ``crash`` (a signal), ``hang`` (no end within
``--timeout``; faulthandler leaves the stack). Apart from that, ``wrong`` counts reads that
returned other bytes than were written, without an exception, and ``slow`` operations slower
than 0.5 s. Arena i's randomness comes from (seed, i) alone: ``--seed X --index I`` replays it
and prints everything. Exit code 0 only without crashes and hangs.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import mmap
import os
import random
import secrets
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from shmalloc import CorruptionDetected, MemoryManager, ShmallocError
from shmalloc import _binding as C
from shmalloc._binding import ffi, lib

from ._common import Parser, bar, pattern, run_check, signame, spawn

SHM_DIR = "/dev/shm"
M64, M32 = (1 << 64) - 1, (1 << 32) - 1
KiB, MiB = 1 << 10, 1 << 20
HDR = ffi.sizeof("shm_block_t")
HEAP_OFF = int(lib.shm_header_size())
CAPACITY = MiB  # every scratch arena's
SLOW = 0.5  # seconds: an operation slower than this ends the batch and is reported as slow
EXPECTED = (ShmallocError, ValueError, KeyError, OSError, MemoryError)
OUTCOMES = ("clean", "detected", "other_error", "error", "crash", "hang")
LABELS = dict(clean="clean", detected="corruption detected", other_error="other error (refused)")
LABELS.update(error="unexpected exception", crash="CRASH", hang="HANG")
LABELS.update(wrong="wrong answer (silent)", resized_silently="size changed (silent)")
LABELS.update(slow=f"slow answer (> {SLOW} s)")
EXAMPLES = ("crash", "hang", "error", "slow", "wrong")  # outcomes and findings shown in full
NEW_BLOCKS = ((24, None), (700, None), (3000, 256), (9000, None), (70000, None), (200, 4096))


# ----------------------------------------------------------------------------- layout
def fields(ctype: str) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the leaves of a struct (arrays kept whole), from the compiled
    layout, padding left out."""
    out: list[tuple[str, int, int]] = []

    def walk(t: Any, prefix: str, base: int) -> None:
        for name, f in t.fields:
            if f.type.kind == "struct":
                walk(f.type, f"{prefix}{name}.", base + f.offset)
            elif not name.startswith("pad"):
                out.append((prefix + name, base + f.offset, ffi.sizeof(f.type)))

    walk(ffi.typeof(ctype), "", 0)
    return out


def off(field: str) -> int:
    return int(ffi.offsetof("shm_arena_t", field))


ARENA_SCALARS = [f for f in fields("shm_arena_t") if "." not in f[0] and f[2] <= 8]
BLOCK = {n: (o, s) for n, o, s in fields("shm_block_t")}
TABLES = {  # region: (offset of the array, entries, entry type)
    "procs": (off("procs"), int(lib.SHM_MAX_PROCS), "shm_proc_t"),
    "refs": (off("refs"), int(lib.SHM_MAX_REFS), "shm_ref_t"),
    "names": (off("names"), int(lib.SHM_MAX_NAMES), "shm_name_t"),
    "caches": (off("caches"), int(lib.SHM_MAX_PROCS), "shm_cache_t"),
}


# ----------------------------------------------------------------------------- populate
def populate(m: MemoryManager, rng: random.Random) -> dict[str, Any]:
    """Fill an arena with blocks of known content; return what the operations may rely on."""
    m.set_cache_limit(64 * KiB)  # a 1 MiB arena starts without caches: damage them too
    known: list[dict[str, Any]] = []
    for gen in range(1, rng.randint(8, 36) + 1):
        r = rng.random()
        n = rng.randint(*((1, 256) if r < 0.5 else (256, 4096) if r < 0.85 else (4096, 24 * KiB)))
        a = m.allocate(n, align=rng.choice((64, 256, 4096)) if rng.random() < 0.1 else None)
        size = m.size_of(a)
        m.write(a, pattern(a, gen, size))
        known.append({"a": a, "gen": gen, "n": size, "refs": 0, "sealed": False})
    rng.shuffle(known)
    nfree = len(known) // 3
    for k in known[:nfree]:
        m.deallocate(k["a"])
    known = known[nfree:]
    names: dict[str, int] = {}
    for k in known:
        r = rng.random()
        if r < 0.2:
            k["refs"] = rng.randint(1, 2)
            for _ in range(k["refs"]):
                m.retain(k["a"])
        elif r < 0.3:
            m.seal(k["a"])
            k["sealed"] = True
        elif r < 0.38:
            m.persist(k["a"])
        elif r < 0.45 and len(names) < 3:
            names[f"fz{len(names)}"] = k["a"]
            m.bind(f"fz{len(names) - 1}", k["a"])
    others = [m.allocate(rng.randint(16, 2000), pid=os.getppid()) for _ in range(rng.randint(0, 2))]
    dead: list[int] = []
    if rng.random() < 0.5:  # blocks of a zombie child (it still has a /proc entry), then reaped
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        try:
            others += [m.allocate(rng.randint(16, 3000), pid=pid) for _ in range(rng.randint(1, 4))]
        finally:
            os.waitpid(pid, 0)
        dead.append(pid)
    if rng.random() < 0.6:  # a process that dies with blocks in its cache and on its remote list
        r_fd, w_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                mine = [m.allocate(rng.choice((48, 100, 100, 700, 3000))) for _ in range(8)]
                for a in mine[::2]:
                    m.deallocate(a)  # into its cache
                os.write(w_fd, b" ".join(str(a).encode() for a in mine[1::2]))
            finally:
                os._exit(0)  # no close(): the cache stays behind
        os.close(w_fd)
        with os.fdopen(r_fd, "rb") as f:
            theirs = [int(x) for x in f.read().split()]
        os.waitpid(pid, 0)
        m.allocate(64)  # this process frees one of theirs: onto the dead one's remote list
        if theirs:
            m.deallocate(theirs.pop())
        others += theirs
        dead.append(pid)
    return {"known": known, "names": names, "others": others, "dead": dead}


# ----------------------------------------------------------------------------- mutations
DESC = ("region", "target", "field", "offset", "size", "kind", "old", "new")


def desc(*values: Any) -> dict[str, Any]:
    """A mutation as the report shows it."""
    return dict(zip(DESC, values, strict=True))


class Mutator:
    """The adversary: a raw read-write mapping of the segment (and a handle over it for the two
    debug calls), and the regions it damages."""

    # region: weight in the choice of what to damage
    REGIONS = dict(block=3.0, links=2.0, bins=1.5, bitmap=1.0, procs=1.5, refs=1.0, names=1.0)
    REGIONS.update(counters=1.0, arena=0.7, lock=0.7, ring=0.7, journal=0.7, caches=1.5)

    def __init__(self, name: str, rng: random.Random, dead: list[int]) -> None:
        self.fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)  # the handle keeps using it
        self.cap = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, self.cap)
        self.base = ffi.from_buffer(self.mm)
        self.h = C.handle_open(self.base, self.cap, self.fd)
        self.rng, self.dead = rng, dead
        self.blocks: list[tuple[int, int]] = []  # (offset, flags) walked from the headers
        o = HEAP_OFF
        while o + HDR <= self.cap and (size := self.u(o, 8)) >= HDR and o + size <= self.cap:
            self.blocks.append((o, self.u(o + BLOCK["flags"][0], 4)))
            o += size

    def close(self) -> None:
        C.handle_shutdown(self.h)  # its memory goes with the last reference (ffi.gc)
        del self.h
        ffi.release(self.base)
        self.mm.close()
        os.close(self.fd)

    def u(self, o: int, size: int) -> int:
        return int.from_bytes(self.mm[o : o + size], "little")

    def put(self, o: int, size: int, value: int) -> None:
        self.mm[o : o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def some_block(self, flag: int = 0, want: bool | None = None) -> int:
        cands = [o for o, fl in self.blocks if want is None or bool(fl & flag) == want]
        return self.rng.choice(cands) if cands else HEAP_OFF

    def value(self, name: str, size: int, old: int, at: int) -> int:
        """An "interesting" value for a field: offsets, sizes and counts near the edges."""
        r, cap = self.rng, self.cap
        if size == 4:
            edges = [0, 1, 2, 127, 128, 255, M32, 0x7FFFFFFF, 0x80000000, (old + 1) & M32]
            return r.choice([*edges, (old - 1) & M32, r.getrandbits(32)])
        if size != 8:
            return r.getrandbits(8 * size)
        blk, jitter = self.some_block(), old ^ (1 << r.randrange(64))
        common = [0, M64, 1 << 63, cap, cap - 16, cap + 16, r.randrange(cap) & ~15, jitter]
        if name.rsplit(".", 1)[-1] in ("size", "prev_size", "heap_size", "capacity", "used"):
            return r.choice(common + [16, 48, 64, 80, old * 2, old // 2 & ~15, cap - at, old + 16])
        near = [blk, blk + HDR, blk - 16, at, at - HDR, old + 64, old - 16]
        free = self.some_block(lib.SHM_BF_FREE, True)
        return r.choice(common + near + [8, HEAP_OFF, HEAP_OFF - 16, free])

    def mutate(
        self, region: str, target: str, at: int, size: int, name: str, reseal: int | None = None
    ) -> dict[str, Any]:
        r = self.rng
        if size > 8:  # a byte array: one byte or one word inside it
            rel = r.randrange(0, size - 7) & ~7 if r.random() < 0.4 else r.randrange(size)
            width = 8 if rel % 8 == 0 and rel + 8 <= size and r.random() < 0.5 else 1
            return self.mutate(region, target, at + rel, width, f"{name}[{rel}]", reseal)
        old = self.u(at, size)
        kind = r.choices(("bitflip", "set", "random"), (35, 50, 15))[0]
        new = {
            "bitflip": lambda: old ^ (1 << r.randrange(8 * size)),
            "set": lambda: self.value(name, size, old, at),
            "random": lambda: r.getrandbits(8 * size),
        }[kind]() & ((1 << (8 * size)) - 1)
        self.put(at, size, new if new != old else old ^ 1)
        if reseal is not None:  # recompute the header's checksum, as an adversary with the salt
            kind += "+checksum"
            o, s = BLOCK["check"]
            self.put(reseal + o, s, lib.shm_debug_block_checksum(self.base, self.cap, reseal))
        return desc(region, target, name, at, size, kind, f"{old:#x}", f"{self.u(at, size):#x}")

    def forge(self, region: str, which: int) -> dict[str, Any]:
        """The lock ``which`` (-1: the heap lock) left to a holder that died without the kernel's
        cleanup: the next taker must recover it (and roll the journal back)."""
        if not self.dead:  # no process died with blocks in populate(): one dies now
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            self.dead.append(pid)
        tid = self.dead[0]
        C.debug_lock_forge(self.h, which, tid)
        at = int(lib.shm_lock_offset(which))
        return desc(region, f"lock {which}", "holder", at, 0, "dead holder", "", str(tid))

    def entry(self, region: str) -> tuple[int, int, str]:
        """A table entry, preferring live ones (a non-zero first word): (index, offset, type)."""
        base, count, ctype = TABLES[region]
        size = ffi.sizeof(ctype)
        live = [i for i in range(count) if self.u(base + i * size, 8)]
        if live and self.rng.random() < 0.8:
            i = self.rng.choice(live)
        else:  # often among the first few, where a small run's entries are
            i = self.rng.randrange(min(count, 8) if self.rng.random() < 0.5 else count)
        return i, base + i * size, ctype

    def field_of(self, region: str, target: str, at: int, ctype: str) -> dict[str, Any]:
        n, o, s = self.rng.choice(fields(ctype))
        return self.mutate(region, target, at + o, s, n)

    def r_arena(self) -> dict[str, Any]:
        n, o, s = self.rng.choice(ARENA_SCALARS)
        return self.mutate("arena", "arena header", o, s, n)

    def r_counters(self) -> dict[str, Any]:
        return self.field_of("counters", "counters", off("counters"), "shm_counters_t")

    def r_lock(self) -> dict[str, Any]:
        if self.rng.random() < 0.3:
            return self.forge("lock", -1)
        n, o, s = fields("shm_lock_t")[0]  # the mutex's bytes, whatever the libc keeps there
        return self.mutate("lock", "heap lock", int(lib.shm_lock_offset(-1)) + o, s, n)

    def r_bitmap(self) -> dict[str, Any]:
        r, words = self.rng, int(lib.SHM_BITMAP_WORDS)
        bit = r.randrange(64 * words) if r.random() < 0.3 else r.randrange(int(lib.SHM_NBINS))
        at, word = off("bitmap") + 8 * (bit // 64), f"bitmap[{bit // 64}]"
        old, new = self.u(at, 8), self.u(at, 8) ^ (1 << bit % 64)
        self.put(at, 8, new)
        return desc("bitmap", f"bin {bit}", word, at, 8, "bitflip", f"{old:#x}", f"{new:#x}")

    def r_bins(self) -> dict[str, Any]:
        nbins = int(lib.SHM_NBINS)
        full = [i for i in range(nbins) if self.u(off("bins") + 8 * i, 8)]
        i = self.rng.choice(full) if full and self.rng.random() < 0.7 else self.rng.randrange(nbins)
        return self.mutate("bins", f"bin {i}", off("bins") + 8 * i, 8, f"bins[{i}]")

    def r_procs(self) -> dict[str, Any]:
        i, at, ctype = self.entry("procs")
        return self.field_of("procs", f"slot {i}", at, ctype)

    def r_refs(self) -> dict[str, Any]:
        i, at, ctype = self.entry("refs")
        return self.field_of("refs", f"ref entry {i}", at, ctype)

    def r_names(self) -> dict[str, Any]:
        i, at, ctype = self.entry("names")
        if self.rng.random() < 0.2:  # a name without its terminating NUL
            o = int(ffi.offsetof(ctype, "name"))
            n = int(lib.SHM_NAME_LEN)
            self.mm[at + o : at + o + n] = b"Z" * n
            return desc("names", f"name entry {i}", "name", at + o, n, "unterminated", "", "Z..")
        return self.field_of("names", f"name entry {i}", at, ctype)

    def r_ring(self) -> dict[str, Any]:
        ring = off("ring")
        if self.rng.random() < 0.4:
            n, o, s = self.rng.choice([f for f in fields("shm_ring_t") if f[0] != "slots"])
            return self.mutate("ring", "ring", ring + o, s, n)
        i = self.rng.randrange(int(lib.SHM_RING_SLOTS) if self.rng.random() < 0.5 else 8)
        at = ring + int(ffi.offsetof("shm_ring_t", "slots")) + i * ffi.sizeof("shm_event_t")
        return self.field_of("ring", f"ring slot {i}", at, "shm_event_t")

    def r_journal(self) -> dict[str, Any]:
        j = off("journal")
        f = {n: (o, s) for n, o, s in fields("shm_journal_t")}
        if self.rng.random() >= 0.5:
            return self.field_of("journal", "journal", j, "shm_journal_t")
        # records claimed by a holder that died mid-operation: the next taker rolls them back
        r, pos, recs = self.rng, 0, []
        for _ in range(r.randint(1, 3)):
            at = self.value("offset", 8, 0, 0) if r.random() < 0.5 else r.randrange(self.cap)
            ln = r.choice((1, 8, 16, 32, 64, 4096, M64, 1 << 32, r.randrange(1 << 20)))
            rec = struct.pack("<QQ", at & M64, ln & M64) + r.randbytes(min(ln, 64) + 7 & ~7)
            self.mm[j + f["log"][0] + pos : j + f["log"][0] + pos + len(rec)] = rec
            pos += len(rec)
            recs.append(f"{at & M64:#x}+{ln & M64:#x}")
        self.put(j + f["count"][0], f["count"][1], len(recs))
        self.put(j + f["used"][0], f["used"][1], pos)
        forged = self.forge("journal", -1)
        return {**forged, "target": "journal + dead lock holder", "new": ", ".join(recs)}

    def r_caches(self) -> dict[str, Any]:
        """A process's cache (list heads, counts, remote list, pending word), the link in a
        cached block, or its slot lock."""
        r = self.rng
        i, at, ctype = self.entry("caches")
        cached = [o for o, fl in self.blocks if fl & lib.SHM_BF_CACHED]
        if cached and r.random() < 0.3:
            b = r.choice(cached)
            return self.mutate("caches", f"cached block at {b:#x}", b + HDR, 8, "link")
        if r.random() < 0.15:
            return self.forge("caches", i)
        return self.field_of("caches", f"cache of slot {i}", at, ctype)

    def r_block(self) -> dict[str, Any]:
        r = self.rng
        b = self.some_block(lib.SHM_BF_FREE, None if r.random() < 0.6 else bool(r.getrandbits(1)))
        kind = "free" if self.u(b + BLOCK["flags"][0], 4) & lib.SHM_BF_FREE else "allocated"
        forge = r.random() < 0.4  # then the checksum is recomputed, not damaged
        n, o, s = r.choice([f for f in fields("shm_block_t") if not (forge and f[0] == "check")])
        return self.mutate("block", f"{kind} block at {b:#x}", b + o, s, n, b if forge else None)

    def r_links(self) -> dict[str, Any]:
        frees = [o for o, fl in self.blocks if fl & lib.SHM_BF_FREE]
        if not frees:
            return self.r_block()
        b, which = self.rng.choice(frees), self.rng.randrange(2)
        at, name = b + HDR + 8 * which, ("next", "prev")[which]
        return self.mutate("links", f"free block at {b:#x}", at, 8, name)

    def run(self) -> list[dict[str, Any]]:
        regions, weights = list(self.REGIONS), list(self.REGIONS.values())
        n = self.rng.choice((1, 1, 1, 2, 2, 3))  # each damage draws its region, then its details
        return [getattr(self, "r_" + self.rng.choices(regions, weights)[0])() for _ in range(n)]


# ----------------------------------------------------------------------------- the operations
class Ops:
    """The batch of operations run on a damaged arena, with every outcome recorded."""

    FAIL = object()

    def __init__(self, rng: random.Random, state: dict[str, Any]) -> None:
        self.rng, self.state = rng, state
        self.nops = self.corruption = self.other = 0
        self.exc: Counter[str] = Counter()
        self.first_detected: dict[str, Any] | None = None
        self.unexpected: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []
        self.resized: list[dict[str, Any]] = []
        self.slow: list[dict[str, Any]] = []

    def call(self, label: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if self.slow:  # a slow answer (a lock waiting for a holder that is gone) would make
            return self.FAIL  # every later operation as slow: stop the batch here
        self.nops += 1
        t = time.monotonic()
        try:
            return fn(*args, **kw)
        except CorruptionDetected as e:
            self.corruption += 1
            self.exc[f"{label}: CorruptionDetected"] += 1
            if self.first_detected is None:
                self.first_detected = {"op": label, "offset": e.offset, "detail": e.detail}
        except EXPECTED as e:
            self.other += 1
            self.exc[f"{label}: {type(e).__name__}"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is what this fuzz looks for
            tb = traceback.format_exc(limit=8)[-2000:]
            self.unexpected.append(dict(op=label, type=type(e).__name__, message=str(e)[:300]))
            self.unexpected[-1]["traceback"] = tb
        finally:
            if time.monotonic() - t > SLOW:
                self.slow.append({"op": label, "seconds": round(time.monotonic() - t, 2)})
        return self.FAIL

    def verify(self, m: MemoryManager, label: str, a: int, gen: int, n: int) -> None:
        size = self.call(f"size_of {label}", m.size_of, a)
        data = self.call(f"read {label}", m.read, a)
        if size is self.FAIL or data is self.FAIL:
            return
        k = min(len(data), n)
        exp = pattern(a, gen, n)
        if data[:k] != exp[:k]:
            i = next(j for j in range(k) if data[j] != exp[j])
            seen = dict(expected=exp[i : i + 16].hex(), found=data[i : i + 16].hex())
            self.wrong.append(dict(op=f"read {label}", address=a, offset=i, **seen))
        if size != n:
            self.resized.append({"address": a, "size": n, "size_now": size})

    def run(self, name: str) -> None:
        m = self.call("attach", MemoryManager.attach, name)
        if m is self.FAIL:
            return
        known, call = list(self.state["known"]), self.call
        try:
            call("stats", m.stats)
            call("check", m.check)
            self.rng.shuffle(known)
            for k in known[:10]:
                self.verify(m, "known", k["a"], k["gen"], k["n"])
            for k in [k for k in known if not k["sealed"]][:5]:
                data = pattern(k["a"], k["gen"] + 1000, k["n"])
                if call("write known", m.write, k["a"], data) is not self.FAIL:
                    k["gen"] += 1000  # (a refused write changed nothing)
                    self.verify(m, "rewritten", k["a"], k["gen"], k["n"])
            new = []
            for n, align in NEW_BLOCKS:
                a = call("allocate", m.allocate, n, align=align)
                size = self.FAIL if a is self.FAIL else call("size_of new", m.size_of, a)
                wrote = size is not self.FAIL and call("write new", m.write, a, pattern(a, 7, size))
                if wrote not in (False, self.FAIL):
                    new.append((a, size))
            for a, size in new:
                self.verify(m, "new", a, 7, size)
            for k in known[:4]:  # a new block must not overlap an old one
                self.verify(m, "known after allocations", k["a"], k["gen"], k["n"])
            for k in known[:3]:
                if call("retain", m.retain, k["a"]) is not self.FAIL:
                    call("release", m.release, k["a"])
            for k in known:
                for _ in range(k["refs"]):
                    call("release populated", m.release, k["a"])
            for a in self.state["others"][:2]:
                call("adopt", m.adopt, a)
            if new:
                call("persist", m.persist, new[0][0])
                call("seal", m.seal, new[-1][0])
            call("names", m.names)
            for nm, a in self.state["names"].items():
                got = call("lookup", m.lookup, nm)
                if got is not self.FAIL and got != a:
                    self.wrong.append({"op": "lookup", "name": nm, "expected": a, "found": got})
            if new and call("bind", m.bind, "fz-new", new[0][0]) is not self.FAIL:
                call("lookup new", m.lookup, "fz-new")
                call("unbind", m.unbind, "fz-new")
            for label in ("processes", "all_blocks", "should_collect", "dropped_events"):
                call(label, getattr(m, label))
            call("process_memory", m.process_memory, os.getpid())
            call("process_allocations", m.process_allocations, os.getpid())
            for k in known[: len(known) // 2]:
                call("deallocate known", m.deallocate, k["a"])
            for a, _ in new:
                call("deallocate new", m.deallocate, a)
            call("collect", m.collect)
            call("free_process_memory", m.free_process_memory, os.getppid())
            call("drain_events", m.drain_events)
            call("check again", m.check)
            call("stats again", m.stats)
        finally:
            call("close", m.close)

    def outcome(self) -> str:
        if self.unexpected:
            return "error"
        return "detected" if self.corruption else "other_error" if self.other else "clean"


# ----------------------------------------------------------------------------- one arena
def child_main(a: argparse.Namespace) -> int:
    """One arena: populate, damage, print the mutations, run the batch, print the outcome."""
    faulthandler.enable()
    faulthandler.dump_traceback_later(max(0.5, a.timeout - 1), exit=False)  # before a hang kill
    rng = random.Random(f"{a.seed}:{a.index}")
    name = f"{a.child}-{a.index}"
    try:
        m = MemoryManager.create(name, CAPACITY)
        state = populate(m, rng)
        m.close()
        mut = Mutator(name, rng, state["dead"])
        try:
            muts = [] if a.no_corrupt else mut.run()
        finally:
            mut.close()
        print(json.dumps({"mutations": muts}), flush=True)
        ops = Ops(rng, state)
        ops.run(name)
        res = dict(outcome=ops.outcome(), exceptions=dict(ops.exc), nops=ops.nops)
        res.update(first_detected=ops.first_detected, unexpected=ops.unexpected[:3])
        res.update(wrong=ops.wrong[:3], resized=ops.resized[:3], slow=ops.slow[:3])
        print(json.dumps(res, default=str), flush=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
        Path(SHM_DIR, name).unlink(missing_ok=True)
    return 0


class Fuzz:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.prefix = f"shmalloc-fuzz-{os.getpid()}-{secrets.token_hex(2)}"
        self.counts: Counter[str] = Counter()
        self.by_region: dict[str, Counter[str]] = defaultdict(Counter)
        self.examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.found: Counter[str] = Counter()  # arenas with wrong, resized or slow answers
        self.detail: list[dict[str, Any]] = []

    def run_one(self, i: int) -> dict[str, Any]:
        """Arena i in a child process; its outcome from how the child ended and what it said."""
        a = self.a
        args = ["--child", self.prefix, "--index", i, "--seed", a.seed, "--timeout", a.timeout]
        args += ["--no-corrupt"][: a.no_corrupt]
        p = spawn("corrupt_fuzz", *args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=a.timeout)
            status = "crash" if p.returncode < 0 else "error" if p.returncode else None
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            status = "hang"
        finally:
            Path(SHM_DIR, f"{self.prefix}-{i}").unlink(missing_ok=True)
        lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        muts = lines[0]["mutations"] if lines else None
        res = lines[1] if len(lines) > 1 and status is None else {}
        res = {"index": i, "mutations": muts, "status": signame(p.returncode), **res}
        return {**res, "outcome": status or res["outcome"], "stderr": err[-4000:] * bool(status)}

    def record(self, r: dict[str, Any]) -> None:
        outcome = r["outcome"]
        self.counts[outcome] += 1
        for region in sorted({m["region"] for m in r["mutations"] or []}) or ["(none)"]:
            self.by_region[region][outcome] += 1
        r["reproduce"] = f"python -m stress.corrupt_fuzz --seed {self.a.seed} --index {r['index']}"
        for kind in EXAMPLES:  # the outcome, or a list of what went wrong in the child
            if (outcome == kind or r.get(kind)) and len(self.examples[kind]) < 50:
                self.examples[kind].append(r)
        self.found.update(k for k in ("wrong", "resized", "slow") if r.get(k))
        if self.a.index is not None:
            self.detail.append(r)

    def run(self) -> dict[str, Any]:
        a, t0 = self.a, time.monotonic()
        indices = [a.index] if a.index is not None else list(range(a.arenas))
        pool = ThreadPoolExecutor(a.jobs)
        try:
            futures = [pool.submit(self.run_one, i) for i in indices]
            with bar(len(indices), "arenas") as update:
                for done, fut in enumerate(as_completed(futures), 1):
                    self.record(fut.result())
                    update(done, " ".join(f"{k}={self.counts[k]}" for k in OUTCOMES))
        finally:  # after an interrupt, the children at work stop (the pool starts no more)
            for child in psutil.Process().children():
                with suppress(psutil.NoSuchProcess):  # it ended meanwhile
                    child.kill()
            pool.shutdown(wait=True, cancel_futures=True)
        counts = {k: self.counts[k] for k in OUTCOMES}
        config = {k: getattr(a, k) for k in ("seed", "timeout", "jobs", "quick")}
        config.update(capacity=CAPACITY, arenas=len(indices), corrupt=not a.no_corrupt)
        res = dict(ok=counts["crash"] == counts["hang"] == 0, config=config, counts=counts)
        res.update(arenas=sum(counts.values()), wrong=self.found["wrong"], slow=self.found["slow"])
        res.update(resized_silently=self.found["resized"], detail=self.detail, index=a.index)
        res["by_region"] = {k: dict(v) for k, v in sorted(self.by_region.items())}
        res.update({f"{k}_examples": self.examples[k] for k in EXAMPLES})
        res["duration"] = round(time.monotonic() - t0, 2)
        return res


def print_report(res: dict[str, Any]) -> None:
    c, cfg = res["counts"], res["config"]
    print(f"corrupt fuzz: {res['arenas']} arenas of {cfg['capacity'] // KiB} KiB, seed ", end="")
    print(f"{cfg['seed']}, {cfg['jobs']} at once, timeout {cfg['timeout']} s, {res['duration']} s")
    for k, n in {**c, **{k: res[k] for k in ("wrong", "resized_silently", "slow")}}.items():
        print(f"  {LABELS[k]:<24} {n:>7}")
    if res["by_region"]:
        print("  by region:  " + " ".join(f"{k:>11}" for k in OUTCOMES))
        for r, cnt in res["by_region"].items():
            print(f"    {r:<10}" + " ".join(f"{cnt.get(k, 0):>11}" for k in OUTCOMES))
    each = "{region}/{target}.{field} {kind} {old}->{new}"
    for kind in EXAMPLES:
        for e in res[f"{kind}_examples"][:10]:
            muts = [each.format(**m) for m in e["mutations"] or ()]
            print(f"  {kind} in arena {e['index']} [{e['status']}]: ", end="")
            print("; ".join(muts) or "(before any mutation)")
            print(f"      reproduce: {e['reproduce']}")
            for u in (e.get("unexpected") or e.get("slow") or e.get("wrong") or [])[:1]:
                print(f"      {u}")
            tail = [ln for ln in e["stderr"].splitlines() if ln.strip()]
            for ln in tail[-6:]:
                print(f"      | {ln}")
    for d in res["detail"]:
        print(json.dumps(d, indent=2, default=str))
    print(f"  result: {'PASS' if res['ok'] else 'FAIL'} (crashes {c['crash']}, hangs {c['hang']})")


def main(argv: list[str] | None = None) -> int:
    p = Parser(sys.modules[__name__], "100 arenas (a CI smoke test)", results=False)
    p.scaled("--arenas", 100, 2000, "scratch arenas to damage", least=0)
    p.add_argument("--seed", type=int, default=1, help="arena i's randomness is (seed, i)")
    jobs = "children at once (default: the CPUs)"
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help=jobs)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a hang (default 10)")
    p.add_argument("--index", type=int, help="replay only arena I of this seed, verbosely")
    p.add_argument("--no-corrupt", action="store_true", help="no damage: every arena must be clean")
    p.add_argument("--child", metavar="PREFIX", help=argparse.SUPPRESS)  # Fuzz.run_one()'s
    a = p.parse(argv)
    if a.jobs < 1 or a.timeout <= 0:
        p.error("--jobs >= 1 and --timeout > 0")
    if a.child is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return child_main(a)
    return run_check(a, Fuzz(a).run, print_report, "children killed, scratch arenas removed")


if __name__ == "__main__":
    sys.exit(main())
