"""Queues of objects in the arena: drop-ins for multiprocessing's Queue, JoinableQueue and
SimpleQueue.

    q = shmalloc.Queue()                       # in the per-user default arena (shmalloc.compat)
    Process(target=work, args=(q,)).start()    # fork or spawn: the queue pickles as a reference
    q.put(np.arange(10**7))                    # the array's data goes to the arena once
    a = q.get()                                # elsewhere: the same bytes, zero-copy, read-only

The queue itself lives in the segment (native/queue.c: a ring of object references in a block,
grown by doubling; its state machine and what a killed process leaves behind are drawn there).
Each item is an object (shmalloc.objects): put() pickles the item (protocol 5, buffers of 1 KiB or
more in blocks of their own) into a new, unpublished object, then one C call publishes it into
the queue; get() takes the oldest item, held by this process from then on, and unpickles it over
the arena. There is no feeder thread and no pipe: an item is in the queue when put() returns, and
an unpicklable item raises at once, in put(). A put on a full queue and a get on an empty one
sleep on a futex word of the queue (native/wait.c) until the other side wakes them; each sleep is
capped at RECHECK seconds, which only matters when a waker was killed between its step and its
wake-up call.

A Queue pickles as a reference to its queue object (shmalloc.objects.ObjectRef): send it to
processes, Pool initializers, other queues. The queue lives while any process holds one, and the
items still in it go with it. close() is per process, as in multiprocessing: this process will not
put or get any more; the queue itself stays for the others.

An ObjectRef put as the item itself travels as that reference (no copy, no transit ticket: the
queue holds the object while the reference waits in it) and get() returns an ObjectRef to the same
object.
"""

from __future__ import annotations

import asyncio
import queue as _queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _binding as C
from . import encoding, objects
from .attachment import Attachment, check_int
from .manager import MemoryManager, attachment_of
from .objects import ObjectRef
from .tracking import slot_for

__all__ = ["RECHECK", "Empty", "Full", "JoinableQueue", "Queue", "SimpleQueue"]

Empty = _queue.Empty
Full = _queue.Full
RECHECK = 1.0  # longest single sleep of a blocked put or get (see the module's docstring)

# what put and get use in C; RECHECK is read here once (get()'s C half sleeps as long)
C.bind_queues(encoding.encode, encoding.decode, ObjectRef, RECHECK)


def _arena(arena: MemoryManager | None) -> Attachment:
    if arena is None:
        from .compat import get_arena  # the per-user default arena

        arena = get_arena()
    if not isinstance(arena, MemoryManager):
        raise TypeError(f"arena must be a MemoryManager or None, not {type(arena).__name__}")
    return attachment_of(arena)


def _deadline(block: bool, timeout: float | None) -> float | None:
    """The monotonic time a blocking call gives up at (None: never); NaN is refused."""
    if not block or timeout is None:
        return None
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds or None, not NaN")
    return time.monotonic() + max(timeout, 0.0)


def _time_left(deadline: float | None) -> float:
    return RECHECK if deadline is None else min(deadline - time.monotonic(), RECHECK)


@dataclass(slots=True)
class _Item:
    """An item on its way into a queue: the object to put and how (C.QPUT_*); ``unpublished``
    lists the blocks to free if it never goes in."""

    address: int
    oid: int
    mode: int
    unpublished: list[int] = field(default_factory=list)

    def abandon(self, att: Attachment) -> None:
        """It will not go in: free its unpublished blocks (plain blocks of this process)."""
        blocks, self.unpublished = self.unpublished, []
        if blocks and not att.closed:
            h = att.handle()
            for at in blocks:
                C.free_raw(h, at)


_NO_VALUE: Any = object()  # _Taken.value when the item is not a value read in C (None may be one)


@dataclass(slots=True)
class _Taken:
    """An item taken out of a queue, held by this process: a reference, or a value to load
    (counted once as this process's pin, which _load consumes)."""

    view: C.ObjectView | None  # None: ``stream`` or ``value`` is set, copied out
    ref: ObjectRef | None
    stream: bytes | None = None  # the value's stream, to decode
    value: Any = _NO_VALUE  # the value itself (a bytes or a marshalled one, read in C)


