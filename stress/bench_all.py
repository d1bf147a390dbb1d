"""Run the whole benchmark suite with one command and summarise every target.

    python -m stress.bench_all [--quick] [--out-dir DIR] [--only LIST] [--skip LIST]

Runs every benchmark module of ``stress/`` as its own process (``python -m stress.<module>``,
with ``--quick`` passed on), one after the other so that they do not disturb each other:

  bench_alloc          allocate+free pairs vs cffi malloc and stdlib SharedMemory (its scaling
                       part is left to bench_scaling, which runs the same code to 1e6 live blocks)
  bench_handoff        array hand-off between processes (if present)
  bench_workloads      larson, xmalloc-test, mstress, cache-scratch with 1, 2, 4 processes
  bench_fragmentation  peak footprint / peak live bytes on mixed-size traces
  bench_scaling        cost vs live blocks, throughput vs processes
  bench_c              the C core vs glibc malloc and Boost.Interprocess, from C
  bench_*              any other benchmark module found in stress/, after these

A progress bar on stderr shows which module runs and its latest progress line; each module's own
table is printed as it finishes. Then a combined table of every target (name, target, measured,
met) is printed. Written to the output directory (default ``stress/results``): each module's
JSON, stdout (.txt) and stderr (.log); ``all.json`` with all of them and the summary;
``summary.md``, a markdown table for the README; ``summary.png`` (throughput vs processes and
cost vs live blocks), when matplotlib is installed.

Targets are reported, never asserted. The exit code is 0 when every module ran (whether or not
its targets were met), 1 when one failed, 130 when interrupted (the running module is stopped
and cleans up its own arenas and processes first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import (
    MiB,
    REPO_ROOT,
    RESULTS_DIR,
    check_interrupt,
    judge,
    load_pyplot,
    machine_info,
    noise_note,
    sigterm_as_interrupt,
    write_json,
)

ORDER = ("bench_alloc", "bench_handoff", "bench_workloads", "bench_fragmentation",
         "bench_scaling", "bench_c")
# arguments beyond --quick/--json; {out} is the output directory
EXTRA_ARGS: dict[str, list[str]] = {
    "bench_alloc": ["--parts", "pair,collector", "--plot", "{out}/bench_alloc.png"],
    "bench_workloads": ["--plot", "{out}/bench_workloads.png"],
    "bench_fragmentation": ["--plot", "{out}/bench_fragmentation.png"],
    "bench_scaling": ["--plot", "{out}/bench_scaling.png"],
}
MODULE_TIMEOUT = 3600.0


def discover() -> list[str]:
    """The benchmark modules in stress/: the known ones in their order, then any others."""
    here = REPO_ROOT / "stress"
    found = {p.stem for p in here.glob("bench_*.py")} - {"bench_all"}
    return [m for m in ORDER if m in found] + sorted(found - set(ORDER))


# --------------------------------------------------------------------------- running


class Bar:
    """One status line on stderr: rewritten in place on a terminal, printed on change otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.t0 = time.monotonic()

    def show(self, done: int, name: str, detail: str) -> None:
        width = 24
        fill = int(width * done / max(1, self.total))
        el = time.monotonic() - self.t0
        line = (f"[{'#' * fill}{'-' * (width - fill)}] {done}/{self.total} {name} "
                f"{int(el // 60):02d}:{int(el % 60):02d}  {detail}")
        if self.tty:
            cols = 120
            try:
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                pass
            sys.stderr.write("\r\x1b[K" + line[: cols - 1])
            sys.stderr.flush()
        elif detail != self.last:
            print(line, file=sys.stderr, flush=True)
        self.last = detail

    def clear(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_module(mod: str, args: argparse.Namespace, bar: Bar, index: int) -> dict[str, Any]:
    out = args.out_dir
    jpath = out / f"{mod}.json"
    cmd = [sys.executable, "-m", f"stress.{mod}", "--json", str(jpath)]
    if args.quick:
        cmd.append("--quick")
    cmd += [a.format(out=out) for a in EXTRA_ARGS.get(mod, [])]
    if jpath.exists():
        jpath.unlink()  # a stale file must not pass for this run's results
    t0 = time.monotonic()
    latest = ["starting"]
    log = open(out / f"{mod}.log", "w")  # noqa: SIM115 -- closed in finally
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)

    def pump_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)
            log.flush()
            line = line.strip()
            if line:
                latest[0] = line.split("] ", 1)[-1]

    stdout_chunks: list[str] = []

    def pump_out() -> None:
        assert proc.stdout is not None
        for chunk in proc.stdout:
            stdout_chunks.append(chunk)

    threads = [threading.Thread(target=pump_err, daemon=True),
               threading.Thread(target=pump_out, daemon=True)]
    for t in threads:
        t.start()
    try:
        while proc.poll() is None:
            check_interrupt()
            bar.show(index, mod, latest[0])
            if time.monotonic() - t0 > args.timeout:
                raise TimeoutError(f"{mod} ran longer than {args.timeout:.0f} s")
            time.sleep(0.25)
    finally:
        if proc.poll() is None:  # interrupted or timed out: let the module clean up, then stop it
            try:  # a Ctrl-C from the terminal reached the module too: it may be unwinding already
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)  # the modules unwind on SIGTERM like on Ctrl-C
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for t in threads:
            t.join(5)
        log.close()
        bar.clear()
    stdout = "".join(stdout_chunks)
    (out / f"{mod}.txt").write_text(stdout)
    entry: dict[str, Any] = {"module": mod, "command": " ".join(cmd), "pid": proc.pid,
                             "exit_code": proc.returncode, "seconds": time.monotonic() - t0}
    if proc.returncode == 0 and jpath.exists():
        entry["status"] = "ok"
        entry["result"] = json.loads(jpath.read_text())
    else:
        entry["status"] = "failed"
        entry["stderr_tail"] = (out / f"{mod}.log").read_text()[-2000:]
    if args.echo:
        print(f"\n{'=' * 20} {mod} ({entry['status']}, {entry['seconds']:.0f} s) {'=' * 20}")
        print(stdout.rstrip() if stdout else "(no output)")
        if entry["status"] != "ok":
            print(f"--- {mod} failed (exit {proc.returncode}); stderr tail:\n"
                  f"{entry['stderr_tail']}")
        sys.stdout.flush()
    return entry


