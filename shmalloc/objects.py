"""Python objects in the arena: put, get, delete, arrays made in place, and ObjectRef.

    ref = mgr.put({"x": np.arange(10**6), "meta": "run 3"})   # pickle 5, one block per buffer
    queue.put(ref)                                             # ~150 bytes, whatever the size
    value = mgr.get(ref)                                       # elsewhere: zero-copy, read-only

An object is a header block (the pickle stream) and one sealed block per out-of-band buffer of
1 KiB or more (numpy arrays' data, bytearrays): the C core (native/objects.c) keeps them and
counts who holds them. The lifetime rule, enforced in the segment, not here:

- a process holds an object once (one bit in its header) while it has any ObjectRef to it or any
  value that shares its memory; this module counts those per process and drops the bit when the
  last one goes (a finalizer on the ObjectRef, a cffi destructor on the buffer that every view
  returned by get() is made from), or at exit, or by collection if the process dies;
- a pickled ObjectRef takes a transit ticket, an anonymous hold that the first process to
  unpickle it takes over, or that expires after the arena's transit timeout;
- a name keeps it until delete().
The call that drops the last hold frees the object at once.

Waiting for a name: get(name, timeout) reads the arena's bind sequence word with its lookup and
sleeps on it (a futex, native/wait.c) until a bind bumps it, then looks again. Each sleep is
capped at RECHECK seconds, which only matters if a binder is killed between its bind and its
wake-up call: the waiter then finds the name at its next look instead of never.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _binding as C
from . import encoding
from .access import mapped
from .attachment import Attachment, check_int
from .attachment import _open as _open_attachments
from .encoding import INLINE_BELOW
from .errors import InvalidAddress, ObjectNotFound
from .ownership import encode_block_name
from .tracking import slot_for

__all__ = [
    "INLINE_BELOW",
    "RECHECK",
    "ObjectRef",
    "delete",
    "empty",
    "get",
    "get_async",
    "hold",
    "own",
    "reference",
    "data_address",
    "object_stats",
    "open_array",
    "put",
    "set_transit_timeout",
    "zeros",
]

RECHECK = 1.0  # longest sleep of a get(name) between two looks (see the module's docstring)

# ------------------------------------------------------------------ this process's holds

Key = tuple[str, int, int]  # (arena name, header address, object id)


@dataclass
class _Hold:
    """What this process holds on one object: ``count`` ObjectRefs and values alive here (the C
    bit is set while count > 0), ``pins`` of them values, through ``att``."""

    att: Attachment
    count: int = 0
    pins: int = 0


_lock = threading.RLock()
_holds: dict[Key, _Hold] = {}
_pid = os.getpid()  # the process _holds belongs to (a fork child adopts them: _adopt_after_fork)
_me = _pid  # os.getpid(), kept by the fork hook below: a system call less on every hand-off
_depth = 0  # > 0 while this module's code runs under _lock (finalizers then defer their drop)
_deferred: list[tuple[Key, bool]] = []
_attached: dict[str, Attachment] = {}  # arenas this module attached to (unpickled references)


def _after_fork_in_child() -> None:
    global _lock, _depth, _me
    _me = os.getpid()
    _lock = threading.RLock()
    _depth = 0
    _deferred.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Critical:
    """``with _critical():`` holds the module's lock; drops that finalizers ask for meanwhile run
    when it ends. A class, not a generator: it is on every hand-off's path."""

    def __call__(self) -> _Critical:
        return self

    def __enter__(self) -> None:
        global _depth
        _lock.acquire()
        try:
            if _pid != _me:
                _adopt_after_fork()
        except BaseException:
            _lock.release()
            raise
        _depth += 1

    def __exit__(self, *exc: object) -> None:
        global _depth
        try:
            _depth -= 1
            while not _depth and _deferred:
                _drop(*_deferred.pop())
        finally:
            _lock.release()


_critical = _Critical()


