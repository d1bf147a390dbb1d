"""Run every benchmark of stress/ (bench_*), one process after the other, and summarise targets.

Each module runs as ``python -m stress.<module> --json ...`` (``--quick`` passed on), so that they
do not disturb each other; a status line on stderr shows its latest progress, and its own tables
are printed as it finishes. Then one table of every target (the ``targets_summary`` of each
module's JSON). Written to the output directory: each module's JSON, stdout (.txt) and stderr
(.log), ``all.json`` and ``summary.md`` (a markdown table for the README). Exit code 0 when
every module ran, whether or not its targets were met; 1 when one failed; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from . import _common as bench
from ._common import judge

ORDER = "bench_alloc bench_objects bench_workloads bench_fragmentation bench_scaling bench_c"
ORDER += " bench_coordinator"


def discover() -> list[str]:
    """The benchmark modules in stress/: the known ones in their order, then any others."""
    found = {p.stem for p in (bench.REPO_ROOT / "stress").glob("bench_*.py")} - {"bench_all"}
    return [m for m in ORDER.split() if m in found] + sorted(found - set(ORDER.split()))


def latest_message(log: Path) -> str:
    """The last progress message a module wrote to its log, without its ``[name time]`` head."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip().split("] ", 1)[-1] if lines else "starting"


def stop(proc: subprocess.Popen[Any]) -> None:
    """A module still running (interrupted or timed out) gets 10 s to clean up (a Ctrl-C from the
    terminal reached it too), then SIGTERM (the modules unwind on it too) and 60 s, then SIGKILL."""
    for sig, grace in ((None, 10), (signal.SIGTERM, 60), (signal.SIGKILL, None)):
        if proc.poll() is None and sig is not None:
            proc.send_signal(sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


def run_module(mod: str, a: argparse.Namespace, index: int) -> dict[str, Any]:
    jpath, txt, log = (a.out_dir / f"{mod}.{ext}" for ext in ("json", "txt", "log"))
    cmd = [sys.executable, "-m", f"stress.{mod}", "--json", str(jpath), *["--quick"][: a.quick]]
    jpath.unlink(missing_ok=True)  # a stale file must not pass for this run's results
    t0, shown = time.monotonic(), ""
    with open(txt, "w") as out, open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=bench.REPO_ROOT, stdout=out, stderr=err)
        try:
            while proc.poll() is None:
                bench.check_interrupt()
                latest, took = latest_message(log), time.monotonic() - t0
                line = f"[{index + 1}/{len(a.modules)}] {mod} {took:.0f}s {latest}"
                if sys.stderr.isatty():
                    sys.stderr.write("\r\x1b[K" + line[:150])
                elif latest != shown:
                    print(line, file=sys.stderr, flush=True)
                shown = latest
                if took > a.timeout:
                    raise TimeoutError(f"{mod} ran longer than {a.timeout:.0f} s")
                time.sleep(0.25)
        finally:
            stop(proc)
            if sys.stderr.isatty():
                sys.stderr.write("\r\x1b[K")
    stdout = txt.read_text()
    entry: dict[str, Any] = dict(module=mod, command=" ".join(cmd), pid=proc.pid)
    entry.update(exit_code=proc.returncode, seconds=time.monotonic() - t0)
    if proc.returncode == 0 and jpath.exists():
        entry.update(status="ok", result=json.loads(jpath.read_text()))
    else:
        entry.update(status="failed", stderr_tail=log.read_text()[-2000:])
    if a.echo:
        print(f"\n{'=' * 20} {mod} ({entry['status']}, {entry['seconds']:.0f} s) {'=' * 20}")
        print(stdout.rstrip() or "(no output)")
        if entry["status"] != "ok":
            print(f"--- {mod} failed (exit {proc.returncode}); stderr tail:")
            print(entry["stderr_tail"])
        sys.stdout.flush()
    return entry


