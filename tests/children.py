"""Child command servers for tests with real child processes (spawn and fork).

A Child runs serve in a multiprocessing child: the parent sends (op, *args) over a Pipe and
blocks on the reply, so no step relies on timing, and a SIGKILLed child is always blocked on its
pipe (or SIGSTOPped), never in the middle of a call. The ``children`` fixture (conftest.py)
starts them and kills and joins every one after the test. run_child runs a one-shot function in a
child and returns what it sent back.

(The subprocess workers driven over stdin/stdout are in shm_workers.py.)"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

from shmalloc import MemoryManager
from shmalloc.manager import attachment_of

TIMEOUT = 60.0


# ---------------------------------------------------------------- child side: the ops


def _op_alloc(m: MemoryManager, env: dict[str, Any], size: int, data: bytes | None = None) -> int:
    a = m.allocate(size)
    if data is not None:
        m.write(a, data)
    return a


def _op_call(m: MemoryManager, env: dict[str, Any], method: str, *args: Any) -> Any:
    return getattr(m, method)(*args)


def _op_read(m: MemoryManager, env: dict[str, Any], address: int, n: int) -> bytes:
    return m.read(address, n)


def _op_slot(m: MemoryManager, env: dict[str, Any]) -> int:
    return attachment_of(m).slot


def _op_collector(m: MemoryManager, env: dict[str, Any], on: bool) -> None:
    env.setdefault("events", [])
    m.set_collector(env["events"].append if on else None)


def _op_events(m: MemoryManager, env: dict[str, Any]) -> list[Any]:
    return list(env.get("events", []))


def _op_on_pressure(m: MemoryManager, env: dict[str, Any], victim: int | None) -> None:
    """Register a trim callback that counts its runs and frees ``victim`` (once)."""
    env["trims"] = 0
    env["victim"] = victim

    def trim() -> None:
        env["trims"] += 1
        if env["victim"] is not None:
            m.deallocate(env["victim"])
            env["victim"] = None

    m.on_pressure(trim)


def _op_trims(m: MemoryManager, env: dict[str, Any]) -> int:
    return int(env["trims"])


_OPS = {
    "alloc": _op_alloc,
    "call": _op_call,
    "read": _op_read,
    "slot": _op_slot,
    "collector": _op_collector,
    "events": _op_events,
    "on_pressure": _op_on_pressure,
    "trims": _op_trims,
}


def serve(m: MemoryManager, conn: Any) -> None:
    """Child: answer (op, *args) requests until "exit" (or EOF). ``m`` arrives pickled by name
    (spawn: attached here) or is the parent's object inherited through fork."""
    env: dict[str, Any] = {}
    try:
        conn.send(("ready", os.getpid()))
        while True:
            try:
                op, *args = conn.recv()
            except EOFError:
                return
            if op == "exit":
                m.close()
                conn.send(("ok", None))
                return
            if op == "stop":
                conn.send(("ok", None))
                os.kill(os.getpid(), signal.SIGSTOP)
                continue
            try:
                res = _OPS[op](m, env, *args)
            except BaseException as e:  # sent back and re-raised in the parent
                conn.send(("err", e))
            else:
                conn.send(("ok", res))
    finally:
        conn.close()


# ---------------------------------------------------------------- parent side


class Child:
    """A live child process running serve, driven over a Pipe."""

    def __init__(self, method: str, m: MemoryManager) -> None:
        ctx = mp.get_context(method)
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(m, there), daemon=True)
        self.proc.start()
        there.close()
        try:
            tag, self.pid = self._recv()
            assert tag == "ready" and self.pid == self.proc.pid
        except BaseException:
            self.cleanup()
            raise

    def _recv(self) -> Any:
        if not self.conn.poll(TIMEOUT):
            raise AssertionError(f"child {self.proc.pid} did not answer within {TIMEOUT}s")
        try:
            return self.conn.recv()
        except EOFError:
            raise AssertionError(f"child {self.proc.pid} ended ({self.proc.exitcode})") from None

    def __call__(self, op: str, *args: Any) -> Any:
        self.conn.send((op, *args))
        tag, value = self._recv()
        if tag == "err":
            raise value
        return value

    def call(self, method: str, *args: Any) -> Any:
        return self("call", method, *args)

    def stop(self) -> None:
        """Have the child SIGSTOP itself; return once it is stopped."""
        self("stop")
        deadline = time.monotonic() + TIMEOUT
        while proc_state(self.pid) not in ("T", "t"):
            assert time.monotonic() < deadline, f"child {self.pid} did not stop"
            time.sleep(0.001)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(TIMEOUT)
        assert not self.proc.is_alive()
        assert self.proc.exitcode == -signal.SIGKILL

    def exit(self) -> None:
        self("exit")
        self.proc.join(TIMEOUT)
        assert self.proc.exitcode == 0

    def cleanup(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(TIMEOUT)
        self.conn.close()


def proc_state(pid: int) -> str:
    """The state letter in /proc/PID/stat ("R", "S", "T", "Z", ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "gone"
    return raw[raw.rindex(b")") + 2 :][:1].decode()


def process_row(m: MemoryManager, pid: int) -> Any:
    """The one row of ``m.processes()`` for ``pid``."""
    rows = [p for p in m.processes() if p.pid == pid]
    assert len(rows) == 1, f"expected one row for pid {pid}, got {rows}"
    return rows[0]


def run_child(method: str, target: Any, *args: Any) -> list[Any]:
    """Run target(*args, conn) in a ``method`` child; return what it sent, after it exited 0."""
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(*args, child))
    p.start()
    child.close()
    got = []
    try:
        while True:
            got.append(parent.recv())
    except EOFError:
        pass
    p.join(TIMEOUT)
    assert p.exitcode == 0, f"child exited with {p.exitcode}; sent {got}"
    return got