def _adopt_after_fork() -> None:
    """In a fork child, hold (for this process's slot) what the parent held when it forked: the
    values and references it inherited still point into those objects."""
    global _pid
    if _pid == _me:
        return
    _pid = _me
    for key, hold in list(_holds.items()):
        try:
            if hold.att.closed:
                raise ObjectNotFound(key[1], "its arena is closed")
            C.object_open(hold.att.handle(), slot_for(hold.att, None), key[1], key[2])
        except (ObjectNotFound, ValueError):
            del _holds[key]  # gone already: the inherited values are not ours to keep


def after_fork_adopted() -> None:
    """Before a call made outside the module's lock: in a fork child, first hold what the
    parent held (see _adopt_after_fork)."""
    if _pid != _me:
        with _critical:
            pass


def _count(att: Attachment, key: Key, pin: bool) -> None:
    """One more holder of ``key`` here (under _lock; the caller sets the C bit)."""
    hold = _holds.get(key)
    if hold is None:
        hold = _holds[key] = _Hold(att)
    hold.count += 1
    hold.pins += pin


def _drop(key: Key, pin: bool) -> None:
    """One holder of ``key`` fewer here; the last one drops the C bit (which may free it)."""
    hold = _holds.get(key)
    if hold is None:
        return
    hold.count -= 1
    hold.pins -= pin
    if hold.count > 0:
        return
    del _holds[key]
    att = hold.att
    if not att.closed and att.slot >= 0:
        C.object_release(att.handle(), att.slot, key[1], key[2])


def _finalize(key: Key, pin: bool, pid: int) -> None:
    """A holder died (an ObjectRef, or the buffer under a value): drop it, or defer the drop to
    the end of the critical section this thread is in."""
    if pid != _me:
        return  # inherited through fork: the child counted it afresh
    with _lock:
        if _depth:
            _deferred.append((key, pin))
        else:
            _drop(key, pin)


_exit_state = {"exiting": False}  # set by _release_all: ObjectRef.__del__ has nothing to do then


@atexit.register
def _release_all() -> None:
    """At a normal exit, drop every hold at once (collection would, later)."""
    _exit_state["exiting"] = True
    if _pid != os.getpid():
        return
    with _lock:
        for key, hold in list(_holds.items()):
            del _holds[key]
            if not hold.att.closed and hold.att.slot >= 0:
                try:
                    C.object_release(hold.att.handle(), hold.att.slot, key[1], key[2])
                except Exception:  # noqa: BLE001 -- at exit, with a damaged arena: collection cleans
                    continue


# ------------------------------------------------------------------ references