# --------------------------------------------------------------------------- targets


def _row(source: str, name: str, op: str | None, target: float | None, value: float | None,
         met: bool | None, unit: str = "x", note: str = "") -> dict[str, Any]:
    return {"source": source, "name": name, "op": op, "target": target, "value": value,
            "unit": unit, "met": met, "note": note}


def _from_summary(source: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    return [_row(source, r["name"], r["op"], r["target"], r["value"], r["met"], r.get("unit", "x"),
                 r.get("note", "")) for r in res["targets_summary"]]


def _alloc_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    d = res.get("derived", {})
    rows = []
    names = {
        "public_over_malloc": "public allocate+free pair / cffi malloc+free",
        "stdlib_over_public": "stdlib SharedMemory create+unlink / public pair",
        "scaling_max_over_1e3": "pair cost at max live / at 1e3 live (bench_alloc)",
    }
    for key, label in names.items():
        j = d.get(key)
        if j and j.get("target") is not None:
            note = f"worst size {j['worst_size']} B" if "worst_size" in j else ""
            if "geomean" in j:
                note += f", geomean {j['geomean']:.2f}x"
            rows.append(_row("bench_alloc", label, j["op"], j["target"], j["value"], j["met"],
                             "x", note))
    return rows


def _handoff_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """bench_handoff writes no verdicts of its own: judge issue 7's two 1 MiB targets here."""
    row = next((r for r in res.get("rows", []) if r.get("size") == 1 * MiB), None)
    if row is None:
        return []
    out = []
    if "pickle_over_shmalloc" in row:
        j = judge(">=", 10.0, row["pickle_over_shmalloc"])
        out.append(_row("bench_handoff", "1 MiB hand-off: Queue (pickle) / shmalloc", j["op"],
                        j["target"], j["value"], j["met"]))
    if "shmalloc_over_memcpy" in row:
        j = judge("<=", 2.0, row["shmalloc_over_memcpy"])
        out.append(_row("bench_handoff", "1 MiB hand-off: shmalloc / one memcpy", j["op"],
                        j["target"], j["value"], j["met"]))
    return out


def _coordinator_targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    rec, cpu = res.get("reclaim", {}), res.get("idle_cpu", {})
    if "worst_ms" in rec:
        j = judge("<", 1000.0, rec["worst_ms"])
        out.append(_row("bench_coordinator", "reclaim after kill -9, worst", j["op"], j["target"],
                        j["value"], j["met"], "ms"))
    if "percent_of_core" in cpu:
        j = judge("<", 1.0, cpu["percent_of_core"])
        out.append(_row("bench_coordinator", "idle coordinator CPU", j["op"], j["target"],
                        j["value"], j["met"], "% of a core"))
    return out


def _generic_targets(source: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, j in (res.get("derived") or {}).items():
        if isinstance(j, dict) and j.get("target") is not None and "op" in j:
            rows.append(_row(source, key, j["op"], j["target"], j.get("value"), j.get("met")))
    if not rows:
        for key, v in (res.get("targets") or {}).items():
            if isinstance(v, bool):
                rows.append(_row(source, key, None, None, None, v, ""))
    return rows


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "bench_alloc": _alloc_targets,
    "bench_handoff": _handoff_targets,
    "bench_coordinator": _coordinator_targets,
}


def collect_targets(modules: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mod, entry in modules.items():
        if entry["status"] != "ok":
            rows.append(_row(mod, f"{mod} did not run to the end", None, None, None, None, "",
                             f"status {entry['status']}, exit {entry.get('exit_code')}"))
            continue
        res = entry["result"]
        if "targets_summary" in res:
            got = _from_summary(mod, res)
        elif mod in ADAPTERS:
            got = ADAPTERS[mod](res)
        else:
            got = _generic_targets(mod, res)
        if not got:
            got = [_row(mod, f"{mod}: no target found in its JSON", None, None, None, None, "")]
        rows.extend(got)
    return rows


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x" if v < 100 else f"{v:.0f}x"
    return f"{v:,.4g} {unit}".strip()


def fmt_target(r: dict[str, Any]) -> str:
    if r["op"] is None or r["target"] is None:
        return "-"
    return f"{r['op']} {fmt_value(r['target'], r['unit'])}"


def fmt_met(met: bool | None) -> str:
    return "yes" if met is True else "no" if met is False else "n/a"


def summary_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[r["source"], r["name"], fmt_target(r), fmt_value(r["value"], r["unit"]),
             fmt_met(r["met"])] for r in rows]


def print_summary(rows: list[dict[str, Any]]) -> None:
    headers = ["module", "target", "goal", "measured", "met"]
    table = summary_rows(rows)
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("\nSummary of every target")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    met = sum(1 for r in rows if r["met"] is True)
    judged = sum(1 for r in rows if r["met"] is not None)
    print(f"\n{met} of {judged} judged targets met")


def write_markdown(path: Path, rows: list[dict[str, Any]], machine: dict[str, Any],
                   quick: bool, modules: dict[str, dict[str, Any]]) -> None:
    lines = [
        f"Measured by `python -m stress.bench_all{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {machine.get('cpu_model', 'unknown CPU')} "
        f"x{machine.get('cpus_usable') or machine.get('cpu_count')}, Python "
        f"{machine.get('python_version')}, {machine.get('platform')}.",
        "",
        "| module | target | goal | measured | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t, r in zip(summary_rows(rows), rows):
        cells = [f"`{t[0]}`", t[1], t[2], t[3], f"**{t[4]}**" if r["met"] is False else t[4]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [r for r in rows if r["note"]]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['name']}: {r['note']}" for r in notes]
    nn = noise_note(machine)
    if nn:
        lines += ["", f"Caveat: {nn}."]
    if quick:
        lines += ["", "These are `--quick` figures: short runs, few trials; rerun without "
                  "`--quick` for numbers to quote."]
    failed = [m for m, e in modules.items() if e["status"] != "ok"]
    if failed:
        lines += ["", f"Did not complete: {', '.join(failed)}."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, modules: dict[str, dict[str, Any]]) -> bool:
    """throughput vs processes (speed-up over 1 process) and cost vs live blocks, in one PNG."""
    wl = modules.get("bench_workloads", {}).get("result")
    sc = modules.get("bench_scaling", {}).get("result")
    live = sc.get("live") if sc else None
    if not wl and not (sc and sc.get("procs")) and not live:
        return False
    plt = load_pyplot(f"summary plot {path}")
    if plt is None:
        return False
    ncols = 2 if live else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    procs_seen: set[int] = set()
    series: list[tuple[str, dict[str, Any], list[int], str]] = []
    if wl:
        for name, w in wl["workloads"].items():
            series.append((f"{name} (shmalloc)", w["methods"]["shmalloc"]["by_procs"], w["procs"],
                           "-"))
        lar = wl["workloads"].get("larson")
        if lar and "malloc_private" in lar["methods"]:
            series.append(("larson (private malloc)", lar["methods"]["malloc_private"]["by_procs"],
                           lar["procs"], ":"))
    if sc and sc.get("procs"):
        pr = sc["procs"]
        series.append(("alloc/write/free loop (shmalloc)", pr["methods"]["shmalloc"]["by_procs"],
                       pr["procs"], "--"))
    for label, by, procs, style in series:
        base = by["1"]["median"]
        ax.plot(procs, [by[str(k)]["median"] / base for k in procs], marker="o", linestyle=style,
                label=label)
        procs_seen.update(procs)
    ps = sorted(procs_seen)
    cores = os.cpu_count() or 1
    ax.plot(ps, [min(k, cores) for k in ps], color="grey", linewidth=1,
            label=f"ideal ({cores} cores)")
    ax.axhline(1.7, color="red", linestyle="--", linewidth=1, label="larson target at 2 (1.7x)")
    ax.set_xticks(ps)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("processes")
    ax.set_ylabel("throughput / throughput with 1 process")
    ax.set_title("Throughput vs processes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if live:
        from .bench_scaling import plot_live

        plot_live(axes[0][1], live)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.bench_all",
        description="Run every benchmark module in stress/ (bench_alloc, bench_handoff, "
        "bench_workloads, bench_fragmentation, bench_scaling, bench_c, and any other bench_*), "
        "then print and write a summary of every target.",
    )
    p.add_argument("--quick", action="store_true", help="pass --quick to every module")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                   help="where JSON, logs, summary.md and summary.png go (default: "
                   f"{RESULTS_DIR.relative_to(REPO_ROOT)})")
    p.add_argument("--only", help="comma-separated modules to run (default: all found)")
    p.add_argument("--skip", default="", help="comma-separated modules not to run")
    p.add_argument("--no-echo", dest="echo", action="store_false",
                   help="do not print each module's own tables (they are saved as .txt)")
    p.add_argument("--timeout", type=float, default=MODULE_TIMEOUT,
                   help="seconds one module may take (default 3600)")
    a = p.parse_args(argv)
    found = discover()
    want = [m.strip() for m in a.only.split(",") if m.strip()] if a.only else found
    skip = {m.strip() for m in a.skip.split(",") if m.strip()}
    unknown = (set(want) | skip) - set(found)
    if unknown:
        p.error(f"no such benchmark module(s) {sorted(unknown)}; found: {', '.join(found)}")
    a.modules = [m for m in found if m in want and m not in skip]
    if not a.modules:
        p.error("nothing to run")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    bar = Bar(len(args.modules))
    modules: dict[str, dict[str, Any]] = {}
    interrupted = False

    try:
        with sigterm_as_interrupt():
            for i, mod in enumerate(args.modules):
                try:
                    modules[mod] = run_module(mod, args, bar, i)
                except TimeoutError as e:
                    print(f"\n{e}", file=sys.stderr)
                    modules[mod] = {"module": mod, "status": "timeout", "exit_code": None}
            bar.show(len(args.modules), "done", "")
            bar.clear()
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        print("\ninterrupted: the running module was stopped (it destroys its own arenas); "
              "no summary written", file=sys.stderr)
        return 130
    machine = machine_info()
    rows = collect_targets(modules)
    all_res = {
        "benchmark": "bench_all",
        "schema": 1,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "noise_note": noise_note(machine),
        "config": {"quick": args.quick, "modules": args.modules},
        "elapsed_seconds": time.monotonic() - t0,
        "modules": modules,
        "summary": rows,
    }
    write_json(args.out_dir / "all.json", all_res)
    write_markdown(args.out_dir / "summary.md", rows, machine, args.quick, modules)
    plotted = write_plot(args.out_dir / "summary.png", modules)
    print_summary(rows)
    nn = noise_note(machine)
    if nn:
        print(f"NOTE: {nn}")
    print(f"\nwritten to {args.out_dir}: all.json, summary.md"
          f"{', summary.png' if plotted else ''} ({all_res['elapsed_seconds']:.0f} s total)")
    return 0 if all(e["status"] == "ok" for e in modules.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
