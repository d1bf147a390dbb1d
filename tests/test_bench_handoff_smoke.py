"""Smoke test for the hand-off benchmark: --quick runs, exits 0, leaves no arena behind, and
writes JSON with every method for every size. No timing thresholds: the numbers are the
machine's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHM_DIR = "/dev/shm"
METHODS = ["memcpy", "ping", "shmalloc", "compat_shm", "stdlib_shm", "pickle"]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_handoff_quick(tmp_path: Path) -> None:
    out = tmp_path / "handoff.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stress.bench_handoff", "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    left = [n for n in os.listdir(SHM_DIR) if n.startswith(f"shmalloc-{proc.pid}-")]
    assert not left, f"benchmark left arenas behind: {left}"
    assert "pickle/shmalloc" in stdout and "64 MiB" in stdout

    res = json.loads(out.read_text())
    for key in ("benchmark", "machine", "config", "rows", "elapsed_seconds"):
        assert key in res, key
    assert res["config"]["quick"] is True
    rows = res["rows"]
    assert [r["size"] for r in rows] == [64 << 10, 1 << 20, 64 << 20]
    for r in rows:
        assert r["verified"] is True
        for m in METHODS:
            s = r[m]
            assert all(_positive(s[k]) for k in ("median", "min", "max")), (r["size"], m, s)
            assert s["min"] <= s["median"] <= s["max"]
            assert len(s["trials"]) == res["config"]["trials"]
        for k in (
            "pickle_over_shmalloc",
            "stdlib_over_shmalloc",
            "stdlib_over_compat",
            "shmalloc_over_memcpy",
        ):
            assert _positive(r[k]), (r["size"], k)
