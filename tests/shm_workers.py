"""Helpers for tests that need other real processes: scriptable workers, coordinators, polling.

A Worker is a separate Python process attached to an arena that runs one JSON command per line
from its stdin and answers one JSON line; it is killed (SIGKILL) and reaped by close(), so a test
that uses it as a context manager never leaves it behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from shmalloc.coordinator import coordinator_command

T = TypeVar("T")
DEADLINE = 30.0  # generous: the machine may be busy with the rest of the suite (-n auto)

_WORKER = r"""
import json, sys
from shmalloc import MemoryManager, OutOfMemory
from shmalloc.gc import GcStrategy, GlobalGarbageCollector

m = MemoryManager.attach(sys.argv[1])
trims = []
m.on_pressure(lambda: trims.append(1))

def reply(x):
    sys.stdout.write(json.dumps(x) + "\n")
    sys.stdout.flush()

reply({"ok": "ready"})
for line in sys.stdin:
    op, *args = json.loads(line)
    try:
        if op == "alloc":
            r = [m.allocate(s) for s in args[0]]
        elif op == "fill":
            r = []
            while True:
                try:
                    r.append(m.allocate(args[0]))
                except OutOfMemory:
                    break
        elif op == "try_alloc":
            try:
                r = m.allocate(args[0])
            except OutOfMemory:
                r = None
        elif op == "free":
            r = [m.deallocate(a) for a in args[0]]
        elif op == "retain":
            m.retain(args[0])
            r = None
        elif op == "trims":
            r = len(trims)
        elif op == "gc":
            s = GlobalGarbageCollector(m).collect(GcStrategy.GLOBAL)
            r = [s.freed_blocks, s.freed_bytes, s.processes_cleaned]
        else:
            raise ValueError(op)
        reply({"ok": r})
    except Exception as e:
        reply({"error": repr(e)})
"""


def wait_for(cond: Callable[[], T], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


class Worker:
    """A scriptable process attached to the arena ``name``."""

    def __init__(self, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        try:
            self._read()
        except BaseException:
            self.close()
            raise

    def send(self, op: str, *args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE)
        if not ready:
            raise AssertionError(f"worker {self.pid} did not answer within {DEADLINE} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker {self.pid} exited with {self.proc.wait()}")
        msg = json.loads(line)
        if "error" in msg:
            raise AssertionError(f"worker {self.pid} failed: {msg['error']}")
        return msg["ok"]

    def call(self, op: str, *args: Any) -> Any:
        self.send(op, *args)
        return self._read()

    def kill(self) -> None:
        """SIGKILL, then reap: afterwards the process is gone, its memory orphaned."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except BrokenPipeError:
                    pass

    def __enter__(self) -> Worker:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class CoordinatorProcess:
    """``python -m shmalloc.coordinator NAME ...`` as a child; stderr goes to ``log``."""

    def __init__(self, name: str, log: Path, **kw: Any) -> None:
        kw.setdefault("interval", 0.05)
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                coordinator_command(name, **kw), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        self.pid = self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

    def __enter__(self) -> CoordinatorProcess:  # noqa: PYI034 - as above
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
