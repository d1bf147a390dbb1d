"""Messages a person reads: the capacity that was passed, a bad --mode, destroying nothing, and a
library that does not print on stderr unless the application configured logging."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from shmalloc import MemoryManager


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=60, check=False
    )


def test_capacity_message_reports_what_was_passed() -> None:
    with pytest.raises(ValueError, match=r"^capacity 100 is out of range"):
        MemoryManager(100)


@pytest.mark.parametrize("mode", ["999", "1777", "rw", "-1"])
def test_create_with_a_bad_mode(arena_name: str, mode: str) -> None:
    r = _run("-m", "shmalloc", "create", arena_name, "--mode", mode)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"shmalloc create: error: invalid mode {mode!r}: "), r.stderr
    assert "0000 to 0777" in r.stderr
    assert "int()" not in r.stderr and "base 8" not in r.stderr
    assert not os.path.exists(f"/dev/shm/{arena_name}")


def test_create_mode_out_of_range_in_the_api(arena_name: str) -> None:
    with pytest.raises(ValueError, match="0o777"):
        MemoryManager.create(arena_name, 1 << 20, mode=0o1777)


def test_destroying_a_missing_arena_says_there_is_nothing_to_destroy(arena_name: str) -> None:
    r = _run("-m", "shmalloc", "destroy", arena_name)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "nothing to destroy" in r.stderr and "create it first" not in r.stderr, r.stderr


FILL = """
import logging, sys
from shmalloc import MemoryManager
if sys.argv[1] == "configured":
    logging.basicConfig(level=logging.WARNING)
with MemoryManager(4 << 20) as m:
    m.set_cache_limit(0)
    held = []
    while m.stats().usage_percentage() < 97:
        held.append(m.allocate(64 << 10))
    for a in held:
        m.deallocate(a)
print("filled")
"""


def test_pressure_warnings_reach_stderr_only_when_logging_is_configured() -> None:
    script = textwrap.dedent(FILL)
    quiet = _run("-c", script, "unconfigured")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "filled"
    assert quiet.stderr == "", quiet.stderr
    loud = _run("-c", script, "configured")
    assert loud.returncode == 0, loud.stderr
    assert "WARNING:shmalloc:" in loud.stderr and "pressure" in loud.stderr, loud.stderr
