"""Smoke test for the objects benchmark: --quick runs (with or without the optional peers),
exits 0, leaves no arena behind, and writes JSON with every method for every size. No timing
thresholds: the numbers are the machine's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench_runs import arenas_left, check_stat, positive, run_module

METHODS = ["memcpy", "shmalloc", "mp", "shm", "compat"]


def test_bench_objects_quick(tmp_path: Path) -> None:
    out = tmp_path / "objects.json"
    pid, stdout = run_module("stress.bench_objects", "--quick", "--json", str(out))
    assert not arenas_left(pid), f"benchmark left arenas behind: {arenas_left(pid)}"
    assert not list(Path("/dev/shm").glob("bench-objects-*")), "LMDB's directory was left behind"
    has_lmdb = importlib.util.find_spec("lmdb") is not None
    assert ("lmdb: measured" if has_lmdb else "lmdb: not installed") in stdout
    has_ray = importlib.util.find_spec("ray") is not None
    assert ("ray: left out" if has_ray else "ray: not installed") in stdout
    assert "64.0 MiB" in stdout

    res = json.loads(out.read_text())
    assert res["config"]["quick"] is True
    rows = res["handoff"]
    assert [r["size"] for r in rows] == [64 << 10, 1 << 20, 64 << 20]
    for r in rows:
        for fig in ("latency", "stream"):
            assert set(r[fig]) == set(METHODS + ["lmdb"] * has_lmdb), (r["size"], fig)
            for m, s in r[fig].items():
                check_stat(s, f"{r['size']}.{fig}.{m}")
                assert len(s["trials"]) == res["config"]["trials"]
    figs = res["figures"]
    assert set(figs["64 MiB made in place"]) == {
        "in place",
        "memcpy",
        "Queue.put(a)",
        "fill (apart)",
    }
    assert set(figs["small round trip"]) == {"shmalloc", "Pipe"}
    records = [by for name, by in figs.items() if "records" in name]
    assert len(records) == 2
    for by in records:
        assert {"shmalloc", "shmalloc put", "shmalloc get"} <= set(by)
        assert ("lmdb get, 1 txn" in by) == has_lmdb
        for name, s in by.items():
            check_stat(s, name)
    targets = res["targets_summary"]
    assert len(targets) == 8
    judged = [t for t in targets if t["value"] is not None]
    assert all(positive(t["value"]) for t in judged)
    # --quick leaves Ray out, so its two targets are not judged; nor LMDB's two without it
    assert len(judged) == 6 - 2 * (not has_lmdb)
