"""Crash storm: worker processes churn one arena while the driver SIGKILLs them at random.

Workers allocate random sizes, write a pattern of (address, generation) over each block, verify,
rewrite, free, retain, release, persist, seal, hand blocks to each other through bound names,
and run allocate/free bursts straight through the C core so that a kill often lands inside it.
A survivor holds blocks of known content for the whole run. The driver kills a random worker
after a random interval and respawns it, until K kills or S seconds; a share of the kills is
aimed at the worker holding the heap lock. After every kill it collects, checks the arena and
reads the survivor's blocks. At the end half the workers stop gracefully, the others are killed,
the survivor verifies and frees its blocks, and the driver frees what dead workers left
persistent or named (reported apart) and expects nothing used, one free block and no slot left.

Queue workers put and get arrays, small and large, through one shared JoinableQueue and log each
item's id once put or get returned; at the end the driver drains the queue, sees a new put/get
pair work, no item come out twice, and every item put come out (but one per consumer killed in get).

An inconsistency is a ``check()`` failure, a ``CorruptionDetected`` seen by a worker, a block whose
content or size changed under its owner, or a queue item lost, duplicated or damaged; the first one
stops the storm (unless ``--keep-going``). Exit code 0 only without inconsistency, worker error,
leak or damage to the survivor's data. The fault-step matrix (a child killed at each named step of
the C core) is ``tests/test_fault_steps.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import pickle
import queue
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shmalloc import CorruptionDetected, JoinableQueue, MemoryManager, OutOfMemory, ShmallocError
from shmalloc._binding import ffi, lib, raise_status
from shmalloc.gc import GcStrategy, GlobalGarbageCollector

from ._common import MiB, Parser, bar, core_handle, pattern, run_check, signame, spawn

OPS = ("idle", "start", "alloc", "verify", "rewrite", "free", "retain", "release", "persist")
OPS += ("seal", "handoff", "claim", "burst", "core_burst", "collect", "check", "stats", "stop")
# operation: weight in a worker's random choice
WEIGHTS = dict(zip(OPS[2:-1], (28, 14, 6, 20, 3, 3, 2, 2, 4, 4, 8, 6, 0.6, 0.3, 1), strict=True))
# status words of one process, a row of a small shared file (not in the arena under test)
F_OPS, F_CUR, F_READY, F_ERRS, F_OOMS = range(5)
ROW = 8
MAX_LIVE = 48
MAX_WORKER_ERRORS = 20  # a worker that reported this many errors exits (status 3)
SURVIVOR_WEIGHTS = dict(alloc=30, verify=20, rewrite=8, free=30, burst=8, stats=4)
SHOWN = ("operations", "checks", "out_of_memory_answers", "lock_recoveries", "n_inconsistencies")
SHOWN += ("n_worker_errors", "leaked_bytes", "n_leaked_blocks")  # counts in the report
CORE_SIZES = (16, 24, 64, 100, 200, 500, 1000, 2000, 4000, 6000, 10000, 40000, 70000, 300000)
OPS += ("put", "get")  # the queue workers'
Q_SIZES = (1, 5, 100, 2000, 30_000)  # elements of a queue item's array (in band up to 1 KiB)


def q_item_ok(gen: int, x: Any) -> bool:
    return x.dtype == "uint64" and x.size in Q_SIZES and bool((x == gen).all())


def random_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.04:
        return rng.randint(64 << 10, 1 << 20)
    if r < 0.25:
        return rng.randint(4 << 10, 64 << 10)
    return max(1, int(math.exp(rng.uniform(0, math.log(4096)))))  # small, log-uniform


def status_words(path: str, rows: int = 0) -> memoryview:
    """Per-process counters in a shared file, ``words[row, field]``; made with ``rows``."""
    if rows:
        Path(path).write_bytes(bytes(rows * ROW * 8))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    return memoryview(mm).cast("Q", (len(mm) // (8 * ROW), ROW))


@dataclass
class Held:
    gen: int
    n: int
    refs: int = 0
    persistent: bool = False
    sealed: bool = False


# ----------------------------------------------------------------------------- the workers
class Worker:
    """One churning process. Every surprise goes as a JSON line to the errors file."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a, self.row, self.inc, self.role = a, a.wid, a.inc, a.role
        self.rng = random.Random(a.seed)
        self.st = status_words(a.status)
        self.errfd = os.open(a.errors, os.O_WRONLY | os.O_APPEND)
        self.nerr = self.counter = 0
        self.stop = False
        self.blocks: dict[int, Held] = {}
        self.q: Any = None
        self.m = MemoryManager.attach(a.arena)

    def next_gen(self) -> int:
        self.counter += 1
        return self.inc << 32 | self.counter

    def report(self, kind: str, **fields: Any) -> None:
        self.nerr += 1
        self.st[self.row, F_ERRS] = self.nerr
        rec = {"kind": kind, "role": self.role, "worker": self.row, "pid": os.getpid(), **fields}
        os.write(self.errfd, (json.dumps(rec, default=str) + "\n").encode())
        if self.nerr >= MAX_WORKER_ERRORS and self.role == "worker":
            os._exit(3)

    def verify(self, a: int, b: Held, why: str) -> bool:
        n, got = self.m.size_of(a), self.m.read(a)
        if n == b.n and got == pattern(a, b.gen, b.n):
            return True
        self.report("data", op=why, address=a, gen=b.gen, size=b.n, size_now=n)
        return False

    def pick(self, cond: Any = None) -> int | None:
        cands = [a for a, b in self.blocks.items() if cond is None or cond(b)]
        return self.rng.choice(cands) if cands else None

    def op_alloc(self) -> None:
        if len(self.blocks) >= MAX_LIVE:
            return self.op_free()
        size = random_size(self.rng)
        align = self.rng.choice((64, 256, 4096)) if self.rng.random() < 0.1 else None
        a = self.m.allocate(size, align=align)
        n = self.m.size_of(a)
        if (align and a % align) or n < size:
            self.report("unexpected", op="alloc", message=f"{a:#x}: {n} B for {size}, {align}")
        self.blocks[a] = Held(self.next_gen(), n)
        self.m.write(a, pattern(a, self.blocks[a].gen, n))

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
        b = self.blocks.pop(a)
        ok = self.verify(a, b, "free")
        while b.refs and self.rng.random() < 0.5:
            self.m.release(a)
            b.refs -= 1
        n = self.m.deallocate(a)
        if ok and n != b.n:
            self.report("unexpected", op="free", message=f"deallocate gave {n}, block had {b.n}")

    def op_retain(self) -> None:
        a = self.pick(lambda b: b.refs < 3)
        if a is not None:
            self.m.retain(a)
            self.blocks[a].refs += 1

    def op_release(self) -> None:
        a = self.pick(lambda b: b.refs > 0)
        if a is not None:
            self.blocks[a].refs -= 1
            if self.m.release(a):
                self.report("unexpected", op="release", message=f"release freed live {a:#x}")
                del self.blocks[a]

    def op_persist(self) -> None:  # small blocks only: a killed worker leaves them to the driver
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
        b = self.blocks.pop(a)
        if self.verify(a, b, "handoff"):
            try:
                self.m.bind(f"h.{b.gen:x}.{int(b.sealed)}", a)
            except ShmallocError:  # the name table is full: keep the block
                self.blocks[a] = b

    def op_claim(self) -> None:
        offers = [n for n in self.m.names() if n.startswith("h.")]
        if not offers:
            return
        name = self.rng.choice(offers)
        try:
            a = self.m.lookup(name)
            self.m.unbind(name)  # whoever unbinds first owns the block
        except KeyError:
            return
        _, g, s = name.split(".")
        b = Held(int(g, 16), self.m.size_of(a), sealed=s == "1")
        ok = self.verify(a, b, "claim")  # a damaged block is reported and left alone
        if ok and self.rng.random() < 0.7 and len(self.blocks) < MAX_LIVE:
            self.m.adopt(a)
            self.blocks[a] = b
        elif ok:
            self.m.deallocate(a)

    def op_burst(self) -> None:
        addrs: list[int] = []
        try:
            for _ in range(self.rng.randint(8, 48)):
                addrs.append(self.m.allocate(self.rng.choice((16, 48, 100, 200, 1000, 9000))))
            self.rng.shuffle(addrs)
        finally:  # also after an error: give back what the burst holds
            for a in addrs:
                self.m.deallocate(a)

    def op_core_burst(self) -> None:
        """Allocate/free straight through the C core (no Python between the calls), so that
        most of the time goes inside the heap lock and a kill often lands there."""
        h, slot = core_handle(self.m)
        live: list[int] = []
        try:
            for _ in range(self.rng.randint(4, 12)):
                for _ in range(self.rng.randint(8, 64)):
                    r = lib.shm_alloc(h, self.rng.choice(CORE_SIZES), 0, slot)
                    if r < 0:
                        raise_status(r)
                    live.append(r & lib.SHM_ALLOC_ADDRESS_MASK)
                self.rng.shuffle(live)
                for _ in range(len(live) * 3 // 4):
                    r = lib.shm_free(h, live[-1])
                    if r < 0:
                        raise_status(r, live[-1])
                    live.pop()
        finally:
            for a in live:
                self.m.deallocate(a)

    def op_stats(self) -> None:
        s = self.m.stats()
        if s.used > s.total:
            self.report("unexpected", op="stats", message=f"used {s.used} > total {s.total}")

    def run_op(self, op: str) -> None:
        self.st[self.row, F_CUR] = OPS.index(op)
        try:
            (getattr(self, "op_" + op, None) or getattr(self.m, op))()  # collect, check: as is
        except OutOfMemory:  # an answer, not a failure: make room
            self.st[self.row, F_OOMS] += 1
            for a in list(self.blocks)[: len(self.blocks) // 2]:
                del self.blocks[a]
                self.m.deallocate(a)
        except CorruptionDetected as e:
            self.report("corruption", op=op, offset=e.offset, detail=e.detail)
        except Exception as e:  # noqa: BLE001 - any surprise is reported, then the churn goes on
            tb = traceback.format_exc(limit=6)
            self.report("unexpected", op=op, type=type(e).__name__, message=str(e), traceback=tb)
        self.st[self.row, F_CUR] = 0
        self.st[self.row, F_OPS] += 1

    def free_all(self, blocks: dict[int, Held], why: str = "final") -> int:
        """Verify and free ``blocks``; returns how many had changed."""
        self.st[self.row, F_CUR] = OPS.index("stop")
        changed = 0
        for a, b in blocks.items():
            changed += not self.verify(a, b, why)
            for _ in range(b.refs):
                self.m.release(a)
            self.m.deallocate(a)
        blocks.clear()
        return changed

    def main(self, weights: dict[str, float] = WEIGHTS) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.st[self.row, F_READY] = 1
        ops, ws = list(weights), list(weights.values())
        ppid = os.getppid()
        while not self.stop:
            for _ in range(64):
                self.run_op(self.rng.choices(ops, ws)[0])
            if os.getppid() != ppid:  # the driver is gone: so are we
                os._exit(4)
        self.free_all(self.blocks)
        self.q = None
        self.m.close()
        return 0


class QueueWorker(Worker):
    """Puts (even rows) or gets (odd rows) items (id, array of id) through the storm's queue and
    logs "p id" / "g id" once the call returned: F_CUR says "put" / "get" until then."""

    def main(self, weights: dict[str, float] = WEIGHTS) -> int:
        self.q = pickle.loads(Path(self.a.queue).read_bytes())
        self.qlog = os.open(self.a.queue + ".log", os.O_WRONLY | os.O_APPEND)
        return super().main({"put" if self.row % 2 == 0 else "get": 1})

    def op_put(self) -> None:
        import numpy as np

        gen = self.next_gen()
        item = (gen, np.full(self.rng.choice(Q_SIZES), gen, np.uint64))
        for _ in range(60):  # a killed consumer is respawned within seconds
            if self.stop:
                return
            with contextlib.suppress(queue.Full):
                self.q.put(item, timeout=1)
                os.write(self.qlog, b"p %d\n" % gen)
                return
        self.report("wedged", op="put", message="no room in the queue for 60 s")

    def op_get(self) -> None:
        with contextlib.suppress(queue.Empty):
            gen, x = self.q.get(timeout=1)
            os.write(self.qlog, b"g %d\n" % gen)
            if not q_item_ok(gen, x):
                self.report("data", op="get", gen=gen, size=x.size)
            self.q.task_done()


class Survivor(Worker):
    """Holds blocks of known content for the whole storm and churns a few more. Prints its held
    blocks as a JSON line, churns until a line arrives on stdin, then verifies, frees and prints
    its figures."""

    def main(self) -> int:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        held: dict[int, Held] = {}
        for i in range(32):
            a = self.m.allocate(self.rng.randint(64, 16 << 10))
            b = held[a] = Held(self.next_gen(), self.m.size_of(a))
            self.m.write(a, pattern(a, b.gen, b.n))
            if i % 4 == 1:
                self.m.seal(a)
            if i % 3 == 0:
                self.m.retain(a)
                b.refs = 1
        print(json.dumps({"held": [[a, b.gen, b.n] for a, b in held.items()]}), flush=True)
        corrupt = verified = 0
        ops, weights = list(SURVIVOR_WEIGHTS), list(SURVIVOR_WEIGHTS.values())
        ppid = os.getppid()
        while not select.select([sys.stdin], [], [], 0)[0]:
            if os.getppid() != ppid:
                os._exit(4)
            for _ in range(50):
                self.run_op(self.rng.choices(ops, weights)[0] if len(self.blocks) < 24 else "free")
            verified += len(held)
            corrupt += sum(not self.verify(a, b, "held") for a, b in held.items())
        self.free_all(self.blocks)
        verified += len(held)
        corrupt += self.free_all(held, "held, final")
        self.m.close()
        ops = self.st[self.row, F_OPS]
        out = dict(corrupt=corrupt, verified=verified, errors=self.nerr, ops=ops)
        print(json.dumps(out), flush=True)
        return 0


# ----------------------------------------------------------------------------- the driver
class Storm:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.rng = random.Random(args.seed)
        self.tmp = tempfile.mkdtemp(prefix="crash_storm-")
        self.status_path = os.path.join(self.tmp, "status.bin")
        self.errors_path = os.path.join(self.tmp, "errors.jsonl")
        open(self.errors_path, "wb").close()
        self.name = f"shmalloc-storm-{os.getpid()}-{secrets.token_hex(4)}"
        self.n = args.workers + args.queue_workers  # rows: workers, queue workers, survivor
        self.st = status_words(self.status_path, self.n + 1)
        self.mgr = MemoryManager.create(self.name, args.capacity)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.n
        self.survivor: subprocess.Popen[str] | None = None
        self.log = os.path.join(self.tmp, "w{}.log")
        self.logs = [open(self.log.format(i), "ab") for i in range(self.n + 1)]  # noqa: SIM115
        self.q: JoinableQueue | None = JoinableQueue(8, arena=self.mgr)
        self.queue_path = os.path.join(self.tmp, "queue")
        Path(self.queue_path).write_bytes(pickle.dumps(self.q))
        pickle.loads(Path(self.queue_path).read_bytes())  # its ticket: children need none
        open(self.queue_path + ".log", "wb").close()
        self.q_put: set[int] = set()
        self.q_got: set[int] = set()
        self.read_upto: Counter[str] = Counter()
        self.end_kills: Counter[str] = Counter()  # killed by finish(), by what they were doing
        self.incarnation = self.kills = self.aimed = self.checks = 0
        self.retired_ops = self.retired_ooms = 0
        self.killed_during: Counter[str] = Counter()
        self.kills_since_check: list[dict[str, Any]] = []
        self.inconsistencies: list[dict[str, Any]] = []
        self.worker_errors: list[dict[str, Any]] = []
        self.abnormal_exits: list[dict[str, Any]] = []
        self.held: list[list[int]] = []
        self.t0 = time.monotonic()

    def child(self, role: str, w: int, **kw: Any) -> subprocess.Popen[Any]:
        self.incarnation += 1
        c = dict(role=role, arena=self.name, wid=w, inc=self.incarnation, queue=self.queue_path)
        c.update(status=self.status_path, errors=self.errors_path, seed=self.rng.getrandbits(63))
        return spawn("crash_storm", "--child", json.dumps(c), stderr=self.logs[w], **kw)

    def spawn(self, w: int) -> None:
        self.st[w, F_READY] = self.st[w, F_ERRS] = 0
        self.st[w, F_CUR] = OPS.index("start")
        role = "worker" if w < self.a.workers else "qworker"
        self.procs[w] = self.child(role, w, stdout=subprocess.DEVNULL)

    def retire(self, w: int) -> None:
        self.retired_ops += self.st[w, F_OPS]
        self.retired_ooms += self.st[w, F_OOMS]
        self.st[w, F_OPS] = self.st[w, F_OOMS] = 0

    def operations(self) -> int:
        return self.retired_ops + sum(self.st[w, F_OPS] for w in range(self.n + 1))

    def abnormal(self, w: int, p: subprocess.Popen[Any], status: str) -> None:
        tail = Path(self.log.format(w)).read_bytes()[-3000:].decode("utf-8", "replace")
        rec = {"worker": w, "pid": p.pid, "status": status, "after_kill": self.kills}
        self.abnormal_exits.append({**rec, "log": tail})

    def reap_exited(self) -> None:
        """Workers that ended on their own (an error limit, a crash): record and respawn."""
        for w, p in enumerate(self.procs):
            if p is not None and p.poll() is not None:
                self.abnormal(w, p, signame(p.returncode))
                self.retire(w)
                self.spawn(w)

    def lock_holder(self) -> int | None:
        """The worker holding the heap lock right now, if any (the lock is read, not taken)."""
        tid = ffi.new("uint32_t *")
        pids = {p.pid: w for w, p in enumerate(self.procs) if p and self.st[w, F_READY]}
        h = core_handle(self.mgr)[0]
        deadline = time.monotonic() + 0.5
        while pids and time.monotonic() < deadline:
            for _ in range(2000):
                if lib.shm_lock_owner(h, -1, tid) == 0 and tid[0] in pids:
                    return pids[tid[0]]  # single-threaded workers: thread id == pid
        return None

    def kill_one(self) -> None:
        aimed = self.rng.random() < self.a.lock_kills
        w = self.lock_holder() if aimed else None
        if w is None:  # mostly a worker that is churning (wait for one), else any, maybe starting
            aimed = False
            churning = self.rng.random() < 0.9
            deadline = time.monotonic() + 60
            while True:
                ready = [w for w in range(self.n) if self.st[w, F_OPS] > 0]
                if ready or not churning or time.monotonic() > deadline:
                    break
                time.sleep(0.005)
                self.reap_exited()
            w = self.rng.choice(ready) if ready else self.rng.randrange(self.n)
        p = self.procs[w]
        assert p is not None
        os.kill(p.pid, signal.SIGKILL)
        if p.wait() != -signal.SIGKILL:  # it had already ended by itself
            self.abnormal(w, p, signame(p.returncode))
        op = self.doing(w)  # read once it is dead: what it was doing when it died
        self.kills += 1
        self.aimed += aimed
        self.killed_during[op + (" (lock holder)" if aimed else "")] += 1
        self.kills_since_check.append({"kill": self.kills, "worker": w, "pid": p.pid, "op": op})
        self.retire(w)
        self.spawn(w)

    def doing(self, w: int) -> str:
        return OPS[cur] if (cur := self.st[w, F_CUR]) < len(OPS) else "?"

    def new_lines(self, path: str) -> list[bytes]:
        """The whole lines appended to ``path`` since the last call."""
        with open(path, "rb") as f:
            f.seek(self.read_upto[path])
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]
        self.read_upto[path] += len(data)
        return data.splitlines()

    def read_queue_log(self) -> None:
        for line in self.new_lines(self.queue_path + ".log"):
            self.q_note(line[:1], int(line[2:]))

    def q_note(self, kind: bytes, gen: int) -> None:
        if kind == b"g" and gen in self.q_got:
            self.inconsistency("queue", {"detail": f"item {gen:#x} came out of the queue twice"})
        (self.q_got if kind == b"g" else self.q_put).add(gen)

    def read_errors(self) -> None:
        for line in self.new_lines(self.errors_path):
            rec = {**json.loads(line), "after_kill": self.kills}
            self.worker_errors.append(rec)
            if rec["kind"] in ("corruption", "data"):
                self.inconsistency("worker", rec)

    def inconsistency(self, source: str, detail: dict[str, Any]) -> None:
        since = self.kills_since_check[-5:]
        rec = {"source": source, "after_kill": self.kills, "kills_since_last_clean_check": since}
        self.inconsistencies.append({**rec, **detail})

    def held_changed(self) -> int:
        return sum(self.mgr.read(a) != pattern(a, gen, n) for a, gen, n in self.held)

    def attempt(self, what: str, fn: Any) -> Any:
        """fn(), or None with an inconsistency recorded if the arena refused it."""
        try:
            return fn()
        except ShmallocError as e:
            kind, offset = type(e).__name__, getattr(e, "offset", None)
            self.inconsistency(what, {"type": kind, "detail": str(e), "offset": offset})
            return None

    def check(self) -> None:
        self.checks += 1
        n = len(self.inconsistencies)
        self.attempt("collect", self.mgr.collect)
        self.attempt("check", self.mgr.check)
        self.read_queue_log()
        bad = self.held_changed()
        if bad:
            self.inconsistency("survivor", {"detail": f"{bad} of the survivor's blocks changed"})
        if len(self.inconsistencies) == n:
            self.kills_since_check = []

    def survivor_line(self, timeout: float) -> dict[str, Any]:
        assert self.survivor is not None and self.survivor.stdout is not None
        if not select.select([self.survivor.stdout], [], [], timeout)[0]:
            raise RuntimeError(f"the survivor did not answer within {timeout} s")
        line = self.survivor.stdout.readline()
        if not line:
            raise RuntimeError(f"the survivor ended ({signame(self.survivor.wait())})")
        return dict(json.loads(line))

    def run(self) -> dict[str, Any]:
        a = self.a
        pipes: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.survivor = self.child("survivor", self.n, **pipes)
        self.held = self.survivor_line(60)["held"]
        for w in range(self.n):
            self.spawn(w)
        deadline = self.t0 + a.seconds if a.seconds else math.inf
        stop_reason = "kills"
        with bar(a.kills, "kills") as update:
            while self.kills < a.kills:
                if time.monotonic() >= deadline:
                    stop_reason = "seconds"
                    break
                time.sleep(min(self.rng.expovariate(1.0 / a.interval), 5 * a.interval))
                self.reap_exited()
                self.kill_one()
                self.read_errors()
                self.check()
                update(self.kills, f"ops {self.operations():,} incons {len(self.inconsistencies)}")
                if self.inconsistencies and not a.keep_going:
                    stop_reason = "inconsistency"
                    break
        self.check()
        return self.finish(stop_reason)

    def finish(self, stop_reason: str) -> dict[str, Any]:
        assert self.survivor is not None and self.survivor.stdin is not None
        m = self.mgr
        for w, p in enumerate(self.procs):  # half stop gracefully, half are killed
            assert p is not None
            graceful = self.st[w, F_READY] and self.rng.random() < 0.5
            p.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                rc = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
                self.abnormal(w, p, "did not stop")
            if rc not in (0, -signal.SIGKILL):
                self.abnormal(w, p, signame(rc))
            self.end_kills[self.doing(w)] += rc == -signal.SIGKILL
            self.retire(w)
            self.procs[w] = None
        driver_corrupt = self.held_changed()
        self.survivor.stdin.write("stop\n")
        self.survivor.stdin.flush()
        surv = self.survivor_line(120)
        surv_rc = self.survivor.wait(timeout=60)
        self.read_errors()
        queue_res = self.queue_end()
        gc = GlobalGarbageCollector(m)
        gs = self.attempt("final collect", lambda: gc.collect(GcStrategy.GLOBAL))
        final: dict[str, Any] = {"gc": gs and gs.__dict__}
        final["check_after_gc"] = vars(self.attempt("final check", m.check) or {})
        # persistent and named blocks of dead workers are expected leftovers; the rest leaks
        named = {m.lookup(n) for n in m.names()}
        blocks = m.all_blocks()
        kept = [b for b in blocks if b.persistent]
        persistent = dict(blocks=len(kept), bytes=sum(b.size for b in kept))
        persistent["named"] = sum(b.address in named for b in kept)
        lost = [b for b in blocks if not b.persistent]
        leaked = [dict(address=b.address, size=b.size, pid=b.pid) for b in lost]
        for b in blocks:
            m.deallocate(b.address)
        m.collect()  # what those frees put in this process's cache goes back to the heap
        s = m.stats()
        slots = [p.__dict__ for p in m.processes() if p.pid != os.getpid()]
        final["check_after_cleanup"] = after = vars(self.attempt("cleanup check", m.check) or {})
        leaked_bytes = sum(b["size"] for b in leaked) + s.used
        survivor_ok = surv["corrupt"] == 0 and surv_rc == 0 and driver_corrupt == 0
        one_free = after.get("free_blocks") == 1 and after.get("allocated_blocks") == 0
        one_free &= after.get("objects") == 0  # the queue went, with every item left in it
        bad = self.inconsistencies or self.worker_errors or self.abnormal_exits or slots
        ok = not bad and leaked_bytes == 0 and survivor_ok and one_free
        config = "workers queue_workers kills seconds seed interval lock_kills"
        res = dict(mode="storm", ok=ok, stop_reason=stop_reason, arena=self.name)
        res["config"] = {k: getattr(self.a, k) for k in (*config.split(), "capacity", "quick")}
        res.update(duration=round(time.monotonic() - self.t0, 2), kills=self.kills)
        res.update(lock_holder_kills=self.aimed, operations=self.operations(), checks=self.checks)
        res.update(respawns=self.incarnation - self.n - 1, final=final, final_used=s.used)
        res.update(out_of_memory_answers=self.retired_ooms, lock_recoveries=s.lock_recoveries)
        res.update(killed_during=dict(self.killed_during.most_common()), queue=queue_res)
        incs = self.inconsistencies
        res.update(inconsistencies=incs, n_inconsistencies=len(incs))
        res.update(worker_errors=self.worker_errors[:200], n_worker_errors=len(self.worker_errors))
        res.update(abnormal_exits=self.abnormal_exits, persistent_leftovers=persistent)
        res.update(leaked_blocks=leaked[:50], n_leaked_blocks=len(leaked), slots_left=slots)
        res.update(leaked_bytes=leaked_bytes)
        res["survivor"] = {**surv, "exit": signame(surv_rc), "driver_corrupt": driver_corrupt}
        res["survivor"].update(held_blocks=len(self.held), ok=survivor_ok)
        return res

    def queue_end(self) -> dict[str, Any]:
        """Once no worker runs: drain the queue, put and get once more (a new producer and
        consumer still work), match the logs, and drop the queue (the leak check follows)."""
        assert self.q is not None
        self.read_queue_log()
        drained = self.q.qsize()
        for gen, x in (self.q.get_nowait() for _ in range(drained)):
            self.q_note(b"g", gen)
            if not q_item_ok(gen, x):
                self.inconsistency("queue", {"detail": f"item {gen:#x} came out damaged"})
        got = x = None
        with contextlib.suppress(queue.Full, queue.Empty):
            self.q.put((-1, b"probe"), timeout=10)
            got = self.q.get(timeout=10)
        if got != (-1, b"probe"):
            self.inconsistency("queue", {"detail": "a new producer and consumer pair failed"})
        self.q = None  # the driver's hold was the last: the queue goes
        during = (self.killed_during + self.end_kills).items()
        kills = {op: sum(v for k, v in during if k.split()[0] == op) for op in ("put", "get")}
        lost, unlogged = self.q_put - self.q_got, self.q_got - self.q_put
        if len(lost) > kills["get"] or len(unlogged) > kills["put"]:  # killed before logging
            detail = f"{len(lost)} items put were never got, {len(unlogged)} got were never put"
            self.inconsistency("queue", {"detail": f"{detail}; kills during put, get: {kills}"})
        res = dict(put=len(self.q_put), got=len(self.q_got), drained=drained)
        return {**res, "lost_with_killed_consumers": len(lost), "unlogged_puts": len(unlogged)}

    def cleanup(self) -> None:
        for p in [*self.procs, self.survivor]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        self.mgr.destroy()
        self.mgr.close()
        for f in self.logs:
            f.close()
        self.st.release()
        shutil.rmtree(self.tmp)


def print_storm(res: dict[str, Any]) -> None:
    c, left, surv = res["config"], res["persistent_leftovers"], res["survivor"]
    print(f"crash storm on {res['arena']}: {c['workers']} workers, seed {c['seed']}, ", end="")
    print(f"stopped by {res['stop_reason']}")
    rows = {"kills": f"{res['kills']:,} ({res['lock_holder_kills']:,} aimed at the lock holder)"}
    for key in SHOWN:
        rows[key.replace("n_", "", 1).replace("_", " ")] = f"{res[key]:,}"
    rows["abnormal worker exits"] = f"{len(res['abnormal_exits']):,}"
    rows["slots left"] = f"{len(res['slots_left']):,}"
    named = f"{left['named']} named), freed by the driver"
    rows["persistent leftovers"] = f"{left['blocks']} blocks, {left['bytes']:,} B ({named}"
    changed = surv["corrupt"] + surv["driver_corrupt"]
    rows["survivor"] = f"{surv['verified']:,} reads, {changed} changed"
    q = res["queue"]
    rows["queue items"] = f"{q['put']:,} put, {q['got']:,} got ({q['drained']} at the end)"
    rows["duration"] = f"{res['duration']} s"
    rows["result"] = "PASS" if res["ok"] else "FAIL"
    for k, v in rows.items():
        print(f"  {k:<22}  {v}")
    if res["killed_during"]:
        print("  killed during: " + ", ".join(f"{k} {v}" for k, v in res["killed_during"].items()))
    for inc in res["inconsistencies"][:20]:
        print(f"  ! {inc['source']} after kill {inc['after_kill']}: {inc.get('detail')}")
        for k in inc["kills_since_last_clean_check"][-3:]:
            print(f"      kill {k['kill']}: worker {k['worker']} (pid {k['pid']}) in {k['op']}")
    for e in res["worker_errors"][:10]:
        print(f"  ! worker {e['worker']} {e['kind']} in {e.get('op')}: ", end="")
        print(e.get("detail") or e.get("message") or "")
    for e in res["abnormal_exits"][:5]:
        print(f"  ! worker {e['worker']} (pid {e['pid']}) ended: {e['status']}")
        for t in e["log"].strip().splitlines()[-3:]:
            print(f"      {t}")


def main(argv: list[str] | None = None) -> int:
    p = Parser(sys.modules[__name__], "3 workers, 10 kills (a CI smoke test)", results=False)
    p.scaled("--workers", 3, 4, "worker processes")
    p.scaled("--queue-workers", 2, 4, "queue producers and consumers (every other one)", least=0)
    p.scaled("--kills", 10, 200, "stop after this many kills", least=0)
    p.add_argument("--seconds", type=float, help="also stop after this many seconds")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    p.scaled("--interval", 0.05, 0.1, "mean seconds between kills", least=0.001)
    p.add_argument("--lock-kills", type=float, default=0.3, help="share aimed at the lock holder")
    p.add_argument("--capacity", type=int, default=128 * MiB, help="arena bytes (default 128 MiB)")
    p.add_argument("--keep-going", action="store_true", help="go on after an inconsistency")
    p.add_argument("--child", type=json.loads, help=argparse.SUPPRESS)  # Storm.child()'s
    args = p.parse(argv)
    if args.child is not None:  # a process of the storm: its settings replace the driver's
        a = argparse.Namespace(**{**vars(args), **args.child})
        return dict(worker=Worker, qworker=QueueWorker, survivor=Survivor)[a.role](a).main()
    storm = Storm(args)
    stopped = "every process killed, the arena destroyed"
    return run_check(args, storm.run, print_storm, stopped, storm.cleanup)


if __name__ == "__main__":
    sys.exit(main())