class _Base(C.QueueBase):
    """What the three queues share: the queue object, put and get.

    put() and get() are C methods (C.QueueBase, native/halves.c): with their defaults, the
    first attempt is one core call there (and a blocked get() waits there), and everything else
    comes to _put, _put_encoded, _put_answered, _get, _get_answered and _wait_failed here. What
    they read (_att, _address, _id, _control, _pid, _closed) are C members of that base."""

    _joinable = False
    _att: Attachment

    def __init__(self, maxsize: int = 0, *, arena: MemoryManager | None = None) -> None:
        maxsize = check_int(maxsize, "maxsize")
        att = _arena(arena)
        with objects._critical:
            address, oid = C.queue_create(
                att.handle(), slot_for(att, None), max(maxsize, 0), self._joinable
            )
            ref = objects._held_ref(att, address, oid, 0, None)
        self._setup(ref)

    def _setup(self, ref: ObjectRef) -> None:
        att = ref._att
        if att is None:
            raise ValueError(f"{ref!r} names no attached arena")
        self._ref = ref
        self._att = att
        self._address, self._id = ref.address, ref.id
        self._closed = False
        info = C.queue_info(att.handle(), ref.address, ref.id)
        self._maxsize = info.maxsize
        self._control = info.control

    def __reduce__(self) -> tuple[Any, ...]:
        # the reference pickles with a transit ticket: the queue lives until unpickled
        return _rebuilt, (type(self), self._ref)

    def __repr__(self) -> str:
        bound = f" maxsize={self._maxsize}" if self._maxsize else ""
        return f"<shmalloc.{type(self).__name__} {self._ref.arena}:{self._address:#x}{bound}>"

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def _info(self) -> C.QueueInfo:
        with objects._critical:  # (in a fork child, first hold what the parent held)
            return C.queue_info(self._att.handle(), self._address, self._id)

    # -------------------------------------------------------------- put

    def _prepare(self, obj: Any) -> tuple[_Item, list[memoryview], bytes]:
        """The item for ``obj``: an ObjectRef of this arena is that object itself; anything else
        is pickled here (raises here if ``obj`` cannot be pickled), the object to be made."""
        a = self._att
        if isinstance(obj, ObjectRef) and obj.arena == a.name and obj._att is not None:
            return _Item(obj.address, obj.id, C.QPUT_REF), [], b""
        data, bufs = encoding.encode(obj)
        return _Item(0, 0, C.QPUT_NEW), bufs, data

    def _offer(self, item: _Item) -> int | None:
        """One attempt to put ``item``: None when it went in, else the not_full word to wait on."""
        a = self._att
        with objects._critical:  # a fork child holds the queue from its first call on
            seq = C.queue_put(a.handle(), slot_for(a, None), self._address, self._id, *_args(item))
        if seq is None:
            item.unpublished = []  # published: the queue holds it now
        return seq

    def _offer_new(self, data: Any, bufs: list[memoryview] | None) -> tuple[_Item | None, int]:
        """The first attempt of a new item: made and put in one C call (native/handoff.c),
        from its stream ``data`` and buffers ``bufs``, or from a bytes value ``data`` when
        ``bufs`` is None. (None, 0) when it went in. If the queue is full, the object stays
        made, unpublished: (its item, for _offer, the not_full word's value)."""
        a = self._att
        self._adopted()  # (the copy runs outside the module's lock)
        port = a.open_port()
        slot = objects._slot(a)
        if bufs is None:
            r = port.put_bytes(slot, self._address, self._id, data)
        else:
            r = port.put_new(slot, self._address, self._id, data, bufs)
        return self._offered(r)

    def _offered(self, r: None | int | tuple[int, list[int]]) -> tuple[_Item | None, int]:
        """A first attempt's answer (port.put_new's): (None, 0) when the item went in; the item
        made and left unpublished, and the not_full word's value, when the queue is full."""
        if r is None:
            return None, 0
        if isinstance(r, int):
            C.raise_status(r, self._address)
        seq, blocks = r
        return _Item(blocks[0], 0, C.QPUT_NEW, [*blocks[1:], blocks[0]]), seq

    def _adopted(self) -> None:
        """In a fork child, first hold what the parent held (objects.after_fork_adopted); the C
        half of put and get then skips this check until the next fork (_pid is this process)."""
        objects.after_fork_adopted()
        self._pid = objects._me

    def _offer_ref(self, obj: ObjectRef) -> tuple[_Item | None, int]:
        """put()'s first attempt for an ObjectRef (the object itself if it is of this arena, else
        the reference pickled): (None, 0) if it went in; else the item (to abandon once done)
        and the not_full word's value (for _retry)."""
        item, bufs, data = self._prepare(obj)
        if item.mode == C.QPUT_NEW:
            return self._offer_new(data, bufs)
        seq = self._offer(item)
        return (None, 0) if seq is None else (item, seq)

    def _retry(
        self,
        attempt: Callable[[], int | None],
        word: int,
        seq: int | None,
        deadline: float | None,
        block: bool = True,
    ) -> bool:
        """After a first attempt that returned ``seq``, run ``attempt`` until it returns None
        (True), sleeping between two on the queue's ``word`` (C.QWAIT_*) while it holds the value
        the last attempt returned; False once ``deadline`` has passed (at the first refusal unless
        ``block``)."""
        while seq is not None:
            left = _time_left(deadline)
            if not block or left <= 0:
                return False
            self._sleep(word, seq, left)
            seq = attempt()
        return True

    def _sleep(self, word: int, seq: int, left: float) -> None:
        """Sleep up to ``left`` seconds while the queue's ``word`` (C.QWAIT_*) holds ``seq``."""
        port = self._att.open_port()
        rc = port.wait(self._control, word, seq, int(left * 1e9))
        if rc < 0 and rc != C.ETIMEDOUT:
            self._wait_failed(rc)

    def _wait_failed(self, rc: int) -> None:
        """Raise for a wait's status ``rc`` (also get()'s C half's)."""
        C.raise_status(rc, self._control)

    def _put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """put() whenever its C half does not make the first attempt itself."""
        if self._closed:
            self._check_open()
        deadline = None if timeout is None else _deadline(block, timeout)
        cls = type(obj)
        if cls is bytes:  # its stream is made in C (native/fastcall.c)
            item, seq = self._offer_new(obj, None)
        elif cls is not ObjectRef:
            item, seq = self._offer_new(*encoding.encode(obj))
        else:
            item, seq = self._offer_ref(obj)
        self._put_rest(item, seq, deadline, block)

    def _put_encoded(self, made: tuple[bytes, list[memoryview]]) -> None:
        """put(obj) after its C half encoded ``obj`` and then found it may not put it itself."""
        item, seq = self._offer_new(*made)
        self._put_rest(item, seq, None, True)

    def _put_answered(self, r: int | tuple[int, list[int]]) -> None:
        """put(obj) after its C half's first attempt answered ``r`` (as port.put_new)."""
        item, seq = self._offered(r)
        self._put_rest(item, seq, None, True)

    def _put_rest(self, item: _Item | None, seq: int, deadline: float | None, block: bool) -> None:
        """After a first attempt: nothing if the item went in (None); else wait for room and
        offer it again, and free its blocks if it never goes in."""
        if item is None:  # the common case: in at the first attempt, nothing left to abandon
            return
        try:
            if not self._retry(lambda: self._offer(item), C.QWAIT_NOT_FULL, seq, deadline, block):
                raise Full
        finally:
            item.abandon(self._att)

    # -------------------------------------------------------------- get

    def _take(self, box: list[_Taken]) -> int | None:
        """One attempt to take an item into ``box``: None when taken, else the not_empty word
        to wait on."""
        taken = self._take_one()
        if isinstance(taken, int):
            return taken
        box.append(taken)
        return None

    def _take_one(self) -> _Taken | int:
        """One attempt to take an item: the item, or the not_empty word's value to wait on."""
        a = self._att
        port = a.open_port()
        with objects._critical:
            got, x = port.take(objects._slot(a), self._address, self._id, False)
            if got != C.TAKE_VALUE and got != C.TAKE_STREAM:
                return self._held(got, x)
        return _Taken(None, None, x) if got == C.TAKE_STREAM else _Taken(None, None, None, x)

    def _held(self, got: int, x: Any) -> _Taken | int:
        """The rest of a take that did not copy the item out (port.take's answer ``got``, ``x``):
        under _critical, the view's hold counted here; or the not_empty word's value."""
        if got == C.TAKE_EMPTY:
            return int(x)
        if got < 0:
            C.raise_status(got, self._address)
        a, view = self._att, C.new_view(x)
        if got == C.TAKE_REF:
            return _Taken(view, objects._held_ref(a, view.address, view.id, view.nbytes, None))
        objects._count(a, (a.name, view.address, view.id), True)
        return _Taken(view, None)

    def _load(self, taken: _Taken) -> Any:
        if taken.value is not _NO_VALUE:
            return taken.value
        if taken.ref is not None:
            return taken.ref
        if taken.stream is not None:
            return encoding.decode(taken.stream)
        assert taken.view is not None
        return objects._load(self._att, taken.view)

    def _untake(self, taken: _Taken) -> None:
        """Put a taken item back, at the end of the queue, whatever its bound (asyncio's
        cancellation, which must not lose it)."""
        mode = C.QPUT_REF if taken.ref is not None else C.QPUT_VALUE
        a = self._att
        stream = taken.stream
        if taken.value is not _NO_VALUE:
            stream = encoding.encode(taken.value)[0]
        if stream is not None:  # dropped when taken: the same value, as a new object
            h, slot = a.handle(), objects._slot(a)
            address, oid, _ = C.object_put(h, slot, stream, [], None, False)
            C.queue_put(h, slot, self._address, self._id, address, oid, C.QPUT_VALUE | C.QPUT_FORCE)
            C.object_release(h, slot, address, oid)
            return
        assert taken.view is not None
        C.queue_put(
            a.handle(),
            slot_for(a, None),
            self._address,
            self._id,
            taken.view.address,
            taken.view.id,
            mode | C.QPUT_FORCE,
        )
        if taken.ref is None:
            objects._finalize((a.name, taken.view.address, taken.view.id), True, objects._me)

    def _get(self, block: bool = True, timeout: float | None = None) -> Any:
        """get() whenever its C half does not make the first attempt itself."""
        if self._closed:
            self._check_open()
        deadline = None if timeout is None else _deadline(block, timeout)
        self._adopted()
        got, x = self._take_copy()
        return self._get_rest(got, x, deadline, block)

    def _get_answered(self, got: int, x: Any) -> Any:
        """get() after its C half's first take answered ``(got, x)`` (as port.take), the item
        not copied out."""
        return self._get_rest(got, x, None, True)

    def _take_copy(self) -> tuple[int, Any]:
        """One take that copies a small item out (dropped already: no hold to count here, so no
        module lock; native/queue.c, queue_take), or leaves a held one in the queue."""
        a = self._att
        port = a.open_port()
        return port.take(objects._slot(a), self._address, self._id, True)

    def _get_rest(self, got: int, x: Any, deadline: float | None, block: bool) -> Any:
        """From a take's answer ``(got, x)``: the item, taking it held if it must be, or waiting
        for one while the queue is empty."""
        while True:
            if got == C.TAKE_VALUE:
                return x
            if got == C.TAKE_STREAM:
                return encoding.decode(x)  # (a pickle or a small array)
            if got != C.TAKE_EMPTY:
                taken = self._take_one() if got == C.TAKE_HELD else self._held(got, x)
                if not isinstance(taken, int):
                    return self._load(taken)
                x = taken
            left = _time_left(deadline)  # empty: wait
            if not block or left <= 0:
                raise Empty
            self._sleep(C.QWAIT_NOT_EMPTY, x, left)
            got, x = self._take_copy()

    # -------------------------------------------------------------- common methods

    def empty(self) -> bool:
        """True if no item waits (at this instant; another process may put one next)."""
        return self._info().size == 0

    def close(self) -> None:
        """This process will not put or get any more (they raise ValueError from now on). The
        queue stays for the other processes; it goes when the last one drops it."""
        self._closed = True


