"""When /dev/shm itself runs out of pages, allocation raises OutOfMemory: no process dies of
SIGBUS. The child runs in a private mount namespace with a 4 MiB tmpfs over /dev/shm, so the
host's /dev/shm is never filled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import unique_name

TMPFS_SIZE = 4 << 20
ARENA = 64 << 20

CHILD = textwrap.dedent(
    """
    import json, os, sys
    from shmalloc import MemoryManager, OutOfMemory

    name, tmpfs_size = sys.argv[1], int(sys.argv[2])
    out = {}
    st = os.statvfs("/dev/shm")
    out["shm_size"] = st.f_blocks * st.f_frsize
    m = MemoryManager.create(name, ARENA)   # lazy: creation costs only the header
    out["capacity"] = m.capacity
    live = {}

    def fill(a, n, k):
        data = bytes([k & 0xFF]) * n
        assert m.write(a, data) == n         # touches every page of the block
        live[a] = data

    # 1. big blocks until the tmpfs is full
    k = 0
    ooms = []
    for size in (256 * 1024, 64 * 1024, 4096, 100, 1):
        while True:
            try:
                a = m.allocate(size)
            except OutOfMemory as e:
                assert isinstance(e, MemoryError)
                assert e.requested == size, (e.requested, size)
                assert e.total == m.stats().total
                assert e.used == m.stats().used
                ooms.append({"size": size, "detail": e.detail, "available": e.available,
                             "message": str(e)})
                break
            k += 1
            fill(a, size, k)
            assert k < 100000
    out["ooms"] = ooms
    out["blocks"] = len(live)
    out["used_at_full"] = m.stats().used
    # the arena itself still had room: it was the tmpfs that ran out
    out["available_at_full"] = m.stats().available
    for a, d in live.items():
        assert m.read(a) [: len(d)] == d
    m.check()

    # 2. a second arena cannot even be created: a clean error, no segment left behind
    try:
        MemoryManager.create(name + "-2", ARENA)
        out["second"] = "created"
    except (MemoryError, OSError) as e:
        out["second"] = type(e).__name__
    out["second_left"] = os.path.exists("/dev/shm/" + name + "-2")

    # 3. free everything: the arena is empty and serves again from its reserved pages
    for a in list(live):
        m.deallocate(a)
    live.clear()
    out["used_after_free"] = m.stats().used
    out["allocated_after_free"] = m.stats().allocated_blocks
    m.check()
    again = []
    for i in range(out["blocks"]):
        a = m.allocate(64 * 1024)
        fill(a, 64 * 1024, i)
        again.append(a)
        if len(again) * 64 * 1024 >= out["used_at_full"] // 2:
            break
    out["again"] = len(again)
    for a in again:
        assert m.read(a, 64 * 1024) == live[a]
        m.deallocate(a)
    out["used_end"] = m.stats().used
    m.check()
    m.close()
    m.destroy()
    out["left"] = sorted(n for n in os.listdir("/dev/shm") if n.startswith(name))
    print("RESULT " + json.dumps(out))
    """.replace("ARENA", str(ARENA))
)


def _unshare_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a private mount namespace (unshare -m) with its own tmpfs")
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("the unshare(1) and mount(8) commands are not installed")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.strip()}")


def _run_child(tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    shell = (
        "mount --make-rprivate / && "
        f"mount -t tmpfs -o size={TMPFS_SIZE} tmpfs /dev/shm && "
        f'exec "$0" "$1" "$2" "$3"'
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", shell, sys.executable, str(script), name, str(TMPFS_SIZE)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tmpfs_full_gives_out_of_memory_not_sigbus(tmp_path: Path) -> None:
    _unshare_or_skip()
    name = unique_name("tmpfs")
    host_before = set(os.listdir("/dev/shm"))
    proc = _run_child(tmp_path, name)
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode != -signal.SIGBUS, "the child died of SIGBUS\n" + report
    assert proc.returncode == 0, report
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, report
    out = json.loads(lines[0][len("RESULT ") :])

    assert out["shm_size"] == TMPFS_SIZE  # the child really ran over the small tmpfs
    assert out["capacity"] == ARENA
    assert out["blocks"] > 0
    # the tmpfs, not the arena, ran out: the arena still had most of its capacity free
    assert out["used_at_full"] < TMPFS_SIZE
    assert out["available_at_full"] > ARENA // 2
    assert len(out["ooms"]) == 5
    for oom in out["ooms"]:
        assert oom["available"] > 0
        assert oom["message"]
    assert any("tmpfs" in o["detail"] or "/dev/shm" in o["detail"] for o in out["ooms"]), out
    assert out["second"] in ("OutOfMemory", "MemoryError", "OSError"), out
    assert out["second_left"] is False
    assert out["used_after_free"] == 0 and out["allocated_after_free"] == 0
    assert out["again"] > 0
    assert out["used_end"] == 0
    assert out["left"] == []
    # nothing leaked into the host's /dev/shm
    assert not any(n.startswith(name) for n in set(os.listdir("/dev/shm")) - host_before)
