"""Coordinator benchmark: how fast the memory of a killed process comes back, and what an idle
coordinator costs (issue 5).

  reclaim   latency from ``kill -9`` of an attached worker that owns blocks until its slot is free
            in the arena's process table (its blocks freed), over 20 kills; each victim lives a
            random 2-3 coordinator intervals, so kills are not in phase with its ticks.
  idle CPU  the coordinator's CPU time (psutil, user + system) over 10 s on an idle arena with
            64 attached processes, as a percentage of one core.

Workers are forked from this process (copy-on-write: 64 of them cost little); each allocates,
says it is ready through a pipe, then blocks until killed or until the pipe closes. The
coordinator is a real ``python -m shmalloc.coordinator`` child.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from contextlib import suppress
from typing import Any

import psutil

from shmalloc import MemoryManager
from shmalloc._binding import ffi, lib
from shmalloc.coordinator import DEFAULT_INTERVAL, coordinator_command, lease_holder

from . import _common as bench

ARENA = 256 << 20
VICTIM_BLOCKS = [4096, 65536, 300, 1 << 20, 12345, 777, 8192, 100_000]
TARGETS = {"worst_reclaim_ms": ("<", 1000.0), "idle_cpu_percent": ("<", 1.0)}


class Workers:
    """Forked workers attached to the arena; all killed and reaped by close()."""

    def __init__(self, m: MemoryManager) -> None:
        self.m = m
        self.hold: dict[int, socket.socket] = {}  # pid -> the parent's end of its socket pair

    def fork(self, sizes: list[int]) -> int:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker: allocate, say so, then block until killed or the parent goes
            code = 1
            try:
                for s in [ours, *self.hold.values()]:
                    s.close()
                for size in sizes:
                    self.m.allocate(size)
                theirs.sendall(b"x")
                theirs.recv(1)  # returns at EOF, when the parent's end closes
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.hold[pid] = ours
        if ours.recv(1) != b"x":
            raise RuntimeError(f"worker {pid} failed to attach")
        return pid

    def reap(self, pid: int) -> None:
        self.hold.pop(pid).close()
        os.waitpid(pid, 0)

    def close(self) -> None:
        for pid in list(self.hold):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.reap(pid)


class SlotWatch:
    """Is (pid's slot) still taken? One lock-free read of one slot, so polling it is cheap."""

    def __init__(self, m: MemoryManager, pid: int) -> None:
        self.h = bench.core_handle(m)[0]
        self.pid = pid
        self.slot = next(p.slot for p in m.processes() if p.pid == pid)
        self.info = ffi.new("shm_proc_info_t *")

    def taken(self) -> bool:
        lib.shm_proc_info(self.h, self.slot, self.info)
        return bool(self.info.state != lib.SHM_PROC_FREE and self.info.pid == self.pid)


def run(a: Any, res: dict[str, Any], arenas: bench.Arenas) -> None:
    m = arenas.new(ARENA)
    workers = Workers(m)
    coord: subprocess.Popen[bytes] | None = None
    try:
        bench.progress(f"forking {a.procs} idle workers")
        for _ in range(a.procs):
            workers.fork([4096])
        idle_pids = list(workers.hold)
        bench.progress(f"starting the coordinator (interval {a.interval} s)")
        cmd = coordinator_command(m.name, interval=a.interval, log_level="WARNING")
        coord = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while lease_holder(m) != coord.pid:
            if coord.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator did not start (exit {coord.poll()})")
            time.sleep(0.01)
        cp = psutil.Process(coord.pid)
        time.sleep(max(1.0, 4 * a.interval))  # let it settle: open its pidfds, import lazily

        bench.progress(f"idle CPU over {a.seconds} s with {a.procs} attached processes")
        c0, w0 = cp.cpu_times(), time.monotonic()
        time.sleep(a.seconds)
        c1, w1 = cp.cpu_times(), time.monotonic()
        user, system, wall = c1.user - c0.user, c1.system - c0.system, w1 - w0
        ticks = 100.0 * (user + system) / wall  # psutil: 10 ms clock ticks
        res["idle_cpu"] = dict(percent_of_core=ticks, user_s=user, system_s=system, wall_s=wall)
        res["idle_cpu"]["attached_processes"] = sum(1 for p in m.processes() if p.alive)

        bench.progress(f"reclamation latency over {a.kills} kill -9")
        rng = random.Random(5)
        samples = []
        for i in range(a.kills):
            pid = workers.fork(VICTIM_BLOCKS)
            held = m.process_memory(pid)
            watch = SlotWatch(m, pid)
            time.sleep(a.interval * (2 + rng.random()))  # not in phase with the coordinator
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while watch.taken():
                time.sleep(0.0002)
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"worker {pid} was not reclaimed within 30 s")
            samples.append((time.perf_counter() - t0) * 1e3)
            workers.reap(pid)
            back = f"{held} bytes in {len(VICTIM_BLOCKS)} blocks back in {samples[-1]:.2f} ms"
            bench.progress(f"  kill {i + 1}: {back}")
        assert all(p in workers.hold for p in idle_pids)
        alive = coord.poll() is None
        coord.send_signal(signal.SIGTERM)
        res["coordinator"] = dict(alive_through_run=alive, exit_code_on_sigterm=coord.wait(30))
        coord = None
        res["reclaim"] = dict(samples_ms=samples, median_ms=statistics.median(samples))
        res["reclaim"].update(worst_ms=max(samples), best_ms=min(samples))
    finally:
        workers.close()
        if coord is not None:
            coord.kill()
            coord.wait()