class ObjectRef:
    """A reference to an object in an arena: small, hashable, picklable.

    While it lives, the object lives. Pickling it (for a queue, a pipe, a Pool task) takes a
    transit ticket that keeps the object alive until another process unpickles it, even if this
    one exits, for up to the arena's transit timeout."""

    __slots__ = ("__weakref__", "_att", "_pid", "address", "arena", "id", "name", "nbytes")

    arena: str
    address: int
    id: int
    nbytes: int
    name: str | None

    def __init__(
        self, att: Attachment | None, address: int, oid: int, nbytes: int, name: str | None
    ) -> None:
        self._att = att
        self._pid = 0  # the pid that counted it as a holder (_held_ref); 0: not counted
        self.arena = att.name if att is not None else ""
        self.address, self.id, self.nbytes, self.name = address, oid, nbytes, name

    def __del__(
        self, _exit: dict[str, bool] = _exit_state, _fin: Callable[..., None] = _finalize
    ) -> None:
        # cheaper than weakref.finalize (no registry); after _release_all (at exit) there is
        # nothing left to drop, and the module's globals may be going
        if self._pid and not _exit["exiting"]:
            _fin((self.arena, self.address, self.id), False, self._pid)

    @property
    def key(self) -> Key:
        return (self.arena, self.address, self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        named = f" name={self.name!r}" if self.name else ""
        return f"<ObjectRef {self.arena}:{self.address:#x}#{self.id} {self.nbytes} bytes{named}>"

    def __reduce__(self) -> tuple[Any, ...]:
        ticket = tid = 0
        att = self._att
        if att is not None and not att.closed:
            try:
                ticket, tid = C.ticket_issue(att.handle(), self.address, self.id)
            except ObjectNotFound:
                pass  # a reference to a gone object pickles as one
        return (_rebuild, (self.arena, self.address, self.id, self.nbytes, self.name, ticket, tid))


def _held_ref(att: Attachment, address: int, oid: int, nbytes: int, name: str | None) -> ObjectRef:
    """A new ObjectRef counted as a holder (under _critical, with the C bit set)."""
    ref = ObjectRef(att, address, oid, nbytes, name)
    _count(att, (att.name, address, oid), False)
    ref._pid = _pid
    return ref


def attachment(arena: str) -> Attachment:
    """An open attachment of this process to ``arena``, attached now if there is none."""
    for att in list(_open_attachments):
        if att.name == arena and not att.closed:
            return att
    kept = _attached.get(arena)
    if kept is None or kept.closed:
        kept = _attached[arena] = Attachment.open(arena)
    return kept


def _rebuild(
    arena: str, address: int, oid: int, nbytes: int, name: str | None, ticket: int, tid: int
) -> ObjectRef:
    """Unpickle an ObjectRef: this process takes the transit ticket (or, if someone took it
    already, a plain reference while the object lives). A gone object gives a dead reference,
    on which get() raises ObjectNotFound."""
    att = attachment(arena)
    with _critical():
        try:
            C.ticket_claim(att.handle(), slot_for(att, None), ticket, tid, address, oid)
        except ObjectNotFound:
            dead = ObjectRef(att, address, oid, nbytes, name)
            return dead
        return _held_ref(att, address, oid, nbytes, name)


# ------------------------------------------------------------------ put


def _slot(a: Attachment) -> int:
    slot = a.slot
    return slot if slot >= 0 else slot_for(a, None)


def _handle(a: Attachment) -> C.Handle:
    h = a.h
    return h if h is not None else a.handle()  # (handle() raises: closed)


def _store(
    a: Attachment,
    data: bytes,
    sizes: list[int],
    bufs: list[memoryview] | None,
    name: str | None,
    writable: bool,
) -> tuple[ObjectRef, list[int]]:
    """Write a pickle stream and its buffers (``sizes`` bytes each; none written if ``bufs`` is
    None) into a new object, published and held by a new ObjectRef, in one C call; with
    ``name``, bind it. Returns the reference and the buffers' addresses."""
    raw_name = encode_block_name(name) if name is not None else None
    h = _handle(a)
    if _pid != _me:
        after_fork_adopted()  # (the copy runs outside the module's lock)
    slot = a.slot
    if slot < 0:
        slot = slot_for(a, None)
    address, oid, addresses = C.object_put(h, slot, data, sizes, bufs, writable)
    with _critical:
        ref = _held_ref(a, address, oid, len(data) + sum(sizes), name)
    if raw_name is not None:
        try:
            C.name_bind(h, raw_name, address)
        except FileExistsError:
            raise FileExistsError(
                f"the name {name!r} is already bound; delete() it first or pick another"
            ) from None
    return ref, addresses


def put(a: Attachment, obj: Any, name: str | None = None) -> ObjectRef:
    """Store ``obj`` (see encoding: pickle protocol 5, or a plain array's header; buffers of 1 KiB
    or more in sealed blocks of their own)
    and return a reference to it; with ``name``, also bind it."""
    data, bufs = encoding.encode(obj)
    return _store(a, data, [b.nbytes for b in bufs] if bufs else [], bufs, name, False)[0]


# ------------------------------------------------------------------ get


def _pinned(a: Attachment, key: Key, spans: list[tuple[int, int]], writable: bool) -> list[Any]:
    """Views of the given (address, nbytes) spans of the mapping, all made from one cffi buffer
    whose destructor drops this process's hold on ``key`` when the last view dies. The buffer
    also keeps the mapping exported, so close() refuses to unmap under it."""
    if len(spans) == 1:  # the common case (an array): the view is the whole buffer
        lo, n = spans[0]
        hi = lo + n
    else:
        lo = min(s for s, _ in spans)
        hi = max(s + n for s, n in spans)
    pin = C.pin_buffer(mapped(a, lo, hi), functools.partial(_finalize, key, True, _me))
    whole = memoryview(pin)
    if not writable:
        whole = whole.toreadonly()
    if len(spans) == 1:
        return [whole]
    return [whole[s - lo : s - lo + n] for s, n in spans]


def _load(a: Attachment, view: C.ObjectView, writable: bool = False) -> Any:
    """The value of an open object (this process counted once more as its holder, for the
    value's pin; dropped here if the value shares no memory with the arena)."""
    key = (a.name, view.address, view.id)
    stream = mapped(a, view.pickle, view.pickle + view.pickle_len)
    try:
        if not view.buffers:
            return encoding.decode(stream)
        return encoding.decode(stream, _pinned(a, key, list(view.buffers), writable))
    finally:
        stream.release()
        if not view.buffers:
            _finalize(key, True, _me)


def _open(a: Attachment, address: int, oid: int, name: bytes | None) -> tuple[Any, bool]:
    """get()'s step under the module's lock: (the view, pinned for _load) or, for an object
    whose stream C copied out (no buffers: the value will share no memory with the arena), (its
    stream, False), this process's hold left as it was. For a name not bound: (its bind
    sequence word, False)."""
    with _critical:
        view, stream, seq = C.object_get(_handle(a), _slot(a), address, oid, name, True)
        if stream is not None:
            return stream, False
        if view is None:
            return seq, False
        _count(a, (a.name, view.address, view.id), True)  # C set this process's bit: the pin
        return view, True


def _open_name(a: Attachment, name: str, timeout: float | None) -> tuple[Any, bool]:
    raw = encode_block_name(name)
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    word = C.bind_seq_offset()
    while True:
        got, pinned = _open(a, 0, 0, raw)
        if got.__class__ is not int:
            return got, pinned
        left = RECHECK if deadline is None else deadline - time.monotonic()
        if left <= 0:
            waited = "" if not timeout else f" within {timeout} s"
            raise ObjectNotFound(name, f"no object was bound to this name{waited}")
        C.wait(a.handle(), word, got, min(left, RECHECK))


def get(a: Attachment, key: ObjectRef | str, timeout: float | None = None) -> Any:
    """The object back: out-of-band buffers as read-only views over the arena (numpy arrays stay
    numpy arrays), alive while the value or any view of it lives. A name waits up to
    ``timeout`` seconds (None: forever, 0: not at all) for a bind."""
    if isinstance(key, ObjectRef):
        if key.arena != a.name:
            raise ValueError(
                f"this reference names an object of arena {key.arena!r}, not {a.name!r}; "
                "use that arena's manager"
            )
        got, pinned = _open(a, key.address, key.id, None)
    elif isinstance(key, str):
        if timeout is not None and (timeout != timeout or timeout < 0):
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout}")
        got, pinned = _open_name(a, key, timeout)
    else:
        raise TypeError(f"get() takes an ObjectRef or a name, not {type(key).__name__}")
    return _load(a, got) if pinned else encoding.decode(got)


