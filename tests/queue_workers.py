"""Children of tests/test_queue.py and test_queue_stdlib.py, in a module of their own so that a
spawned child imports only this, shmalloc and the standard library (not pytest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shmalloc import JoinableQueue, Queue, SimpleQueue

TIMEOUT = 60.0


def producer(q: Queue, first: int, n: int, path: str, progress: Any, after: int) -> None:
    """Put first .. first+n-1, writing each down once its put returned."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    for i in range(first, first + n):
        q.put(i)
        os.write(fd, b"%d\n" % i)
        if i - first + 1 == after:
            progress.set()


def consumer(q: Queue, path: str, progress: Any, after: int) -> None:
    """Get until None, writing each item down once get returned it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    n = 0
    while (x := q.get(timeout=TIMEOUT)) is not None:
        os.write(fd, b"%d\n" % x)
        n += 1
        if n == after:
            progress.set()


def start_workers(
    ctx: Any,
    q: Queue,
    where: Path,
    ranges: list[tuple[int, int]],
    consumers: int,
    progress: list[Any],
    after: int,
) -> tuple[list[Any], list[Any]]:
    """Start a producer per (first, n) of ``ranges`` (writing down to ``where``/pK) and
    ``consumers`` consumers (``where``/cK); worker i sets progress[i] after ``after`` items.
    Returns (producers, consumers)."""
    prods = [
        ctx.Process(target=producer, args=(q, first, n, str(where / f"p{k}"), progress[k], after))
        for k, (first, n) in enumerate(ranges)
    ]
    cons = [
        ctx.Process(
            target=consumer, args=(q, str(where / f"c{k}"), progress[len(ranges) + k], after)
        )
        for k in range(consumers)
    ]
    for p in prods + cons:
        p.start()
    return prods, cons


def put_array(q: Queue, n: int) -> None:
    import numpy as np

    q.put(np.arange(n, dtype=np.int64))


def put_three(q: Queue, done: Any) -> None:
    for i in range(3):
        q.put(i)  # the third waits for room
    done.set()


def join_worker(q: JoinableQueue) -> None:
    for _ in iter(q.get, None):
        q.task_done()
    q.task_done()


def simple_echo(inq: SimpleQueue, outq: SimpleQueue) -> None:
    while (x := inq.get()) is not None:
        outq.put(x * 2)


_pool_queue: Queue | None = None


def pool_init(q: Queue) -> None:
    global _pool_queue
    _pool_queue = q


def pool_task(x: int) -> int:
    assert _pool_queue is not None
    _pool_queue.put(x * x)
    return x
