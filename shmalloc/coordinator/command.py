"""The coordinator's command line: ``shmalloc coordinator NAME ...`` and
``python -m shmalloc.coordinator NAME ...``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import NotAnArena, ShmallocError
from ..lease import EXIT_LEASE_HELD, CoordinatorRunning
from .service import DEFAULT_INTERVAL, LOG_LEVELS, Coordinator

__all__ = ["EXIT_ERROR", "EXIT_LEASE_HELD", "EXIT_USAGE", "build_parser", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2  # as for every command: it could not run (no such arena, not an arena, permission)

# ---------------------------------------------------------------------------- argument types


def _positive(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return v


def _non_negative(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return v


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, not {text}")
    return v


# ------------------------------------------------------------------------------------ parser


def build_parser(prog: str = "shmalloc coordinator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run the coordinator of an arena in the foreground: reclaim the memory of "
        "dead processes, monitor pressure, export events and metrics. Stops on SIGTERM/SIGINT.",
        epilog=f"Exit status: 0 on a clean stop, {EXIT_LEASE_HELD} if another coordinator holds "
        f"the arena, {EXIT_USAGE} if it could not start (no such arena, not an arena, no "
        f"permission), {EXIT_ERROR} on other errors.",
    )
    p.add_argument("name", help="the arena's name")
    p.add_argument(
        "--interval",
        type=_positive,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"seconds between two ticks (default {DEFAULT_INTERVAL})",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="P",
        help="serve Prometheus metrics on this port (needs shmalloc[metrics])",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="H",
        help="address the metrics server binds (default 127.0.0.1)",
    )
    p.add_argument("--events", metavar="FILE", help="append every event to FILE as JSON lines")
    p.add_argument(
        "--log-level",
        default="INFO",
        metavar="L",
        choices=list(LOG_LEVELS),
        type=str.upper,
        help="DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
    )
    p.add_argument(
        "--trim-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="under HIGH pressure, ask processes owning more than this to trim "
        "(default 0: all that own memory)",
    )
    p.add_argument(
        "--min-interval",
        type=_non_negative,
        default=5.0,
        metavar="S",
        help="seconds between two automatic collections (default 5)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``shmalloc coordinator NAME ...``: returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    try:
        Coordinator(
            args.name,
            interval=args.interval,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            events_path=args.events,
            log_level=args.log_level,
            trim_threshold=args.trim_threshold,
            min_interval=args.min_interval,
        ).run()
    except CoordinatorRunning as e:
        print(f"shmalloc coordinator: error: {e}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except (FileNotFoundError, PermissionError, NotAnArena) as e:
        print(f"shmalloc coordinator: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ShmallocError, OSError, ValueError) as e:
        print(f"shmalloc coordinator: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return 0
