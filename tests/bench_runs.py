"""Helpers for the benchmark smoke tests: run ``python -m stress.<bench> --quick ...`` from the
repository root, find the arenas it left behind, and check the figures of its JSON."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import SHM_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent


def spawn_module(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> tuple[int, int, str, str]:
    """Run ``python -m ARGS`` in the repository root (killed if it outlasts ``timeout``); return
    its exit status, pid, stdout and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, proc.pid, stdout, stderr


def run_module(*args: str, timeout: float = 300) -> tuple[int, str]:
    """spawn_module, asserting that it exited 0; return its pid and its stdout."""
    rc, pid, stdout, stderr = spawn_module(*args, timeout=timeout)
    assert rc == 0, f"exit {rc}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return pid, stdout


def arenas_left(pid: int) -> list[str]:
    """The segments named after ``pid`` (a benchmark names its arenas shmalloc-PID-...)."""
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"shmalloc-{pid}-")]


def positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_stat(s: dict[str, Any], where: str) -> None:
    """A timing summary: positive median/min/max in order, and positive trials."""
    for k in ("median", "min", "max"):
        assert positive(s[k]), f"{where}.{k} = {s[k]!r}"
    assert s["min"] <= s["median"] <= s["max"], where
    assert s["trials"] and all(positive(t) for t in s["trials"]), where