async def get_async(a: Attachment, name: ObjectRef | str, timeout: float | None = None) -> Any:
    """get() for asyncio: the wait runs in the loop's default thread executor (the futex sleep
    releases the GIL), so the loop keeps running. A cancelled wait gives up at its next look,
    within RECHECK seconds."""
    cancelled = threading.Event()
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)

    def wait() -> Any:
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            step = RECHECK if left is None else min(left, RECHECK)
            try:
                return get(a, name, step)
            except ObjectNotFound:
                if cancelled.is_set() or isinstance(name, ObjectRef) or left == step:
                    raise

    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, wait)
    finally:
        cancelled.set()


# ------------------------------------------------------------------ delete


def delete(a: Attachment, key: ObjectRef | str) -> None:
    """A name: unbind it (its object goes if nothing else holds it). A reference: nobody can
    get() the object any more, its names and references in transit go, and this process drops
    its hold unless it still has values over the object's memory; memory under live views
    (here or in other processes) stays until they are released."""
    h = a.handle()
    if isinstance(key, str):
        if not C.name_unbind(h, encode_block_name(key)):
            raise ObjectNotFound(key, "no object is bound to this name")
        return
    if not isinstance(key, ObjectRef):
        raise TypeError(f"delete() takes an ObjectRef or a name, not {type(key).__name__}")
    with _critical():
        C.object_delete(h, key.address, key.id)
        hold = _holds.get(key.key)
        if hold is not None and not hold.pins:
            del _holds[key.key]
            C.object_release(h, slot_for(a, None), key.address, key.id)


