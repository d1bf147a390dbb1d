"""Corruption fuzz: damage scratch arenas on purpose, then use them from a child process.

    python -m stress.corrupt_fuzz [--arenas N] [--seed X] [--json PATH] [--quick]
                                  [--jobs J] [--timeout T] [--index I] [--no-corrupt]

For each of N scratch arenas (1 MiB, or the header plus 512 KiB if that is more; unique names;
destroyed after), a child process:

1. creates the arena and populates it: blocks of random sizes (some aligned) with a known
   pattern, a third of them freed again (free blocks between live ones), some retained, sealed,
   persistent, bound to names, some owned by the parent process and some by a process that has
   died meanwhile (a zombie child, reaped before the damage: its blocks are orphans);
2. damages it: 1 to 3 mutations, each in one region: the arena header fields, the counters, the
   heap lock's bytes, the bitmap, the bins, the process table, the references, the names, the
   event ring, the undo journal (and any other header field the layout grows), block headers and
   free-list links. A mutation flips a bit, writes random bytes, sets a field to an "interesting"
   value (0, -1, the capacity, the heap's start or end, another block's offset, its own offset,
   a neighbour's, off by 16...) or, for block headers, forges a field and recomputes the header's
   checksum (an adversary that knows the salt: only structural checks can catch that). Offsets
   come from the layout the cffi module compiled (``ffi.offsetof``), so they follow the layout;
3. attaches afresh and runs a batch of operations, catching exceptions: attach, stats, check,
   size_of/read of known blocks (compared with their pattern), write, allocate/write/read new
   blocks, retain/release, adopt, persist, seal, names/lookup/bind/unbind, processes,
   process_memory/allocations, all_blocks, deallocate, collect, free_process_memory,
   drain_events, check again, close. On an undamaged arena this batch raises nothing
   (``--no-corrupt`` verifies that).

Outcome per arena: ``clean`` (nothing raised), ``detected`` (CorruptionDetected raised),
``other_error`` (another ShmallocError, ValueError, KeyError or OSError: refused, but not named as
corruption), ``error`` (any other Python exception: a bug in the Python layer), ``crash`` (the
child died by a signal: SIGSEGV, SIGBUS, SIGABRT...), ``hang`` (no answer within ``--timeout``).
Independently, ``wrong`` counts arenas where a read returned, without any exception, bytes that
differ from what was written (a silent wrong answer).

Children handle many arenas each and report one JSON line per step on stdout, so a crash loses
only the current arena; the parent then starts a new child at the next arena. Children run with
faulthandler on, so a crash or a hang leaves the Python stack of the operation in the report.
Each arena's randomness is derived from (seed, index) alone: ``--seed X --index I`` replays
arena I of a run exactly (up to the arena's random salt and pids) and prints everything.

Exit code 0 only if there were no crashes and no hangs. Every arena and child is cleaned up on
the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import mmap
import os
import random
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from shmalloc import CorruptionDetected, MemoryManager, ShmallocError
from shmalloc._binding import ffi, lib

from ._common import child_env, write_json
from ._common import signame as _signame

REPO_ROOT = Path(__file__).resolve().parent.parent
SHM_DIR = "/dev/shm"
M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
HDR = ffi.sizeof("shm_block_t")
HEAP_OFF = int(lib.shm_header_size())
KiB, MiB = 1 << 10, 1 << 20
SLOW = 0.5  # seconds: an operation slower than this ends the batch and is reported as slow
EXPECTED = (ShmallocError, ValueError, KeyError, OSError, MemoryError)
OUTCOMES = ("clean", "detected", "other_error", "error", "crash", "hang")

# ----------------------------------------------------------------------------- layout


def pattern(address: int, gen: int, n: int) -> bytes:
    unit = struct.pack("<QQ", address, gen)
    return (unit * (n // 16 + 1))[:n]


TRANSIENT = int(getattr(lib, "SHM_BF_TRANSIENT", 0))  # flag bits the checksum leaves out


def _mix64(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    x ^= x >> 31
    return x


def block_checksum(
    salt: int, off: int, size: int, prev: int, owner: int, flags: int, refs: int
) -> int:
    """A port of block.c's block_checksum (verified against a real header before use)."""
    x = salt ^ ((off * 0x9E3779B97F4A7C15) & M64)
    x ^= (size * 0xC2B2AE3D27D4EB4F) & M64
    x ^= ((prev + 1) * 0x165667B19E3779F9) & M64
    x ^= ((((owner << 32) | (flags & ~TRANSIENT & M32)) + 3) * 0xD6E8FEB86659FD93) & M64
    x ^= ((refs + 7) * 0x94D049BB133111EB) & M64
    x = _mix64(x & M64)
    return (x ^ (x >> 32)) & M32


