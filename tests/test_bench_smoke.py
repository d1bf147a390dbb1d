"""Smoke test for the allocation benchmark: it runs, exits 0, cleans up, and writes sane JSON.

No timing thresholds here: the numbers depend on the machine; the benchmark reports targets."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHM_DIR = "/dev/shm"


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_stat(s: dict, where: str) -> None:
    for k in ("median", "min", "max"):
        assert _positive(s[k]), f"{where}.{k} = {s[k]!r}"
    assert s["min"] <= s["median"] <= s["max"], where
    assert s["trials"] and all(_positive(t) for t in s["trials"]), where


def test_bench_alloc_quick(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stress.bench_alloc", "--quick", "--json", str(out)],
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

    # every arena the benchmark made (named after its pid) is gone
    left = [n for n in os.listdir(SHM_DIR) if n.startswith(f"shmalloc-{proc.pid}-")]
    assert not left, f"benchmark left arenas behind: {left}"

    assert "public pair / cffi malloc pair" in stdout
    res = json.loads(out.read_text())
    for key in ("machine", "config", "pair", "scaling", "collector", "derived", "targets"):
        assert key in res, key
    m = res["machine"]
    assert _positive(m["cpu_count"]) and m["python_version"] and m["platform"]
    assert res["config"]["quick"] is True

    sizes = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1 << 20]
    rows = res["pair"]["rows"]
    assert [r["size"] for r in rows] == sizes
    for r in rows:
        for k in ("public", "core", "cffi_malloc", "stdlib_shm"):
            _check_stat(r[k], f"pair[{r['size']}].{k}")
        for k in ("public_over_malloc", "stdlib_over_public", "public_over_core"):
            assert _positive(r[k]), (r["size"], k, r[k])

    levels = res["scaling"]["levels"]
    assert [lv["live"] for lv in levels] == [1_000, 10_000, 100_000]
    for lv in levels:
        for kind in ("public", "core"):
            for size, s in lv[kind].items():
                _check_stat(s, f"scaling[{lv['live']}].{kind}[{size}]")

    col = res["collector"]
    _check_stat(col["with"], "collector.with")
    _check_stat(col["without"], "collector.without")
    assert _positive(col["ratio"])

    d = res["derived"]
    for k in ("public_over_malloc", "stdlib_over_public", "scaling_max_over_1e3", "collector_ratio"):
        assert _positive(d[k]["value"]), (k, d[k])