# ------------------------------------------------------------------ arrays made in place


def _shape(shape: Any) -> tuple[int, ...]:
    shp = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in shp:
        if check_int(d, "shape entry") < 0:
            raise ValueError(f"negative dimension in shape {shp}")
    return shp


def empty(a: Attachment, shape: Any, dtype: Any = float, order: str = "C") -> tuple[Any, ObjectRef]:
    """A new array object, created in place and writable here: fill it, then hand out the
    reference (get() elsewhere sees it read-only). No copy at any point."""
    np = encoding.numpy()
    shp, dt = _shape(shape), np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(
            f"cannot make an array of dtype {dt} in the arena: it holds Python objects, which "
            "live in one process; use a numeric, bytes or structured dtype"
        )
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    nbytes = dt.itemsize
    for d in shp:
        nbytes *= d
    data = encoding.array_header(dt, shp, order)
    ref, [address] = _store(a, data, [nbytes], None, None, True)
    with _critical():
        _count(a, ref.key, True)
        [mem] = _pinned(a, ref.key, [(address, nbytes)], True)
    return encoding.decode(data, [mem]), ref


def zeros(a: Attachment, shape: Any, dtype: Any = float, order: str = "C") -> tuple[Any, ObjectRef]:
    """empty(), filled with zeros."""
    arr, ref = empty(a, shape, dtype, order)
    arr[...] = 0
    return arr, ref


def open_array(a: Attachment, address: int, oid: int, writable: bool) -> Any:
    """The value of the object (address, oid) (shmalloc.arrays: a writable array over it when
    ``writable``); InvalidAddress when it is gone, as for any freed block."""
    key = (a.name, address, oid)
    with _critical():
        _count(a, key, True)
        try:
            view = C.object_open(a.handle(), slot_for(a, None), address, oid)
        except ObjectNotFound as e:
            _drop(key, True)
            raise InvalidAddress(address, e.detail) from None
    return _load(a, view, writable)


def reference(a: Attachment, address: int, oid: int) -> ObjectRef:
    """A new ObjectRef (held) to the live object (address, oid); ObjectNotFound if gone."""
    with _critical():
        view = C.object_open(a.handle(), slot_for(a, None), address, oid)
        return _held_ref(a, address, oid, view.nbytes, None)


def data_address(a: Attachment, ref: ObjectRef) -> int:
    """The address of the first out-of-band buffer of a held object (an array's data)."""
    with _critical():
        _count(a, ref.key, False)
        try:
            view = C.object_open(a.handle(), slot_for(a, None), ref.address, ref.id)
        finally:
            _drop(ref.key, False)
    return view.buffers[0][0]


def own(a: Attachment, address: int, oid: int) -> None:
    """This process owns the object: it holds it until it ends or anyone deletes it (the old
    lifetime of a block, for shmalloc.arrays). ObjectNotFound if gone."""
    C.object_own(a.handle(), slot_for(a, None), address, oid)


def hold(a: Attachment, ref: ObjectRef) -> None:
    """An anonymous hold on the object: it lives until delete(), whoever holds references."""
    C.object_hold(a.handle(), ref.address)


# ------------------------------------------------------------------ settings and counts


def set_transit_timeout(a: Attachment, seconds: float) -> None:
    """How long a pickled reference keeps its object alive, waiting to be unpickled (arena-wide;
    default 60 s). Applies to references pickled from now on."""
    if not seconds > 0:
        raise ValueError(f"the transit timeout must be positive, got {seconds}")
    C.objects_set_transit_timeout(a.handle(), seconds)


def object_stats(a: Attachment) -> C.ObjectsInfo:
    """Objects alive, references in transit, the transit timeout, and what this process holds."""
    return C.objects_info(a.handle(), a.slot)