def struct_fields(ctype: str) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the scalar leaves of a struct, arrays of scalars kept whole."""
    out: list[tuple[str, int, int]] = []

    def walk(t: Any, prefix: str, base: int) -> None:
        for name, f in t.fields:
            ft = f.type
            if ft.kind == "struct":
                walk(ft, f"{prefix}{name}.", base + f.offset)
            elif ft.kind == "array" and ft.item.kind == "struct":
                out.append((prefix + name, base + f.offset, ffi.sizeof(ft)))
            else:
                out.append((prefix + name, base + f.offset, ffi.sizeof(ft)))

    walk(ffi.typeof(ctype), "", 0)
    return out


def _off(field: str) -> int:
    return int(ffi.offsetof("shm_arena_t", field))


ARENA_TOP = [(n, o, s) for n, o, s in struct_fields("shm_arena_t")]
KNOWN_TOP = {
    "counters",
    "heap_lock",
    "bitmap",
    "bins",
    "pad_bins",
    "procs",
    "refs",
    "names",
    "ring",
    "journal",
    "caches",
    "slot_locks",
}
ARENA_SCALAR_NAMES = {
    "magic",
    "version",
    "header_size",
    "capacity",
    "heap_off",
    "heap_size",
    "salt",
    "created_ns",
    "max_procs",
    "nbins",
}
ARENA_SCALARS = [f for f in ARENA_TOP if f[0] in ARENA_SCALAR_NAMES]
# fields the layout may grow that this file does not know: damaged as raw bytes ("other")
OTHER_FIELDS = [f for f in ARENA_TOP if f[0].split(".")[0] not in KNOWN_TOP | ARENA_SCALAR_NAMES]
HAS_JOURNAL = any(n.startswith("journal") for n, _, _ in ARENA_TOP)
OFF_COUNTERS = _off("counters")
OFF_LOCK = _off("heap_lock")
OFF_BITMAP = _off("bitmap")
OFF_BINS = _off("bins")
OFF_PROCS = _off("procs")
OFF_REFS = _off("refs")
OFF_NAMES = _off("names")
OFF_RING = _off("ring")
OFF_CACHES = _off("caches")
OFF_SLOT_LOCKS = _off("slot_locks")
CACHE_SIZE = ffi.sizeof("shm_cache_t")
LOCK_SIZE = ffi.sizeof("shm_lock_t")
CACHE_FIELDS = [f for f in struct_fields("shm_cache_t") if not f[0].startswith("pad")]
OFF_SALT = _off("salt")
NBINS = int(lib.SHM_NBINS)
NPROCS = int(lib.SHM_MAX_PROCS)
NREFS = int(lib.SHM_MAX_REFS)
NNAMES = int(lib.SHM_MAX_NAMES)
PROC_SIZE = ffi.sizeof("shm_proc_t")
REF_SIZE = ffi.sizeof("shm_ref_t")
NAME_SIZE = ffi.sizeof("shm_name_t")
EVENT_SIZE = ffi.sizeof("shm_event_t")
RING_SLOTS_OFF = OFF_RING + int(ffi.offsetof("shm_ring_t", "slots"))
PROC_FIELDS = struct_fields("shm_proc_t")
REF_FIELDS = struct_fields("shm_ref_t")
NAME_FIELDS = struct_fields("shm_name_t")
BLOCK_FIELDS = struct_fields("shm_block_t")
COUNTER_FIELDS = struct_fields("shm_counters_t")
RING_FIELDS = [f for f in struct_fields("shm_ring_t") if not f[0].startswith(("pad", "slots"))]
EVENT_FIELDS = struct_fields("shm_event_t")
JOURNAL_FIELDS = struct_fields("shm_journal_t") if HAS_JOURNAL else []
OFF_JOURNAL = _off("journal") if HAS_JOURNAL else 0
F_BLOCK = {n: (o, s) for n, o, s in BLOCK_FIELDS}


def arena_capacity(requested: int) -> int:
    cap = max(requested, HEAP_OFF + 512 * KiB)
    return -(-cap // MiB) * MiB


# ----------------------------------------------------------------------------- the segment


class Segment:
    """A raw read-write mapping of an arena's segment: the adversary's view."""

    def __init__(self, name: str) -> None:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            self.cap = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, self.cap)
        finally:
            os.close(fd)

    def u(self, off: int, size: int) -> int:
        return int.from_bytes(self.mm[off : off + size], "little")

    def put(self, off: int, size: int, value: int) -> None:
        self.mm[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def blocks(self) -> list[tuple[int, int, int]]:
        """(offset, size, flags) of the heap's blocks, walked from the headers."""
        out = []
        off = HEAP_OFF
        while off < self.cap:
            size = self.u(off, 8)
            if size < 64 or size % 16 or off + size > self.cap:
                break
            out.append((off, size, self.u(off + F_BLOCK["flags"][0], 4)))
            off += size
        return out

    def close(self) -> None:
        self.mm.close()


# ----------------------------------------------------------------------------- populate


def populate(m: MemoryManager, rng: random.Random) -> dict[str, Any]:
    """Fill an arena with blocks of known content; return what the operations may rely on."""
    m.set_cache_limit(64 * KiB)  # a 1 MiB arena starts without caches: damage them too
    known: list[dict[str, Any]] = []
    for gen in range(1, rng.randint(8, 36) + 1):
        r = rng.random()
        n = (
            rng.randint(1, 256)
            if r < 0.5
            else rng.randint(256, 4096)
            if r < 0.85
            else rng.randint(4096, 24 * KiB)
        )
        align = rng.choice((64, 256, 4096)) if rng.random() < 0.1 else None
        a = m.allocate(n, align=align)
        size = m.size_of(a)
        m.write(a, pattern(a, gen, size))
        known.append(
            {
                "a": a,
                "gen": gen,
                "n": size,
                "refs": 0,
                "sealed": False,
                "persist": False,
                "owner": "self",
            }
        )
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
            k["persist"] = True
        elif r < 0.45 and len(names) < 3:
            nm = f"fz{len(names)}"
            m.bind(nm, k["a"])
            names[nm] = k["a"]
            k["persist"] = True
    # blocks of other processes: the parent (alive) and a zombie child (dead once reaped)
    others: list[dict[str, Any]] = []
    for _ in range(rng.randint(0, 2)):
        a = m.allocate(rng.randint(16, 2000), pid=os.getppid())
        others.append({"a": a, "owner": "parent"})
    dead_pid = 0
    if rng.random() < 0.5:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        try:
            for _ in range(rng.randint(1, 4)):  # the zombie still has a /proc entry
                others.append({"a": m.allocate(rng.randint(16, 3000), pid=pid), "owner": "dead"})
            dead_pid = pid
        finally:
            os.waitpid(pid, 0)
    if rng.random() < 0.6:  # a process that dies with blocks in its cache and on its remote list
        r_fd, w_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r_fd)
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
        others.extend({"a": a, "owner": "dead"} for a in theirs)
        dead_pid = dead_pid or pid
    return {"known": known, "names": names, "others": others, "dead_pid": dead_pid}


# ----------------------------------------------------------------------------- mutations


