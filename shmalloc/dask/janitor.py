"""The host coordinator of a Dask host arena: ``python -m shmalloc.dask.janitor NAME``.

shmalloc's Coordinator (it reclaims the objects of killed workers, watches pressure, expires
references in transit) in the main thread, and a janitor thread that waits, on the arena's
file lock, until no worker holds the arena, then destroys it; the coordinator notices the
unlinked segment at its next tick and stops. So the host's last worker leaving, by a clean close
or by SIGKILL, leaves nothing in /dev/shm and no process. Importing this does not import Dask.
"""

from __future__ import annotations

import argparse
import sys
import threading

from ..coordinator import Coordinator
from ..lease import EXIT_LEASE_HELD, CoordinatorRunning
from .host import janitor

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmalloc.dask.janitor", description=__doc__)
    parser.add_argument("name", help="the host arena")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between ticks")
    args = parser.parse_args(argv)
    coordinator = Coordinator(args.name, interval=args.interval, log_level="WARNING")
    watcher = threading.Thread(target=janitor, args=(args.name,), name="janitor", daemon=True)
    watcher.start()
    try:
        coordinator.run()
    except CoordinatorRunning as e:
        print(e, file=sys.stderr)
        return EXIT_LEASE_HELD
    except FileNotFoundError:
        return 0  # destroyed before this started: nothing to serve
    return 0


if __name__ == "__main__":
    sys.exit(main())
