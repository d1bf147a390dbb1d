"""Smoke test for the hand-off benchmark: --quick runs, exits 0, leaves no arena behind, and
writes JSON with every method for every size. No timing thresholds: the numbers are the
machine's."""

from __future__ import annotations

import json
from pathlib import Path

from bench_runs import arenas_left, positive, run_module

METHODS = ["memcpy", "ping", "shmalloc", "compat_shm", "stdlib_shm", "pickle"]


def test_bench_handoff_quick(tmp_path: Path) -> None:
    out = tmp_path / "handoff.json"
    pid, stdout = run_module("stress.bench_handoff", "--quick", "--json", str(out))
    left = arenas_left(pid)
    assert not left, f"benchmark left arenas behind: {left}"
    assert "pickle/shmalloc" in stdout and "64.0 MiB" in stdout

    res = json.loads(out.read_text())
    for key in ("benchmark", "machine", "config", "rows", "elapsed_seconds"):
        assert key in res, key
    assert res["config"]["quick"] is True
    assert len(res["targets_summary"]) == 2
    rows = res["rows"]
    assert [r["size"] for r in rows] == [64 << 10, 1 << 20, 64 << 20]
    for r in rows:
        assert r["verified"] is True
        for m in METHODS:
            s = r[m]
            assert all(positive(s[k]) for k in ("median", "min", "max")), (r["size"], m, s)
            assert s["min"] <= s["median"] <= s["max"]
            assert len(s["trials"]) == res["config"]["trials"]
        for k in (
            "pickle_over_shmalloc",
            "stdlib_over_shmalloc",
            "stdlib_over_compat",
            "shmalloc_over_memcpy",
        ):
            assert positive(r[k]), (r["size"], k)
