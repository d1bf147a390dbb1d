"""Smoke test for the benchmark suite driver and the modules it runs: bench_workloads,
bench_fragmentation, bench_scaling and bench_c, through ``python -m stress.bench_all --quick``.

It runs, exits 0, leaves no arena behind, and writes JSON with the expected keys and positive
numbers. No timing thresholds: the figures depend on the machine; the suite reports targets.
(bench_alloc has its own smoke test; the other modules are left to theirs.)"""

from __future__ import annotations

import json
from pathlib import Path

from bench_runs import arenas_left, check_stat, positive, run_module

MODULES = ["bench_workloads", "bench_fragmentation", "bench_scaling", "bench_c"]


def test_bench_all_quick(tmp_path: Path) -> None:
    _, stdout = run_module(
        "stress.bench_all",
        "--quick",
        "--no-echo",
        "--out-dir",
        str(tmp_path),
        "--only",
        ",".join(MODULES),
    )
    assert "Summary of every target" in stdout

    res = json.loads((tmp_path / "all.json").read_text())
    assert res["config"]["quick"] is True
    assert list(res["modules"]) == MODULES
    for mod, entry in res["modules"].items():
        assert entry["status"] == "ok", (mod, entry)
        # every arena a module made (named after its pid) is gone
        left = arenas_left(entry["pid"])
        assert not left, f"{mod} left arenas behind: {left}"
        assert json.loads((tmp_path / f"{mod}.json").read_text())["benchmark"] == mod

    rows = res["summary"]
    names = [r["name"] for r in rows]
    assert any("larson" in n for n in names), names
    assert sum("fragmentation" in n for n in names) == 4, names
    assert any("glibc" in n for n in names), names
    for r in rows:
        assert set(r) >= {"source", "name", "op", "target", "value", "met"}, r
        if r["value"] is not None:
            assert positive(r["value"]), r
    md = (tmp_path / "summary.md").read_text()
    assert "| module | target | goal | measured | met |" in md

    wl = res["modules"]["bench_workloads"]["result"]
    assert set(wl["workloads"]) == {"larson", "xmalloc-test", "mstress", "cache-scratch"}
    for name, w in wl["workloads"].items():
        assert w["procs"] == [1, 2, 4], name
        assert "shmalloc" in w["methods"] and len(w["methods"]) >= 2, name
        for meth, v in w["methods"].items():
            for k in ("1", "2", "4"):
                check_stat(v["by_procs"][k], f"{name}.{meth}.{k}")
            assert positive(v["scaling"]["2_over_1"]), (name, meth)
    lar = wl["workloads"]["larson"]["methods"]["shmalloc"]["by_procs"]
    assert lar["2"]["remote_free_fraction"] > 0  # blocks really were freed by other processes
    assert positive(wl["derived"]["larson_2p_over_1p"]["value"])

    fr = res["modules"]["bench_fragmentation"]["result"]
    assert set(fr["traces"]) == {"larson", "mstress", "xmalloc", "random-lifetime"}
    for name, t in fr["traces"].items():
        for s in t["seeds"]:
            for k in ("peak_live", "peak_footprint", "ratio", "headers_and_rounding", "placement"):
                assert positive(s[k]), (name, k, s[k])
            assert s["peak_footprint"] >= s["peak_live"], name

    sc = res["modules"]["bench_scaling"]["result"]
    assert [lv["live"] for lv in sc["live"]["levels"]] == [1_000, 10_000, 100_000]
    for lv in sc["live"]["levels"]:
        for kind in ("public", "core"):
            for size, s in lv[kind].items():
                check_stat(s, f"scaling.live[{lv['live']}].{kind}[{size}]")
    for meth, v in sc["procs"]["methods"].items():
        for k in ("1", "2", "4"):
            check_stat(v["by_procs"][k], f"scaling.procs.{meth}.{k}")

    c = res["modules"]["bench_c"]["result"]
    assert [r["size"] for r in c["pairs"]["rows"]] == [64, 1024, 16384]
    for r in c["pairs"]["rows"]:
        check_stat(r["core"], f"c.core[{r['size']}]")
        check_stat(r["glibc"], f"c.glibc[{r['size']}]")
        if c["pairs"]["boost_available"]:
            check_stat(r["boost"], f"c.boost[{r['size']}]")
        else:
            assert c["pairs"]["build"]["boost"]["skipped"]  # says why
    for k in ("1", "2", "4"):
        check_stat(c["pairs"]["scale"]["by_method"]["core"][k], f"c.scale.{k}")
