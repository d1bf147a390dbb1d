"""Smoke test for the Dask benchmark: --quick runs, exits 0, leaves no arena or coordinator
behind, and writes JSON with both configurations of every workload. No timing thresholds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from bench_runs import positive, run_module

pytest.importorskip("distributed")  # the `dask` extra, part of `test`


def test_bench_dask_quick(tmp_path: Path) -> None:
    out = tmp_path / "dask.json"
    _, stdout = run_module("stress.bench_dask", "--quick", "--json", str(out), timeout=600)
    assert "plain/shmalloc" in stdout
    res = json.loads(out.read_text())
    assert res["config"]["quick"] is True
    assert [r["what"] for r in res["rows"]] == ["handoff", "xxt", "xxt_2h"]
    for r in res["rows"]:
        for kind in ("plain", "shmalloc"):
            assert positive(r[kind]["median"]), (r["what"], kind)
    assert res["rows"][2]["hosts"] == ["hostA", "hostB"]
    assert res["rows"][1]["shmalloc"]["result"] == pytest.approx(res["rows"][1]["plain"]["result"])
    assert len(res["targets_summary"]) == 4
    arenas = [n for r in res["rows"] for n in r["arenas"]]
    assert len(arenas) == 8  # one per cluster with the plugin (2 kinds), two in two-host ones
    deadline = time.monotonic() + 30  # each host coordinator unlinks its arena once alone
    while left := [n for n in arenas if os.path.exists(os.path.join("/dev/shm", n))]:
        assert time.monotonic() < deadline, f"the benchmark left host arenas behind: {left}"
        time.sleep(0.05)
