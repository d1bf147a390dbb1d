"""``python -m shmalloc``: the same command line as the ``shmalloc`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":  # a spawned child imports this module as __mp_main__: do nothing there
    sys.exit(main())
