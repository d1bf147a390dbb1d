"""A name in /dev/shm that is no arena (a symbolic link, a directory, an empty or foreign
segment) is NotAnArena with its name, in the API and in the command line (exit 2): never
"corruption ... recreate it", never a bare OSError or ValueError. An arena whose header is
smashed while attached stays CorruptionDetected."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from conftest import SHM_DIR

from shmalloc import CorruptionDetected, MemoryManager, NotAnArena
from shmalloc import _binding as C
from shmalloc.manager import attachment_of


def _symlink(path: str) -> None:
    os.symlink("/etc/hostname", path)


def _symlink_to_arena(path: str) -> None:
    # a link to a real arena is still refused: shm_open never follows links
    target = path + "-target"
    MemoryManager.create(os.path.basename(target), 1 << 20).close()
    os.symlink(target, path)


def _directory(path: str) -> None:
    os.mkdir(path, 0o700)


def _empty(path: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def _fifo(path: str) -> None:
    os.mkfifo(path, 0o600)


def _foreign(path: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"another program's data\n" * 100_000)
    os.close(fd)


KINDS: dict[str, tuple[Callable[[str], None], str]] = {
    "symlink": (_symlink, "symbolic link"),
    "symlink-to-arena": (_symlink_to_arena, "symbolic link"),
    "directory": (_directory, "directory"),
    "empty": (_empty, "0 bytes"),
    "fifo": (_fifo, "not a regular file"),
    "foreign": (_foreign, "no shmalloc magic"),
}


@pytest.fixture(params=list(KINDS))
def planted(request: pytest.FixtureRequest, arena_name: str) -> Iterator[tuple[str, str]]:
    make, why = KINDS[request.param]
    path = os.path.join(SHM_DIR, arena_name)
    make(path)
    try:
        yield arena_name, why
    finally:
        for p in (path, path + "-target"):
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            elif os.path.lexists(p):
                os.unlink(p)


def test_attach_says_not_an_arena(planted: tuple[str, str]) -> None:
    name, why = planted
    with pytest.raises(NotAnArena) as ei:
        MemoryManager.attach(name)
    assert ei.value.name == name
    assert why in str(ei.value), str(ei.value)
    assert "recreate" not in str(ei.value)


def _shmalloc(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHMALLOC_TRACEBACK": ""}
    return subprocess.run(
        [sys.executable, "-m", "shmalloc", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["info", "check", "destroy", "coordinator"])
def test_command_line_exits_2_not_an_arena(planted: tuple[str, str], command: str) -> None:
    name, _ = planted
    r = _shmalloc(command, name)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"shmalloc {command}: error: " in r.stderr
    assert "not a shmalloc arena" in r.stderr, r.stderr
    assert "Errno" not in r.stderr and "recreate" not in r.stderr
    assert os.path.lexists(os.path.join(SHM_DIR, name))  # left alone


def test_coordinator_of_a_missing_arena_exits_2(arena_name: str) -> None:
    r = _shmalloc("coordinator", arena_name)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"shmalloc coordinator: error: no arena named {arena_name!r}")


def test_header_smashed_while_attached_is_corruption(small: MemoryManager) -> None:
    a = small.allocate(64)
    mm = attachment_of(small).mm
    at = C.offsetof("shm_arena_t", "capacity")
    old = mm[at : at + 8]
    mm[at : at + 8] = (small.capacity * 4).to_bytes(8, "little")
    try:
        with pytest.raises(CorruptionDetected):
            small.check()
        with pytest.raises(CorruptionDetected):
            MemoryManager.attach(small.name)
    finally:
        mm[at : at + 8] = old
    small.deallocate(a)
    small.check()
