"""Crash storm: worker processes churn one arena while a killer SIGKILLs them at random.

    python -m stress.crash_storm [--workers N] [--kills K] [--seconds S] [--seed X]
                                 [--json PATH] [--quick] [--keep-going]
    python -m stress.crash_storm --fault-steps [--quick] [--json PATH]

Storm mode
    N worker processes attached to one arena churn: they allocate random sizes, write a pattern
    derived from (address, generation) over the whole block, verify it, rewrite, free, retain and
    release, persist, seal, hand blocks off to each other through named blocks (bind by the
    sender; lookup, unbind, verify and adopt or free by the receiver), retain blocks they looked
    up, run short allocate/free bursts (so that a kill often lands inside the C core, holding the
    heap lock), and now and then collect or check. A survivor process holds blocks with known
    content (some sealed, some retained) for the whole run and keeps allocating and freeing.
    The killer sends SIGKILL to a random worker after a random interval (exponential, mean
    ``--interval``) and respawns it, until K kills (or S seconds). A share of the kills
    (``--lock-kills``, default 0.3) is aimed: the driver watches the heap lock's owner word and
    kills the worker that holds it, so that many kills land inside the C core, half-way through an
    operation; ``lock_recoveries`` in the report counts the kills that left the lock to be
    recovered (aimed or not). After every kill (every
    ``--check-every`` kills) the driver runs ``mgr.collect()`` and ``mgr.check()`` and reads the
    survivor's blocks. At the end: half of the workers are stopped gracefully (they free what
    they hold), the others are killed; the survivor verifies and frees its blocks; the driver
    runs a GLOBAL collection, ``check()``, frees the persistent and named blocks that dead
    workers left (hand-offs in flight, persisted blocks: expected leftovers, reported apart),
    and then expects ``stats().used == 0``, no block left, one free block, no process slot left.

    An inconsistency is a ``check()`` failure (offset and detail), a ``CorruptionDetected`` seen
    by a worker, or a block whose content or size changed under its owner. The first one stops
    the storm (``--keep-going`` continues): after it, everything else is noise. Exit code 0 only
    if there was no inconsistency, no worker error, no leak, and the survivor's data is intact.

Fault-steps mode
    For each step of ``native/fault.c``'s ``steps[]`` table, run a child with
    ``SHMALLOC_FAULT=<step>`` doing an operation that reaches that step (scenarios of the step's
    family first: alloc, free, retain, gc, ...), confirm that it died by SIGKILL, then check the
    arena, verify the driver's blocks, and allocate/write/free from another process; finally
    collect and free everything and expect ``used == 0``. One scenario first leaves the lock to
    a helper killed in the middle of an allocation, so that steps inside the recovery (rollback)
    are reached by the child that recovers it. With ``--quick`` each step stops at
    its first reaching scenario; otherwise every scenario runs for every step. Exit code 0 only
    if every run that reached its step left the heap consistent.

Reproduction: ``--seed`` fixes every random choice the driver and the workers make; the
interleaving of processes is up to the OS, so a failing storm is reproduced statistically
(same seed, same options), a failing fault step exactly. Every arena and every process this
starts is destroyed / killed on the way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import random
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmalloc import (
    CorruptionDetected,
    InvalidAddress,
    MemoryManager,
    OutOfMemory,
    ShmallocError,
)
from shmalloc._binding import ffi, lib, raise_status

from ._common import child_env, signame, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
FAULT_C = REPO_ROOT / "native" / "fault.c"
KNOWN_STEPS = ("alloc.locked", "free.locked")  # fallback when fault.c cannot be parsed
MiB = 1 << 20

# ----------------------------------------------------------------------------- shared helpers

OPS = (
    "idle",
    "start",
    "attach",
    "alloc",
    "verify",
    "rewrite",
    "free",
    "retain",
    "release",
    "persist",
    "seal",
    "handoff",
    "claim",
    "peer_retain",
    "burst",
    "core_burst",
    "collect",
    "check",
    "stats",
    "stop",
)
OP_CODE = {n: i for i, n in enumerate(OPS)}
# Status words per process (one row of SLOT_WORDS uint64 per worker; the survivor is row N).
F_OPS, F_CUR, F_INC, F_PID, F_ERRS, F_READY, F_HANDOFFS, F_CLAIMS, F_OOMS = range(9)
SLOT_WORDS = 16
MAX_WORKER_ERRORS = 20  # a worker that reported this many errors exits (status 3)


def pattern(address: int, gen: int, n: int) -> bytes:
    """The content of a block: (address, generation) repeated over its n usable bytes."""
    unit = struct.pack("<QQ", address, gen)
    return (unit * (n // 16 + 1))[:n]


def first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(0, n, 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            for j in range(i, min(i + 4096, n)):
                if a[j] != b[j]:
                    return j
    return n


def random_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.04:
        return rng.randint(64 << 10, 1 << 20)  # large bins
    if r < 0.25:
        return rng.randint(4 << 10, 64 << 10)  # medium bins
    return max(1, int(math.exp(rng.uniform(0, math.log(4096)))))  # small, log-uniform


class Status:
    """The per-process status words, in a small shared file (not in the arena under test)."""

    def __init__(self, path: str, rows: int | None = None) -> None:
        if rows is not None:
            with open(path, "wb") as f:
                f.write(b"\0" * (rows * SLOT_WORDS * 8))
        self._fd = os.open(path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, 0)
        self.words = memoryview(self._mm).cast("Q")

    def get(self, row: int, f: int) -> int:
        return int(self.words[row * SLOT_WORDS + f])

    def set(self, row: int, f: int, v: int) -> None:
        self.words[row * SLOT_WORDS + f] = v

    def add(self, row: int, f: int, v: int = 1) -> None:
        self.words[row * SLOT_WORDS + f] += v

    def close(self) -> None:
        self.words.release()
        self._mm.close()
        os.close(self._fd)


# ----------------------------------------------------------------------------- the worker


@dataclass
class Held:
    gen: int
    n: int
    refs: int = 0
    persistent: bool = False
    sealed: bool = False


WORKER_WEIGHTS = {
    "alloc": 28,
    "verify": 14,
    "rewrite": 6,
    "free": 20,
    "retain": 3,
    "release": 3,
    "persist": 2,
    "seal": 2,
    "handoff": 4,
    "claim": 4,
    "peer_retain": 1.5,
    "burst": 8,
    "core_burst": 6,
    "collect": 0.6,
    "check": 0.3,
    "stats": 1,
}
MAX_LIVE = 48
CORE_SIZES = (16, 24, 64, 100, 200, 500, 1000, 2000, 4000, 6000, 10000, 40000, 70000, 300000)
_ADDR_MASK = (1 << 61) - 1  # shm_alloc's result may carry flag bits above this
_shm_alloc = lib.shm_alloc
_shm_free = lib.shm_free


class Worker:
    """One churning process. Every surprise is appended as a JSON line to the errors file."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.row = ns.wid
        self.inc = ns.inc
        self.rng = random.Random(ns.worker_seed)
        self.st = Status(ns.status)
        self.errfd = os.open(ns.errors, os.O_WRONLY | os.O_APPEND)
        self.nerr = 0
        self.stop = False
        self.blocks: dict[int, Held] = {}
        self.counter = 0
        self.role = ns.role
        self.name = ns.arena

    # bookkeeping
    def next_gen(self) -> int:
        self.counter += 1
        return int(self.inc << 32 | self.counter)

    def report(self, kind: str, **fields: Any) -> None:
        self.nerr += 1
        self.st.add(self.row, F_ERRS)
        rec = {
            "kind": kind,
            "role": self.role,
            "worker": self.row,
            "incarnation": self.inc,
            "pid": os.getpid(),
            "time": time.time(),
            **fields,
        }
        os.write(self.errfd, (json.dumps(rec, default=str) + "\n").encode())
        if self.nerr >= MAX_WORKER_ERRORS and self.role == "worker":
            os._exit(3)

    def set_op(self, op: str) -> None:
        self.st.set(self.row, F_CUR, OP_CODE[op])

    # the operations
    def verify(self, a: int, b: Held, why: str) -> bool:
        n = self.m.size_of(a)
        got = self.m.read(a)
        exp = pattern(a, b.gen, b.n)
        if n != b.n or got != exp:
            off = first_diff(got, exp)
            self.report(
                "data",
                op=why,
                address=a,
                gen=b.gen,
                size=b.n,
                size_now=n,
                offset=off,
                expected=exp[off : off + 16].hex(),
                found=got[off : off + 16].hex(),
            )
            return False
        return True

    def pick(self, cond: Callable[[Held], bool] = lambda b: True) -> int | None:
        cands = [a for a, b in self.blocks.items() if cond(b)]
        return self.rng.choice(cands) if cands else None

    def op_alloc(self) -> None:
        if len(self.blocks) >= MAX_LIVE:
            return self.op_free()
        size = random_size(self.rng)
        align = self.rng.choice((64, 256, 4096)) if self.rng.random() < 0.1 else None
        a = self.m.allocate(size, align=align)
        if align and a % align:
            self.report("unexpected", op="alloc", message=f"{a:#x} not aligned to {align}")
        n = self.m.size_of(a)
        if n < size:
            self.report("unexpected", op="alloc", message=f"size_of {n} < requested {size}")
        gen = self.next_gen()
        self.m.write(a, pattern(a, gen, n))
        self.blocks[a] = Held(gen, n)

    def op_verify(self) -> None:
        a = self.pick()
        if a is not None and not self.verify(a, self.blocks[a], "verify"):
            del self.blocks[a]

    def op_rewrite(self) -> None:
        a = self.pick(lambda b: not b.sealed)
        if a is None:
            return
        b = self.blocks[a]
        if not self.verify(a, b, "rewrite"):
            del self.blocks[a]
            return
        b.gen = self.next_gen()
        self.m.write(a, pattern(a, b.gen, b.n))

    def op_free(self) -> None:
        a = self.pick()
        if a is None:
            return self.op_alloc()
        b = self.blocks[a]
        ok = self.verify(a, b, "free")
        if b.refs and self.rng.random() < 0.5:
            while b.refs:
                self.m.release(a)
                b.refs -= 1
        del self.blocks[a]
        n = self.m.deallocate(a)
        if ok and n != b.n:
            self.report(
                "unexpected", op="free", message=f"deallocate returned {n}, block had {b.n}"
            )

    def op_retain(self) -> None:
        a = self.pick(lambda b: b.refs < 3)
        if a is not None:
            self.m.retain(a)
            self.blocks[a].refs += 1

    def op_release(self) -> None:
        a = self.pick(lambda b: b.refs > 0)
        if a is not None:
            freed = self.m.release(a)
            self.blocks[a].refs -= 1
            if freed:
                self.report("unexpected", op="release", message=f"release freed live block {a:#x}")
                del self.blocks[a]

    def op_persist(self) -> None:
        # small blocks only: a worker killed later leaves its persistent blocks to the driver
        a = self.pick(lambda b: not b.persistent and b.n <= 8192)
        if a is not None:
            self.m.persist(a)
            self.blocks[a].persistent = True

    def op_seal(self) -> None:
        a = self.pick(lambda b: not b.sealed)
        if a is not None:
            self.m.seal(a)
            self.blocks[a].sealed = True

    def op_handoff(self) -> None:
        a = self.pick(lambda b: b.refs == 0 and b.n <= 65536)
        if a is None:
            return
        b = self.blocks[a]
        if not self.verify(a, b, "handoff"):
            del self.blocks[a]
            return
        name = f"h.{b.gen:x}.{int(b.sealed)}"
        try:
            self.m.bind(name, a)
        except ShmallocError:  # the name table is full: keep the block
            return
        del self.blocks[a]
        self.st.add(self.row, F_HANDOFFS)

    def _offers(self) -> list[str]:
        return [n for n in self.m.names() if n.startswith("h.")]

    def op_claim(self) -> None:
        offers = self._offers()
        if not offers:
            return
        name = self.rng.choice(offers)
        try:
            a = self.m.lookup(name)
            self.m.unbind(name)  # whoever unbinds first owns the block
        except KeyError:
            return
        _, g, s = name.split(".")
        b = Held(int(g, 16), 0, sealed=s == "1", persistent=True)
        b.n = self.m.size_of(a)
        if not self.verify(a, b, "claim"):
            return
        self.st.add(self.row, F_CLAIMS)
        if self.rng.random() < 0.7 and len(self.blocks) < MAX_LIVE:
            self.m.adopt(a)
            b.persistent = False
            self.blocks[a] = b
        else:
            self.m.deallocate(a)

    def op_peer_retain(self) -> None:
        # A reference on a block another process may free or claim meanwhile: either may fail
        # with InvalidAddress / ValueError (no reference), which is the expected answer.
        offers = self._offers()
        if not offers:
            return
        try:
            a = self.m.lookup(self.rng.choice(offers))
            self.m.retain(a)
            self.m.release(a)
        except (KeyError, InvalidAddress, ValueError):
            pass

    def op_burst(self) -> None:
        addrs: list[int] = []
        try:
            for _ in range(self.rng.randint(8, 48)):
                addrs.append(self.m.allocate(self.rng.choice((16, 48, 100, 200, 1000, 3000, 9000))))
            self.rng.shuffle(addrs)
            while addrs:
                self.m.deallocate(addrs[-1])
                addrs.pop()
        finally:
            for a in addrs:  # after an error: give back what the burst still holds
                try:
                    self.m.deallocate(a)
                except ShmallocError:
                    pass

    def op_core_burst(self) -> None:
        """Allocate/free pairs straight through the C core (no Python wrapper between the calls),
        so that most of the time goes inside the heap lock and a kill often lands there."""
        h, slot = self.m._h, self.m._own_slot()
        sizes = [self.rng.choice(CORE_SIZES) for _ in range(64)]
        live: list[int] = []
        try:
            for _ in range(self.rng.randint(4, 12)):
                for s in sizes[: self.rng.randint(8, 64)]:
                    r = _shm_alloc(h, s, 0, slot)
                    if r < 0:
                        raise_status(r)
                    live.append(r & _ADDR_MASK)
                self.rng.shuffle(live)
                for _ in range(len(live) * 3 // 4):
                    r = _shm_free(h, live[-1])
                    if r < 0:
                        raise_status(r, live[-1])
                    live.pop()
        finally:
            for a in live:
                try:
                    self.m.deallocate(a)
                except ShmallocError:
                    pass

    def op_collect(self) -> None:
        self.m.collect()

    def op_check(self) -> None:
        self.m.check()

    def op_stats(self) -> None:
        s = self.m.stats()
        if s.used > s.total:
            self.report("unexpected", op="stats", message=f"used {s.used} > total {s.total}")

    def run_op(self, op: str) -> None:
        self.set_op(op)
        try:
            getattr(self, "op_" + op)()
        except OutOfMemory:
            self.st.add(self.row, F_OOMS)  # an answer, not a failure: make room
            for a in list(self.blocks)[: len(self.blocks) // 2]:
                b = self.blocks.pop(a)
                try:
                    self.m.deallocate(a)
                except ShmallocError as e:
                    self.report(
                        "unexpected",
                        op="free after OOM",
                        address=a,
                        gen=b.gen,
                        type=type(e).__name__,
                        message=str(e),
                    )
        except CorruptionDetected as e:
            self.report(
                "corruption",
                op=op,
                offset=e.offset,
                detail=e.detail,
                traceback=traceback.format_exc(limit=4),
            )
        except Exception as e:  # noqa: BLE001 - any surprise is reported, then the churn goes on
            self.report(
                "unexpected",
                op=op,
                type=type(e).__name__,
                message=str(e),
                traceback=traceback.format_exc(limit=6),
            )
        self.set_op("idle")
        self.st.add(self.row, F_OPS)

    def free_all(self) -> None:
        self.set_op("stop")
        for a, b in list(self.blocks.items()):
            try:
                self.verify(a, b, "final")
                while b.refs:
                    self.m.release(a)
                    b.refs -= 1
                self.m.deallocate(a)
            except Exception as e:  # noqa: BLE001
                self.report(
                    "unexpected", op="final free", address=a, type=type(e).__name__, message=str(e)
                )
        self.blocks.clear()

    def main(self) -> int:
        def on_term(signum: int, frame: Any) -> None:
            self.stop = True

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.st.set(self.row, F_PID, os.getpid())
        self.st.set(self.row, F_INC, self.inc)
        self.set_op("attach")
        self.m = MemoryManager.attach(self.name)
        self.st.set(self.row, F_READY, 1)
        ops = list(WORKER_WEIGHTS)
        weights = list(WORKER_WEIGHTS.values())
        ppid = os.getppid()
        n = 0
        while not self.stop:
            self.run_op(self.rng.choices(ops, weights)[0])
            n += 1
            if n % 64 == 0 and os.getppid() != ppid:  # the driver is gone: so are we
                os._exit(4)
        self.free_all()
        self.m.close()
        return 0


class Survivor(Worker):
    """Holds blocks with known content for the whole storm and churns a few more."""

    HELD = 32

    def main(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.st.set(self.row, F_PID, os.getpid())
        self.m = MemoryManager.attach(self.name)
        held: dict[int, Held] = {}
        for i in range(self.HELD):
            n0 = self.rng.randint(64, 16 << 10)
            a = self.m.allocate(n0)
            b = Held(self.next_gen(), self.m.size_of(a))
            self.m.write(a, pattern(a, b.gen, b.n))
            if i % 4 == 1:
                self.m.seal(a)
                b.sealed = True
            if i % 3 == 0:
                self.m.retain(a)
                b.refs = 1
            held[a] = b
        print(json.dumps({"held": [[a, b.gen, b.n] for a, b in held.items()]}), flush=True)
        self.st.set(self.row, F_READY, 1)
        corrupt = verified = 0
        ops = ["alloc", "verify", "rewrite", "free", "burst", "stats"]
        weights = [30, 20, 8, 30, 8, 4]
        ppid = os.getppid()
        while True:
            if os.getppid() != ppid:  # the driver is gone: so are we
                os._exit(4)
            for _ in range(50):
                self.run_op(self.rng.choices(ops, weights)[0])
                if len(self.blocks) > 24:
                    self.run_op("free")
            for a, b in held.items():  # the held blocks never change: any difference is damage
                try:
                    verified += 1
                    if not self.verify(a, b, "held"):
                        corrupt += 1
                except Exception as e:  # noqa: BLE001
                    corrupt += 1
                    self.report("held", address=a, type=type(e).__name__, message=str(e))
            r, _, _ = select.select([sys.stdin], [], [], 0)
            if r:
                break
        sys.stdin.readline()
        self.free_all()
        errors = self.nerr
        for a, b in held.items():
            try:
                verified += 1
                if not self.verify(a, b, "held, final"):
                    corrupt += 1
                if b.refs:
                    self.m.release(a)
                self.m.deallocate(a)
            except Exception as e:  # noqa: BLE001
                corrupt += 1
                self.report("held", address=a, type=type(e).__name__, message=str(e))
        ops_done = self.st.get(self.row, F_OPS)
        self.m.close()
        print(
            json.dumps(
                {
                    "corrupt": corrupt,
                    "verified": verified,
                    "ops": ops_done,
                    "errors": self.nerr,
                    "errors_before_final": errors,
                }
            ),
            flush=True,
        )
        return 0


# ----------------------------------------------------------------------------- progress


class Progress:
    """A plain-text progress bar on stderr: \\r updates on a terminal, a line per 10 % otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.total = max(1, total)
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last_decile = -1
        self.t0 = time.monotonic()

    def update(self, done: int, extra: str = "") -> None:
        frac = min(1.0, done / self.total)
        if self.tty:
            width = 30
            fill = int(frac * width)
            bar = "#" * fill + "-" * (width - fill)
            sys.stderr.write(
                f"\r{self.label} [{bar}] {done}/{self.total} {extra} {time.monotonic() - self.t0:6.1f}s "
            )
            sys.stderr.flush()
        else:
            decile = int(frac * 10)
            if decile != self.last_decile:
                self.last_decile = decile
                sys.stderr.write(
                    f"{self.label} {done}/{self.total} {extra} {time.monotonic() - self.t0:.1f}s\n"
                )
                sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _fmt(n: int) -> str:
    return f"{n:,}"


# ----------------------------------------------------------------------------- the storm driver


class Storm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = tempfile.mkdtemp(prefix="crash_storm-")
        self.status_path = os.path.join(self.tmp, "status.bin")
        self.errors_path = os.path.join(self.tmp, "errors.jsonl")
        open(self.errors_path, "wb").close()
        self.err_pos = 0
        self.name = f"shmalloc-storm-{os.getpid()}-{secrets.token_hex(4)}"
        self.mgr: MemoryManager | None = None
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * args.workers
        self.survivor: subprocess.Popen[str] | None = None
        self.incarnation = 0
        self.kills = 0
        self.kill_log: deque[dict[str, Any]] = deque(maxlen=10)
        self.killed_during: Counter[str] = Counter()
        self.kills_since_check: list[dict[str, Any]] = []
        self.inconsistencies: list[dict[str, Any]] = []
        self.worker_errors: list[dict[str, Any]] = []
        self.worker_error_kinds: Counter[str] = Counter()
        self.abnormal_exits: list[dict[str, Any]] = []
        self.retired_ops = 0  # operations of the workers' previous incarnations
        self.retired_handoffs = 0
        self.retired_claims = 0
        self.retired_ooms = 0
        self.checks = 0
        self.targeted_kills = 0
        self.held: list[list[int]] = []
        self.survivor_driver_corrupt = 0
        self.t0 = time.monotonic()
        # the children's stderr, open for as long as the storm runs (closed in cleanup)
        self.logs = [open(os.path.join(self.tmp, f"w{i}.log"), "ab") for i in range(args.workers)]  # noqa: SIM115
        self.survivor_log = open(os.path.join(self.tmp, "survivor.log"), "ab")  # noqa: SIM115

    # processes
    def spawn(self, w: int) -> None:
        self.incarnation += 1
        self.st.set(w, F_READY, 0)
        self.st.set(w, F_CUR, OP_CODE["start"])
        cmd = [
            sys.executable,
            "-m",
            "stress.crash_storm",
            "--role",
            "worker",
            "--arena",
            self.name,
            "--wid",
            str(w),
            "--inc",
            str(self.incarnation),
            "--worker-seed",
            str(self.rng.getrandbits(63)),
            "--status",
            self.status_path,
            "--errors",
            self.errors_path,
        ]
        self.procs[w] = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.logs[w],
        )

    def retire(self, w: int) -> None:
        self.retired_ops += self.st.get(w, F_OPS)
        self.retired_handoffs += self.st.get(w, F_HANDOFFS)
        self.retired_claims += self.st.get(w, F_CLAIMS)
        self.retired_ooms += self.st.get(w, F_OOMS)
        for f in (F_OPS, F_HANDOFFS, F_CLAIMS, F_ERRS, F_OOMS):
            self.st.set(w, f, 0)

    def operations(self) -> int:
        n = self.retired_ops
        for w in range(self.args.workers + 1):
            n += self.st.get(w, F_OPS)
        return n

    def log_tail(self, w: int, nbytes: int = 3000) -> str:
        path = os.path.join(self.tmp, f"w{w}.log")
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - nbytes))
            return f.read().decode("utf-8", "replace")

    def reap_exited(self) -> None:
        """Workers that ended on their own (an error limit, a crash): record and respawn."""
        for w, p in enumerate(self.procs):
            if p is not None and p.poll() is not None:
                self.abnormal_exits.append(
                    {
                        "worker": w,
                        "pid": p.pid,
                        "status": signame(p.returncode),
                        "after_kill": self.kills,
                        "log": self.log_tail(w),
                    }
                )
                self.retire(w)
                self.spawn(w)

    def kill_one(self) -> None:
        n = self.args.workers
        if self.rng.random() < self.args.lock_kills and self.kill_lock_holder():
            return
        if self.rng.random() < 0.9:  # mostly a worker that is churning; else any (maybe starting)
            deadline = time.monotonic() + 60
            while True:
                ready = [
                    w for w in range(n) if self.st.get(w, F_READY) and self.st.get(w, F_OPS) > 0
                ]
                if ready or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
                self.reap_exited()
            w = self.rng.choice(ready) if ready else self.rng.randrange(n)
        else:
            w = self.rng.randrange(n)
        p = self.procs[w]
        assert p is not None
        op = OPS[self.st.get(w, F_CUR)] if self.st.get(w, F_CUR) < len(OPS) else "?"
        ops_done = self.st.get(w, F_OPS)
        os.kill(p.pid, signal.SIGKILL)
        self.after_kill(w, op, ops_done, targeted=False)

    def kill_lock_holder(self) -> bool:
        """Spin until a worker holds the heap lock and SIGKILL it at once: the kill then lands
        inside the C core (in the locked section, or just after it) far more often than a kill
        at a random time. Gives up after a short while."""
        pids = {
            p.pid: w for w, p in enumerate(self.procs) if p is not None and self.st.get(w, F_READY)
        }
        if not pids:
            return False
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            for _ in range(2000):
                w = pids.get(struct.unpack_from("<i", self.seg, self.owner_off)[0] & 0x3FFFFFFF)
                if w is not None:
                    break
            else:
                continue
            op = OPS[self.st.get(w, F_CUR)] if self.st.get(w, F_CUR) < len(OPS) else "?"
            ops_done = self.st.get(w, F_OPS)
            p = self.procs[w]
            assert p is not None
            os.kill(p.pid, signal.SIGKILL)
            self.after_kill(w, op, ops_done, targeted=True)
            return True
        return False

    def after_kill(self, w: int, op: str, ops_done: int, targeted: bool) -> None:
        p = self.procs[w]
        assert p is not None
        p.wait()
        if p.returncode != -signal.SIGKILL:  # it had already ended by itself
            self.abnormal_exits.append(
                {
                    "worker": w,
                    "pid": p.pid,
                    "status": signame(p.returncode),
                    "after_kill": self.kills,
                    "log": self.log_tail(w),
                }
            )
        self.kills += 1
        rec = {
            "kill": self.kills,
            "worker": w,
            "pid": p.pid,
            "op": op,
            "ops_done": ops_done,
            "lock_targeted": targeted,
            "t": round(time.monotonic() - self.t0, 3),
        }
        self.targeted_kills += targeted
        self.kill_log.append(rec)
        self.kills_since_check.append(rec)
        self.killed_during[op + (" (lock holder)" if targeted else "")] += 1
        self.retire(w)
        self.spawn(w)

    # observation
    def read_errors(self) -> None:
        with open(self.errors_path, "rb") as f:
            f.seek(self.err_pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.err_pos += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"kind": "unparsable", "line": line[:200].decode("utf-8", "replace")}
            rec["after_kill"] = self.kills
            self.worker_error_kinds[rec.get("kind", "?")] += 1
            if len(self.worker_errors) < 200:
                self.worker_errors.append(rec)
            if rec.get("kind") in ("corruption", "data", "held"):
                self.inconsistency("worker", rec)

    def inconsistency(self, source: str, detail: dict[str, Any]) -> None:
        self.inconsistencies.append(
            {
                "source": source,
                "after_kill": self.kills,
                "t": round(time.monotonic() - self.t0, 3),
                "kills_since_last_clean_check": list(self.kills_since_check[-5:]),
                **detail,
            }
        )

    def verify_held(self) -> int:
        assert self.mgr is not None
        bad = 0
        for a, gen, n in self.held:
            try:
                if self.mgr.read(a) != pattern(a, gen, n):
                    bad += 1
            except ShmallocError:
                bad += 1
        return bad

    def check(self) -> bool:
        assert self.mgr is not None
        self.checks += 1
        ok = True
        try:
            self.mgr.collect()
        except ShmallocError as e:
            ok = False
            self.inconsistency(
                "collect",
                {
                    "type": type(e).__name__,
                    "offset": getattr(e, "offset", None),
                    "detail": getattr(e, "detail", str(e)),
                },
            )
        try:
            self.mgr.check()
        except ShmallocError as e:
            ok = False
            self.inconsistency(
                "check",
                {
                    "type": type(e).__name__,
                    "offset": getattr(e, "offset", None),
                    "detail": getattr(e, "detail", str(e)),
                },
            )
        bad = self.verify_held()
        if bad:
            ok = False
            self.survivor_driver_corrupt += bad
            self.inconsistency("survivor", {"detail": f"{bad} of the survivor's blocks changed"})
        if ok:
            self.kills_since_check = []
        return ok

    # the run
    def run(self) -> dict[str, Any]:
        a = self.args
        self.mgr = MemoryManager.create(self.name, a.capacity)
        fd = os.open(os.path.join("/dev/shm", self.name), os.O_RDONLY)
        try:
            self.seg = mmap.mmap(fd, mmap.PAGESIZE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.owner_off = ffi.offsetof("shm_arena_t", "heap_lock") + 8  # pthread_mutex_t.__owner
        self.st = Status(self.status_path, a.workers + 1)
        self.survivor = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stress.crash_storm",
                "--role",
                "survivor",
                "--arena",
                self.name,
                "--wid",
                str(a.workers),
                "--inc",
                "0",
                "--worker-seed",
                str(self.rng.getrandbits(63)),
                "--status",
                self.status_path,
                "--errors",
                self.errors_path,
            ],
            cwd=REPO_ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.survivor_log,
            text=True,
        )
        line = self._read_survivor_line(60)
        self.held = json.loads(line)["held"]
        for w in range(a.workers):
            self.spawn(w)
        bar = Progress(a.kills, "kills")
        deadline = self.t0 + a.seconds if a.seconds else math.inf
        stop_reason = "kills"
        while self.kills < a.kills:
            if time.monotonic() >= deadline:
                stop_reason = "seconds"
                break
            time.sleep(min(self.rng.expovariate(1.0 / a.interval), 5 * a.interval))
            self.reap_exited()
            self.kill_one()
            self.read_errors()
            if self.kills % a.check_every == 0:
                self.check()
            bar.update(
                self.kills,
                f"ops {_fmt(self.operations())} rec {self.mgr.stats().lock_recoveries} "
                f"incons {len(self.inconsistencies)}",
            )
            if self.inconsistencies and not a.keep_going:
                stop_reason = "inconsistency"
                break
        bar.finish()
        if not self.inconsistencies:
            self.check()
        return self.finish(stop_reason)

    def _read_survivor_line(self, timeout: float) -> str:
        assert self.survivor is not None and self.survivor.stdout is not None
        r, _, _ = select.select([self.survivor.stdout], [], [], timeout)
        if not r:
            raise RuntimeError(f"the survivor did not answer within {timeout} s")
        line = self.survivor.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the survivor ended ({signame(self.survivor.wait())}): "
                + Path(self.tmp, "survivor.log").read_text(errors="replace")[-2000:]
            )
        return line

    def finish(self, stop_reason: str) -> dict[str, Any]:
        assert self.mgr is not None and self.survivor is not None
        a = self.args
        m = self.mgr
        # 1. workers: half stop gracefully (they free what they hold), half are killed
        graceful, killed = [], []
        for w, p in enumerate(self.procs):
            if p is None:
                continue
            if self.st.get(w, F_READY) and self.rng.random() < 0.5:  # its handler is installed
                p.send_signal(signal.SIGTERM)
                graceful.append(w)
            else:
                p.kill()
                killed.append(w)
        for w in graceful + killed:
            p = self.procs[w]
            assert p is not None
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.abnormal_exits.append(
                    {"worker": w, "pid": p.pid, "status": "did not stop", "log": self.log_tail(w)}
                )
            if w in graceful and p.returncode not in (0, -signal.SIGKILL):
                self.abnormal_exits.append(
                    {
                        "worker": w,
                        "pid": p.pid,
                        "status": signame(p.returncode),
                        "log": self.log_tail(w),
                    }
                )
            self.retire(w)
            self.procs[w] = None
        # 2. the survivor: the driver reads its blocks once more, then it verifies and frees them
        held_bad_driver = self.verify_held()
        self.survivor_driver_corrupt += held_bad_driver
        assert self.survivor.stdin is not None
        self.survivor.stdin.write("stop\n")
        self.survivor.stdin.flush()
        try:
            surv = json.loads(self._read_survivor_line(120))
        except (RuntimeError, ValueError) as e:
            surv = {"corrupt": -1, "error": str(e)}
        surv_rc = self.survivor.wait(timeout=60)
        self.read_errors()
        # 3. global collection and check
        from shmalloc.gc import GcStrategy, GlobalGarbageCollector

        final: dict[str, Any] = {}
        try:
            gs = GlobalGarbageCollector(m).collect(GcStrategy.GLOBAL)
            final["gc"] = {
                "freed_blocks": gs.freed_blocks,
                "freed_bytes": gs.freed_bytes,
                "processes_cleaned": gs.processes_cleaned,
            }
        except ShmallocError as e:
            final["gc"] = {"error": str(e)}
            self.inconsistency("final collect", _err(e))
        try:
            rep = m.check()
            final["check_after_gc"] = rep.__dict__
        except ShmallocError as e:
            final["check_after_gc"] = {"error": str(e)}
            self.inconsistency(
                "final check",
                {"offset": getattr(e, "offset", None), "detail": getattr(e, "detail", str(e))},
            )
        # 4. leftovers: persistent/named blocks of dead workers are expected; anything else leaks
        persistent = {"blocks": 0, "bytes": 0, "named": 0}
        leaked_blocks: list[dict[str, Any]] = []
        try:
            names = set()
            for n in m.names():
                try:
                    names.add(m.lookup(n))
                except KeyError:
                    pass
            blocks = m.all_blocks()
            for b in blocks:
                if b.persistent:
                    persistent["blocks"] += 1
                    persistent["bytes"] += b.size
                    persistent["named"] += b.address in names
                else:
                    leaked_blocks.append(
                        {"address": b.address, "size": b.size, "pid": b.pid, "refcount": b.refcount}
                    )
                m.deallocate(b.address)
        except ShmallocError as e:
            final["leftover_sweep_error"] = str(e)
            self.inconsistency("leftover sweep", _err(e))
        s = m.stats()
        slots = [p.__dict__ for p in m.processes() if p.pid != os.getpid()]
        try:
            rep = m.check()
            final["check_after_cleanup"] = rep.__dict__
            if rep.free_blocks != 1 or rep.allocated_blocks:
                final["not_one_free_block"] = True
        except ShmallocError as e:
            final["check_after_cleanup"] = {"error": str(e)}
            self.inconsistency(
                "cleanup check",
                {"offset": getattr(e, "offset", None), "detail": getattr(e, "detail", str(e))},
            )
        leaked_bytes = sum(b["size"] for b in leaked_blocks) + s.used
        surv_corrupt = max(0, surv.get("corrupt", 0)) + self.survivor_driver_corrupt
        survivor_ok = (
            surv.get("corrupt") == 0 and surv_rc == 0 and self.survivor_driver_corrupt == 0
        )
        bad_exits = [e for e in self.abnormal_exits]
        ok = (
            not self.inconsistencies
            and leaked_bytes == 0
            and survivor_ok
            and not slots
            and not bad_exits
            and not self.worker_errors
            and not final.get("not_one_free_block")
        )
        return {
            "mode": "storm",
            "ok": ok,
            "stop_reason": stop_reason,
            "config": {
                "workers": a.workers,
                "kills": a.kills,
                "seconds": a.seconds,
                "seed": a.seed,
                "interval": a.interval,
                "lock_kills": a.lock_kills,
                "check_every": a.check_every,
                "capacity": a.capacity,
                "quick": a.quick,
                "keep_going": a.keep_going,
            },
            "arena": self.name,
            "duration": round(time.monotonic() - self.t0, 2),
            "kills": self.kills,
            "lock_holder_kills": self.targeted_kills,
            "operations": self.operations(),
            "handoffs": self.retired_handoffs,
            "claims": self.retired_claims,
            "out_of_memory_answers": self.retired_ooms + self.st.get(a.workers, F_OOMS),
            "respawns": self.incarnation - a.workers,
            "checks": self.checks,
            "lock_recoveries": s.lock_recoveries,
            "killed_during": dict(self.killed_during.most_common()),
            "inconsistencies": self.inconsistencies,
            "n_inconsistencies": len(
                {
                    (i["source"].split()[-1], i.get("offset"), i.get("detail"))
                    for i in self.inconsistencies
                }
            ),
            "worker_errors": self.worker_errors,
            "worker_error_kinds": dict(self.worker_error_kinds),
            "n_worker_errors": sum(self.worker_error_kinds.values()),
            "abnormal_exits": bad_exits,
            "persistent_leftovers": persistent,
            "leaked_blocks": leaked_blocks[:50],
            "n_leaked_blocks": len(leaked_blocks),
            "leaked_bytes": leaked_bytes,
            "slots_left": slots,
            "final_used": s.used,
            "final": final,
            "survivor": {
                **surv,
                "exit": signame(surv_rc),
                "driver_corrupt": self.survivor_driver_corrupt,
                "held_blocks": len(self.held),
                "ok": survivor_ok,
            },
            "survivor_corruption": surv_corrupt,
            "last_kills": list(self.kill_log),
        }

    def cleanup(self) -> None:
        for p in [*self.procs, self.survivor]:
            if p is not None and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if self.mgr is not None:
            self.mgr.destroy()
            try:
                self.mgr.close()
            except (BufferError, ShmallocError, ValueError):
                pass
        for f in [*self.logs, self.survivor_log]:
            f.close()
        if hasattr(self, "st"):
            self.st.close()
        if hasattr(self, "seg"):
            self.seg.close()
        if not self.args.keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)


def print_storm(res: dict[str, Any]) -> None:
    rows = [
        (
            "kills",
            f"{_fmt(res['kills'])} ({_fmt(res['lock_holder_kills'])} aimed at the lock holder)",
        ),
        ("operations", _fmt(res["operations"])),
        ("hand-offs / claims", f"{_fmt(res['handoffs'])} / {_fmt(res['claims'])}"),
        ("checks run", _fmt(res["checks"])),
        ("out-of-memory answers", _fmt(res["out_of_memory_answers"])),
        ("lock recoveries", _fmt(res["lock_recoveries"])),
        ("inconsistencies", _fmt(res["n_inconsistencies"])),
        ("worker errors", _fmt(res["n_worker_errors"])),
        ("abnormal worker exits", _fmt(len(res["abnormal_exits"]))),
        ("leaked bytes", _fmt(res["leaked_bytes"])),
        ("leaked blocks", _fmt(res["n_leaked_blocks"])),
        ("slots left", _fmt(len(res["slots_left"]))),
        (
            "persistent leftovers",
            (
                f"{res['persistent_leftovers']['blocks']} blocks, "
                f"{_fmt(res['persistent_leftovers']['bytes'])} B "
                f"({res['persistent_leftovers']['named']} named), freed by the driver"
            ),
        ),
        ("survivor corruption", _fmt(res["survivor_corruption"])),
        ("final used", _fmt(res["final_used"])),
        ("duration", f"{res['duration']} s"),
        ("result", "PASS" if res["ok"] else "FAIL"),
    ]
    c = res["config"]
    print(
        f"crash storm on {res['arena']}: {c['workers']} workers, seed {c['seed']}, "
        f"stopped by {res['stop_reason']}"
    )
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if res["killed_during"]:
        print("  killed during: " + ", ".join(f"{k} {v}" for k, v in res["killed_during"].items()))
    seen = set()
    for inc in res["inconsistencies"][:40]:
        key = (inc.get("offset"), inc.get("detail"))
        if key in seen:
            continue
        seen.add(key)
        off = inc.get("offset")
        where = f" at {off:#x}" if isinstance(off, int) else ""
        print(
            f"  ! {inc['source']}{where} after kill {inc['after_kill']}: "
            f"{inc.get('detail') or inc.get('kind')}"
        )
        for k in inc.get("kills_since_last_clean_check", [])[-3:]:
            print(f"      kill {k['kill']}: worker {k['worker']} (pid {k['pid']}) during {k['op']}")
    for e in res["worker_errors"][:10]:
        msg = e.get("detail") or e.get("message") or ""
        print(f"  ! worker {e.get('worker')} {e.get('kind')} in {e.get('op')}: {msg}")
    for e in res["abnormal_exits"][:5]:
        print(f"  ! worker {e['worker']} (pid {e['pid']}) ended: {e['status']}")
        tail = e.get("log", "").strip().splitlines()[-3:]
        for t in tail:
            print(f"      {t}")


# ----------------------------------------------------------------------------- fault steps


def parse_fault_steps(path: Path = FAULT_C) -> list[str]:
    """The step names of fault.c's ``steps[]`` table, in index order."""
    try:
        text = path.read_text()
    except OSError:
        return list(KNOWN_STEPS)
    m = re.search(r"steps\s*\[\s*\]\s*=\s*\{(.*?)\};", text, re.DOTALL)
    body = m.group(1) if m else text
    steps = re.findall(r'\[\s*\w+\s*\]\s*=\s*"([^"]+)"', body) or re.findall(r'"([^"]+)"', body)
    return list(dict.fromkeys(steps)) or list(KNOWN_STEPS)


PRELUDE = """
import os, sys
from shmalloc import MemoryManager
m = MemoryManager.attach(sys.argv[1])
A = [int(x, 0) for x in sys.argv[2:]]
"""
EPILOGUE = '\nprint("completed", flush=True)\n'

HELPER = (
    PRELUDE
    + """
out = [m.allocate(s) for s in A[1:]]
for a in out[: A[0]]:
    m.retain(a)
print(" ".join(map(str, out)), flush=True)
"""
)

VERIFIER = (
    PRELUDE
    + """
import json, random
res = {"ok": True, "step": "check"}
try:
    m.check()
    rng = random.Random(A[0])
    live = {}
    res["step"] = "churn"
    for i in range(300):
        if live and rng.random() < 0.45:
            a = rng.choice(list(live))
            data = live.pop(a)
            if m.read(a, len(data)) != data:
                raise AssertionError(f"block {a:#x} changed under its owner")
            m.deallocate(a)
        else:
            n = rng.choice([16, 100, 1000, 5000, 70000])
            a = m.allocate(n)
            data = os.urandom(n)
            m.write(a, data)
            live[a] = data
    for a, data in live.items():
        if m.read(a, len(data)) != data:
            raise AssertionError(f"block {a:#x} changed under its owner")
        m.deallocate(a)
    res["step"] = "final check"
    m.check()
except Exception as e:
    res.update(ok=False, error=f"{type(e).__name__}: {e}")
m.close()
print(json.dumps(res), flush=True)
"""
)

MIXED = """
import random
rng = random.Random(A[0])
live = []
for i in range(400):
    r = rng.random()
    if live and r < 0.35:
        m.deallocate(live.pop(rng.randrange(len(live))))
    elif live and r < 0.42:
        a = rng.choice(live); m.retain(a); m.release(a)
    elif live and r < 0.46:
        a = live.pop(); m.bind(f"mx{i}", a); m.lookup(f"mx{i}"); m.unbind(f"mx{i}"); m.adopt(a); live.append(a)
    elif live and r < 0.48:
        m.persist(live[-1])
    elif r < 0.50:
        m.collect()
    else:
        live.append(m.allocate(rng.choice([16, 200, 3000, 20000, 200000]), align=rng.choice([None, None, 256])))
"""


class FaultCtx:
    """What a scenario's setup may ask for besides the driver's own manager."""

    def __init__(self, m: MemoryManager, seed: int) -> None:
        self.m = m
        self.seed = seed

    def run_helper(self, sizes: list[int], retain: int = 0) -> tuple[int, list[int]]:
        """A process that allocates ``sizes`` (retaining the first ``retain``) and exits: its
        blocks are orphans. Returns its pid and the addresses."""
        p = subprocess.Popen(
            [sys.executable, "-c", HELPER, self.m.name, str(retain), *map(str, sizes)],
            cwd=REPO_ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if p.returncode != 0:
            raise RuntimeError(f"helper failed ({signame(p.returncode)}): {err[-2000:]}")
        return p.pid, [int(x) for x in out.split()]

    def kill_in_operation(self) -> str | None:
        """A process killed by fault injection in the middle of an allocation, holding the heap
        lock with a non-empty journal: the next lock taker (the scenario's child) recovers it.
        Returns the step used, or None when fault.c has no step to do that with."""
        steps = parse_fault_steps()
        mid = [s for s in steps if s.startswith("alloc.") and not s.endswith(".locked")]
        step = (
            mid[len(mid) // 2] if mid else next((s for s in steps if s.startswith("alloc.")), None)
        )
        if step is None:
            return None
        p = subprocess.run(
            [sys.executable, "-c", PRELUDE + "m.allocate(3000)" + EPILOGUE, self.m.name],
            cwd=REPO_ROOT,
            env=child_env(step),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if p.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the helper killed at {step} ended {signame(p.returncode)}")
        return step

    def mark_dead(self) -> None:
        from shmalloc.tracking import mark_if_dead
        from shmalloc.tracking import scan_slots as scan

        h = self.m._handle()
        for r in scan(h):
            mark_if_dead(h, r)


@dataclass(frozen=True)
class Scenario:
    name: str
    families: frozenset[str]
    setup: Callable[[MemoryManager, FaultCtx], tuple[str, list[int]]]
    lock_left_dead: bool = False  # setup leaves the lock to a dead holder: the driver keeps off it


def _allocs(m: MemoryManager, *sizes: int) -> list[int]:
    return [m.allocate(s) for s in sizes]


def _sc_alloc_split(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _allocs(m, 1000)
    return "m.allocate(3000)", []


def _sc_alloc_exact(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    x, _ = _allocs(m, 2000, 100)
    m.deallocate(x)
    return "m.allocate(2000)", []


def _sc_alloc_aligned(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _allocs(m, 100)
    return "m.allocate(1000, align=4096)", []


def _sc_alloc_binned(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    xs = _allocs(m, *[100] * 16)
    for x in xs[::2]:
        m.deallocate(x)
    return "m.allocate(100); m.allocate(90)", []


def _sc_alloc_large(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    return "m.allocate(1 << 20)", []


def _sc_alloc_oom(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    return "try:\n    m.allocate(m.capacity)\nexcept MemoryError:\n    pass", []


def _sc_free_isolated(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, b, _ = _allocs(m, 500, 500, 500)
    return "m.deallocate(A[0])", [b]


def _sc_free_merge_next(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, b, cc, _ = _allocs(m, 500, 500, 500, 500)
    m.deallocate(cc)
    return "m.deallocate(A[0])", [b]


def _sc_free_merge_prev(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, b, cc, _ = _allocs(m, 500, 500, 500, 500)
    m.deallocate(b)
    return "m.deallocate(A[0])", [cc]


def _sc_free_merge_both(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, b, cc, d, _ = _allocs(m, 500, 500, 500, 500, 500)
    m.deallocate(b)
    m.deallocate(d)
    return "m.deallocate(A[0])", [cc]


def _sc_free_merge_tail(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, b = _allocs(m, 500, 500)
    return "m.deallocate(A[0])", [b]


def _sc_free_retained_named(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, x, _ = _allocs(m, 300, 700, 300)
    m.retain(x)
    m.bind("fault-named", x)
    return "m.deallocate(A[0])", [x]


def _sc_retain_release(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    (x,) = _allocs(m, 300)
    return "m.retain(A[0]); m.retain(A[0]); m.release(A[0]); m.release(A[0])", [x]


def _sc_release_orphan(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _, (x, _) = c.run_helper([300, 300])
    c.mark_dead()
    return "m.retain(A[0]); m.release(A[0])", [x]


def _sc_gc_dead(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _allocs(m, 100)
    c.run_helper([100, 200, 300, 400, 500, 6000])
    _allocs(m, 100)
    return "m.collect()", []


def _sc_gc_dead_retained(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    c.run_helper([100, 200, 300, 400], retain=2)
    return "m.collect()", []


def _sc_gc_targeted(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    pid, _ = c.run_helper([100, 200, 300])
    return "m.free_process_memory(A[0])", [pid]


def _sc_gc_unreferenced(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    c.run_helper([100, 200, 300, 400])
    code = (
        "from shmalloc.gc import GcStrategy, GlobalGarbageCollector\n"
        "GlobalGarbageCollector(m).collect(GcStrategy.UNREFERENCED)"
    )
    return (
        code,
        [],
    )


def _sc_adopt(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    (x,) = _allocs(m, 300)
    return "m.adopt(A[0])", [x]


def _sc_persist(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    (x,) = _allocs(m, 300)
    return "m.persist(A[0])", [x]


def _sc_bind(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    (x,) = _allocs(m, 300)
    return "m.bind('fault-n', A[0]); m.lookup('fault-n'); m.names(); m.unbind('fault-n')", [x]


def _sc_seal(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    (x,) = _allocs(m, 300)
    return "m.seal(A[0])", [x]


def _sc_check(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    return "m.check(); m.stats(); m.processes(); m.all_blocks()", []


def _sc_slot(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    return "a = m.allocate(64); m.deallocate(a); m.close()", []


def _sc_mixed(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    c.run_helper([100, 2000, 300], retain=1)
    return MIXED, [c.seed]


def _sc_recover(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    _allocs(m, 500, 500)
    c.kill_in_operation()
    return "m.allocate(100); m.check()", []


def _sc_cache(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    m.set_cache_limit(256 << 10)  # an 8 MiB arena starts without caches
    _allocs(m, 100)
    return "a = m.allocate(100); m.deallocate(a); m.allocate(100); m.allocate(3000)", []


def _sc_remote_free(m: MemoryManager, c: FaultCtx) -> tuple[str, list[int]]:
    m.set_cache_limit(256 << 10)
    x, _ = _allocs(m, 100, 100)  # the driver's block, freed by the child: a remote free
    # the child joins the process table first (a process without a slot frees under the lock)
    return "m.deallocate(m.allocate(64)); m.deallocate(A[0])", [x]


def _fs(*names: str) -> frozenset[str]:
    return frozenset(names)


SCENARIOS = [
    Scenario("alloc_split", _fs("alloc"), _sc_alloc_split),
    Scenario("alloc_exact", _fs("alloc"), _sc_alloc_exact),
    Scenario("alloc_aligned", _fs("alloc"), _sc_alloc_aligned),
    Scenario("alloc_binned", _fs("alloc"), _sc_alloc_binned),
    Scenario("alloc_large", _fs("alloc"), _sc_alloc_large),
    Scenario("alloc_oom", _fs("alloc", "oom"), _sc_alloc_oom),
    Scenario("free_isolated", _fs("free"), _sc_free_isolated),
    Scenario("free_merge_next", _fs("free"), _sc_free_merge_next),
    Scenario("free_merge_prev", _fs("free"), _sc_free_merge_prev),
    Scenario("free_merge_both", _fs("free"), _sc_free_merge_both),
    Scenario("free_merge_tail", _fs("free"), _sc_free_merge_tail),
    Scenario("free_retained_named", _fs("free", "refs", "names"), _sc_free_retained_named),
    Scenario("retain_release", _fs("retain", "release", "refs"), _sc_retain_release),
    Scenario("release_orphan", _fs("release", "retain", "free"), _sc_release_orphan),
    Scenario("gc_dead", _fs("gc", "collect", "free"), _sc_gc_dead),
    Scenario("gc_dead_retained", _fs("gc", "collect", "refs", "free"), _sc_gc_dead_retained),
    Scenario("gc_targeted", _fs("gc", "free"), _sc_gc_targeted),
    Scenario("gc_unreferenced", _fs("gc", "collect", "free"), _sc_gc_unreferenced),
    Scenario("adopt", _fs("adopt", "own"), _sc_adopt),
    Scenario("persist", _fs("persist", "own"), _sc_persist),
    Scenario("bind_unbind", _fs("bind", "unbind", "name", "names", "lookup"), _sc_bind),
    Scenario("seal", _fs("seal"), _sc_seal),
    Scenario("check", _fs("check", "stats"), _sc_check),
    Scenario("slot", _fs("attach", "detach", "proc", "slot"), _sc_slot),
    Scenario("cache", _fs("cache", "alloc", "free"), _sc_cache),
    Scenario("remote_free", _fs("remote", "free"), _sc_remote_free),
    Scenario("mixed", _fs(), _sc_mixed),
    Scenario(
        "recover_after_kill",
        _fs("rollback", "recover", "recovery", "journal", "lock", "undo"),
        _sc_recover,
        lock_left_dead=True,
    ),
]


def _snapshot(m: MemoryManager) -> list[tuple[int, int, int, bool, int, bool]]:
    return [(b.address, b.size, b.pid, b.sealed, b.refcount, b.persistent) for b in m.all_blocks()]


def _recoveries(m: MemoryManager) -> int:
    """lock_recoveries, read without taking the lock (stats() takes it for the largest block)."""
    s = ffi.new("shm_stats_t *")
    lib.shm_stats_read(m._handle(), s)
    return int(s.lock_recoveries)


def _err(e: BaseException) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "offset": getattr(e, "offset", None),
        "detail": getattr(e, "detail", None) or str(e),
    }


def fault_run(step: str, sc: Scenario, seed: int) -> dict[str, Any]:
    """One child killed at ``step`` during scenario ``sc``; then judge the arena."""
    name = f"shmalloc-fault-{os.getpid()}-{secrets.token_hex(4)}"
    m = MemoryManager.create(name, 8 * MiB)
    res: dict[str, Any] = {"step": step, "scenario": sc.name}
    try:
        keep = []
        for i, n in enumerate((100, 5000, 300)):
            a = m.allocate(n)
            m.write(a, pattern(a, i + 1, m.size_of(a)))
            keep.append((a, i + 1, m.size_of(a)))
        code, args = sc.setup(m, FaultCtx(m, seed))
        # (taking the lock here would recover a dead holder the scenario leaves to its child)
        before = None if sc.lock_left_dead else _snapshot(m)
        rec0 = _recoveries(m)
        try:
            child = subprocess.run(
                [sys.executable, "-c", PRELUDE + code + EPILOGUE, name, *map(str, args)],
                cwd=REPO_ROOT,
                env=child_env(step),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            rc: int | None = child.returncode
            stderr = child.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = (
                None,
                (e.stderr or b"").decode("utf-8", "replace")
                if isinstance(e.stderr, bytes)
                else str(e.stderr or ""),
            )
        res["child"] = "hang" if rc is None else signame(rc)
        res["reached"] = rc == -signal.SIGKILL
        if rc not in (0, -signal.SIGKILL):
            res["child_stderr"] = stderr[-1500:]
        problems: list[str] = []
        try:
            rep = m.check()
            res["check"] = "ok"
            res["check_report"] = {
                "blocks": rep.blocks,
                "allocated": rep.allocated_blocks,
                "free": rep.free_blocks,
            }
        except ShmallocError as e:
            res["check"] = _err(e)
            problems.append(f"check: {_err(e)['detail']}")
        res["lock_recoveries"] = _recoveries(m) - rec0
        try:
            after = _snapshot(m)
            res["heap_changed"] = None if before is None else after != before
        except ShmallocError as e:
            res["heap_changed"] = None
            problems.append(f"all_blocks: {e}")
        bad = 0
        for a, g, n in keep:
            try:
                if m.read(a) != pattern(a, g, n):
                    bad += 1
            except ShmallocError:
                bad += 1
        res["driver_blocks_changed"] = bad
        if bad:
            problems.append(f"{bad} of the driver's blocks changed")
        try:
            v = subprocess.run(
                [sys.executable, "-c", VERIFIER, name, str(seed)],
                cwd=REPO_ROOT,
                env=child_env(),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if v.returncode == 0 and v.stdout.strip():
                res["verifier"] = json.loads(v.stdout.strip().splitlines()[-1])
            else:
                res["verifier"] = {
                    "ok": False,
                    "error": signame(v.returncode),
                    "stderr": v.stderr[-1500:],
                }
        except subprocess.TimeoutExpired:
            res["verifier"] = {"ok": False, "error": "hang (60 s)"}
        if not res["verifier"].get("ok"):
            problems.append(f"verifier: {res['verifier'].get('error')}")
        # clean up: collect the dead, free whatever is left, expect an empty arena
        try:
            m.collect()
            for b in m.all_blocks():
                m.deallocate(b.address)
            m.collect()  # what those frees put in this process's cache goes back to the heap
            s = m.stats()
            res["leaked_bytes"] = s.used
            if s.used:
                problems.append(f"{s.used} bytes still counted as used after freeing every block")
            rep = m.check()
            if rep.free_blocks != 1 or rep.allocated_blocks:
                problems.append(
                    f"after cleanup: {rep.allocated_blocks} allocated, {rep.free_blocks} free blocks"
                )
            left = [p.pid for p in m.processes() if p.pid != os.getpid()]
            if left:
                problems.append(f"process slots left: {left}")
        except ShmallocError as e:
            problems.append(f"cleanup: {_err(e)['type']}: {_err(e)['detail']}")
        res["problems"] = problems
        res["consistent"] = not problems
    finally:
        m.destroy()
        try:
            m.close()
        except (BufferError, ValueError):
            pass
    return res


def fault_steps(args: argparse.Namespace) -> dict[str, Any]:
    steps = parse_fault_steps()
    t0 = time.monotonic()
    rng = random.Random(args.seed)
    out = []
    plan: list[tuple[str, list[Scenario]]] = []
    for step in steps:
        fam = step.split(".")[0]
        first = [s for s in SCENARIOS if fam in s.families]
        rest = [s for s in SCENARIOS if fam not in s.families]
        plan.append((step, first + rest))
    total = sum(len(p) for _, p in plan) if not args.quick else len(plan)
    bar = Progress(total, "fault runs")
    done = 0
    for step, scen in plan:
        runs = []
        for sc in scen:
            r = fault_run(step, sc, rng.getrandbits(32))
            runs.append(r)
            done += 1 if not args.quick else 0
            bar.update(done, step)
            if args.quick and r["reached"]:
                break
        if args.quick:
            done += 1
            bar.update(done, step)
        reached = [r for r in runs if r["reached"]]
        out.append(
            {
                "step": step,
                "reached_by": [r["scenario"] for r in reached],
                "consistent": all(r["consistent"] for r in reached) if reached else None,
                "inconsistent_runs": [r for r in reached if not r["consistent"]],
                "odd_children": [r for r in runs if r["child"] not in ("SIGKILL", "exit 0")],
                "runs": runs,
            }
        )
    bar.finish()
    ok = all(s["consistent"] is not False for s in out) and not any(s["odd_children"] for s in out)
    return {
        "mode": "fault-steps",
        "ok": ok,
        "steps": out,
        "duration": round(time.monotonic() - t0, 2),
        "config": {"seed": args.seed, "quick": args.quick, "fault_c": str(FAULT_C)},
    }


def print_fault_steps(res: dict[str, Any]) -> None:
    print(
        f"fault steps from {res['config']['fault_c']} ({len(res['steps'])} steps, {res['duration']} s)"
    )
    w = max([len(s["step"]) for s in res["steps"]] + [4])
    print(
        f"  {'step':<{w}}  {'reached':>7}  {'consistent':>10}  first reaching scenario / problems"
    )
    for s in res["steps"]:
        n = len(s["reached_by"])
        cons = {True: "yes", False: "NO", None: "-"}[s["consistent"]]
        note = s["reached_by"][0] if s["reached_by"] else "NOT REACHED by any scenario"
        print(f"  {s['step']:<{w}}  {n:>7}  {cons:>10}  {note}")
        for r in s["inconsistent_runs"][:6]:
            print(f"  {'':<{w}}  ! {r['scenario']}: " + "; ".join(r["problems"])[:300])
        for r in s["odd_children"][:3]:
            last = (r.get("child_stderr") or "").strip().splitlines()[-1:]
            print(f"  {'':<{w}}  ! {r['scenario']}: child {r['child']}: {' '.join(last)}")
    print(f"  result: {'PASS' if res['ok'] else 'FAIL'}")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.crash_storm",
        description="Churn one arena from many processes while SIGKILLing them at random; "
        "then check the heap, the survivor's data and that nothing leaked. "
        "--fault-steps kills a child at each named step of native/fault.c instead.",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default 4; --quick 3)"
    )
    p.add_argument(
        "--kills",
        type=int,
        default=None,
        help="stop after this many kills (default 200; --quick 10)",
    )
    p.add_argument("--seconds", type=float, default=None, help="also stop after this many seconds")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    p.add_argument(
        "--interval",
        type=float,
        default=None,
        help="mean seconds between kills (exponential; default 0.1, --quick 0.05)",
    )
    p.add_argument(
        "--lock-kills",
        type=float,
        default=0.3,
        help="share of kills aimed at the worker holding the heap lock (default 0.3)",
    )
    p.add_argument(
        "--check-every", type=int, default=1, help="collect + check every N kills (default 1)"
    )
    p.add_argument(
        "--capacity", type=int, default=128 * MiB, help="arena capacity in bytes (default 128 MiB)"
    )
    p.add_argument(
        "--keep-going", action="store_true", help="do not stop at the first inconsistency"
    )
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the workers' stderr logs (path printed)"
    )
    p.add_argument(
        "--fault-steps",
        action="store_true",
        help="kill a child at each step of native/fault.c and check the arena after",
    )
    # internal: the roles of the child processes
    p.add_argument("--role", choices=("worker", "survivor"), help=argparse.SUPPRESS)
    p.add_argument("--arena", help=argparse.SUPPRESS)
    p.add_argument("--wid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--inc", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--status", help=argparse.SUPPRESS)
    p.add_argument("--errors", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.workers is None:
        a.workers = 3 if a.quick else 4
    if a.kills is None:
        a.kills = 10 if a.quick else 200
    if a.interval is None:
        a.interval = 0.05 if a.quick else 0.1
    if a.workers < 1 or a.kills < 0 or a.interval <= 0 or a.check_every < 1:
        p.error("--workers and --check-every must be >= 1, --kills >= 0, --interval > 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "worker":
        return Worker(args).main()
    if args.role == "survivor":
        return Survivor(args).main()
    if os.environ.get("SHMALLOC_FAULT"):
        print(
            "note: SHMALLOC_FAULT is set; the driver ignores it and its children do not inherit it",
            file=sys.stderr,
        )
    old = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        if args.fault_steps:
            res = fault_steps(args)
            print_fault_steps(res)
        else:
            storm = Storm(args)
            try:
                res = storm.run()
            finally:
                storm.cleanup()
            print_storm(res)
            if args.keep_logs:
                print(f"  logs kept in {storm.tmp}")
    except KeyboardInterrupt:
        print("\ninterrupted: every process killed, the arena destroyed", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    if args.json:
        write_json(args.json, res, default=str)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