class Mutator:
    def __init__(self, seg: Segment, rng: random.Random, state: dict[str, Any]) -> None:
        self.seg = seg
        self.rng = rng
        self.state = state
        self.blocks = seg.blocks()
        self.salt = seg.u(OFF_SALT, 8)
        self.forge_ok = self._forge_works()

    def _forge_works(self) -> bool:
        if not self.blocks:
            return False
        off = self.blocks[0][0]
        f = {n: self.seg.u(off + o, s) for n, (o, s) in F_BLOCK.items()}
        try:
            return f["check"] == block_checksum(
                self.salt, off, f["size"], f["prev_size"], f["owner"], f["flags"], f["refcount"]
            )
        except KeyError:
            return False

    # values
    def some_block(self, free: bool | None = None) -> int:
        cands = [o for o, _, fl in self.blocks if free is None or bool(fl & 1) == free]
        return self.rng.choice(cands) if cands else HEAP_OFF

    def offset_value(self, old: int, self_off: int) -> int:
        r = self.rng
        cap = self.seg.cap
        blk = self.some_block()
        values: list[int] = [
            0,
            1,
            8,
            16,
            M64,
            1 << 63,
            (1 << 63) - 1,
            cap,
            cap - 16,
            cap - 64,
            cap + 16,
            HEAP_OFF,
            HEAP_OFF - 16,
            HEAP_OFF + 16,
            blk,
            blk + HDR,
            blk + 8,
            blk - 16,
            self.some_block(True),
            self.some_block(False),
            self_off,
            self_off - HDR,
            r.randrange(0, cap) & ~15,
            r.randrange(0, cap),
            r.getrandbits(64),
            old ^ (1 << r.randrange(64)),
            (old + 16) & M64,
            (old - 16) & M64,
            (old + 64) & M64,
        ]
        return r.choice(values)

    def u32_value(self, old: int) -> int:
        r = self.rng
        return r.choice(
            [
                0,
                1,
                2,
                3,
                127,
                128,
                129,
                255,
                M32,
                0x7FFFFFFF,
                0x80000000,
                r.getrandbits(32),
                old ^ (1 << r.randrange(32)),
                (old + 1) & M32,
                (old - 1) & M32,
            ]
        )

    def size_value(self, old: int, off: int) -> int:
        r = self.rng
        cap = self.seg.cap
        return (
            r.choice(
                [
                    0,
                    16,
                    32,
                    48,
                    64,
                    80,
                    old + 16,
                    old - 16,
                    old + 64,
                    old * 2,
                    old // 2 & ~15,
                    cap - off,
                    cap - off + 16,
                    cap - off - 16,
                    cap,
                    M64,
                    1 << 63,
                    r.randrange(0, cap) & ~15,
                ]
            )
            & M64
        )

    def value_for(self, name: str, size: int, old: int, off: int) -> int:
        leaf = name.rsplit(".", 1)[-1]
        if size == 8:
            if leaf in ("size", "prev_size", "heap_size", "capacity", "used", "free_bytes"):
                return self.size_value(old, off)
            return self.offset_value(old, off)
        if size == 4:
            return self.u32_value(old)
        return self.rng.getrandbits(8 * size)

    # one mutation of a field or a byte range
    def mutate(
        self, region: str, target: str, off: int, size: int, name: str, forge: bool = False
    ) -> dict[str, Any]:
        r = self.rng
        old_bytes = bytes(self.seg.mm[off : off + size])
        old = int.from_bytes(old_bytes, "little")
        if size > 8:  # a byte array: mutate one byte (or a word) inside it
            k = r.choice(("bitflip", "byte", "word"))
            if k == "word" and size >= 8:
                rel = r.randrange(0, size - 7) & ~7
                return self.mutate(region, target, off + rel, 8, f"{name}[{rel}:{rel + 8}]")
            rel = r.randrange(size)
            return self.mutate(region, target, off + rel, 1, f"{name}[{rel}]")
        kind = r.choices(("bitflip", "set", "random"), (35, 50, 15))[0]
        if kind == "bitflip":
            new = old ^ (1 << r.randrange(8 * size))
        elif kind == "set":
            new = self.value_for(name, size, old, off) & ((1 << (8 * size)) - 1)
        else:
            new = r.getrandbits(8 * size)
        if new == old:
            new = old ^ 1
        self.seg.put(off, size, new)
        desc: dict[str, Any] = {
            "region": region,
            "target": target,
            "field": name,
            "offset": off,
            "size": size,
            "kind": kind,
            "old": f"{old:#x}",
            "new": f"{new:#x}",
        }
        if forge:
            self.reseal(self._block_of(off))
            desc["kind"] += "+checksum"
        return desc

    def _block_of(self, off: int) -> int:
        for b, s, _ in self.blocks:
            if b <= off < b + HDR:
                return b
        return off & ~15

    def reseal(self, b: int) -> None:
        f = {n: self.seg.u(b + o, s) for n, (o, s) in F_BLOCK.items()}
        chk = block_checksum(
            self.salt, b, f["size"], f["prev_size"], f["owner"], f["flags"], f["refcount"]
        )
        self.seg.put(b + F_BLOCK["check"][0], 4, chk)

    # regions
    def r_arena(self) -> dict[str, Any]:
        n, o, s = self.rng.choice(ARENA_SCALARS)
        return self.mutate("arena", "arena header", o, s, n)

    def r_counters(self) -> dict[str, Any]:
        n, o, s = self.rng.choice(COUNTER_FIELDS)
        return self.mutate("counters", "counters", OFF_COUNTERS + o, s, n)

    def r_lock(self) -> dict[str, Any]:
        r = self.rng
        if r.random() < 0.25:  # the owner-died bit on a free lock: the next taker recovers
            old = self.seg.u(OFF_LOCK, 4)
            new = old | 0x40000000
            self.seg.put(OFF_LOCK, 4, new)
            return {
                "region": "lock",
                "target": "heap lock",
                "field": "__lock",
                "offset": OFF_LOCK,
                "size": 4,
                "kind": "owner-died",
                "old": f"{old:#x}",
                "new": f"{new:#x}",
            }
        if r.random() < 0.6:
            rel = r.choice(
                (0, 4, 8, 12, 16, 20)
            )  # __lock, __count, __owner, __nusers, __kind, __spins
            return self.mutate("lock", "heap lock", OFF_LOCK + rel, 4, f"mutex+{rel}")
        rel = r.randrange(0, 64)
        return self.mutate("lock", "heap lock", OFF_LOCK + rel, 1, f"mutex[{rel}]")

    def r_bitmap(self) -> dict[str, Any]:
        r = self.rng
        bit = r.randrange(64 * 4) if r.random() < 0.3 else r.randrange(NBINS)
        w, b = divmod(bit, 64)
        off = OFF_BITMAP + 8 * w
        old = self.seg.u(off, 8)
        new = old ^ (1 << b)
        self.seg.put(off, 8, new)
        return {
            "region": "bitmap",
            "target": f"bin {bit}",
            "field": f"bitmap[{w}]",
            "offset": off,
            "size": 8,
            "kind": "bitflip",
            "old": f"{old:#x}",
            "new": f"{new:#x}",
        }

    def r_bins(self) -> dict[str, Any]:
        nonempty = [i for i in range(NBINS) if self.seg.u(OFF_BINS + 8 * i, 8)]
        i = (
            self.rng.choice(nonempty)
            if nonempty and self.rng.random() < 0.7
            else self.rng.randrange(NBINS)
        )
        return self.mutate("bins", f"bin {i}", OFF_BINS + 8 * i, 8, f"bins[{i}]")

    def _entry(self, base: int, count: int, size: int, used: Callable[[int], bool]) -> int:
        live = [i for i in range(count) if used(base + i * size)]
        if live and self.rng.random() < 0.8:
            return self.rng.choice(live)
        return (
            self.rng.randrange(min(count, 8))
            if self.rng.random() < 0.5
            else self.rng.randrange(count)
        )

    def r_procs(self) -> dict[str, Any]:
        i = self._entry(OFF_PROCS, NPROCS, PROC_SIZE, lambda o: self.seg.u(o, 4) != 0)
        n, o, s = self.rng.choice([f for f in PROC_FIELDS if f[0] != "reserved"] * 3 + PROC_FIELDS)
        return self.mutate("procs", f"slot {i}", OFF_PROCS + i * PROC_SIZE + o, s, n)

    def r_refs(self) -> dict[str, Any]:
        i = self._entry(OFF_REFS, NREFS, REF_SIZE, lambda o: self.seg.u(o + 8, 4) != 0)
        n, o, s = self.rng.choice(REF_FIELDS)
        return self.mutate("refs", f"ref entry {i}", OFF_REFS + i * REF_SIZE + o, s, n)

    def r_names(self) -> dict[str, Any]:
        i = self._entry(OFF_NAMES, NNAMES, NAME_SIZE, lambda o: self.seg.u(o, 8) != 0)
        base = OFF_NAMES + i * NAME_SIZE
        if self.rng.random() < 0.2:  # a name without its terminating NUL
            fo, fs = {n: (o, s) for n, o, s in NAME_FIELDS}["name"]
            old = bytes(self.seg.mm[base + fo : base + fo + fs])
            self.seg.mm[base + fo : base + fo + fs] = b"Z" * fs
            return {
                "region": "names",
                "target": f"name entry {i}",
                "field": "name",
                "offset": base + fo,
                "size": fs,
                "kind": "unterminated",
                "old": old.hex(),
                "new": "5a" * fs,
            }
        n, o, s = self.rng.choice(NAME_FIELDS)
        return self.mutate("names", f"name entry {i}", base + o, s, n)

    def r_ring(self) -> dict[str, Any]:
        if self.rng.random() < 0.4:
            n, o, s = self.rng.choice(RING_FIELDS)
            return self.mutate("ring", "ring", OFF_RING + o, s, n)
        i = (
            self.rng.randrange(int(lib.SHM_RING_SLOTS))
            if self.rng.random() < 0.5
            else self.rng.randrange(8)
        )
        n, o, s = self.rng.choice(EVENT_FIELDS[:2] * 3 + EVENT_FIELDS)
        return self.mutate(
            "ring", f"ring slot {i}", RING_SLOTS_OFF + i * EVENT_SIZE + o, s, f"slots[{i}].{n}"
        )

    def r_journal(self) -> dict[str, Any]:
        r = self.rng
        j = OFF_JOURNAL
        fields = {n: (o, s) for n, o, s in JOURNAL_FIELDS}
        if "log" in fields and "count" in fields and r.random() < 0.5:
            # a journal that claims records (what a holder dying mid-operation leaves) and the
            # owner-died bit, so that the next lock taker rolls it back
            lo, ls = fields["log"]
            nrec = r.randint(1, 3)
            pos = 0
            recs = []
            for _ in range(nrec):
                off = self.offset_value(0, 0) if r.random() < 0.5 else r.randrange(0, self.seg.cap)
                ln = r.choice((1, 8, 16, 32, 64, 4096, M64, 1 << 32, r.randrange(0, 1 << 20)))
                body = min(ln, 64) if ln < (1 << 20) else 0
                rec = struct.pack("<QQ", off & M64, ln & M64) + r.randbytes((body + 7) & ~7)
                if pos + len(rec) > ls:
                    break
                self.seg.mm[j + lo + pos : j + lo + pos + len(rec)] = rec
                pos += len(rec)
                recs.append(f"{off & M64:#x}+{ln & M64:#x}")
            self.seg.put(j + fields["count"][0], 8, len(recs))
            if "used" in fields:
                self.seg.put(j + fields["used"][0], 8, pos)
            self.seg.put(OFF_LOCK, 4, self.seg.u(OFF_LOCK, 4) | 0x40000000)
            return {
                "region": "journal",
                "target": "journal + owner-died lock",
                "field": "log",
                "offset": j + lo,
                "size": pos,
                "kind": "records",
                "old": "",
                "new": ", ".join(recs),
            }
        n, o, s = r.choice(JOURNAL_FIELDS)
        return self.mutate("journal", "journal", j + o, s, n)

    def r_other(self) -> dict[str, Any]:
        n, o, s = self.rng.choice(OTHER_FIELDS)
        return self.mutate("other", "header", o, s, n)

    def r_block(self) -> dict[str, Any]:
        r = self.rng
        b = self.some_block(None if r.random() < 0.6 else bool(r.getrandbits(1)))
        kind = "free" if self.seg.u(b + F_BLOCK["flags"][0], 4) & 1 else "allocated"
        forge = self.forge_ok and r.random() < 0.4
        fields = [f for f in BLOCK_FIELDS if not (forge and f[0] == "check")]
        n, o, s = r.choice(fields)
        return self.mutate("block", f"{kind} block at {b:#x}", b + o, s, n, forge=forge)

    def r_caches(self) -> dict[str, Any]:
        """A process's cache: its list heads and counts, counters, remote list, pending word,
        the link in a cached block, or its slot lock's bytes."""
        r = self.rng
        i = self._entry(OFF_PROCS, NPROCS, PROC_SIZE, lambda o: self.seg.u(o, 4) != 0)
        base = OFF_CACHES + i * CACHE_SIZE
        cached = [o for o, _, fl in self.blocks if fl & lib.SHM_BF_CACHED]
        if cached and r.random() < 0.3:
            b = r.choice(cached)
            return self.mutate("caches", f"cached block at {b:#x}", b + HDR, 8, "link")
        if r.random() < 0.15:
            rel = r.choice((0, 4, 8, 12, 16))
            return self.mutate("caches", f"slot lock {i}", OFF_SLOT_LOCKS + i * LOCK_SIZE + rel, 4,
                               f"mutex+{rel}")
        heads = [f for f in CACHE_FIELDS if f[0].startswith(("head", "count"))]
        n, o, s = r.choice(heads * 2 + CACHE_FIELDS)
        if n in ("head", "count"):  # whole arrays: pick one element, preferring non-empty lists
            width = 8 if n == "head" else 4
            k = r.randrange(s // width)
            for _ in range(8):
                if self.seg.u(base + o + k * width, width):
                    break
                k = r.randrange(s // width)
            return self.mutate("caches", f"cache of slot {i}", base + o + k * width, width, f"{n}[{k}]")
        return self.mutate("caches", f"cache of slot {i}", base + o, s, n)

    def r_links(self) -> dict[str, Any]:
        frees = [o for o, _, fl in self.blocks if fl & 1]
        if not frees:
            return self.r_block()
        b = self.rng.choice(frees)
        which = self.rng.choice(("next", "prev"))
        return self.mutate(
            "links", f"free block at {b:#x}", b + HDR + (0 if which == "next" else 8), 8, which
        )

    REGIONS: ClassVar[dict[str, float]] = {
        "block": 3.0,
        "links": 2.0,
        "bins": 1.5,
        "bitmap": 1.0,
        "procs": 1.5,
        "refs": 1.0,
        "names": 1.0,
        "counters": 1.0,
        "arena": 0.7,
        "lock": 0.7,
        "ring": 0.7,
        "journal": 0.7,
        "caches": 1.5,
        "other": 0.3,
    }

    def run(self, regions: list[str]) -> list[dict[str, Any]]:
        avail = {k: v for k, v in self.REGIONS.items() if k in regions}
        if not HAS_JOURNAL:
            avail.pop("journal", None)
        if not OTHER_FIELDS:
            avail.pop("other", None)
        k = self.rng.choice((1, 1, 1, 2, 2, 3))
        out = []
        for _ in range(k):
            region = self.rng.choices(list(avail), list(avail.values()))[0]
            out.append(getattr(self, "r_" + region)())
        return out


# ----------------------------------------------------------------------------- the operations


class Ops:
    """The batch of operations run on a damaged arena, with every outcome recorded."""

    FAIL = object()

    def __init__(
        self, name: str, rng: random.Random, state: dict[str, Any], timeout: float
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.slow_ops: list[dict[str, Any]] = []
        self.rng = rng
        self.state = state
        self.log: list[str] = []
        self.exc: Counter[str] = Counter()
        self.unexpected: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []
        self.resized: list[dict[str, Any]] = []
        self.corruption = 0
        self.other = 0

    def call(self, label: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        if self.slow_ops:  # a slow answer (a lock that waits for a holder that is gone) would
            return self.FAIL  # make every later operation as slow: stop the batch here
        self.log.append(label)
        faulthandler.dump_traceback_later(self.timeout * 0.8, exit=False)
        t = time.monotonic()
        try:
            return fn(*args, **kw)
        except CorruptionDetected as e:
            self.corruption += 1
            self.exc[f"{label}: CorruptionDetected"] += 1
            if self.corruption == 1:
                self.first_detected = {"op": label, "offset": e.offset, "detail": e.detail}
        except EXPECTED as e:
            self.other += 1
            self.exc[f"{label}: {type(e).__name__}"] += 1
        except Exception as e:  # noqa: BLE001 - anything else is what this fuzz looks for
            self.unexpected.append(
                {
                    "op": label,
                    "type": type(e).__name__,
                    "message": str(e)[:300],
                    "traceback": traceback.format_exc(limit=8)[-2000:],
                }
            )
        finally:
            dt = time.monotonic() - t
            if dt > SLOW:
                self.slow_ops.append({"op": label, "seconds": round(dt, 2)})
                _emit({"ev": "slow", "op": label, "seconds": round(dt, 2)})  # resets the hang timer
        return self.FAIL

    def verify(self, m: MemoryManager, label: str, a: int, gen: int, n: int) -> None:
        size = self.call(f"size_of {label}", m.size_of, a)
        data = self.call(f"read {label}", m.read, a)
        if size is self.FAIL or data is self.FAIL:
            return
        exp = pattern(a, gen, n)
        k = min(len(data), n)
        if data[:k] != exp[:k]:
            i = next(j for j in range(k) if data[j] != exp[j])
            self.wrong.append(
                {
                    "op": f"read {label}",
                    "address": a,
                    "offset": i,
                    "expected": exp[i : i + 16].hex(),
                    "found": data[i : i + 16].hex(),
                }
            )
        if size != n:
            self.resized.append({"address": a, "size": n, "size_now": size})

    def run(self) -> None:
        r = self.rng
        m = self.call("attach", MemoryManager.attach, self.name)
        if m is self.FAIL:
            return
        known = list(self.state["known"])
        others = list(self.state["others"])
        try:
            self.call("stats", m.stats)
            self.call("check", m.check)
            r.shuffle(known)
            for k in known[:10]:
                self.verify(m, "known", k["a"], k["gen"], k["n"])
            for k in [k for k in known if not k["sealed"]][:5]:
                gen = k["gen"] + 1000
                if (
                    self.call("write known", m.write, k["a"], pattern(k["a"], gen, k["n"]))
                    is not self.FAIL
                ):
                    k["gen"] = gen  # (a refused write changed nothing)
                    self.verify(m, "rewritten", k["a"], k["gen"], k["n"])
            new = []
            for n, align in (
                (24, None),
                (700, None),
                (3000, 256),
                (9000, None),
                (70000, None),
                (200, 4096),
            ):
                a = self.call("allocate", m.allocate, n, align=align)
                if a is self.FAIL:
                    continue
                size = self.call("size_of new", m.size_of, a)
                if size is self.FAIL:
                    continue
                if self.call("write new", m.write, a, pattern(a, 7, size)) is not self.FAIL:
                    new.append((a, size))
            for a, size in new:
                self.verify(m, "new", a, 7, size)
            for k in known[:4]:  # a new block must not overlap an old one
                self.verify(m, "known after allocations", k["a"], k["gen"], k["n"])
            for k in known[:3]:
                if self.call("retain", m.retain, k["a"]) is not self.FAIL:
                    self.call("release", m.release, k["a"])
            for k in known:
                while k["refs"]:
                    k["refs"] -= 1
                    self.call("release populated", m.release, k["a"])
            for o in others[:2]:
                self.call("adopt", m.adopt, o["a"])
            if new:
                self.call("persist", m.persist, new[0][0])
                self.call("seal", m.seal, new[-1][0])
            self.call("names", m.names)
            for nm, a in self.state["names"].items():
                got = self.call("lookup", m.lookup, nm)
                if got is not self.FAIL and got != a:
                    self.wrong.append({"op": "lookup", "name": nm, "expected": a, "found": got})
            if new and self.call("bind", m.bind, "fz-new", new[0][0]) is not self.FAIL:
                self.call("lookup new", m.lookup, "fz-new")
                self.call("unbind", m.unbind, "fz-new")
            self.call("processes", m.processes)
            self.call("process_memory", m.process_memory, os.getpid())
            self.call("process_allocations", m.process_allocations, os.getpid())
            self.call("all_blocks", m.all_blocks)
            self.call("should_collect", m.should_collect)
            for k in known[: len(known) // 2]:
                self.call("deallocate known", m.deallocate, k["a"])
            for a, _ in new:
                self.call("deallocate new", m.deallocate, a)
            self.call("collect", m.collect)
            self.call("free_process_memory", m.free_process_memory, os.getppid())
            self.call("drain_events", m.drain_events)
            self.call("dropped_events", m.dropped_events)
            self.call("check again", m.check)
            self.call("stats again", m.stats)
        finally:
            self.call("close", m.close)

    def outcome(self) -> str:
        if self.unexpected:
            return "error"
        if self.corruption:
            return "detected"
        if self.other:
            return "other_error"
        return "clean"


# ----------------------------------------------------------------------------- the child


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def one_arena(
    seed: int, i: int, prefix: str, capacity: int, timeout: float, corrupt: bool, regions: list[str]
) -> None:
    rng = random.Random(f"{seed}:{i}")
    name = f"{prefix}-{i}-{secrets.token_hex(3)}"
    _emit({"ev": "start", "i": i, "name": name})
    m = MemoryManager.create(name, capacity)
    try:
        state = populate(m, rng)
        m.close()
        seg = Segment(name)
        try:
            mut = Mutator(seg, rng, state)
            muts = mut.run(regions) if corrupt else []
            forge_ok = mut.forge_ok
        finally:
            seg.close()
        _emit({"ev": "mut", "i": i, "mutations": muts, "forge_checksum_ok": forge_ok})
        ops = Ops(name, rng, state, timeout)
        try:
            ops.run()
        finally:
            faulthandler.cancel_dump_traceback_later()
        _emit(
            {
                "ev": "end",
                "i": i,
                "outcome": ops.outcome(),
                "exceptions": dict(ops.exc),
                "first_detected": getattr(ops, "first_detected", None),
                "unexpected": ops.unexpected[:3],
                "wrong": ops.wrong[:3],
                "resized": ops.resized[:3],
                "slow": ops.slow_ops[:3],
                "nops": len(ops.log),
            }
        )
    finally:
        _unlink(name)


def child_main(a: argparse.Namespace) -> int:
    faulthandler.enable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for i in range(a.start, a.stop):
        one_arena(a.seed, i, a.prefix, a.capacity, a.timeout, not a.no_corrupt, a.regions)
    _emit({"ev": "done"})
    return 0


# ----------------------------------------------------------------------------- the parent


class Child:
    def __init__(self, args: argparse.Namespace, lo: int, hi: int, prefix: str, tmp: str) -> None:
        self.lo, self.hi = lo, hi
        self.next = lo
        self.cur: int | None = None
        self.cur_name: str | None = None
        self.cur_mut: list[dict[str, Any]] | None = None
        self.t_cur = time.monotonic()
        self.buf = b""
        self.eof = False
        self.err_path = os.path.join(tmp, f"child-{lo}-{secrets.token_hex(3)}.err")
        self.err = open(self.err_path, "wb")  # noqa: SIM115 - open while the child runs
        cmd = [
            sys.executable,
            "-m",
            "stress.corrupt_fuzz",
            "--role",
            "child",
            "--seed",
            str(args.seed),
            "--start",
            str(lo),
            "--stop",
            str(hi),
            "--prefix",
            prefix,
            "--capacity",
            str(args.capacity),
            "--timeout",
            str(args.timeout),
            "--regions",
            ",".join(args.regions),
        ]
        if args.no_corrupt:
            cmd.append("--no-corrupt")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()

    def stderr_tail(self, n: int = 4000) -> str:
        self.err.flush()
        with open(self.err_path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()
        try:
            os.unlink(self.err_path)
        except FileNotFoundError:
            pass


class Fuzz:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"shmalloc-fuzz-{os.getpid()}-{secrets.token_hex(2)}"
        self.tmp = tempfile.mkdtemp(prefix="corrupt_fuzz-")
        self.counts: Counter[str] = Counter()
        self.by_region: dict[str, Counter[str]] = defaultdict(Counter)
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.crashes: list[dict[str, Any]] = []
        self.hangs: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.wrong: list[dict[str, Any]] = []
        self.wrong_count = 0
        self.resized_count = 0
        self.slow_count = 0
        self.slow: list[dict[str, Any]] = []
        self.forge_ok: bool | None = None
        self.detail: list[dict[str, Any]] = []  # --index: everything about the one arena
        self.done = 0
        self.children: list[Child] = []

    def record(self, i: int, outcome: str, muts: list[dict[str, Any]] | None, **extra: Any) -> None:
        self.done += 1
        self.counts[outcome] += 1
        for r in sorted({m["region"] for m in muts or []}) or ["(none)"]:
            self.by_region[r][outcome] += 1
        if outcome in ("crash", "hang", "error"):
            ex = {
                "index": i,
                "seed": self.args.seed,
                "mutations": muts,
                "reproduce": f"python -m stress.corrupt_fuzz --seed {self.args.seed} --index {i}",
                **extra,
            }
            lst = {"crash": self.crashes, "hang": self.hangs, "error": self.errors}[outcome]
            if len(lst) < 200:
                lst.append(ex)

    def handle(self, c: Child, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        c.t_cur = time.monotonic()
        if kind == "start":
            c.cur, c.cur_name, c.cur_mut = ev["i"], ev["name"], None
            c.t_cur = time.monotonic()
        elif kind == "mut":
            c.cur_mut = ev["mutations"]
            if self.forge_ok is None:
                self.forge_ok = ev.get("forge_checksum_ok")
            c.t_cur = time.monotonic()
        elif kind == "end":
            i = ev["i"]
            extra: dict[str, Any] = {}
            if ev["outcome"] == "error":
                extra["unexpected"] = ev.get("unexpected")
            self.record(i, ev["outcome"], c.cur_mut, **extra)
            for m in c.cur_mut or []:
                self.by_kind[m["kind"]][ev["outcome"]] += 1
            if ev.get("wrong"):
                self.wrong_count += 1
                if len(self.wrong) < 50:
                    self.wrong.append(
                        {
                            "index": i,
                            "mutations": c.cur_mut,
                            "wrong": ev["wrong"],
                            "reproduce": f"python -m stress.corrupt_fuzz --seed {self.args.seed} --index {i}",
                        }
                    )
            if ev.get("resized"):
                self.resized_count += 1
            if ev.get("slow"):
                self.slow_count += 1
                if len(self.slow) < 50:
                    self.slow.append(
                        {
                            "index": i,
                            "mutations": c.cur_mut,
                            "slow": ev["slow"],
                            "outcome": ev["outcome"],
                            "first_detected": ev.get("first_detected"),
                            "reproduce": f"python -m stress.corrupt_fuzz --seed {self.args.seed} --index {i}",
                        }
                    )
            if self.args.index is not None:
                self.detail.append({**ev, "mutations": c.cur_mut})
            c.cur = None
            c.next = i + 1

    def lost(self, c: Child, outcome: str) -> None:
        """The child died (crash) or was killed (hang) during arena c.cur (or before the next)."""
        i = c.cur if c.cur is not None else c.next
        status = c.proc.returncode
        extra = {
            "status": _signame(status),
            "phase": "operations" if c.cur_mut is not None else "populate",
            "stderr": c.stderr_tail(),
        }
        if outcome == "hang":
            extra["timeout"] = self.args.timeout
        self.record(i, outcome, c.cur_mut, **extra)
        for m in c.cur_mut or []:
            self.by_kind[m["kind"]][outcome] += 1
        if self.args.index is not None:
            self.detail.append({"i": i, "outcome": outcome, "mutations": c.cur_mut, **extra})
        if c.cur_name:
            _unlink(c.cur_name)
        c.next = i + 1
        c.cur = None

    def run(self) -> dict[str, Any]:
        a = self.args
        t0 = time.monotonic()
        if a.index is not None:
            chunks = [(a.index, a.index + 1)]
        else:
            step = max(1, min(a.chunk, -(-a.arenas // a.jobs)))
            chunks = [(lo, min(a.arenas, lo + step)) for lo in range(0, a.arenas, step)]
        total = sum(hi - lo for lo, hi in chunks)
        bar = _Progress(total)
        try:
            while chunks or self.children:
                while chunks and len(self.children) < a.jobs:
                    lo, hi = chunks.pop(0)
                    self.children.append(Child(a, lo, hi, self.prefix, self.tmp))
                fds = {c.fd: c for c in self.children if not c.eof}
                ready = select.select(list(fds), [], [], 0.2)[0] if fds else []
                for fd in ready:
                    c = fds[fd]
                    data = os.read(fd, 1 << 16)
                    if not data:
                        c.eof = True
                        continue
                    c.buf += data
                    *lines, c.buf = c.buf.split(b"\n")
                    for line in lines:
                        try:
                            self.handle(c, json.loads(line))
                        except ValueError:
                            pass
                now = time.monotonic()
                for c in list(self.children):
                    if c.eof:
                        c.proc.wait()
                        if c.proc.returncode != 0 or c.next < c.hi:
                            self.lost(c, "crash")
                        c.close()
                        self.children.remove(c)
                        if c.next < c.hi:
                            chunks.insert(0, (c.next, c.hi))
                    elif now - c.t_cur > a.timeout:
                        c.proc.send_signal(signal.SIGKILL)
                        c.proc.wait()
                        self.lost(c, "hang")
                        c.close()
                        self.children.remove(c)
                        if c.next < c.hi:
                            chunks.insert(0, (c.next, c.hi))
                bar.update(self.done, self.counts)
        finally:
            for c in self.children:
                c.close()
            for n in os.listdir(SHM_DIR):
                if n.startswith(self.prefix + "-"):
                    _unlink(n)
            try:
                os.rmdir(self.tmp)
            except OSError:
                pass
            bar.finish()
        counts = {k: self.counts.get(k, 0) for k in OUTCOMES}
        return {
            "ok": counts["crash"] == 0 and counts["hang"] == 0 and self.done == total,
            "config": {
                "seed": a.seed,
                "arenas": total,
                "capacity": a.capacity,
                "timeout": a.timeout,
                "jobs": a.jobs,
                "quick": a.quick,
                "corrupt": not a.no_corrupt,
                "regions": a.regions,
                "index": a.index,
                "header_size": HEAP_OFF,
                "forge_checksum_ok": self.forge_ok,
            },
            "arenas": self.done,
            "counts": counts,
            "crashes": counts["crash"],
            "hangs": counts["hang"],
            "wrong": self.wrong_count,
            "resized_silently": self.resized_count,
            "slow": self.slow_count,
            "slow_examples": self.slow,
            "by_region": {k: dict(v) for k, v in sorted(self.by_region.items())},
            "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "crash_examples": self.crashes,
            "hang_examples": self.hangs,
            "error_examples": self.errors[:50],
            "wrong_examples": self.wrong,
            "detail": self.detail,
            "duration": round(time.monotonic() - t0, 2),
        }


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.last = -1.0

    def update(self, done: int, counts: Counter[str]) -> None:
        now = time.monotonic()
        frac = min(1.0, done / self.total)
        tail = " ".join(f"{k}={counts.get(k, 0)}" for k in OUTCOMES)
        if self.tty:
            if now - self.last < 0.1 and done < self.total:
                return
            self.last = now
            fill = int(frac * 30)
            sys.stderr.write(
                f"\rarenas [{'#' * fill}{'-' * (30 - fill)}] {done}/{self.total} {tail} {now - self.t0:6.1f}s "
            )
        else:
            if int(frac * 10) == int(self.last):
                return
            self.last = int(frac * 10)
            sys.stderr.write(f"arenas {done}/{self.total} {tail} {now - self.t0:.1f}s\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _stack_top(stderr: str, frames: int = 4) -> list[str]:
    """The fatal error line and the innermost frames of a faulthandler dump (or the last lines)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    out: list[str] = []
    for k, ln in enumerate(lines):
        if ln.startswith(("Fatal Python error", "Timeout (")):
            out.append(ln)
        if ln.startswith(("Current thread", "Thread 0x")):
            out += [x.strip() for x in lines[k + 1 : k + 1 + frames]]
            break
    return out or lines[-6:]


def _mut_str(muts: list[dict[str, Any]] | None) -> str:
    if not muts:
        return "(before any mutation)"
    return "; ".join(
        f"{m['region']}/{m['target']}.{m['field']} {m['kind']} {m['old']}->{m['new']}" for m in muts
    )


def print_report(res: dict[str, Any]) -> None:
    c = res["counts"]
    cfg = res["config"]
    print(
        f"corrupt fuzz: {res['arenas']} arenas of {cfg['capacity'] // KiB} KiB, seed {cfg['seed']}, "
        f"{cfg['jobs']} children, timeout {cfg['timeout']} s, {res['duration']} s"
    )
    w = 24
    for k, label in (
        ("clean", "clean"),
        ("detected", "corruption detected"),
        ("other_error", "other error (refused)"),
        ("error", "unexpected exception"),
        ("crash", "CRASH"),
        ("hang", "HANG"),
    ):
        print(f"  {label:<{w}} {c[k]:>7}")
    print(f"  {'wrong answer (silent)':<{w}} {res['wrong']:>7}")
    print(f"  {'size changed (silent)':<{w}} {res['resized_silently']:>7}")
    print(f"  {f'slow answer (> {SLOW} s)':<{w}} {res['slow']:>7}")
    if res["by_region"]:
        cols = ("clean", "detected", "other_error", "error", "crash", "hang")
        print("  by region:  " + " ".join(f"{k:>11}" for k in cols))
        for r, cnt in res["by_region"].items():
            print(f"    {r:<10}" + " ".join(f"{cnt.get(k, 0):>11}" for k in cols))
    for title, key in (
        ("crashes", "crash_examples"),
        ("hangs", "hang_examples"),
        ("unexpected exceptions", "error_examples"),
    ):
        ex = res[key]
        if not ex:
            continue
        print(f"  {title} ({len(ex)} shown):")
        for e in ex[:15]:
            print(
                f"    arena {e['index']} [{e.get('status', '')} {e.get('phase', '')}]: {_mut_str(e['mutations'])}"
            )
            print(f"      reproduce: {e['reproduce']}")
            if key == "error_examples":
                for u in (e.get("unexpected") or [])[:1]:
                    print(f"      {u['op']}: {u['type']}: {u['message']}")
            else:
                for ln in _stack_top(e.get("stderr") or ""):
                    print(f"      | {ln}")
    for e in res["slow_examples"][:3]:
        print(
            f"  slow answer in arena {e['index']}: {_mut_str(e['mutations'])}: {e['slow'][0]}, then {e['outcome']}"
        )
    for e in res["wrong_examples"][:5]:
        print(f"  wrong answer in arena {e['index']}: {_mut_str(e['mutations'])}: {e['wrong'][0]}")
    for d in res["detail"]:
        print(json.dumps(d, indent=2, default=str))
    print(f"  result: {'PASS' if res['ok'] else 'FAIL'} (crashes {c['crash']}, hangs {c['hang']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.corrupt_fuzz",
        description="Flip bytes in the header region and block headers of scratch arenas, then run "
        "operations on them in child processes; count clean / detected / crash / hang.",
    )
    p.add_argument(
        "--arenas",
        type=int,
        default=None,
        help="scratch arenas to damage (default 2000; --quick 200)",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="seed; arena i's randomness is (seed, i) (default 1)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    p.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 2,
        help="child processes at once (default: CPUs)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds an arena may take before it counts as a hang",
    )
    p.add_argument(
        "--capacity",
        type=int,
        default=MiB,
        help="arena size (default 1 MiB, at least header + 512 KiB)",
    )
    p.add_argument(
        "--chunk", type=int, default=250, help="arenas per child before a fresh one starts"
    )
    p.add_argument(
        "--index", type=int, default=None, help="replay only arena I of this seed, verbosely"
    )
    p.add_argument(
        "--regions",
        type=lambda s: s.split(","),
        default=list(Mutator.REGIONS),
        help="comma-separated regions to damage (default all: " + ",".join(Mutator.REGIONS) + ")",
    )
    p.add_argument(
        "--no-corrupt",
        action="store_true",
        help="populate and run the operations without damage (every arena must come out clean)",
    )
    p.add_argument("--role", choices=("child",), help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.arenas is None:
        a.arenas = 200 if a.quick else 2000
    unknown = [r for r in a.regions if r not in Mutator.REGIONS]
    if unknown:
        p.error(f"unknown regions {unknown}; choose from {list(Mutator.REGIONS)}")
    if a.arenas < 0 or a.jobs < 1 or a.timeout <= 0 or a.chunk < 1:
        p.error("--arenas >= 0, --jobs >= 1, --chunk >= 1 and --timeout > 0")
    a.capacity = arena_capacity(a.capacity)
    return a


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.role == "child":
        return child_main(a)
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        res = Fuzz(a).run()
    except KeyboardInterrupt:
        print("\ninterrupted: children killed, scratch arenas removed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print_report(res)
    if a.json:
        write_json(a.json, res, default=str)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