def derive(res: dict[str, Any]) -> dict[str, Any]:
    got = {"worst_reclaim_ms": res["reclaim"]["worst_ms"]}
    got["idle_cpu_percent"] = res["idle_cpu"]["percent_of_core"]
    return {k: bench.judge(*TARGETS[k], v) for k, v in got.items()}


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    d, row = res["derived"], bench.target_row
    worst = row("reclaim after kill -9, worst", d["worst_reclaim_ms"], "ms")
    return [worst, row("idle coordinator CPU", d["idle_cpu_percent"], "% of a core")]


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    c, r, u, kill9 = res["config"], res["reclaim"], res["idle_cpu"], "reclaim after kill -9,"
    attached = f"{c['kills']} kills, {c['procs']} other processes attached"
    cpu = f"{u['attached_processes']} attached, {u['wall_s']:.1f} s"
    core = f"{u['percent_of_core']:.3f} % of a core"
    us = f"{u['user_s']:.3f} / {u['system_s']:.3f} s"
    rows = [
        [f"{kill9} median", f"{r['median_ms']:.2f} ms", attached],
        [f"{kill9} worst", f"{r['worst_ms']:.2f} ms", ""],
        [f"{kill9} best", f"{r['best_ms']:.2f} ms", ""],
        ["coordinator CPU, idle", core, cpu],
        ["  of which user / system", us, "psutil cpu_times (10 ms ticks)"],
        ["exit status on SIGTERM", str(res["coordinator"]["exit_code_on_sigterm"]), ""],
    ]
    bench.print_table(["measure", "value", "notes"], rows, f"interval {c['interval']} s", left=True)
    bench.print_targets(res)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "16 processes, 5 kills, 3 s of idle CPU")
    p.scaled("--procs", 16, 64, "idle attached processes")
    p.scaled("--kills", 5, 20, "victims killed with SIGKILL")
    p.scaled("--seconds", 3.0, 10.0, "idle CPU measurement", least=0.1)
    interval = f"the coordinator's interval (default {DEFAULT_INTERVAL})"
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help=interval)
    a = p.parse(argv)
    config = {k: getattr(a, k) for k in ("procs", "kills", "seconds", "interval")}
    config.update(arena_bytes=ARENA, victim_blocks=VICTIM_BLOCKS)
    return bench.run_bench(sys.modules[__name__], a, config, functools.partial(run, a))


if __name__ == "__main__":
    sys.exit(main())
