"""The child processes of ``shmalloc demo``: the workers and the victim. demo.py starts them
with the ``spawn`` method; each attaches to the arena by its name and reports to the main process
over its pipe.

The demo's processes:
  main     creates the arena, binds "demo.config", starts the coordinator and the workers,
           draws the progress, kills the victim, fills the arena, prints the summary, cleans up
  worker i churns private blocks (allocate, write, read back, free), hands a parcel to worker
           i+1 through a pipe every round (i+1 adopts it, verifies it and frees it), retains
           and reads the shared config, and at the end binds "demo.result.i" for main to read
  victim   holds ballast blocks and one named note, then waits to be killed with SIGKILL
  producer puts numbered arrays (bytes if numpy is not installed) into a shmalloc.Queue that
           main created and sent to it pickled, then one None per consumer
  consumer gets items from that queue until None: each array is a read-only view of the
           arena's memory (zero-copy); it checks every element and reports what it got
Workers talk to main over one duplex pipe each: ("progress", rounds, ops, bytes), ("done",
...), ("error", text); main answers "exit" once every worker is done, so that no parcel is
left orphaned by a worker that exited before its neighbour adopted it. The producer and the
consumers answer ("produced", items, bytes) and ("consumed", items, bytes, zero_copy).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from ..manager import MemoryManager
from ..queues import Queue

__all__ = ["CONFIG", "demo_consumer", "demo_producer", "demo_victim", "demo_worker", "has_numpy"]

_CHURN = 6  # private allocate/write/read/free cycles per round
_PARCEL_TIMEOUT = 30.0  # seconds a worker waits for its neighbour's parcel
CONFIG = b"shmalloc demo configuration: every worker reads this named block" * 8


def _fill(tag: int, size: int) -> bytes:
    """A block's expected contents: 8 bytes of tag, then one repeated byte derived from it."""
    return tag.to_bytes(8, "little") + bytes([tag % 251]) * (size - 8)


@contextlib.contextmanager
def _reporting_to(ctl: Connection, mgr: MemoryManager, who: str) -> Iterator[None]:
    """The frame of a demo child's work: a failure is sent to the main process as ("error",
    text), a main process that went away ends the child quietly, and the arena is closed."""
    try:
        yield
    except (EOFError, BrokenPipeError):
        pass  # the main process went away: just leave
    except Exception as e:  # noqa: BLE001 - any failure is reported; the main process decides
        with contextlib.suppress(OSError):
            ctl.send(("error", f"{who}: {type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(BufferError):
            mgr.close()


def demo_worker(
    mgr: MemoryManager,
    index: int,
    rounds: int,
    churn_max: int,
    seed: int,
    to_next: Connection,
    from_prev: Connection,
    ctl: Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    rng = random.Random(seed * 1009 + index)
    pid = os.getpid()
    ops = nbytes = handed = 0
    with _reporting_to(ctl, mgr, f"worker {index} (pid {pid})"):
        config = mgr.lookup("demo.config")
        ops += 1
        for r in range(rounds):
            for _ in range(_CHURN):
                size = rng.randint(64, churn_max)
                tag = (pid << 24) | (r << 4) | rng.randrange(16)
                data = _fill(tag, size)
                a = mgr.allocate(size)
                mgr.write(a, data)
                if mgr.read(a, size) != data:
                    raise AssertionError(f"block {a:#x} read back different bytes")
                mgr.deallocate(a)
                ops += 4
                nbytes += size
            # hand a parcel to the next worker, take one from the previous
            size = rng.randint(256, 16384)
            a = mgr.allocate(size)
            mgr.write(a, _fill(pid + r, size))
            to_next.send((a, size, r))
            ops += 2
            nbytes += size
            if not from_prev.poll(_PARCEL_TIMEOUT):
                raise TimeoutError(f"no parcel from the previous worker for round {r}")
            pa, psize, pr = from_prev.recv()
            mgr.adopt(pa)
            got = mgr.read(pa, psize)
            sender = int.from_bytes(got[:8], "little") - pr
            if got != _fill(sender + pr, psize):
                raise AssertionError(f"parcel {pa:#x} from pid {sender} is damaged")
            mgr.deallocate(pa)
            ops += 3
            handed += 1
            if r % 8 == 0:  # hold a reference on the shared config while reading it
                mgr.retain(config)
                if mgr.read(config, len(CONFIG)) != CONFIG:
                    raise AssertionError("the named block demo.config changed")
                mgr.release(config)
                ops += 3
            if r % 10 == 9 or r == rounds - 1:
                ctl.send(("progress", r + 1, ops, nbytes))
        result = json.dumps({"pid": pid, "ops": ops, "bytes": nbytes, "adopted": handed}).encode()
        a = mgr.allocate(4 + len(result))
        mgr.write(a, len(result).to_bytes(4, "little") + result)
        mgr.bind(f"demo.result.{index}", a)
        ops += 3
        ctl.send(("done", ops, nbytes, handed))
        ctl.recv()  # "exit": every worker is done, no parcel is in flight


def demo_victim(mgr: MemoryManager, ballast: int, ctl: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    chunk = 256 << 10
    held: list[int] = []
    with _reporting_to(ctl, mgr, f"victim (pid {os.getpid()})"):
        while len(held) * chunk < ballast:
            a = mgr.allocate(chunk)
            mgr.write(a, b"\xa5" * chunk)  # touch the pages: this is real memory
            held.append(a)
        note = mgr.allocate(64)
        mgr.write(note, b"written by the victim before it was killed".ljust(64, b"."))
        mgr.bind("demo.victim.note", note)
        ctl.send(("holding", mgr.process_memory(os.getpid()), len(held)))
        ctl.recv()  # never answered: the main process kills this one


def has_numpy() -> bool:
    """numpy is an optional extra: without it the queue carries bytes."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def _item(i: int, nbytes: int) -> Any:
    """The queue's item number i: an array of nbytes whose every element is i (or bytes)."""
    if not has_numpy():
        return bytes([i % 256]) * nbytes
    import numpy as np

    return np.full(nbytes // 8, float(i))


def demo_producer(
    mgr: MemoryManager, queue: bytes, items: int, nbytes: int, consumers: int, ctl: Connection
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with _reporting_to(ctl, mgr, f"producer (pid {os.getpid()})"):
        q: Queue = pickle.loads(queue)  # a pickled Queue is a reference to the same queue
        ctl.recv()  # "go": the workers are done
        for i in range(items):
            q.put((i, _item(i, nbytes)))  # waits while the queue holds its maxsize
        for _ in range(consumers):
            q.put(None)
        ctl.send(("produced", items, items * nbytes))
        del q  # before the arena is closed


def demo_consumer(mgr: MemoryManager, queue: bytes, ctl: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    got = nbytes = 0
    zero_copy = True
    with _reporting_to(ctl, mgr, f"consumer (pid {os.getpid()})"):
        q: Queue = pickle.loads(queue)
        ctl.recv()  # "go"
        while (item := q.get(timeout=_PARCEL_TIMEOUT)) is not None:
            i, data = item
            if has_numpy():
                zero_copy &= not data.flags.writeable  # a view of the arena, not a copy
                ok, size = bool((data == i).all()), data.nbytes
            else:
                zero_copy, ok, size = False, data == _item(i, len(data)), len(data)
            if not ok:
                raise AssertionError(f"queue item {i} arrived damaged")
            got += 1
            nbytes += size
            del item, data  # the arena frees an item once no process holds it
        ctl.send(("consumed", got, nbytes, zero_copy))
        del q
