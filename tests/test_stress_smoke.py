"""Smoke runs of the reliability stress drivers (stress/crash_storm.py, stress/corrupt_fuzz.py);
the fault-step matrix is tests/test_fault_steps.py.

Each driver runs as a subprocess with ``--quick`` and a fixed seed; the tests assert its exit code
and the figures of its JSON report, never timings. They are strict on purpose: an inconsistency
after a kill, a leak, a damaged survivor, a crash or a hang on damaged bytes is a failure of the
C core's promises (issue 8), not of the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bench_runs import REPO_ROOT, spawn_module
from conftest import SHM_DIR


def _run(args: list[str], out: Path, timeout: float = 900) -> tuple[dict[str, Any], str, int]:
    env = dict(os.environ)
    env.pop("SHMALLOC_FAULT", None)
    rc, pid, stdout, stderr = spawn_module(*args, "--json", str(out), timeout=timeout, env=env)
    assert out.exists(), f"no JSON report (exit {rc})\nstdout:\n{stdout}\nstderr:\n{stderr}"
    return json.loads(out.read_text()), f"stdout:\n{stdout}\nstderr:\n{stderr[-5000:]}", pid


def _left(prefix: str) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]


def test_crash_storm_quick(tmp_path: Path) -> None:
    res, output, pid = _run(["stress.crash_storm", "--quick", "--seed", "1"], tmp_path / "s.json")
    assert not _left(f"shmalloc-storm-{pid}-"), "the storm left its arena behind"
    assert res["mode"] == "storm" and res["config"]["quick"] is True
    assert res["config"]["workers"] == 3
    assert res["kills"] == 10, output
    assert res["operations"] > 0 and res["respawns"] >= 10
    # the figures the issue asks for
    assert res["n_inconsistencies"] == 0, json.dumps(res["inconsistencies"], indent=1)[:5000]
    assert res["n_worker_errors"] == 0, json.dumps(res["worker_errors"], indent=1)[:5000]
    assert not res["abnormal_exits"], json.dumps(res["abnormal_exits"], indent=1)[:5000]
    assert res["leaked_bytes"] == 0 and res["n_leaked_blocks"] == 0, res["leaked_blocks"]
    assert res["final_used"] == 0
    assert not res["slots_left"], res["slots_left"]
    assert res["survivor"]["ok"] and res["survivor"]["corrupt"] == 0, res["survivor"]
    assert res["survivor"]["verified"] > 0 and res["operations"] > 1000
    assert sum(res["killed_during"].values()) == 10
    assert res["final"]["check_after_cleanup"]["free_blocks"] == 1
    assert res["final"]["check_after_cleanup"]["allocated_blocks"] == 0
    # the queue part: 2 queue workers, every item put got once (the storm fails otherwise), and
    # the queue gone with its items once the driver dropped it
    q = res["queue"]
    assert res["config"]["queue_workers"] == 2 and q["put"] > 0, q
    assert q["got"] >= q["put"] - q["lost_with_killed_consumers"], q
    assert res["final"]["check_after_cleanup"]["objects"] == 0
    assert res["final"]["check_after_cleanup"]["queues"] == 0
    assert res["lock_recoveries"] >= 0
    assert res["ok"] is True, output


def test_soak_quick(tmp_path: Path) -> None:
    """Threads, forks, signals and kill -9 on one arena: nothing crashes, hangs or leaks."""
    res, output, pid = _run(["stress.soak", "--quick", "--seed", "2"], tmp_path / "k.json")
    assert not _left(f"shmalloc-{pid}-soak"), "the soak left its arena behind"
    assert res["kills"] > 0 and res["signals_sent"] > 0, output
    # handlers and forks are counted by the workers that end cleanly (the killed ones cannot say)
    assert res["forks"] > 0, output
    assert res["crashes"] == [] and res["hangs"] == 0, output
    assert res["leaked_bytes"] == 0 and res["check_blocks"] == 1, output


def test_corrupt_fuzz_quick(tmp_path: Path) -> None:
    res, output, pid = _run(["stress.corrupt_fuzz", "--quick", "--seed", "1"], tmp_path / "c.json")
    assert not _left(f"shmalloc-fuzz-{pid}-"), "the fuzz left scratch arenas behind"
    c = res["counts"]
    assert res["arenas"] == 100 and sum(c.values()) == 100, c
    assert c["detected"] > 0, "no mutation was ever detected: the fuzz is not damaging anything"
    crashes = [(e["reproduce"], e["status"], e["mutations"]) for e in res["crash_examples"]]
    assert c["crash"] == 0, json.dumps(crashes, indent=1)[:5000]
    hangs = [(e["reproduce"], e["mutations"]) for e in res["hang_examples"]]
    assert c["hang"] == 0, json.dumps(hangs, indent=1)[:5000]
    # damaged bytes must give CorruptionDetected (or another clear shmalloc error), never a stray
    # Python exception (OverflowError, TypeError, ...) from the library
    errors = [(e["reproduce"], e.get("unexpected"), e["stderr"]) for e in res["error_examples"]]
    assert c["error"] == 0, json.dumps(errors, indent=1)[:5000]
    assert res["ok"] is True, output


def test_corrupt_fuzz_control_is_clean(tmp_path: Path) -> None:
    """Without damage the fuzz's operation batch raises nothing: every outcome it reports on a
    damaged arena is the damage's doing."""
    res, output, pid = _run(
        ["stress.corrupt_fuzz", "--no-corrupt", "--arenas", "60", "--seed", "3"],
        tmp_path / "n.json",
    )
    assert not _left(f"shmalloc-fuzz-{pid}-")
    assert res["counts"]["clean"] == 60, (res["counts"], res["error_examples"], res["detail"])
    assert res["wrong"] == 0 and res["slow"] == 0
    assert res["ok"] is True, output


RUNNERS = sorted(p.stem for p in (REPO_ROOT / "stress").glob("[!_]*.py"))


@pytest.mark.parametrize("name", RUNNERS)
def test_help(name: str) -> None:
    """Every runner in stress/ answers ``python -m stress.<name> --help``."""
    p = subprocess.run(
        [sys.executable, "-m", f"stress.{name}", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0 and f"python -m stress.{name}" in p.stdout, p.stderr
    assert "--quick" in p.stdout
    if name in ("crash_storm", "corrupt_fuzz"):
        assert "--seed" in p.stdout and "--json" in p.stdout
