"""C-level benchmark: the shmalloc core's allocate+free pair called from C, beside glibc malloc/free
in the same program and Boost.Interprocess ``managed_shared_memory`` in a C++ one.

    python -m stress.bench_c [--quick] [--json PATH] [--sizes 64,1024,16384]

``stress/bench_c.c`` is compiled with the system ``cc`` against ``native/*.c`` with the flags
``native/build_ffi.py`` uses for a release build (``-O2 -std=gnu11 -DNDEBUG -DSHMALLOC_DEBUG=0``).
It creates its own segment (shm_open, ftruncate, mmap, then shm_arena_format, shm_handle_open and
shm_proc_attach) and times shm_alloc/shm_free pairs and malloc/free pairs, interleaved trial by
trial. ``stress/bench_c_boost.cpp`` is compiled with ``c++ -O2`` only if the Boost.Interprocess
headers are installed (Debian: ``apt-get install libboost-dev``); otherwise Boost is skipped
with a message. The two programs run alternately, a few trials per turn, so that both see the
same machine. Figures are nanoseconds per pair: median of the trials, with min and max.

A second part (no target; ``--no-scale`` skips it) forks 1, 2 and 4 processes from the C program
onto the one arena, each claiming its own slot and timing 64 B pairs at the same moment, then
does the same on private glibc heaps: aggregate pairs per second, what sharing the heap costs
when processes allocate at once, with no Python in the way.

Binaries are cached under the system temp directory, keyed by a hash of the sources, flags and
compiler, so reruns do not recompile. Both programs unlink their segment right after mapping
it: nothing is left in /dev/shm however they end.

Targets (issue 7): the core's pair within 1.5x of glibc's, and faster than Boost.Interprocess.
Reported, never asserted; the exit code is 0 whether or not they are met (it is 1 only if the
core program cannot be built or fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import (
    REPO_ROOT,
    RESULTS_DIR,
    add_json_arg,
    finish_result,
    fmt_rate_stat,
    fmt_size,
    fmt_stat,
    judge,
    make_progress,
    new_result,
    noise_note,
    print_table,
    run_interruptible,
    summarize,
    summarize_rates,
    target_row,
    verdict,
    write_results,
)

progress = make_progress("bench_c")

DEFAULT_JSON = RESULTS_DIR / "bench_c.json"
SIZES = (64, 1024, 16384)
PROCS = (1, 2, 4)
SCALE_SIZE = 64
C_SOURCE = REPO_ROOT / "stress" / "bench_c.c"
BOOST_SOURCE = REPO_ROOT / "stress" / "bench_c_boost.cpp"
BOOST_HEADERS = Path("/usr/include/boost/interprocess")
CORE_FLAGS = ["-O2", "-std=gnu11", "-DNDEBUG", "-DSHMALLOC_DEBUG=0"]
BOOST_FLAGS = ["-O2", "-std=c++17", "-DNDEBUG"]
TARGETS = {
    "core_over_glibc": ("<=", 1.5),
    "core_over_boost": ("<", 1.0),
}
CACHE_DIR = Path(tempfile.gettempdir()) / "shmalloc-bench-c"


class BuildError(RuntimeError):
    pass


def _compiler_id(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30,
                              check=False).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return cc


def _build(name: str, compiler: str, args: list[str], sources: list[Path], libs: list[str]
           ) -> tuple[Path, dict[str, Any]]:
    """Compile (or reuse a cached build of) sources into a binary; return its path and facts."""
    cc = shutil.which(compiler)
    if cc is None:
        raise BuildError(f"no `{compiler}` on PATH: install a C/C++ compiler (Debian: "
                         "apt-get install build-essential)")
    h = hashlib.sha256()
    h.update(" ".join([_compiler_id(cc), *args, *libs]).encode())
    for s in sources:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    for hdr in sorted((REPO_ROOT / "native").glob("*.h")):
        h.update(hdr.read_bytes())
    digest = h.hexdigest()[:16]
    out = CACHE_DIR / f"{name}-{digest}"
    def command(target: Path) -> list[str]:
        return [cc, *args, *map(str, sources), "-o", str(target), *libs]

    info = {"command": " ".join(command(out)), "binary": str(out), "cached": out.exists()}
    if out.exists():
        return out, info
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    t0 = time.perf_counter()
    r = subprocess.run(command(tmp), capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                       check=False)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"compiling {name} failed ({info['command']}):\n{r.stderr[-3000:]}")
    os.replace(tmp, out)
    info["compile_seconds"] = time.perf_counter() - t0
    return out, info


def build_core() -> tuple[Path, dict[str, Any]]:
    """bench_c.c with the C core, built as native/build_ffi.py builds the core (release)."""
    sources = sorted((REPO_ROOT / "native").glob("*.c")) + [C_SOURCE]
    return _build("bench_c", "cc", [*CORE_FLAGS, "-I" + str(REPO_ROOT / "native")], sources,
                  ["-lpthread"])


def build_boost() -> tuple[Path | None, dict[str, Any]]:
    if not BOOST_HEADERS.is_dir():
        return None, {"skipped": f"Boost.Interprocess headers not found ({BOOST_HEADERS}); "
                                 "install them with `apt-get install libboost-dev` to compare"}
    try:
        return _build("bench_c_boost", "c++", BOOST_FLAGS, [BOOST_SOURCE], ["-lpthread", "-lrt"])
    except BuildError as e:
        return None, {"skipped": str(e)}


def _run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr.strip()}")
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def run_pairs(core: Path, boost: Path | None, sizes: tuple[int, ...], iters: int, rounds: int,
              per_round: int) -> dict[str, dict[str, list[float]]]:
    """Alternate the two programs `rounds` times, `per_round` trials each; merge the trials."""
    trials: dict[str, dict[str, list[float]]] = {
        str(s): {"core": [], "glibc": [], "boost": []} for s in sizes}
    args = [str(iters), str(per_round), *map(str, sizes)]
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}")
        runs = [("core", [str(core), "pairs", *args])]
        if boost is not None:
            runs.append(("boost", [str(boost), *args]))
        for _, cmd in runs if r % 2 == 0 else runs[::-1]:
            out = _run_json(cmd, timeout=600)
            for s, v in out["sizes"].items():
                for k, vals in v.items():
                    trials[s][k].extend(vals)
    return trials


def run_scale(core: Path, procs: tuple[int, ...], iters: int, size: int, trials: int
              ) -> dict[str, Any]:
    """bench_c scale: aggregate pairs/s of N forked processes on one arena, and on private
    malloc heaps, for each N; trials interleaved over N."""
    got: dict[int, dict[str, list[float]]] = {k: {"core": [], "glibc": []} for k in procs}
    for t in range(trials):
        progress(f"processes: trial {t + 1}/{trials}")
        for k in procs:
            out = _run_json([str(core), "scale", str(k), str(iters), str(size)], timeout=600)
            got[k]["core"].append(out["core_pairs_per_s"])
            got[k]["glibc"].append(out["glibc_pairs_per_s"])
    by = {str(k): {m: summarize_rates(v) for m, v in got[k].items()} for k in procs}
    base = by[str(procs[0])]
    return {
        "procs": list(procs), "size": size, "iters_per_process": iters,
        "malloc_iters_per_process": iters * 20,  # MALLOC_X in bench_c.c
        "unit": "allocate+free pairs per second, summed over processes",
        "by_procs": by,
        "speedup": {m: {str(k): by[str(k)][m]["median"] / base[m]["median"] for k in procs}
                    for m in ("core", "glibc")},
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    progress("building the C program (core + glibc)")
    core, core_info = build_core()
    progress("building the Boost.Interprocess program")
    boost, boost_info = build_boost()
    if boost is None:
        progress(f"Boost skipped: {boost_info['skipped']}")
    trials = run_pairs(core, boost, args.sizes, args.iters, args.rounds, args.per_round)
    scale = run_scale(core, PROCS, args.scale_iters, SCALE_SIZE, args.rounds * args.per_round
                      ) if args.scale else None
    rows = []
    for s in args.sizes:
        t = trials[str(s)]
        row: dict[str, Any] = {"size": s}
        for k in ("core", "glibc", "boost"):
            row[k] = summarize(t[k], args.iters) if t[k] else None
        row["core_over_glibc"] = row["core"]["median"] / row["glibc"]["median"]
        row["core_over_boost"] = (row["core"]["median"] / row["boost"]["median"]
                                  if row["boost"] else None)
        rows.append(row)
    return {
        "sizes": list(args.sizes),
        "rows": rows,
        "build": {"core": core_info, "boost": boost_info},
        "boost_available": boost is not None,
        "scale": scale,
    }


def derive(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["pairs"]["rows"]
    d: dict[str, Any] = {}
    worst = max(rows, key=lambda r: r["core_over_glibc"])
    op, target = TARGETS["core_over_glibc"]
    d["core_over_glibc"] = {**judge(op, target, worst["core_over_glibc"]),
                            "aggregate": "worst size (max)", "worst_size": worst["size"],
                            "by_size": {str(r["size"]): r["core_over_glibc"] for r in rows}}
    op, target = TARGETS["core_over_boost"]
    if res["pairs"]["boost_available"]:
        worst = max(rows, key=lambda r: r["core_over_boost"])
        d["core_over_boost"] = {**judge(op, target, worst["core_over_boost"]),
                                "aggregate": "worst size (max)", "worst_size": worst["size"],
                                "by_size": {str(r["size"]): r["core_over_boost"] for r in rows}}
    else:
        d["core_over_boost"] = {**judge(op, target, None), "skipped":
                                res["pairs"]["build"]["boost"]["skipped"]}
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    d = res["derived"]
    rows = res["pairs"]["rows"]
    j = d["core_over_glibc"]
    sizes = ", ".join(f"{fmt_size(r['size'])} {r['core']['median']:.0f} vs "
                      f"{r['glibc']['median']:.0f} ns" for r in rows)
    out = [target_row("C core pair / glibc malloc+free (C)", j, "x", sizes)]
    j = d["core_over_boost"]
    if j["value"] is not None:
        sizes = ", ".join(f"{fmt_size(r['size'])} {r['core']['median']:.0f} vs "
                          f"{r['boost']['median']:.0f} ns" for r in rows)
        out.append(target_row("C core pair / Boost.Interprocess pair", j, "x", sizes))
    else:
        out.append(target_row("C core pair / Boost.Interprocess pair", j, "x",
                              "skipped: " + j.get("skipped", "")))
    return out


def report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"shmalloc bench_c{' (--quick)' if res['config']['quick'] else ''}: "
          f"{m.get('cpu_model', '?')} x{m['cpu_count']}, {m['platform']}")
    note = noise_note(m)
    if note:
        print(f"NOTE: {note}")
    p = res["pairs"]
    rows = []
    for r in p["rows"]:
        rows.append([
            fmt_size(r["size"]), fmt_stat(r["core"]), fmt_stat(r["glibc"]),
            fmt_stat(r["boost"]) if r["boost"] else "skipped",
            f"{r['core_over_glibc']:.2f}x",
            f"{r['core_over_boost']:.2f}x" if r["core_over_boost"] else "-",
        ])
    print_table(["size", "shmalloc core ns", "glibc malloc ns", "Boost.Interprocess ns",
                 "core/glibc", "core/boost"], rows,
                f"ns per allocate+free pair, called from C ({res['config']['iters']:,} pairs per "
                "trial; median [min-max])")
    if not p["boost_available"]:
        print(f"\nBoost.Interprocess skipped: {p['build']['boost']['skipped']}")
    sc = p.get("scale")
    if sc:
        rows = []
        for m, label in (("core", "shmalloc core, one shared arena"),
                         ("glibc", "glibc malloc, private heap per process")):
            rows.append([label] + [fmt_rate_stat(sc["by_procs"][str(k)][m]) for k in sc["procs"]]
                        + [f"{sc['speedup'][m][str(k)]:.2f}x" for k in sc["procs"] if k != 1])
        print_table(["from C"] + [f"{k} proc{'s' if k > 1 else ''}" for k in sc["procs"]]
                    + [f"{k}p/1p" for k in sc["procs"] if k != 1], rows,
                    f"{fmt_size(sc['size'])} allocate+free pairs per second summed over forked "
                    f"processes ({sc['iters_per_process']:,} core / "
                    f"{sc['malloc_iters_per_process']:,} malloc pairs each; no target)")
    d = res["derived"]
    j = d["core_over_glibc"]
    print(f"\n  core pair / glibc pair : {j['value']:.2f}x worst (at {fmt_size(j['worst_size'])})"
          f"   target <= {j['target']:g}x  {verdict(j)}")
    j = d["core_over_boost"]
    if j["value"] is not None:
        print(f"  core pair / Boost pair : {j['value']:.2f}x worst "
              f"(at {fmt_size(j['worst_size'])})   target < {j['target']:g}x (faster)  "
              f"{verdict(j)}")
    else:
        print("  core pair / Boost pair : skipped (no Boost headers)   (not judged)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m stress.bench_c",
        description="Time the shmalloc C core's shm_alloc/shm_free pair from a C program, beside "
        "glibc malloc/free and Boost.Interprocess managed_shared_memory (if its headers are "
        "installed). Prints a table and writes JSON.",
    )
    p.add_argument("--quick", action="store_true", help="fewer pairs and trials (a CI smoke run)")
    add_json_arg(p, DEFAULT_JSON)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="comma-separated block sizes in bytes (default 64,1024,16384)")
    p.add_argument("--iters", type=int, help="pairs per trial (default 1000000; quick 200000)")
    p.add_argument("--rounds", type=int,
                   help="turns of each program, alternating (default 3; quick 2)")
    p.add_argument("--per-round", type=int, help="trials per turn (default 3; quick 2)")
    p.add_argument("--no-scale", dest="scale", action="store_false",
                   help="skip the 1/2/4-process part (forked C processes on one arena)")
    a = p.parse_args(argv)
    try:
        a.sizes = tuple(int(x) for x in a.sizes.split(",") if x.strip())
    except ValueError:
        p.error("--sizes takes integers")
    if not a.sizes or any(s < 1 for s in a.sizes) or len(a.sizes) > 16:
        p.error("--sizes takes 1 to 16 positive sizes")
    a.iters = a.iters or (200_000 if a.quick else 1_000_000)
    a.rounds = a.rounds or (2 if a.quick else 3)
    a.per_round = a.per_round or (2 if a.quick else 3)
    a.scale_iters = max(1, a.iters // 2)
    if min(a.iters, a.rounds, a.per_round) < 1:
        p.error("--iters, --rounds and --per-round must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    res = new_result(
        "bench_c",
        {"quick": args.quick, "sizes": list(args.sizes), "iters": args.iters,
         "rounds": args.rounds, "per_round": args.per_round, "scale": args.scale,
         "scale_iters": args.scale_iters, "scale_procs": list(PROCS),
         "unit": "ns per allocate+free pair",
         "statistic": "median of trials (min, max also given)"},
        {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
    )

    def body() -> None:
        res["pairs"] = bench(args)

    try:
        if not run_interruptible(
                body, "nothing written (the programs leave no segment behind)"):
            return 130
    except (BuildError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench_c: {e}", file=sys.stderr)
        return 1
    finish_result(res, t_start, derive=derive, targets_summary=targets_summary)
    report(res)
    write_results(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
