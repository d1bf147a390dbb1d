"""Long runs, storms, fuzzers and benchmarks, each run as ``python -m stress.<name> [--help]``
from a checkout of the repository: crash_storm, corrupt_fuzz and soak check that an arena holds
up under kills, damage and signals; bench_all runs every bench_* module one after the other and
sums up their targets. The first line of each one's ``--help`` says what it does.

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
