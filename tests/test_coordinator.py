"""The coordinator as a real process: reclamation after SIGKILL, the lease (refusal, takeover,
release), SIGTERM/SIGINT, the events file, /metrics over HTTP, a full arena, start_coordinator.

Every child is killed and reaped in a finally (context managers in tests/shm_workers.py);
synchronisation is by polling a condition with a deadline, never by sleeping."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from shm_workers import DEADLINE, CoordinatorProcess, Worker, free_port, wait_for

from shmalloc import InvalidAddress, MemoryManager
from shmalloc.coordinator import (
    EXIT_LEASE_HELD,
    Coordinator,
    CoordinatorRunning,
    coordinator_command,
    lease_holder,
    start_coordinator,
)


def _holds(m: MemoryManager, pid: int) -> bool:
    return lease_holder(m) == pid


def _gone(m: MemoryManager, pid: int) -> bool:
    return pid not in {p.pid for p in m.processes()}


def test_reclaims_a_worker_killed_with_sigkill(mgr: MemoryManager, tmp_path: Path) -> None:
    with CoordinatorProcess(mgr.name, tmp_path / "coord.log") as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        with Worker(mgr.name) as w, Worker(mgr.name) as live:
            lost = w.call("alloc", [1000, 50_000, 300_000])
            (kept,) = live.call("alloc", [4096])
            held = mgr.process_memory(w.pid)
            w.kill()
            wait_for(lambda: _gone(mgr, w.pid), "the killed worker's memory to be reclaimed")
            assert mgr.process_memory(w.pid) == 0
            with pytest.raises(InvalidAddress, match=f"by a collection in process {c.pid};"):
                mgr.size_of(lost[-1])  # names the coordinator as the one that reclaimed it
            assert mgr.stats().used == mgr.process_memory(live.pid)
            assert mgr.size_of(kept) >= 4096  # the living keep theirs
        wait_for(lambda: f"reclaimed {held} bytes of process {w.pid}" in c.log_text(), "the log")
        assert c.proc.poll() is None
    mgr.check()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_it_with_exit_0_and_releases_the_lease(
    mgr: MemoryManager, tmp_path: Path, sig: signal.Signals
) -> None:
    with CoordinatorProcess(mgr.name, tmp_path / "coord.log") as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        c.proc.send_signal(sig)
        assert c.proc.wait(timeout=DEADLINE) == 0
        assert lease_holder(mgr) is None
        assert f"received {sig.name}" in c.log_text()
    # and the next one takes the free lease without a takeover
    with CoordinatorProcess(mgr.name, tmp_path / "coord2.log") as c2:
        wait_for(lambda: _holds(mgr, c2.pid), "a new coordinator to take the lease")
        assert "taking over" not in c2.log_text()


def test_a_second_coordinator_refuses_and_names_the_holder(
    mgr: MemoryManager, tmp_path: Path
) -> None:
    with CoordinatorProcess(mgr.name, tmp_path / "coord.log") as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        second = subprocess.run(
            coordinator_command(mgr.name),
            check=False,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert second.returncode == EXIT_LEASE_HELD
        assert f"process {c.pid} holds the lease" in second.stderr
        # the same from the class, in this process
        with pytest.raises(CoordinatorRunning) as e:
            Coordinator(mgr.name).run()
        assert e.value.pid == c.pid
        with pytest.raises(CoordinatorRunning):
            start_coordinator(mgr)
        assert lease_holder(mgr) == c.pid and c.proc.poll() is None


def test_takeover_after_kill_9_of_the_coordinator(mgr: MemoryManager, tmp_path: Path) -> None:
    with CoordinatorProcess(mgr.name, tmp_path / "first.log") as first:
        wait_for(lambda: _holds(mgr, first.pid), "the first coordinator to take the lease")
        with Worker(mgr.name) as w:
            w.call("alloc", [8192])
            first.proc.kill()
            first.proc.wait(timeout=DEADLINE)
            # workers keep working without a coordinator
            assert len(w.call("alloc", [100, 200])) == 2
            with CoordinatorProcess(mgr.name, tmp_path / "second.log") as second:
                wait_for(lambda: _holds(mgr, second.pid), "the second coordinator to take over")
                assert f"from process {first.pid}, which has ended" in second.log_text()
                w.kill()
                wait_for(lambda: _gone(mgr, w.pid), "the new coordinator to reclaim the worker")


def _lines(path: Path) -> list[dict[str, object]]:
    """The events file, parsed line by line (only complete lines: the writer may be mid-way)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_events_file_gets_one_json_object_per_line(mgr: MemoryManager, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with CoordinatorProcess(mgr.name, tmp_path / "coord.log", events_path=path) as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        with Worker(mgr.name) as w:
            w.call("alloc", [123_456])
            assert w.call("try_alloc", 1 << 40) is None  # memory.oom, from the worker
            held = mgr.process_memory(w.pid)
            w.kill()

        def reclaimed() -> bool:
            return any(
                e["name"] == "memory.process_reclaimed"
                and e["fields"] == {"pid": w.pid, "bytes": held}
                for e in _lines(path)
            )

        wait_for(reclaimed, "memory.process_reclaimed in the events file")
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(timeout=DEADLINE) == 0
    events = _lines(path)
    assert path.read_text().count("\n") == len(events)
    for e in events:
        assert set(e) == {"name", "pid", "time", "fields"}
        assert isinstance(e["name"], str) and e["name"].startswith("memory.")
        assert isinstance(e["pid"], int) and isinstance(e["time"], float)
        assert isinstance(e["fields"], dict)
    by_name = {(e["name"], e["pid"]) for e in events}
    assert ("memory.oom", w.pid) in by_name
    assert ("memory.gc_triggered", c.pid) in by_name
    oom = next(e for e in events if e["name"] == "memory.oom")
    assert oom["fields"]["requested"] == 1 << 40  # type: ignore[index]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    """/metrics parsed: (sample name, sorted labels) -> value; {} while nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape_until(port: int, pred: Callable[[Samples], bool], what: str) -> Samples:
    found: list[Samples] = []

    def check() -> bool:
        s = _scrape(port)
        if s and pred(s):
            found.append(s)
            return True
        return False

    wait_for(check, what)
    return found[-1]


def test_metrics_are_served_over_http(mgr: MemoryManager, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    with CoordinatorProcess(mgr.name, tmp_path / "coord.log", metrics_port=port) as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        with Worker(mgr.name) as w:
            w.call("alloc", [10_000, 20_000])
            held = mgr.process_memory(w.pid)
            usage = ("shmalloc_process_usage_bytes", (("pid", str(w.pid)),))
            m = _scrape_until(port, lambda s: s.get(usage) == held, "the worker's usage by pid")
            assert m[("shmalloc_capacity_bytes", ())] == mgr.capacity
            assert m[("shmalloc_used_bytes", ())] >= held
            assert m[("shmalloc_allocated_blocks", ())] >= 2
            assert m[("shmalloc_pressure_level", ())] == 0
            assert m[("shmalloc_peak_bytes", ())] >= held
            assert ("shmalloc_dropped_events_total", ()) in m
            assert m[("shmalloc_arena_info", (("name", mgr.name),))] == 1
            w.kill()
            m = _scrape_until(
                port,
                lambda s: (
                    s.get(("shmalloc_gc_freed_bytes_total", ()), 0) >= held and usage not in s
                ),
                "the reclaimed bytes in /metrics",
            )
            assert m[("shmalloc_gc_runs_total", ())] >= 1
            assert m[("shmalloc_gc_freed_blocks_total", ())] >= 2
            assert m[("shmalloc_processes_reclaimed_total", ())] >= 1
        # loopback only, unless asked otherwise
        import psutil

        addrs = {
            conn.laddr.ip
            for conn in psutil.Process(c.pid).net_connections()
            if conn.status == psutil.CONN_LISTEN
        }
        assert addrs == {"127.0.0.1"}


def test_survives_a_full_arena_and_asks_the_big_one_to_trim(
    arena_name: str, tmp_path: Path
) -> None:
    m = MemoryManager.create(arena_name, 2 << 20)
    try:
        with CoordinatorProcess(m.name, tmp_path / "coord.log", min_interval=0) as c:
            wait_for(lambda: _holds(m, c.pid), "the coordinator to take the lease")
            with Worker(m.name) as w:
                blocks = w.call("fill", 64 << 10)  # until OutOfMemory
                wait_for(
                    lambda: "-> CRITICAL" in c.log_text(), "the CRITICAL transition in the log"
                )
                assert c.proc.poll() is None
                w.call("free", blocks[:1])

                def trimmed() -> bool:
                    w.call("try_alloc", 64)  # the request is seen on the next allocation
                    return bool(w.call("trims"))

                wait_for(trimmed, "the worker to be asked to trim")
                w.kill()
                wait_for(lambda: _gone(m, w.pid), "the full arena to be reclaimed")
            wait_for(lambda: "-> LOW" in c.log_text(), "the drop back to LOW")
            assert c.proc.poll() is None
    finally:
        m.close()
        m.destroy()


def test_destroying_the_arena_stops_it(arena_name: str, tmp_path: Path) -> None:
    m = MemoryManager.create(arena_name, 1 << 20)
    try:
        with CoordinatorProcess(m.name, tmp_path / "coord.log") as c:
            wait_for(lambda: _holds(m, c.pid), "the coordinator to take the lease")
            m.destroy()
            assert c.proc.wait(timeout=DEADLINE) == 0
            assert "was destroyed" in c.log_text()
    finally:
        m.close()
        m.destroy()


def test_metrics_port_in_use_is_an_error_and_frees_the_lease(
    mgr: MemoryManager, tmp_path: Path
) -> None:
    pytest.importorskip("prometheus_client")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with CoordinatorProcess(mgr.name, tmp_path / "coord.log", metrics_port=port) as c:
            assert c.proc.wait(timeout=DEADLINE) == 1
            assert "Address already in use" in c.log_text()
    assert lease_holder(mgr) is None


def test_losing_the_lease_stops_it_with_an_error(mgr: MemoryManager, tmp_path: Path) -> None:
    from shmalloc import _binding as C
    from shmalloc import process
    from shmalloc.manager import attachment_of

    with CoordinatorProcess(mgr.name, tmp_path / "coord.log") as c:
        wait_for(lambda: _holds(mgr, c.pid), "the coordinator to take the lease")
        start = process.start_time(c.pid)
        me = process.self_identity()
        # what a second coordinator would have to do to take the role from a live one
        assert C.lease_swap(attachment_of(mgr).handle(), (c.pid, start), me)
        assert c.proc.wait(timeout=DEADLINE) == 1
        assert f"lost its lease to process {me[0]}" in c.log_text()
        assert lease_holder(mgr) == me[0]  # it did not release what it no longer held
        assert C.lease_swap(attachment_of(mgr).handle(), me, (0, 0))


def test_missing_arena_is_an_error(arena_name: str) -> None:
    r = subprocess.run(
        coordinator_command(arena_name),
        check=False,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("shmalloc coordinator: error: ")
    assert f"no arena named {arena_name!r}" in r.stderr


def test_run_and_stop_in_a_thread(mgr: MemoryManager) -> None:
    c = Coordinator(mgr.name, interval=0.05, log_level="WARNING")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            c.run()
        except Exception as e:  # noqa: BLE001 - any failure in the thread is asserted below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_for(lambda: _holds(mgr, os.getpid()) or errors, "the thread to take the lease")
    finally:
        c.stop()
        t.join(DEADLINE)
    assert not t.is_alive() and not errors
    assert lease_holder(mgr) is None


def test_start_coordinator_detaches_and_returns_its_pid(mgr: MemoryManager, tmp_path: Path) -> None:
    from shmalloc import process

    pid = start_coordinator(mgr, interval=0.05, log_path=tmp_path / "coord.log")
    try:
        assert lease_holder(mgr) == pid
        assert os.getsid(pid) == pid  # its own session: no terminal signal reaches it
        with Worker(mgr.name) as w:
            w.call("alloc", [5000])
            w.kill()
            wait_for(lambda: _gone(mgr, w.pid), "the detached coordinator to reclaim the worker")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: lease_holder(mgr) is None, "the lease to be released")
        wait_for(lambda: process.start_time(pid) is None, "the coordinator to be reaped")
    finally:
        if process.start_time(pid) is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: process.start_time(pid) is None, "the killed coordinator to be reaped")
    assert re.search(r"coordinator of arena \S+ stopped", (tmp_path / "coord.log").read_text())
