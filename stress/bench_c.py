"""C-level benchmark: the shmalloc core's allocate+free pair called from C, beside glibc malloc/free
in the same program and Boost.Interprocess ``managed_shared_memory`` in a C++ one.

``stress/bench_c.c`` is compiled against ``native/*.c`` with the release flags of
``native/build_ffi.py``; ``stress/bench_c_boost.cpp`` only if the Boost.Interprocess headers are
installed (Debian: libboost-dev), else Boost is skipped with a message. The two programs run
alternately, a few trials per turn, so that both see the same machine: ns per pair, median
[min-max]. A second part (no target; ``--no-scale`` skips it) forks 1, 2 and 4 C processes onto
one arena, then onto private glibc heaps: aggregate pairs per second with no Python in the way.
Binaries are cached in the temp directory, keyed by a hash of sources, flags and compiler. The
exit code is 1 only if the core program cannot be built or fails.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shmalloc.sizes import format_bytes

from . import _common as bench

SIZES = [64, 1024, 16384]
PROCS = (1, 2, 4)
SCALE_SIZE = 64
C_SOURCE = bench.REPO_ROOT / "stress" / "bench_c.c"
BOOST_SOURCE = bench.REPO_ROOT / "stress" / "bench_c_boost.cpp"
BOOST_HEADERS = Path("/usr/include/boost/interprocess")
CORE_FLAGS = ["-O2", "-std=gnu11", "-DNDEBUG", "-DSHMALLOC_DEBUG=0"]
BOOST_FLAGS = ["-O2", "-std=c++17", "-DNDEBUG"]
TARGETS = {"core_over_glibc": ("<=", 1.5), "core_over_boost": ("<", 1.0)}
CACHE_DIR = Path(tempfile.gettempdir()) / "shmalloc-bench-c"
RUN: dict[str, Any] = dict(capture_output=True, text=True, check=False)  # subprocess.run's
VERSUS = (("core_over_glibc", "glibc", "glibc malloc+free (C)"),)  # target, column, label
VERSUS += (("core_over_boost", "boost", "Boost.Interprocess pair"),)


class BuildError(RuntimeError):
    pass


def _build(
    name: str, compiler: str, args: list[str], sources: list[Path], libs: list[str]
) -> tuple[Path, dict[str, Any]]:
    """Compile (or reuse a cached build of) sources into a binary; return its path and facts."""
    cc = shutil.which(compiler)
    if cc is None:
        install = "install a C/C++ compiler (Debian: apt-get install build-essential)"
        raise BuildError(f"no `{compiler}` on PATH: {install}")
    h = hashlib.sha256()
    compiler_id = f"{os.path.realpath(cc)} {os.stat(os.path.realpath(cc)).st_mtime_ns}"
    h.update(" ".join([compiler_id, *args, *libs]).encode())
    for s in sources:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    for hdr in sorted((bench.REPO_ROOT / "native").glob("*.h")):
        h.update(hdr.read_bytes())
    out = CACHE_DIR / f"{name}-{h.hexdigest()[:16]}"
    cmd = [cc, *args, *map(str, sources), "-o"]
    info = {"command": " ".join([*cmd, str(out), *libs]), "binary": str(out), "cached": True}
    if out.exists():
        return out, info
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    t0 = time.perf_counter()
    r = subprocess.run([*cmd, str(tmp), *libs], timeout=600, **RUN)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"compiling {name} failed ({info['command']}):\n{r.stderr[-3000:]}")
    os.replace(tmp, out)
    info.update(cached=False, compile_seconds=time.perf_counter() - t0)
    return out, info


def build_core() -> tuple[Path, dict[str, Any]]:
    """bench_c.c with the C core, built as native/build_ffi.py builds the core (release)."""
    native = bench.REPO_ROOT / "native"
    # (not fastcall.c and halves.c: they are CPython's)
    core = runpy.run_path(str(native / "build_ffi.py"))["SOURCES"]
    sources = [*(native / s for s in core), C_SOURCE]
    return _build("bench_c", "cc", [*CORE_FLAGS, f"-I{native}"], sources, ["-lpthread"])


def build_boost() -> tuple[Path | None, dict[str, Any]]:
    if not BOOST_HEADERS.is_dir():
        why = f"Boost.Interprocess headers not found ({BOOST_HEADERS}); install them with "
        return None, {"skipped": why + "`apt-get install libboost-dev` to compare"}
    try:
        return _build("bench_c_boost", "c++", BOOST_FLAGS, [BOOST_SOURCE], ["-lpthread", "-lrt"])
    except BuildError as e:
        return None, {"skipped": str(e)}


def _run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    r = subprocess.run(cmd, timeout=timeout, **RUN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr.strip()}")
    return dict(json.loads(r.stdout))


def run_pairs(core: Path, boost: Path | None, a: Any) -> dict[str, dict[str, list[float]]]:
    """Alternate the two programs `rounds` times, `per_round` trials each; merge the trials."""
    trials = {str(s): {"core": [], "glibc": [], "boost": []} for s in SIZES}
    args = [str(a.iters), str(a.per_round), *map(str, SIZES)]
    for r in range(a.rounds):
        bench.progress(f"round {r + 1}/{a.rounds}")
        runs = [("core", [str(core), "pairs", *args])]
        if boost is not None:
            runs.append(("boost", [str(boost), *args]))
        for _, cmd in runs if r % 2 == 0 else runs[::-1]:
            out = _run_json(cmd, timeout=600)
            for s, v in out["sizes"].items():
                for k, vals in v.items():
                    trials[s][k].extend(vals)
    return trials


def run_scale(core: Path, iters: int, trials: int) -> dict[str, Any]:
    """bench_c scale: aggregate pairs/s of N forked processes on one arena, and on private
    malloc heaps, for each N; trials interleaved over N."""
    got: dict[int, dict[str, list[float]]] = {k: {"core": [], "glibc": []} for k in PROCS}
    for t in range(trials):
        bench.progress(f"processes: trial {t + 1}/{trials}")
        for k in PROCS:
            out = _run_json([str(core), "scale", str(k), str(iters), str(SCALE_SIZE)], 600)
            got[k]["core"].append(out["core_pairs_per_s"])
            got[k]["glibc"].append(out["glibc_pairs_per_s"])
    by = {m: {str(k): bench.summarize(got[k][m]) for k in PROCS} for m in ("core", "glibc")}
    out = dict(procs=list(PROCS), size=SCALE_SIZE, iters_per_process=iters, by_method=by)
    out["malloc_iters_per_process"] = iters * 20  # MALLOC_X in bench_c.c
    out["unit"] = "allocate+free pairs per second, summed over processes"
    speedup = {m: {k: v["median"] / by[m]["1"]["median"] for k, v in by[m].items()} for m in by}
    return {**out, "speedup": speedup}


def run(a: Any, res: dict[str, Any], arenas: bench.Arenas) -> None:
    bench.progress("building the C program (core + glibc)")
    core, core_info = build_core()
    bench.progress("building the Boost.Interprocess program")
    boost, boost_info = build_boost()
    if boost is None:
        bench.progress(f"Boost skipped: {boost_info['skipped']}")
    trials = run_pairs(core, boost, a)
    rows = []
    for s in SIZES:
        got = trials[str(s)]
        row = {k: bench.summarize(v, ops_per_trial=a.iters) if v else None for k, v in got.items()}
        ns, boost_ns = row["core"]["median"], row["boost"] and row["boost"]["median"]
        row.update(size=s, core_over_glibc=ns / row["glibc"]["median"])
        rows.append({**row, "core_over_boost": ns / boost_ns if boost_ns else None})
    build = {"core": core_info, "boost": boost_info}
    out = dict(sizes=SIZES, rows=rows, build=build, boost_available=boost is not None)
    scale = run_scale(core, max(1, a.iters // 2), a.rounds * a.per_round) if a.scale else None
    res["pairs"] = {**out, "scale": scale}


def derive(res: dict[str, Any]) -> dict[str, Any]:
    rows, d = res["pairs"]["rows"], {}
    for key in TARGETS:
        if key == "core_over_boost" and not res["pairs"]["boost_available"]:
            skipped = res["pairs"]["build"]["boost"]["skipped"]
            d[key] = {**bench.judge(*TARGETS[key], None), "skipped": skipped}
            continue
        worst = max(rows, key=lambda r: r[key])
        d[key] = {**bench.judge(*TARGETS[key], worst[key]), "aggregate": "worst size (max)"}
        d[key].update(worst_size=worst["size"], by_size={str(r["size"]): r[key] for r in rows})
    return d


def targets_summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, other, label in VERSUS:
        j, rows = res["derived"][key], res["pairs"]["rows"]
        vs = [(r["size"], r["core"]["median"], r[other]["median"]) for r in rows if r[other]]
        vs = [f"{format_bytes(s)} {c:.0f} vs {o:.0f}" for s, c, o in vs]
        note = "skipped: " + j["skipped"] if j["value"] is None else " ns, ".join(vs) + " ns"
        out.append(bench.target_row(f"C core pair / {label}", j, "x", note))
    return out


def report(res: dict[str, Any]) -> None:
    bench.print_header(res)
    p, x2, col = res["pairs"], "{:.2f}x".format, bench.col
    cols = [col("size", "size", format_bytes), col("shmalloc core ns", "core")]
    cols += [col("glibc malloc ns", "glibc"), col("Boost.Interprocess ns", "boost")]
    cols += [col("core/glibc", "core_over_glibc", x2), col("core/boost", "core_over_boost", x2)]
    iters = f"{res['config']['iters']:,} pairs per trial"
    title = f"ns per allocate+free pair, called from C ({iters}; median [min-max])"
    bench.print_columns(title, cols, p["rows"])
    if not p["boost_available"]:
        print(f"\nBoost.Interprocess skipped: {p['build']['boost']['skipped']}")
    sc = p["scale"]
    if sc:
        by = {"shmalloc core, one shared arena": sc["by_method"]["core"]}
        by["glibc malloc, private heaps"] = sc["by_method"]["glibc"]
        each = f"{sc['iters_per_process']:,} core / {sc['malloc_iters_per_process']:,} malloc"
        title = f"{format_bytes(sc['size'])} allocate+free pairs per second summed over forked "
        bench.procs_table(f"{title}processes ({each} pairs each; no target)", sc["procs"], by)
    bench.print_targets(res)


def main(argv: list[str] | None = None) -> int:
    p = bench.Parser(sys.modules[__name__], "fewer pairs and trials (a CI smoke run)")
    p.scaled("--iters", 200_000, 1_000_000, "pairs per trial")
    p.scaled("--rounds", 2, 3, "turns of each program, alternating")
    p.scaled("--per-round", 2, 3, "trials per turn")
    no_scale = "skip the 1/2/4-process part (forked C processes on one arena)"
    p.add_argument("--no-scale", dest="scale", action="store_false", help=no_scale)
    a = p.parse(argv)
    try:
        config = {k: getattr(a, k) for k in ("iters", "rounds", "per_round", "scale")}
        config.update(sizes=SIZES, unit="ns per pair")
        return bench.run_bench(sys.modules[__name__], a, config, functools.partial(run, a))
    except (BuildError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench_c: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
