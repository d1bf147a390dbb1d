"""Long runs, storms, fuzzers and benchmarks, each run as ``python -m stress.<name> [--help]``
from a checkout of the repository.

    crash_storm          workers churn one arena while others SIGKILL them; check after each kill
    corrupt_fuzz         damage scratch arenas on purpose, then use them from a child process
    soak                 threads, forks, signals and kill -9 mixed on one arena for minutes
    bench_all            every benchmark below, one after the other, and a summary of targets
    bench_alloc          allocate+free pair: public API, C core, cffi malloc, stdlib segments
    bench_scaling        pair cost against live blocks; a loop's throughput against processes
    bench_workloads      larson, xmalloc-test, mstress, cache-scratch with 1, 2, 4 processes
    bench_fragmentation  peak footprint over peak live bytes on allocation traces
    bench_objects        objects between processes beside mp.Queue, LMDB, Ray, SharedMemory
    bench_coordinator    reclaim latency after kill -9, idle CPU of the coordinator
    bench_c              the C core called from C, beside glibc malloc and Boost.Interprocess

stress/ is not installed, so these run from the checkout, which ``python -m`` puts first on
``sys.path``. With a normal (non-editable) install the checkout's ``shmalloc/`` is source only,
without the compiled core: so when it has no compiled module, importing this package moves the
checkout's entries to the END of ``sys.path``. ``shmalloc`` then resolves to the installed
package, ``stress`` still to the checkout; spawned workers inherit the order.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def _use_installed_shmalloc() -> None:
    source = CHECKOUT / "shmalloc"
    if "shmalloc" in sys.modules or not source.is_dir():
        return
    if any((source / f"_native{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
        return  # an editable install (or a build in place): the checkout is the package

    def is_checkout(entry: str) -> bool:
        return Path(entry or os.getcwd()).resolve() == CHECKOUT

    ours = [p for p in sys.path if is_checkout(p)]
    sys.path[:] = [p for p in sys.path if not is_checkout(p)] + ours


_use_installed_shmalloc()
