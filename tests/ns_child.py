"""A worker for tests/test_namespaces.py, run in a PID namespace of its own (``unshare -p -f
--mount-proc``): it attaches to the arena named on its command line, allocates a small block (its
cache) and a large one (the heap), fills them, says ``ready SMALL BIG PID SLOT`` and then answers
``check`` (are both blocks still its bytes?) line by line, blocked on its stdin in between."""

from __future__ import annotations

import os
import sys

from shmalloc import MemoryManager
from shmalloc.manager import attachment_of

SMALL, BIG = 100, 200_000


def main() -> None:
    m = MemoryManager.attach(sys.argv[1])
    small = m.allocate(SMALL)
    m.write(small, b"s" * SMALL)
    big = m.allocate(BIG)
    m.write(big, b"B" * BIG)
    print(f"ready {small} {big} {os.getpid()} {attachment_of(m).slot}", flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            ok = m.read(small, SMALL) == b"s" * SMALL and m.read(big, BIG) == b"B" * BIG
            print("ok" if ok else "bad", flush=True)


if __name__ == "__main__":
    main()
