"""Smoke test for the allocation benchmark: it runs, exits 0, cleans up, and writes sane JSON.

No timing thresholds here: the numbers depend on the machine; the benchmark reports targets."""

from __future__ import annotations

import json
from pathlib import Path

from bench_runs import arenas_left, check_stat, positive, run_module


def test_bench_alloc_quick(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    pid, stdout = run_module("stress.bench_alloc", "--quick", "--json", str(out))

    # every arena the benchmark made (named after its pid) is gone
    left = arenas_left(pid)
    assert not left, f"benchmark left arenas behind: {left}"

    assert "public allocate+free pair / cffi malloc+free" in stdout
    res = json.loads(out.read_text())
    for key in ("machine", "config", "pair", "collector", "derived", "targets", "targets_summary"):
        assert key in res, key
    m = res["machine"]
    assert positive(m["cpu_count"]) and m["python_version"] and m["platform"]
    assert [r["name"] for r in res["targets_summary"]] == [
        "public allocate+free pair / cffi malloc+free",
        "stdlib SharedMemory create+unlink / public pair",
    ]
    assert res["config"]["quick"] is True

    sizes = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20]
    rows = res["pair"]["rows"]
    assert [r["size"] for r in rows] == sizes
    for r in rows:
        for k in ("public", "core", "cffi_malloc", "stdlib_shm"):
            check_stat(r[k], f"pair[{r['size']}].{k}")
        for k in ("public_over_malloc", "stdlib_over_public", "public_over_core"):
            assert positive(r[k]), (r["size"], k, r[k])

    col = res["collector"]
    check_stat(col["with"], "collector.with")
    check_stat(col["without"], "collector.without")
    assert positive(col["ratio"])

    d = res["derived"]
    for k in (
        "public_over_malloc",
        "stdlib_over_public",
        "collector_ratio",
    ):
        assert positive(d[k]["value"]), (k, d[k])
