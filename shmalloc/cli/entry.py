"""The entry point of the ``shmalloc`` command line: ``main``, the argument parser and the
one-line error reporting. The commands live in the other modules of this package (see its
``__init__``), and none of them imports this one."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..errors import ShmallocError
from ..sizes import parse_size
from .arena_access import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from .demo import cmd_demo
from .inspection import cmd_check, cmd_info, cmd_list
from .operations import bench_delegated, cmd_bench, cmd_coordinator, cmd_create, cmd_destroy, cmd_gc
from .top import cmd_top

__all__ = ["main"]

# ---------------------------------------------------------------------------- argument types


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


# ------------------------------------------------------------------------------------ parser


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="shmalloc",
        description="Inspect and operate shmalloc shared-memory arenas.",
        epilog="exit codes: 0 done; 1 the arena is unhealthy or the operation failed; "
        "2 the command could not run (bad arguments, no such arena, not an arena, permission)",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"shmalloc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, help: str, func: Callable[[argparse.Namespace], int], *, arena: bool = False
    ) -> argparse.ArgumentParser:
        """A subcommand; ``arena``: it takes the arena's name as its one positional argument."""
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        if arena:
            sp.add_argument("name")
        return sp

    def add_json(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON")

    def add_capacity(sp: argparse.ArgumentParser, default: int, help: str) -> None:
        sp.add_argument("--capacity", type=_size_arg, default=default, metavar="SIZE", help=help)

    add_json(add("list", "list the shmalloc arenas in /dev/shm", cmd_list))

    sp = add("create", "create a named arena", cmd_create)
    sp.add_argument("name", help="the arena's name (what processes attach by)")
    add_capacity(sp, 64 << 20, "size such as 64M, 1G, 512KiB or a number of bytes (default 64M)")
    sp.add_argument("--mode", default="0600", help="permission bits, octal (default 0600)")

    add_json(
        add("info", "show an arena's statistics, pressure and processes", cmd_info, arena=True)
    )

    sp = add("top", "live per-process view of an arena (q quits)", cmd_top, arena=True)
    sp.add_argument(
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    sp.add_argument(
        "--iterations",
        type=_positive_int,
        metavar="N",
        help="stop after N refreshes (default: until q or Ctrl-C)",
    )

    add_json(add("check", "walk the heap and verify every invariant", cmd_check, arena=True))

    sp = add("gc", "run the global garbage collector once", cmd_gc, arena=True)
    sp.add_argument(
        "--strategy",
        default="global",
        metavar="STRATEGY",
        help="global (every dead process, the default), unreferenced (orphaned blocks "
        "without a live reference), threshold=SIZE (dead processes holding more than "
        "SIZE), targeted=PID (all of one process's blocks, alive or not)",
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="with targeted=PID, free the blocks of a process that is still alive",
    )
    add_json(sp)

    add(
        "destroy",
        "unlink an arena (open mappings keep working until closed)",
        cmd_destroy,
        arena=True,
    )

    sub.add_parser(
        "coordinator",
        add_help=False,
        help="run the arena's coordinator in the foreground (see: shmalloc coordinator --help)",
    )

    sp = add(
        "demo",
        "the main job: workers share an arena, one is killed, the coordinator "
        "reclaims its memory, the pressure monitor reacts",
        cmd_demo,
    )
    sp.add_argument("--workers", type=_positive_int, default=4, help="worker processes (default 4)")
    sp.add_argument(
        "--rounds", type=_positive_int, default=8000, help="rounds per worker (default 8000)"
    )
    add_capacity(sp, 64 << 20, "arena size (default 64M)")
    sp.add_argument("--seed", type=int, default=1, help="random seed (default 1)")

    sp = add("bench", "allocation benchmark", cmd_bench)
    sp.description = (
        "Runs `python -m stress.bench_alloc` (the full benchmark) when the stress package is in "
        "the repository checkout, passing it every argument (try `shmalloc bench --quick`; "
        "its options: `python -m stress.bench_alloc --help`); otherwise, or with --builtin, a "
        "small built-in benchmark of allocate+deallocate pairs with the options below."
    )
    sp.add_argument("--builtin", action="store_true", help="run the built-in benchmark")
    sp.add_argument("--ops", type=_positive_int, default=20000, help="built-in: pairs per trial")
    add_capacity(sp, 256 << 20, "built-in: arena size (default 256M)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] == "coordinator":
            return cmd_coordinator(args_list[1:])
        parser = build_parser()
        if args_list and args_list[0] == "bench":
            rc = bench_delegated(args_list[1:])
            if rc is not None:
                return rc
        args = parser.parse_args(args_list)
        return int(args.func(args))
    except CliError as e:
        _error(args_list, str(e))
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (shmalloc top | head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if os.environ.get("SHMALLOC_TRACEBACK"):
            raise
        _error(
            args_list,
            f"{type(e).__name__}: {e}" if not isinstance(e, (ShmallocError, OSError)) else str(e),
        )
        return EXIT_FAILED


def _error(argv: list[str], message: str) -> None:
    cmd = next((a for a in argv if not a.startswith("-")), "")
    print(f"shmalloc{' ' + cmd if cmd else ''}: error: {message}", file=sys.stderr)
