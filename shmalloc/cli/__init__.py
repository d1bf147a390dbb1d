"""The ``shmalloc`` command line: look at arenas, operate them, and show what they do.

    shmalloc list | create | info | top | check | gc | destroy | coordinator | demo | bench

Every command opens arenas through MemoryManager.attach() and only reads unless it is asked to
change something: ``list``, ``info``, ``top`` and ``check`` never claim a slot in the process
table, so looking at an arena does not show up in it.

Exit codes, the same for every command:
  0  done (``check``: the heap is clean)
  1  the arena is unhealthy or the operation failed (``check`` found corruption, the demo saw
     something go wrong)
  2  the command could not run: a bad argument or size string, no such arena, a segment that is
     not a shmalloc arena (or one of another layout version), a permission problem
Errors are one line on stderr, never a traceback (``SHMALLOC_TRACEBACK=1`` adds it, for bugs).

The modules of this package, named after what they hold; the library never imports them:
  entry.py           the entry point: ``main``, the argument parser, error reporting
  arena_access.py    opening an arena for a command; CliError and the exit codes
  snapshot.py        what info and top show
  inspection.py      list, info, check
  top.py             the live view
  operations.py      create, gc, destroy, coordinator, bench
  demo.py            ``shmalloc demo``, the main job: the main process that conducts it
  demo_processes.py  its workers and victim (spawned; they attach by the arena's name)
Sizes as people write and read them (``parse_size``, ``format_bytes``) are the library's
``shmalloc.sizes``.
"""

from __future__ import annotations

from .entry import main

__all__ = ["main"]
