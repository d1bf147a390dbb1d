"""The command line, run as a person runs it: ``python -m shmalloc ...`` in a subprocess, on real
arenas with unique names (destroyed in ``finally``/fixtures).

``top`` is driven twice: through a pseudo-terminal (its screen is read back and checked for this
process's pid and figures, then ``q`` is typed) and without a terminal (``--iterations``). The
demo runs end to end under a child subreaper, so that any process it left behind, even one
detached into its own session, would be found and reported.

Synchronisation is by reading output and polling conditions with deadlines, never by sleeping;
nothing asserts on wall-clock durations."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SHM_DIR, destroyed_after, unique_name

from shmalloc import MemoryManager
from shmalloc.cli import main
from shmalloc.sizes import format_bytes, parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0
MiB = 1 << 20
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>78]")


def shmalloc(
    *args: str, timeout: float = TIMEOUT, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m shmalloc ARGS`` and capture its output."""
    env = dict(os.environ)
    env.pop("SHMALLOC_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", "shmalloc", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
        **kw,  # type: ignore[arg-type]
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """A failure for people: the exit code, one line on stderr that says it, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def name() -> Iterator[str]:
    """A unique arena name; whatever is left under it is unlinked after the test."""
    n = unique_name("cli")
    try:
        yield n
    finally:
        path = os.path.join(SHM_DIR, n)
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def arena(name: str) -> Iterator[MemoryManager]:
    """A 16 MiB arena created through the command line and attached here."""
    r = shmalloc("create", name, "--capacity", "16M")
    assert r.returncode == 0, r.stderr
    with destroyed_after(MemoryManager.attach(name)) as m:
        yield m


# ------------------------------------------------------------------------- sizes and help


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("64M", 64 << 20),
        ("64 MiB", 64 << 20),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "64MB", "64 megabytes", "-1M", "1.5", "0x100", "1e6"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(3 * MiB) == "3.0 MiB"
    assert format_bytes(1536) == "1.5 KiB"


COMMANDS = [
    "list",
    "create",
    "info",
    "top",
    "check",
    "gc",
    "destroy",
    "coordinator",
    "demo",
    "bench",
]


def test_help_lists_every_command() -> None:
    r = shmalloc("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd: str) -> None:
    r = shmalloc(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert f"shmalloc {cmd}" in r.stdout
    assert "usage:" in r.stdout


def test_no_command_is_a_usage_error() -> None:
    assert_one_line_error(shmalloc(), 2, "required", "shmalloc --help")
    assert_one_line_error(shmalloc("info"), 2, "name", "shmalloc info --help")
    assert_one_line_error(shmalloc("frobnicate"), 2, "invalid choice")


# ------------------------------------------------------------------------- create, list, destroy


def test_create_info_destroy(name: str) -> None:
    r = shmalloc("create", name, "--capacity", "8M")
    assert r.returncode == 0, r.stderr
    assert name in r.stdout and "8.0 MiB" in r.stdout
    try:
        info = json.loads(shmalloc("info", name, "--json").stdout)
        assert info["name"] == name
        assert info["capacity"] == 8 * MiB
        assert info["pressure"] == "LOW"
        assert info["processes"] == []
        assert os.stat(os.path.join(SHM_DIR, name)).st_mode & 0o777 == 0o600
    finally:
        r = shmalloc("destroy", name)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_create_with_mode_and_plain_bytes(name: str) -> None:
    r = shmalloc("create", name, "--capacity", "1048576", "--mode", "0640")
    assert r.returncode == 0, r.stderr
    try:
        st = os.stat(os.path.join(SHM_DIR, name))
        assert st.st_size == MiB
        assert st.st_mode & 0o777 == 0o640
    finally:
        assert shmalloc("destroy", name).returncode == 0


def test_create_existing_is_refused(arena: MemoryManager) -> None:
    r = shmalloc("create", arena.name, "--capacity", "1M")
    assert_one_line_error(r, 2, arena.name, "already exists")


@pytest.mark.parametrize("size", ["64MB", "lots", "1.5", "0", "1", "2T"])
def test_create_bad_size(name: str, size: str) -> None:
    r = shmalloc("create", name, "--capacity", size)
    assert_one_line_error(r, 2, "capacity")
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_create_bad_name() -> None:
    r = shmalloc("create", "no/slashes", "--capacity", "1M")
    assert_one_line_error(r, 2, "invalid arena name")


def test_list_shows_arena_usage_and_processes(arena: MemoryManager) -> None:
    a = arena.allocate(MiB)
    try:
        r = shmalloc("list", "--json")
        assert r.returncode == 0, r.stderr
        rows = {row["name"]: row for row in json.loads(r.stdout)["arenas"]}
        row = rows[arena.name]
        assert row["capacity"] == 16 * MiB
        assert row["used"] == arena.stats().used >= MiB
        assert row["processes"] == 1

        plain = shmalloc("list")
        assert plain.returncode == 0
        line = next((ln for ln in plain.stdout.splitlines() if arena.name in ln), plain.stdout)
        assert "16.0 MiB" in line and "1.0 MiB" in line and "LOW" in line, plain.stdout
    finally:
        arena.deallocate(a)


def test_list_skips_foreign_segments(name: str) -> None:
    with open(os.path.join(SHM_DIR, name), "wb") as f:
        f.write(b"not an arena" * 100)
    r = shmalloc("list", "--json")
    assert r.returncode == 0
    assert name not in [row["name"] for row in json.loads(r.stdout)["arenas"]]


def test_destroy_leaves_mappings_working(arena: MemoryManager) -> None:
    a = arena.allocate(100)
    arena.write(a, b"still here")
    r = shmalloc("destroy", arena.name)
    assert r.returncode == 0
    assert "1 process(es) still had it mapped" in r.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, arena.name))
    assert arena.read(a, 10) == b"still here"


# ------------------------------------------------------------------------- errors for people


@pytest.mark.parametrize("cmd", ["info", "check", "top", "gc", "destroy"])
def test_missing_arena(cmd: str, name: str) -> None:
    r = shmalloc(cmd, name)
    assert_one_line_error(r, 2, name, "no arena")


@pytest.mark.parametrize("cmd", ["info", "check", "destroy"])
def test_not_an_arena(cmd: str, name: str) -> None:
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 16))
    r = shmalloc(cmd, name)
    assert_one_line_error(r, 2, "not a shmalloc arena")
    assert os.path.exists(path)  # destroy left a foreign segment alone


def test_arena_of_another_layout_version(arena: MemoryManager) -> None:
    with open(os.path.join(SHM_DIR, arena.name), "r+b") as f:
        f.seek(8)
        (version,) = struct.unpack("<I", f.read(4))
        f.seek(8)
        f.write(struct.pack("<I", version + 1))
    try:
        assert_one_line_error(shmalloc("info", arena.name), 2, "layout")
        rows = json.loads(shmalloc("list", "--json").stdout)["arenas"]
        row = next(r for r in rows if r["name"] == arena.name)
        assert "layout" in row["status"]
    finally:
        with open(os.path.join(SHM_DIR, arena.name), "r+b") as f:
            f.seek(8)
            f.write(struct.pack("<I", version))


def run_as_nobody(*argv: str) -> tuple[int, str]:
    """``shmalloc.cli.main(argv)`` in a fork child that switched to user nobody: (status, output).

    A fork rather than a new interpreter, because the interpreter itself may live where nobody
    cannot read (a pyenv under /root)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 99
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            # pytest's capture objects are not fds 1 and 2; these stay open until os._exit
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(list(argv))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_permission_problem(arena: MemoryManager) -> None:
    code, out = run_as_nobody("info", arena.name)
    assert code == 2, out
    assert "Traceback" not in out
    (line,) = out.strip().splitlines()
    assert arena.name in line and "may not open" in line and "uid 0" in line

    code, out = run_as_nobody("list", "--json")
    assert code == 0, out
    listed = json.loads(out)
    assert arena.name not in [row["name"] for row in listed["arenas"]]
    assert listed["unreadable"] >= 1


# ------------------------------------------------------------------------- info and check


def test_info_shows_stats_and_this_process(arena: MemoryManager) -> None:
    a = arena.allocate(3 * MiB)
    b = arena.allocate(1000)
    arena.bind("cli.test", b)
    try:
        r = shmalloc("info", arena.name)
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert arena.name in out
        assert "pressure" in out and "LOW" in out
        assert "fragmentation" in out
        assert "cli.test" in out
        row = next(ln for ln in out.splitlines() if ln.strip().startswith(str(os.getpid())))
        assert "yes" in row and "3.0 MiB" in row

        info = json.loads(shmalloc("info", arena.name, "--json").stdout)
        s = arena.stats()
        assert info["stats"]["used"] == s.used
        assert info["stats"]["allocated_blocks"] == 2
        assert info["usage_percentage"] == pytest.approx(s.usage_percentage(), abs=0.01)
        assert 0.0 <= info["fragmentation_ratio"] < 1.0
        (me,) = [p for p in info["processes"] if p["pid"] == os.getpid()]
        assert me["alive"] is True and me["usage"] == arena.process_memory(os.getpid())
        assert me["blocks"] == 1 and me["limit"] is None  # b, bound, is persistent: no owner
        assert info["named_blocks"] == ["cli.test"]
        assert info["coordinator"] is None
    finally:
        arena.deallocate(a)
        arena.unbind("cli.test")
        arena.deallocate(b)


def test_info_pressure_high(arena: MemoryManager) -> None:
    held = []
    while arena.stats().memory_pressure().name != "HIGH":
        held.append(arena.allocate(256 << 10))
    try:
        info = json.loads(shmalloc("info", arena.name, "--json").stdout)
        assert info["pressure"] == "HIGH"
        assert 80.0 <= info["usage_percentage"] < 95.0
    finally:
        for a in held:
            arena.deallocate(a)


def test_check_clean(arena: MemoryManager) -> None:
    a = arena.allocate(4096)
    r = shmalloc("check", arena.name)
    assert r.returncode == 0, r.stderr
    assert "clean" in r.stdout
    rep = json.loads(shmalloc("check", arena.name, "--json").stdout)
    assert rep["ok"] is True
    assert rep["allocated_blocks"] == 1 and rep["live_processes"] == 1
    arena.deallocate(a)


def test_check_reports_corruption_with_offset(arena: MemoryManager) -> None:
    a = arena.allocate(4096)
    with open(os.path.join(SHM_DIR, arena.name), "r+b") as f:
        f.seek(a - 8)
        f.write(b"\xff" * 8)  # scribble on the block's header
    r = shmalloc("check", arena.name)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "CORRUPT" in r.stdout and "Traceback" not in r.stderr
    offset = int(re.search(r"offset (0x[0-9a-f]+)", r.stdout).group(1), 16)  # type: ignore[union-attr]
    assert a - 64 <= offset < a
    rep = json.loads(shmalloc("check", arena.name, "--json").stdout)
    assert rep["ok"] is False and rep["offset"] == offset and rep["detail"]


# ------------------------------------------------------------------------- gc


HOLDER = """
import sys
from shmalloc import MemoryManager
m = MemoryManager.attach(sys.argv[1])
for _ in range(int(sys.argv[2])):
    m.write(m.allocate(int(sys.argv[3])), b"x")
print("ready", flush=True)
sys.stdin.readline()
"""


def dead_holder(name: str, blocks: int, size: int) -> int:
    """A process that allocated ``blocks`` x ``size`` in the arena and was then SIGKILLed."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, str(blocks), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    finally:
        p.kill()
        p.wait()
    return p.pid


@pytest.mark.parametrize("strategy", ["global", "unreferenced", "threshold=1M"])
def test_gc_reclaims_a_killed_process(arena: MemoryManager, strategy: str) -> None:
    pid = dead_holder(arena.name, 4, 512 << 10)
    assert arena.process_memory(pid) >= 2 * MiB
    r = shmalloc("gc", arena.name, "--strategy", strategy, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["freed_blocks"] == 4 and res["freed_bytes"] >= 2 * MiB
    assert arena.process_memory(pid) == 0
    plain = shmalloc("gc", arena.name, "--strategy", strategy)
    assert plain.returncode == 0 and "freed 0 blocks" in plain.stdout


def test_gc_threshold_spares_small_dead_processes(arena: MemoryManager) -> None:
    pid = dead_holder(arena.name, 1, 4096)
    res = json.loads(shmalloc("gc", arena.name, "--strategy", "threshold=10M", "--json").stdout)
    assert res["freed_blocks"] == 0
    assert arena.process_memory(pid) >= 4096
    res = json.loads(shmalloc("gc", arena.name, "--strategy", "global", "--json").stdout)
    assert res["freed_blocks"] == 1


def test_gc_targeted_refuses_a_live_process_without_force(arena: MemoryManager) -> None:
    arena.allocate(MiB)
    arena.allocate(MiB)
    held = arena.process_memory(os.getpid())
    r = shmalloc("gc", arena.name, "--strategy", f"targeted={os.getpid()}", "--json")
    assert_one_line_error(r, 2, f"process {os.getpid()} is alive", "2 blocks", "--force")
    assert arena.process_memory(os.getpid()) == held  # nothing freed
    r = shmalloc("gc", arena.name, "--strategy", f"targeted={os.getpid()}", "--json", "--force")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["freed_blocks"] == 2 and res["processes_cleaned"] == 1
    assert res["reclaimed"] == [{"pid": os.getpid(), "bytes": held}]
    assert res["trimmed"] == []
    assert arena.process_memory(os.getpid()) == 0
    arena.allocate(64)
    r = shmalloc("gc", arena.name, "--strategy", f"targeted={os.getpid()}", "--force")
    assert r.returncode == 0, r.stderr
    assert "freed 1 block (" in r.stdout and "of 1 process in" in r.stdout, r.stdout
    assert f"reclaimed 64 B of process {os.getpid()}" in r.stdout, r.stdout


def test_gc_says_which_processes_were_asked_to_trim(arena: MemoryManager) -> None:
    arena.allocate(2 * MiB)
    r = shmalloc("gc", arena.name, "--strategy", "threshold=1M", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["trimmed"] == [os.getpid()] and res["reclaimed"] == []
    r = shmalloc("gc", arena.name, "--strategy", "threshold=1M")
    assert r.returncode == 0, r.stderr
    assert f"asked 1 live process to trim: {os.getpid()}" in r.stdout, r.stdout


@pytest.mark.parametrize("strategy", ["everything", "threshold", "threshold=10MB", "targeted=me"])
def test_gc_bad_strategy(arena: MemoryManager, strategy: str) -> None:
    assert_one_line_error(shmalloc("gc", arena.name, "--strategy", strategy), 2, "strategy")


def test_gc_targeted_unknown_pid(arena: MemoryManager) -> None:
    r = shmalloc("gc", arena.name, "--strategy", "targeted=999999999")
    assert_one_line_error(r, 2, "999999999", "no entry")


# ------------------------------------------------------------------------- top


def test_top_plain_lines(arena: MemoryManager) -> None:
    a = arena.allocate(3 * MiB)
    try:
        r = shmalloc("top", arena.name, "--iterations", "3", "--interval", "0.01")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        arena_lines = [ln for ln in lines if f"arena={arena.name}" in ln]
        assert len(arena_lines) == 3
        assert all(
            "pressure=LOW" in ln and f"used={arena.stats().used}" in ln for ln in arena_lines
        )
        mine = [ln for ln in lines if f"pid={os.getpid()} " in ln]
        assert len(mine) == 3
        usage = arena.process_memory(os.getpid())
        assert all(f"alive=yes usage={usage} " in ln and "blocks=1" in ln for ln in mine)
    finally:
        arena.deallocate(a)


class Screen:
    """A program running on a pseudo-terminal; ``text`` is all it drew, escape codes removed."""

    def __init__(self, argv: list[str], rows: int = 40, cols: int = 120) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, TERM="xterm-256color")
        for k in ("COLUMNS", "LINES", "NO_COLOR", "SHMALLOC_TRACEBACK"):
            env.pop(k, None)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        self.raw += data
        return bool(data)

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if not self._read(0.5):
                break
        raise AssertionError(f"{pattern!r} never appeared on the screen:\n{self.text[-3000:]}")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if not self._read(0.2):
                break
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        finally:
            os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_top_on_a_terminal(arena: MemoryManager) -> None:
    a = arena.allocate(3 * MiB)
    screen = Screen([sys.executable, "-m", "shmalloc", "top", arena.name, "--interval", "0.1"])
    try:
        screen.wait_for(rf"shmalloc top {re.escape(arena.name)}")
        row = screen.wait_for(rf"\n\s*{os.getpid()}\s+yes\s+3\.0 MiB\s+3\.0 MiB\s+-\s+1\s+1\s+0\b")
        assert row
        screen.wait_for(r"pressure LOW")
        screen.wait_for(r"3\.0 MiB used of")
        screen.wait_for(r"q quits")
        # a second block shows up at a later refresh
        b = arena.allocate(MiB)
        screen.wait_for(rf"\n\s*{os.getpid()}\s+yes\s+4\.0 MiB\s+4\.0 MiB\s+-\s+2\s+2\s+0\b")
        screen.type(b"q")
        assert screen.finish() == 0
        arena.deallocate(b)
    finally:
        screen.kill()
        arena.deallocate(a)


def test_top_ends_when_the_arena_is_destroyed(arena: MemoryManager) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "shmalloc", "top", arena.name, "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert p.stdout is not None
        assert f"arena={arena.name}" in p.stdout.readline()
        arena.destroy()
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0
        assert "was destroyed" in err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------- coordinator


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)  # polling interval, not synchronisation: the condition decides


def test_coordinator_runs_in_the_foreground_and_stops_on_sigterm(
    arena: MemoryManager, tmp_path: Path
) -> None:
    log = tmp_path / "coordinator.log"
    with open(log, "w") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "shmalloc", "coordinator", arena.name, "--interval", "0.05"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO_ROOT,
        )

    def holds_lease() -> bool:
        assert p.poll() is None, log.read_text()
        info = json.loads(shmalloc("info", arena.name, "--json").stdout)
        return bool(info["coordinator"] == {"pid": p.pid, "alive": True})

    try:
        wait_until(holds_lease, "the coordinator holds the lease")
        second = shmalloc("coordinator", arena.name)
        assert second.returncode == 3
        assert str(p.pid) in second.stderr
        # it reclaims a killed process by itself
        pid = dead_holder(arena.name, 2, MiB)
        wait_until(lambda: arena.process_memory(pid) == 0, "the coordinator reclaimed it")
        p.send_signal(signal.SIGTERM)
        assert p.wait(TIMEOUT) == 0, log.read_text()
        assert f"reclaimed {2 * MiB} bytes of process {pid}" in log.read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------- bench


def test_bench_builtin() -> None:
    r = shmalloc("bench", "--builtin", "--ops", "200", "--capacity", "8M")
    assert r.returncode == 0, r.stderr
    assert "NS/PAIR" in r.stdout
    for size in ("16 B", "1.0 KiB", "1.0 MiB"):
        assert size in r.stdout


def test_bench_delegates_to_the_stress_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = shmalloc(
        "bench", "--quick", "--parts", "pair", "--trials", "1", "--ops", "20", "--json", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert "stress.bench_alloc" in r.stderr
    assert "pair" in json.loads(out.read_text())


# ------------------------------------------------------------------------- demo

# Runs a command as a child subreaper: processes orphaned below it are re-parented here instead
# of to init, so that whatever the demo leaves running, even detached, is found. Prints the demo's
# output, then a last line of JSON: the demo's pid and exit status and the processes left.
SUBREAPER = r"""
import ctypes, json, subprocess, sys, psutil
PR_SET_CHILD_SUBREAPER = 36
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
out, _ = p.communicate()
left = [{"pid": c.pid, "cmdline": c.cmdline(), "status": c.status()}
        for c in psutil.Process().children(recursive=True)]
for c in psutil.Process().children(recursive=True):
    c.kill()
    c.wait()
sys.stdout.write(out)
print(json.dumps({"pid": p.pid, "returncode": p.returncode, "left": left}))
"""


def demo_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("shmalloc-demo-")}


def test_demo_end_to_end() -> None:
    before = demo_segments()
    r = subprocess.run(
        [sys.executable, "-c", SUBREAPER, sys.executable, "-m", "shmalloc", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 0, r.stderr
    *lines, last = r.stdout.splitlines()
    out = "\n".join(lines)
    result = json.loads(last)
    assert result["returncode"] == 0, out
    assert result["left"] == [], f"the demo left processes behind: {result['left']}"

    name = re.search(r"created arena (shmalloc-demo-\S+)", out).group(1)  # type: ignore[union-attr]
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert not {s for s in demo_segments() - before if f"-{result['pid']}-" in s}

    coordinator = int(re.search(r"started the coordinator: pid (\d+)", out).group(1))  # type: ignore[union-attr]
    assert not os.path.exists(f"/proc/{coordinator}")
    victim = int(re.search(r"killed the victim \(pid (\d+)\) with SIGKILL", out).group(1))  # type: ignore[union-attr]
    assert re.search(rf"reclaimed .* of process {victim}", out), out  # the coordinator's log

    assert "demo summary" in out
    summary = out[out.index("demo summary") :]

    def row(what: str) -> str:
        m = re.search(rf"^\s*{re.escape(what)}\s+(.*)$", summary, re.MULTILINE)
        assert m, f"no {what!r} row in:\n{summary}"
        return m.group(1).strip()

    assert int(row("operations").replace(",", "")) > 0
    assert f"pid {victim} with SIGKILL" in row("killed")
    assert re.search(rf"8\.0 MiB in [\d.]+ s by coordinator pid {coordinator}", row("reclaimed"))
    assert row("pressure reached").startswith("HIGH")
    assert "WARNING logged" in row("monitor")
    assert "memory.pressure_high" in row("monitor")
    assert row("check()").startswith("clean")
    assert row("persistent note") == "survived its owner"
    # the queue of arrays between processes: everything delivered, checked, nothing left
    m = re.search(r"consumers got (\d+) \+ (\d+) of them \(zero-copy", out)
    assert m and int(m.group(1)) + int(m.group(2)) == 32, out
    assert "check() after the queue: clean, no object left" in out
    assert row("queue").startswith("32 arrays of 1.0 MiB, pid ")
    assert f"arena {name} destroyed" in out


def test_demo_cleans_up_when_interrupted() -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the workers run."""
    p = subprocess.Popen(
        [sys.executable, "-m", "shmalloc", "demo", "--rounds", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        assert p.stdout is not None
        seen = []
        for line in p.stdout:
            seen.append(line)
            if "killed the victim" in line:
                break
        else:
            raise AssertionError("".join(seen))
        name = re.search(r"created arena (\S+)", "".join(seen)).group(1)  # type: ignore[union-attr]
        coordinator = int(re.search(r"coordinator: pid (\d+)", "".join(seen)).group(1))  # type: ignore[union-attr]
        os.killpg(p.pid, signal.SIGINT)
        rest, _ = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 130, rest
        assert "interrupted" in rest and f"arena {name} destroyed" in rest
        assert "Traceback" not in rest
        assert not os.path.exists(os.path.join(SHM_DIR, name))
        assert not os.path.exists(f"/proc/{coordinator}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