def _rebuilt(cls: type[_Base], ref: ObjectRef) -> _Base:
    """A queue unpickled: another handle to the queue object ``ref``."""
    q = cls.__new__(cls)
    q._setup(ref)
    return q


def _args(item: _Item) -> tuple[int, int, int]:
    return item.address, item.oid, item.mode


class Queue(_Base):
    """A process-shared FIFO queue of Python objects in the arena: multiprocessing.Queue's
    interface (Full/Empty from the ``queue`` module), without a feeder thread or a pipe.

    ``maxsize`` <= 0: no bound but the arena's memory. ``arena``: a MemoryManager, or None for
    the per-user default arena of shmalloc.compat."""

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    def get_nowait(self) -> Any:
        return self.get(False)

    def qsize(self) -> int:
        """Items waiting now."""
        return self._info().size

    def full(self) -> bool:
        """True if a bounded queue holds maxsize items."""
        return bool(self._maxsize) and self._info().size >= self._maxsize

    def join_thread(self) -> None:
        """As multiprocessing's: only after close(); there is no feeder thread to join."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: an item is in the queue once put() returns."""

    async def get_async(self, timeout: float | None = None) -> Any:
        """get() for asyncio: the wait runs in the loop's default thread executor (the futex sleep
        releases the GIL). queue.Empty after ``timeout`` seconds (None: never). Cancelled, it
        takes nothing; an item it took as the cancellation came goes back to the end of the
        queue, never lost."""
        self._check_open()
        deadline = _deadline(True, timeout)
        lock = threading.Lock()
        box: list[_Taken] = []
        cancelled = False

        def attempt() -> int | None:  # stops once cancelled: work()'s answer is unused then
            with lock:
                return None if cancelled else self._take(box)

        def work() -> bool:
            return self._retry(attempt, C.QWAIT_NOT_EMPTY, attempt(), deadline)

        try:
            got = await asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            with lock:
                cancelled = True
                for taken in box:
                    self._untake(taken)
                box.clear()
            raise
        if not got:
            raise Empty
        return self._load(box.pop())

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """put() for asyncio: pickled here, the wait for room in the loop's default thread
        executor. queue.Full after ``timeout`` seconds (None: never). Cancelled, it puts nothing
        unless the item was in already."""
        self._check_open()
        deadline = _deadline(True, timeout)
        item, bufs, data = self._prepare(obj)
        lock = threading.Lock()
        cancelled, fresh = False, item.mode == C.QPUT_NEW

        def attempt() -> int | None:  # stops once cancelled: work()'s answer is unused then
            nonlocal fresh, item
            with lock:
                if cancelled:
                    return None
                if fresh:  # the object is made (the copy) here, in the executor's thread
                    fresh = False
                    made, seq = self._offer_new(data, bufs)
                    if made is None:
                        return None
                    item = made
                    return seq
                return self._offer(item)

        def work() -> bool:
            try:
                return self._retry(attempt, C.QWAIT_NOT_FULL, attempt(), deadline)
            finally:
                item.abandon(self._att)

        try:
            done = await asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            with lock:
                cancelled = True
            raise
        if not done:
            raise Full


class JoinableQueue(Queue):
    """multiprocessing.JoinableQueue: a Queue that counts the items put and not yet marked
    done, in the segment, so that join() in any process waits for every consumer's task_done."""

    _joinable = True

    def task_done(self) -> None:
        """One item taken by get() is processed; ValueError if called more times than items
        were put."""
        self._check_open()
        C.queue_task_done(self._att.handle(), self._address, self._id)

    def join(self) -> None:
        """Wait until every item ever put has been marked task_done()."""
        while True:
            info = self._info()
            if info.unfinished == 0:
                return
            self._sleep(C.QWAIT_ALL_DONE, info.all_done_seq, RECHECK)


class SimpleQueue(_Base):
    """multiprocessing.SimpleQueue: put, get (blocking), empty, close; unbounded."""

    def __init__(self, *, arena: MemoryManager | None = None) -> None:
        super().__init__(0, arena=arena)

    def put(self, obj: Any) -> None:  # type: ignore[override]
        super().put(obj)

    def get(self) -> Any:  # type: ignore[override]
        return super().get()
