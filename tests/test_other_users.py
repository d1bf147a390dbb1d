"""Another user must not be able to plant an arena for us (SPEC: "Safety under ... other users").

The attack is run for real: a child that became ``nobody`` creates the segment, this user then
attaches or lets ``shmalloc.compat`` pick its default arena. Each scenario runs in its own mount
namespace (``unshare -m``) with a private tmpfs on /dev/shm, so the predictable names (the
default compat arena ``shmalloc-compat-<uid>``) are really used and parallel tests never meet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="becoming another user and mounting a private /dev/shm need root and unshare",
)

# Run in the private namespace: helpers, then the scenario's code, which fills ``out``.
_PRELUDE = """
import json, os, stat, sys
from shmalloc import MemoryManager, compat
from shmalloc.manager import attachment_of

NOBODY = 65534

def as_nobody(fn):
    '''Run fn() in a forked child that became nobody; return what it reported.'''
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = "ok: " + str(fn())
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"
        os.write(w, outcome.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome

def plant(name, mode):
    def make():
        m = MemoryManager.create(name, 1 << 20, mode=mode)
        os.fchmod(attachment_of(m).fd, mode)  # past the umask: the attacker wants it wide open
        m.close()
        return oct(os.stat("/dev/shm/" + name).st_mode & 0o777)
    return as_nobody(make)

def attempt(fn):
    try:
        return "ok: " + str(fn())
    except BaseException as e:
        return f"{type(e).__name__}: {e}"

out = {}
"""


def _run_private(code: str) -> dict[str, str]:
    script = _PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    env = {k: v for k, v in os.environ.items() if k != "SHMALLOC_COMPAT_ARENA"}
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /dev/shm && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def test_a_planted_default_compat_arena_is_refused() -> None:
    out = _run_private(
        """
        name = f"shmalloc-compat-{os.getuid()}"
        out["plant"] = plant(name, 0o666)
        out["compat"] = attempt(lambda: compat.SharedMemory(create=True, size=64))
        out["attach"] = attempt(lambda: MemoryManager.attach(name).close())
        # nothing of ours was written into it: the attacker finds no name bound
        out["attacker_sees"] = as_nobody(lambda: MemoryManager.attach(name, mode=0o666).names())
        """
    )
    assert out["plant"] == "ok: 0o666", out
    assert out["compat"].startswith("PermissionError: "), out
    for key in ("compat", "attach"):
        assert f"uid {NOBODY}" in out[key] and "0666" in out[key], out[key]
    assert "set_arena" in out["compat"] and "SHMALLOC_COMPAT_ARENA" in out["compat"]
    assert out["attacker_sees"] == "ok: []", out


def test_another_users_segment_is_refused_whatever_its_mode() -> None:
    out = _run_private(
        """
        out["plant"] = plant("planted-0600", 0o600)  # root can open it: the owner check must hold
        out["attach"] = attempt(lambda: MemoryManager.attach("planted-0600").close())
        # a caller that shares across users on purpose says so with the mode
        out["shared"] = attempt(lambda: MemoryManager.attach("planted-0600", mode=0o666).close())
        """
    )
    assert out["plant"] == "ok: 0o600", out
    assert out["attach"].startswith("PermissionError: "), out
    assert f"belongs to uid {NOBODY}" in out["attach"] and "0600" in out["attach"]
    assert out["shared"] == "ok: None", out


def test_our_own_segment_wider_than_asked_is_refused_unless_asked() -> None:
    out = _run_private(
        """
        m = MemoryManager.create("wide", 1 << 20, mode=0o666)
        os.fchmod(attachment_of(m).fd, 0o644)
        out["default"] = attempt(lambda: MemoryManager.attach("wide").close())
        out["asked"] = attempt(lambda: MemoryManager.attach("wide", mode=0o644).close())
        out["wider"] = attempt(lambda: MemoryManager.attach("wide", mode=0o666).close())
        m.close()
        """
    )
    assert out["default"].startswith("PermissionError: "), out
    assert "0644" in out["default"] and "mode=0o644" in out["default"], out
    assert out["asked"] == "ok: None" and out["wider"] == "ok: None", out


def test_compat_creates_its_default_arena_0600() -> None:
    out = _run_private(
        """
        shm = compat.SharedMemory(create=True, size=64)
        name = f"shmalloc-compat-{os.getuid()}"
        out["mode"] = oct(stat.S_IMODE(os.stat("/dev/shm/" + name).st_mode))
        out["nobody"] = as_nobody(lambda: MemoryManager.attach(name).close())
        shm.close()
        shm.unlink()
        """
    )
    assert out["mode"] == "0o600", out
    assert out["nobody"].startswith("PermissionError: "), out
