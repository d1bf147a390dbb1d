"""``python -m shmalloc.coordinator NAME ...``: the same as ``shmalloc coordinator NAME ...``."""

from __future__ import annotations

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