def collect_targets(modules: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mod, entry in modules.items():
        if entry["status"] == "ok":
            rows += [{"source": mod, **r} for r in entry["result"]["targets_summary"]]
        else:
            note = f"status {entry['status']}, exit {entry.get('exit_code')}"
            row = bench.target_row(f"{mod} did not run to the end", judge("<", 0, None), "", note)
            rows.append({**row, "source": mod, "op": None, "target": None})
    return rows


def cells(r: dict[str, Any]) -> list[str]:
    def value(v: float | None) -> str:
        if v is None:
            return "-"
        if r["unit"] == "x":
            return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"
        return f"{v:,.4g} {r['unit']}".strip()

    goal = "-" if r["op"] is None else f"{r['op']} {value(r['target'])}"
    met = {True: "yes", False: "no", None: "n/a"}[r["met"]]
    return [r["source"], r["name"], goal, value(r["value"]), met]


def print_summary(rows: list[dict[str, Any]]) -> None:
    headers = ["module", "target", "goal", "measured", "met"]
    bench.print_table(headers, [cells(r) for r in rows], "Summary of every target", left=True)
    judged = [r for r in rows if r["met"] is not None]
    print(f"\n{sum(r['met'] for r in judged)} of {len(judged)} judged targets met")


def write_markdown(
    path: Path, rows: list[dict[str, Any]], machine: dict[str, Any], quick: bool, failed: list[str]
) -> None:
    by = f"`python -m stress.bench_all{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d')}"
    on = f"{machine['cpu_model']} x{machine['cpus_usable']}, Python {machine['python_version']}"
    lines = [f"Measured by {by}: {on}, {machine['platform']}.", ""]
    lines += ["| module | target | goal | measured | met |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        c = cells(r)
        c[0], c[4] = f"`{c[0]}`", f"**{c[4]}**" if r["met"] is False else c[4]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    notes = [f"- {r['name']}: {r['note']}" for r in rows if r["note"]]
    lines += ["", "Notes:", "", *notes] if notes else []
    if bench.noise_note(machine):
        lines += ["", f"Caveat: {bench.noise_note(machine)}."]
    if quick:
        rerun = "rerun without `--quick` for numbers to quote."
        lines += ["", f"These are `--quick` figures: short runs, few trials; {rerun}"]
    if failed:
        lines += ["", f"Did not complete: {', '.join(failed)}."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "pass --quick to every module", results=None)
    where = f"JSON, logs and summaries (default: {bench.RESULTS_DIR.relative_to(bench.REPO_ROOT)})"
    p.add_argument("--out-dir", type=Path, default=bench.RESULTS_DIR, metavar="DIR", help=where)
    p.add_argument("--only", type=bench.csv(), help="comma-separated modules to run (default: all)")
    skip = "comma-separated modules not to run"
    p.add_argument("--skip", type=bench.csv(), default=[], help=skip)
    no_echo = "do not print each module's own tables (they are saved as .txt)"
    p.add_argument("--no-echo", dest="echo", action="store_false", help=no_echo)
    timeout = "seconds one module may take (default 3600)"
    p.add_argument("--timeout", type=float, default=3600.0, help=timeout)
    a = p.parse(argv)
    found = discover()
    want, skip = a.only or found, set(a.skip)
    if (set(want) | skip) - set(found):
        unknown = sorted((set(want) | skip) - set(found))
        p.error(f"no such benchmark module(s) {unknown}; found: {', '.join(found)}")
    a.modules = [m for m in want if m not in skip]
    if not a.modules:
        p.error("nothing to run")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    modules: dict[str, dict[str, Any]] = {}
    try:
        with bench.sigterm_as_interrupt():
            for i, mod in enumerate(a.modules):
                try:
                    modules[mod] = run_module(mod, a, i)
                except TimeoutError as e:
                    print(f"\n{e}", file=sys.stderr)
                    modules[mod] = {"module": mod, "status": "timeout", "exit_code": None}
    except KeyboardInterrupt:
        stopped = "the running module was stopped (it destroys its own arenas)"
        print(f"\ninterrupted: {stopped}; no summary written", file=sys.stderr)
        return 130
    machine = bench.machine_info()
    rows = collect_targets(modules)
    failed = [m for m, e in modules.items() if e["status"] != "ok"]
    res = dict(benchmark="bench_all", schema=1, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    res.update(machine=machine, noise_note=bench.noise_note(machine))
    res.update(config={"quick": a.quick, "modules": a.modules})
    res.update(elapsed_seconds=time.monotonic() - t0, modules=modules, summary=rows)
    bench.write_json(a.out_dir / "all.json", res)
    write_markdown(a.out_dir / "summary.md", rows, machine, a.quick, failed)
    print_summary(rows)
    if bench.noise_note(machine):
        print(f"NOTE: {bench.noise_note(machine)}")
    print(f"\nwritten to {a.out_dir}: all.json, summary.md ({res['elapsed_seconds']:.0f} s total)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
