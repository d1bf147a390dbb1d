"""Soak: threads, forks, signals and kill -9 mixed on one arena for minutes.

Workers (separate processes) each run threads that allocate, write, verify and free; their
main thread takes SIGUSR1, whose handler allocates and frees; they fork children (while their
threads run) that use the inherited manager and exit; and each one ends by closing its manager
while its threads are still inside the library. The driver sends signals, kills workers with
SIGKILL and starts new ones, checks the arena after every kill, and at the end counts:

    crashes  a worker or forked child that died of a signal we did not send, or exited non-zero
    hangs    a worker that did not finish within --grace seconds of being asked to
    leaked   bytes still allocated once every worker is gone and the arena has collected

    python -m stress.soak --seconds 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shmalloc import MemoryManager
from shmalloc.gc import GcStrategy, GlobalGarbageCollector

from ._common import RESULTS_DIR, Parser, print_table, run_check, signame, spawn

CAPACITY = 64 << 20


def _churn(mgr: MemoryManager, rng: random.Random, errors: list[str], steps: Iterable[Any]) -> None:
    """Allocate, write, verify and free for each of ``steps``, then free what is left. A manager
    closed under a running call ends it cleanly with ValueError saying it is closed (how a call
    that races close() is refused); any other exception is an error."""
    mine: dict[int, bytes] = {}
    try:
        for _ in steps:
            if mine and (len(mine) > 64 or rng.random() < 0.5):
                a = rng.choice(list(mine))
                if mgr.read(a, len(mine[a])) != mine.pop(a):
                    errors.append(f"block {a:#x} changed under its owner")
                mgr.deallocate(a)
            else:
                size = rng.choice((24, 100, 700, 5000, 70_000))
                mine[a := mgr.allocate(size)] = rng.randbytes(min(size, 64))
                mgr.write(a, mine[a])
        for a in mine:
            mgr.deallocate(a)
    except ValueError as e:
        if "closed" not in str(e):  # closed under a running call: expected, and said clearly
            errors.append(f"churn: {e!r}")


def worker(name: str, seed: int, out: str) -> int:
    """One worker process: threads churning, a signal handler allocating, forks, a close under
    running threads. Writes its counts to ``out`` and exits 0 unless something went wrong."""
    rng, mgr = random.Random(seed), MemoryManager.attach(name)
    errors: list[str] = []
    counts = {"signals": 0, "forks": 0}

    def on_usr1(signum: int, frame: object) -> None:
        mgr.deallocate(mgr.allocate(rng.choice((16, 4096, 100_000))))
        counts["signals"] += 1

    signal.signal(signal.SIGUSR1, on_usr1)
    stopping, stop = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    churn = [(mgr, random.Random(seed + i), errors, iter(stop.is_set, True)) for i in range(3)]
    threads = [threading.Thread(target=_churn, args=args) for args in churn]
    for t in threads:
        t.start()
    print("ready", flush=True)  # the driver signals a worker only once its handlers are in place
    while not stopping.wait(rng.uniform(0.05, 0.3)):
        if (pid := os.fork()) == 0:  # while the threads are inside the library
            code = 2
            try:  # the child uses the inherited manager for 200 steps, then frees everything
                _churn(mgr, random.Random(seed ^ os.getpid()), child_errors := [], range(200))
                code = 1 if child_errors else 0
            finally:
                os._exit(code)
        counts["forks"] += 1
        if (status := os.waitpid(pid, 0)[1]) != 0:
            errors.append(f"forked child exited with status {status:#x}")
    mgr.close()  # with its threads still running: they must see ValueError, never a crash
    stop.set()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"errors": errors, **counts}))
    return 1 if errors else 0


def drive(args: argparse.Namespace) -> dict[str, Any]:
    rng, name, tmp = random.Random(args.seed), f"shmalloc-{os.getpid()}-soak", Path(args.out_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    mgr = MemoryManager.create(name, CAPACITY)
    procs: dict[int, tuple[subprocess.Popen[bytes], str]] = {}
    res: dict[str, Any] = dict.fromkeys(("workers_started", "kills", "signals_sent", "checks"), 0)
    res.update(seconds=args.seconds, seed=args.seed, signal_handlers_run=0, forks=0, crashes=[])
    res["hangs"] = 0

    def start() -> None:  # a new worker, counted once its handlers are in place
        res["workers_started"] += 1
        out = str(tmp / f"worker-{res['workers_started']}.json")
        p = spawn("soak", "--worker", name, res["workers_started"], out, stdout=subprocess.PIPE)
        if p.stdout is None or p.stdout.readline() != b"ready\n":
            res["crashes"].append(f"worker {p.pid} did not start: {signame(p.wait())}")
        else:
            procs[p.pid] = (p, out)

    try:
        coordinator = mgr.start_coordinator()
        for _ in range(args.workers):
            start()
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.2))
            for pid, (p, _) in list(procs.items()):
                if p.poll() is not None:  # ended by itself: never expected before SIGTERM
                    res["crashes"].append(f"worker {pid}: {signame(p.returncode)}")
                    del procs[pid]
                    start()
            pid = rng.choice(list(procs))
            if rng.random() < 0.15:  # kill -9, check the arena, replace the worker
                os.kill(pid, signal.SIGKILL)
                procs.pop(pid)[0].wait()
                res["kills"] += 1
                mgr.check()
                res["checks"] += 1
                start()
            else:
                os.kill(pid, signal.SIGUSR1)
                res["signals_sent"] += 1
        for p, _ in procs.values():
            p.send_signal(signal.SIGTERM)
        for pid, (p, out) in procs.items():
            try:
                rc = p.wait(timeout=args.grace)
            except subprocess.TimeoutExpired:
                res["hangs"] += 1
                p.kill()
                p.wait()
                continue
            stats = json.loads(Path(out).read_text()) if Path(out).exists() else {}
            res["signal_handlers_run"] += int(stats.get("signals", 0))
            res["forks"] += int(stats.get("forks", 0))
            if rc != 0:
                res["crashes"].append(f"worker {pid}: {signame(rc)} {stats.get('errors', [])[:3]}")
        GlobalGarbageCollector(mgr).collect(GcStrategy.GLOBAL)
        mgr.collect()
        res.update(checks=res["checks"] + 1, check_blocks=mgr.check().blocks)
        res["leaked_bytes"] = mgr.stats().used
        res["ok"] = not res["crashes"] and not res["hangs"] and not res["leaked_bytes"]
        os.kill(coordinator, signal.SIGTERM)
    finally:
        for p, _ in procs.values():  # whatever is still running when the driver fails
            if p.poll() is None:
                p.kill()
                p.wait()
        mgr.close()
        mgr.destroy()
    return res


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:  # a worker process of the driver below
        return worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    p = Parser(sys.modules[__name__], "20 s with 3 workers (a CI smoke test)")
    p.scaled("--seconds", 20.0, 300.0, "how long to soak")
    p.scaled("--workers", 3, 4, "worker processes at once")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--grace", type=float, default=30.0, help="seconds a worker has to finish")
    args = p.parse(argv)
    args.out_dir = str(RESULTS_DIR / "soak")
    return run_check(args, lambda: drive(args), report, "workers killed, the arena destroyed")


def report(res: dict[str, Any]) -> None:
    rows = [[k, str(len(v) if isinstance(v, list) else v)] for k, v in res.items()]
    print_table(["figure", "value"], rows, f"soak, {res['seconds']:g} s, seed {res['seed']}")
    for c in res["crashes"]:
        print("crash:", c)
    print("PASS" if res["ok"] else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
