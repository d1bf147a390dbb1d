"""ShmallocPlugin: the WorkerPlugin that puts a Dask worker's data in its host's arena.

    client.register_plugin(shmalloc.dask.ShmallocPlugin(capacity=8 << 30))

On each worker (and on every worker that joins or restarts later: the scheduler keeps the
plugin), ``setup``:
1. joins the host arena (host.py), creating it and its coordinator if this is the first worker
   of the cluster on this host, and records the worker's address in it (serialize.register);
2. makes an ArenaStore (store.py) the worker's in-memory data (large values move into the arena
   when stored, smaller ones when a worker of the host first asks for one): the fast part of its
   SpillBuffer (values spilled to disk leave the arena), or the whole of it when it does not
   spill;
3. wraps the ``get_data`` handler so that a peer of the same host gets references
   (serialize.py);
4. makes numpy allocate the arrays of ``numpy_size`` bytes or more that tasks make in the arena
   (shmalloc.npalloc's handler, made numpy's in the asyncio task of each ``Worker.execute``, whose
   context Dask copies into the executor thread that runs the task), so that the store lends them
   to the arena without a copy;
5. makes the worker's measure of its process memory count the arena once per host: its resident
   memory less the shared pages it has mapped (every worker that touched an arena page has it in
   its RSS), plus the bytes of the objects it put in the arena.
``teardown`` (the worker closing) drops the worker's values and leaves the arena, destroying it
if this was the host's last worker.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Hashable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..npalloc import ArenaAllocator
from .host import HostArena, arena_name, host_identity
from .serialize import TransferStats, is_registered, register, unregister, wrap_get_data
from .store import ArenaStore

__all__ = ["DEFAULT_CAPACITY", "ShmallocPlugin", "private_memory"]

logger = logging.getLogger("shmalloc.dask")

DEFAULT_CAPACITY = 1 << 40  # reserved lazily: /dev/shm's own size is the real limit


def private_memory(pid: int | None = None) -> int:
    """Resident bytes of the process that are not shared memory (RssAnon + RssFile)."""
    path = f"/proc/{'self' if pid is None else pid}/status"
    anon = file = 0
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(b"RssFile:"):
                file = int(line.split()[1]) * 1024
    return anon + file


def _fetched(state: Any, key: Hashable) -> bool:
    """Is the value the worker is storing under ``key`` one it fetched from a peer? (Dask stores
    a fetched value while the task is in flight, or resumed from flight; a computed one while it
    is executing, or resumed from executing.)"""
    ts = state.tasks.get(key)
    if ts is None:
        return False
    return bool(ts.state == "flight" or (ts.state == "resumed" and ts.previous == "flight"))


class ShmallocPlugin(WorkerPlugin):
    """Keep the data of every worker of a host in one shmalloc arena shared by them.

    ``capacity``: the arena's size (reserved lazily; default 1 TiB, so /dev/shm is the limit).
    ``min_size``: values smaller than this stay in the worker's own memory.
    ``account_memory``: make Dask's memory monitor count the arena once per host (see above).
    ``eager_size``: values of at least this many bytes that the worker computes go into the arena
    when they are stored, so that every transfer of them is a reference; smaller ones (from
    ``min_size``), and those fetched from a worker of another host, when a worker of the same
    host first asks for them, so that those nobody asks for cost no copy.
    ``0``: every value at store time; ``math.inf``: every value on demand.
    ``numpy_size``: numpy arrays of at least this many bytes that tasks make are allocated in the
    arena and go in when stored, without a copy, whatever ``eager_size`` says (``math.inf``: none;
    without numpy: none).
    """

    name = "shmalloc"
    idempotent = False

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        min_size: int = 64 * 1024,
        account_memory: bool = True,
        eager_size: float = 1 << 20,
        numpy_size: float = 1 << 20,
    ) -> None:
        self.eager_size = eager_size
        self.numpy_size = numpy_size
        self.allocator: ArenaAllocator | None = None
        self.capacity = capacity
        self.min_size = min_size
        self.account_memory = account_memory
        self.member: HostArena | None = None
        self.store: ArenaStore | None = None
        self.stats = TransferStats()
        self.host = ""
        self._restore: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "min_size": self.min_size,
            "account_memory": self.account_memory,
            "eager_size": self.eager_size,
            "numpy_size": self.numpy_size,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # ------------------------------------------------------------ setup

    def setup(self, worker: Any) -> None:
        self.host = host_identity()
        name = arena_name(worker.scheduler.address, self.host)
        self.member = member = HostArena.join(name, self.capacity)
        register(member.mgr, worker.address)
        self.allocator = self._install_allocator(worker, member)
        self.store = store = ArenaStore(
            member.mgr,
            min_size=self.min_size,
            eager_size=self.eager_size,
            fetched=lambda key: _fetched(worker.state, key),
            allocator=self.allocator,
        )
        self._install_store(worker, store)
        original = worker.handlers["get_data"]
        worker.handlers["get_data"] = wrap_get_data(
            original, lambda who: is_registered(member.mgr, who), lambda: self.store, self.stats
        )
        self._restore.append(lambda: worker.handlers.__setitem__("get_data", original))
        if self.account_memory:
            monitor = worker.monitor
            before = monitor.get_process_memory
            monitor.get_process_memory = lambda: private_memory() + store.owned_bytes
            self._restore.append(lambda: setattr(monitor, "get_process_memory", before))
        logger.info(
            "worker %s keeps its data in arena %s (host %s)", worker.address, name, self.host
        )

    def _install_allocator(self, worker: Any, member: HostArena) -> ArenaAllocator | None:
        """numpy's handler over the arena while the worker's tasks run (see the module's
        docstring, step 4), or None when ``numpy_size`` is inf or numpy is missing."""
        if math.isinf(self.numpy_size):
            return None
        try:
            allocator = ArenaAllocator(member.mgr, max(int(self.numpy_size), 1))
        except ImportError:
            return None
        original = worker.execute

        async def execute(key: Any, *, stimulus_id: str) -> Any:
            previous = allocator.install()  # in this asyncio task's context, which Dask copies
            try:
                return await original(key, stimulus_id=stimulus_id)
            finally:
                allocator.restore(previous)

        worker.execute = execute
        self._restore.append(lambda: vars(worker).pop("execute", None))
        return allocator

    def _install_store(self, worker: Any, store: ArenaStore) -> None:
        data = worker.memory_manager.data
        lru = getattr(getattr(data, "fast", None), "d", None)
        if lru is not None and hasattr(data.fast, "weight"):  # a SpillBuffer: replace its fast dict
            fast = data.fast
            old, weight = fast.d, fast.weight
            for key, value in list(old.items()):
                store[key] = value
            old.clear()
            fast.d, fast.weight = store, store.weight

            def restore() -> None:
                fast.d, fast.weight = old, weight
                old.update(store)

            self._restore.append(restore)
        elif type(data) is dict:
            store.update(data)
            worker.memory_manager.data = worker.state.data = store
            self._restore.append(lambda: None)
        else:
            raise TypeError(
                f"ShmallocPlugin cannot put this worker's data in the arena: its data is a "
                f"{type(data).__name__}, not Dask's SpillBuffer or a dict; leave the worker's "
                "`data=` argument unset"
            )

    # ------------------------------------------------------------ teardown

    def teardown(self, worker: Any) -> None:
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()
        if self.store is not None:
            self.store.clear()
            self.store = None
        if self.allocator is not None:
            self.allocator.close()  # its handler goes with the last array it made
            self.allocator = None
        member, self.member = self.member, None
        if member is None:
            return
        unregister(member.mgr, worker.address)
        gc.collect()  # views over the arena held only by reference cycles
        member.leave()

    # ------------------------------------------------------------ reporting

    def report(self) -> dict[str, Any]:
        """This worker's view: its arena, host, what it holds there, what its get_data sent."""
        store = self.store
        return {
            "arena": None if self.member is None else self.member.name,
            "host": self.host,
            "values": 0 if store is None else len(store),
            "in_arena": 0 if store is None else store.in_arena(),
            "owned_bytes": 0 if store is None else store.owned_bytes,
            "lent": 0 if store is None else store.lent,
            "bytes_copied": 0 if store is None else store.bytes_copied,
            "numpy_arena_allocs": 0
            if self.allocator is None
            else self.allocator.stats().arena_allocs,
            "refs_sent": self.stats.refs_sent,
            "values_sent": self.stats.values_sent,
            "bytes_same_host": self.stats.bytes_same_host,
            "bytes_other_host": self.stats.bytes_other_host,
        }
