"""How a value crosses between two workers of one host: its reference, not its bytes.

The hook is the worker's ``get_data`` handler (the one Dask peers call to fetch data). The plugin
wraps it: the wrapper decides whether the requesting worker (``who``) shares this worker's host
arena (it is registered in it, see ``register``), and hands the original handler a comm whose
``write`` replaces, in the reply, every value worth sharing by a :class:`Shared` marker (the
store moves the value into the arena then, if it is not there yet: ``ArenaStore.share``). The
marker pickles as its ObjectRef (about 150 bytes, with a transit ticket that keeps the object
alive until the receiver unpickles it, even if the sender dies); unpickled, it becomes the value
itself, a zero-copy view over the arena, which the receiver's store adopts without a copy.
Everything else about the transfer (throttling, counters, the acknowledgement) is Dask's own
code. A peer on another host gets the reply untouched: bytes.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import process
from ..errors import ObjectNotFound
from ..manager import MemoryManager
from ..objects import ObjectRef
from ..objects import attachment as _attachment
from ..objects import get as _get
from .store import ArenaStore, note_arrived

__all__ = ["Shared", "TransferStats", "is_registered", "register", "unregister", "wrap_get_data"]


def _registry_name(address: str) -> str:
    return "dask-worker:" + hashlib.sha256(address.encode()).hexdigest()[:32]


def register(mgr: MemoryManager, address: str) -> None:
    """Record in the host arena that the worker at ``address`` is this process."""
    name = _registry_name(address)
    try:
        mgr.delete(name)  # a stale record of a dead worker that had the same address
    except ObjectNotFound:
        pass
    mgr.put(process.self_identity(), name=name)


def unregister(mgr: MemoryManager, address: str) -> None:
    try:
        mgr.delete(_registry_name(address))
    except ObjectNotFound:
        pass


def is_registered(mgr: MemoryManager, address: str | None) -> bool:
    """Is the worker at ``address`` a live process attached to this host arena?"""
    if not address:
        return False
    try:
        pid, start = mgr.get(_registry_name(address), timeout=0)
    except ObjectNotFound:
        return False
    return process.is_alive(pid, start)


def _arrive(ref: ObjectRef) -> Any:
    """Unpickle a Shared marker: the value, zero-copy, noted for the receiver's store."""
    value = _get(_attachment(ref.arena), ref)
    note_arrived(value, ref)
    return value


class Shared:
    """A value of the host arena on its way to another worker of the host."""

    __slots__ = ("ref",)

    def __init__(self, ref: ObjectRef) -> None:
        self.ref = ref

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrive, (self.ref,))


@dataclass
class TransferStats:
    """What this worker's get_data sent: replies, values as references or as bytes, and the bytes
    its comm wrote, split by whether the peer shared the host."""

    refs_sent: int = 0
    values_sent: int = 0
    bytes_same_host: int = 0
    bytes_other_host: int = 0
    replies: dict[str, int] = field(default_factory=lambda: {"same": 0, "other": 0})


class _ReplyComm:
    """The comm get_data replies on, with the reply's arena values swapped for references."""

    def __init__(self, comm: Any, store: ArenaStore | None, stats: TransferStats) -> None:
        self._comm, self._store, self._stats = comm, store, stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)

    async def write(self, msg: Any, *args: Any, **kwargs: Any) -> int:
        data = msg.get("data") if isinstance(msg, dict) else None
        if isinstance(data, dict):
            from distributed.protocol.serialize import Serialize

            for key, wrapped in list(data.items()):
                ref = None
                if self._store is not None:
                    ref = self._store.share(key, getattr(wrapped, "data", wrapped))
                if ref is not None:
                    data[key] = Serialize(Shared(ref))  # type: ignore[no-untyped-call]
                    self._stats.refs_sent += 1
                else:
                    self._stats.values_sent += 1
        n = int(await self._comm.write(msg, *args, **kwargs))
        if isinstance(data, dict):
            self._stats.bytes_same_host += n if self._store is not None else 0
            self._stats.bytes_other_host += n if self._store is None else 0
        return n


def wrap_get_data(
    original: Callable[..., Any],
    same_host: Callable[[str | None], bool],
    store: Callable[[], ArenaStore | None],
    stats: TransferStats,
) -> Callable[..., Any]:
    """A get_data handler that replies with references to a peer of the same host."""

    async def get_data(
        comm: Any, keys: Any, who: str | None = None, serializers: list[str] | None = None
    ) -> Any:
        same = same_host(who)
        stats.replies["same" if same else "other"] += 1
        reply = _ReplyComm(comm, store() if same else None, stats)
        return await original(reply, keys=keys, who=who, serializers=serializers)

    get_data.__wrapped__ = original  # type: ignore[attr-defined]
    return get_data


def reference_size(ref: ObjectRef) -> int:
    """The size of a pickled reference (what a same-host transfer carries per value)."""
    return len(pickle.dumps(Shared(ref), protocol=5))
