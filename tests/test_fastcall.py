"""The hot calls' second door (native/fastcall.c, shmalloc._fastcall): a Port's methods check
their arguments as cffi does and change nothing when refusing; a Port used after its arena is
closed meets the gate instead of unmapped memory; a queue's wait runs signal handlers; each
thread copies what it takes into a buffer of its own; and allocate/deallocate, C methods of
MemoryManager's base, take every form of their signature and leave all but the common case to
their Python halves."""

from __future__ import annotations

import ctypes
import functools
import inspect
import operator
import os
import pickle
import queue
import signal
import threading
import weakref
from typing import Any

import pytest
from in_threads import run_in_threads

import shmalloc
from shmalloc import MemoryManager
from shmalloc import _binding as C
from shmalloc.manager import attachment_of


def _port(m: MemoryManager) -> tuple[C.Port, int]:
    m.deallocate(m.allocate(64))  # this process has its slot now
    att = attachment_of(m)
    assert att.port is not None
    return att.port, att.slot


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda p, s: p.put_bytes(s, 0, 0), TypeError),
        (lambda p, s: p.put_bytes(1 << 40, 0, 0, b"x"), OverflowError),
        (lambda p, s: p.put_bytes(s, -1, 0, b"x"), OverflowError),
        (lambda p, s: p.put_bytes(s, 0, 0.0, b"x"), TypeError),
        (lambda p, s: p.put_bytes(s, 0, 0, bytearray(b"x")), TypeError),
        (lambda p, s: p.put_new(s, 0, 0, b"x", (b"buffer",)), TypeError),
        (lambda p, s: p.put_new(s, 0, 0, b"x", [object()]), TypeError),
        (lambda p, s: p.put_new(s, 0, 0, b"x", [b"y"] * 257), ValueError),
        (lambda p, s: p.take(s, 0, 0), TypeError),
        (lambda p, s: p.wait(0, 0, 0, "1"), TypeError),
        (lambda p, s: p.wait(0, 0, 1 << 32, 0), OverflowError),
    ],
)
def test_bad_arguments_raise_and_change_nothing(mgr: MemoryManager, call: Any, error: Any) -> None:
    port, slot = _port(mgr)
    before = mgr.stats()
    with pytest.raises(error):
        call(port, slot)
    after = mgr.stats()
    assert (after.used, after.allocations, after.deallocations) == (
        before.used,
        before.allocations,
        before.deallocations,
    )
    mgr.check()  # raises CorruptionDetected if the refusal left anything behind


def test_a_port_is_made_once_and_never_without_a_handle(mgr: MemoryManager) -> None:
    port, _ = _port(mgr)
    with pytest.raises(TypeError):
        C.Port.__new__(C.Port)
    with pytest.raises(ValueError, match="not 0"):
        C.Port(object(), 0)
    with pytest.raises(OverflowError):
        C.Port(object(), -1)
    port.__init__(object(), 0)  # type: ignore[misc]  # object's: the handle stays the same
    assert port.put_bytes(attachment_of(mgr).slot, 4096, 1, b"x") == C.ENOENT  # still the arena


def test_statuses_come_back_as_ints(mgr: MemoryManager) -> None:
    port, slot = _port(mgr)
    assert port.put_bytes(slot, 4096, 1, b"x") == C.ENOENT  # no queue there
    assert port.take(slot, 4096, 1, False) == (C.ENOENT, None)
    assert port.wait(4096 + 3, C.QWAIT_NOT_EMPTY, 0, 0) == C.EINVAL
    assert mgr.stats().used == 0


def test_a_port_kept_past_close_meets_the_gate(arena_name: str) -> None:
    m = MemoryManager.create(arena_name, 16 << 20)
    try:
        port, slot = _port(m)
        att = attachment_of(m)
        q = shmalloc.Queue(arena=m)
        ref = q._ref
        address, oid, control = ref.address, ref.id, q._control
        del q, ref
        m.close()
        assert att.port is None
        assert port.put_bytes(slot, address, oid, b"late") == C.ECLOSED
        assert port.take(slot, address, oid, True) == (C.ECLOSED, None)
        assert port.wait(control, C.QWAIT_NOT_EMPTY, 0, 0) == C.ECLOSED
        with pytest.raises(ValueError, match="closed"):
            m.allocate(64)
        with pytest.raises(ValueError, match="closed"):
            m.deallocate(4096)
    finally:
        m.destroy()


class _Alarm(Exception):
    pass


@pytest.mark.parametrize(
    ("forever", "after"),
    [(False, 0.05), (True, 0.05), (True, 0.0001)],
    ids=["timeout", "no-timeout", "no-timeout-during-the-spin"],
)
def test_a_signal_handler_runs_during_a_blocked_get(
    mgr: MemoryManager, forever: bool, after: float
) -> None:
    """A get on an empty queue sleeps in C without the GIL (get() without arguments waits in its
    C half, get(timeout=) in the Python half); SIGALRM interrupts the sleep and its Python
    handler's exception comes out of get() (were the handler not run, get would raise Empty
    after its timeout, or wait for the item a thread puts after 20 s). A signal that comes
    while the wait still spins, before it sleeps, is handled when that sleep ends (RECHECK)."""
    q = shmalloc.Queue(arena=mgr)
    q.put(b"first")  # the C half's fast path needs this process's slot and _pid set
    assert q.get() == b"first"
    fired = threading.Event()

    def rescue() -> None:  # a get that missed the signal returns this (and the test fails)
        fired.set()
        q.put(b"guard")

    guard = threading.Timer(20, rescue)
    guard.start()

    def ring(signum: int, frame: Any) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, after)
        with pytest.raises(_Alarm):
            q.get() if forever else q.get(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        guard.cancel()
    assert not fired.is_set(), "get() ran the handler only once the guard's item came"
    q.put(b"still works")
    assert q.get(timeout=0) == b"still works"


def test_threads_take_into_buffers_of_their_own(mgr: MemoryManager) -> None:
    """Four threads each put and get their own records (100 B and 10 KiB, copied out of the
    arena by the take) through one queue; every record comes back whole, none twice."""
    q = shmalloc.Queue(arena=mgr)
    n, got = 300, []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(n):
            size = 100 if i % 2 else 10 << 10
            q.put(bytes([t]) + i.to_bytes(4, "little") + os.urandom(16) * (size // 16))
            item = q.get(timeout=30)
            assert len(item) in (5 + 96, 5 + (10 << 10)), len(item)
            assert item[5:21] * ((len(item) - 5) // 16) == item[5:]
            with lock:
                got.append(item[:5])

    run_in_threads(work, 4)
    assert sorted(got) == sorted(
        bytes([t]) + i.to_bytes(4, "little") for t in range(4) for i in range(n)
    )
    assert q.empty()


def test_a_copy_only_take_leaves_items_to_hold_in_place(mgr: MemoryManager) -> None:
    """Queue.get first takes without the module lock, asking C for items it copies out only; an
    item this process would hold (a value with buffers, a large stream, a reference) stays in
    the queue untouched, for the locked take."""
    np = pytest.importorskip("numpy")
    q = shmalloc.Queue(arena=mgr)
    port, slot = _port(mgr)
    ref = mgr.put(b"referenced")
    items = [np.arange(1000.0), b"x" * (C.STREAM_COPY_MAX + 1), ref, b"small"]
    for item in items:
        q.put(item)
    address, oid = q._ref.address, q._ref.id
    for i, item in enumerate(items[:3]):
        before = mgr.check()
        assert port.take(slot, address, oid, True) == (C.TAKE_HELD, None)
        assert mgr.check() == before and q.qsize() == len(items) - i
        got = q.get(timeout=0)
        if isinstance(item, bytes):
            assert got == item
        elif isinstance(item, shmalloc.ObjectRef):
            assert got == item and mgr.get(got) == b"referenced"
        else:
            assert (got == item).all() and not got.flags.writeable
        del got
    assert port.take(slot, address, oid, True) == (C.TAKE_VALUE, b"small")
    assert port.take(slot, address, oid, True)[0] == C.TAKE_EMPTY
    del ref, items, item  # (the loop kept the last one)
    assert mgr.check().objects == 1  # the queue itself


def test_allocate_takes_every_form_of_its_signature(mgr: MemoryManager) -> None:
    """allocate() and deallocate() are C methods (C.Manager); what their C half does not do
    itself (keywords, a pid, an alignment) reaches the Python half with the arguments as given."""
    sig = inspect.signature(MemoryManager.allocate)
    assert list(sig.parameters) == ["self", "size", "pid", "align"]
    assert sig.parameters["align"].kind is inspect.Parameter.KEYWORD_ONLY
    addresses = [
        mgr.allocate(64),
        mgr.allocate(size=64),
        mgr.allocate(64, None),
        mgr.allocate(64, pid=os.getpid()),
        mgr.allocate(100, align=4096),
    ]
    assert addresses[4] % 4096 == 0
    assert len(set(addresses)) == len(addresses)
    bad_calls = [
        ((), TypeError),
        ((64, None, None), TypeError),
        ((0,), ValueError),
        ((True,), TypeError),
    ]
    for bad, error in bad_calls:  # (an int subclass: the Python half checks it)
        with pytest.raises(error):
            mgr.allocate(*bad)
    with pytest.raises(TypeError):
        mgr.allocate(64, colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        mgr.deallocate()  # type: ignore[call-arg]
    sizes = [mgr.size_of(a) for a in addresses]
    assert [mgr.deallocate(a) for a in addresses[1:]] == sizes[1:]
    assert mgr.deallocate(address=addresses[0]) == sizes[0]
    assert list(inspect.signature(MemoryManager.deallocate).parameters) == ["self", "address"]
    assert mgr.stats().used == 0


def test_the_c_half_alone_is_harmless() -> None:
    """A bare C.Manager has no attachment and no Python half: its methods raise, not crash."""
    bare = C.Manager()
    with pytest.raises(AttributeError):
        bare.allocate(64)
    with pytest.raises(AttributeError):
        bare.deallocate(4096)
    bare._state = object()  # type: ignore[attr-defined]  # not an attachment: never read as one
    with pytest.raises(AttributeError):
        bare.allocate(64)


def test_the_fields_the_c_half_reads_keep_their_types(mgr: MemoryManager) -> None:
    """An attachment's slot is an int from -1 up, and a port that is not a Port is not used."""
    mgr.deallocate(mgr.allocate(64))  # this process has its slot now
    att = attachment_of(mgr)
    with pytest.raises(TypeError):
        att.slot = "0"  # type: ignore[assignment]
    for bad in (1 << 40, -2):
        with pytest.raises(OverflowError):
            att.slot = bad  # never truncated into another slot
    assert att.slot >= 0
    port = att.port
    att.port = object()  # type: ignore[assignment]  # not a Port: the C half leaves it to Python
    try:
        assert mgr.deallocate(mgr.allocate(64)) >= 64
    finally:
        att.port = port


def test_a_manager_is_freed_by_its_last_reference(arena_name: str) -> None:
    """The C half holds the attachment, and nothing holds the manager back: dropping the last
    reference frees it at once (no cycle left for the cyclic collector)."""
    m = MemoryManager.create(arena_name, 16 << 20)
    m.deallocate(m.allocate(64))
    att = attachment_of(m)
    gone = weakref.ref(m)
    m.destroy()
    m.close()
    del m
    assert gone() is None
    assert att.closed


def test_queue_put_and_get_take_every_form_of_their_signatures(mgr: MemoryManager) -> None:
    """put() and get() are C methods (C.QueueBase); what their C half does not do itself
    (keywords, block, timeout, an ObjectRef) reaches the Python half with the arguments as
    given, and an unpicklable item raises at once, changing nothing."""
    assert list(inspect.signature(shmalloc.Queue.put).parameters) == [
        "self",
        "obj",
        "block",
        "timeout",
    ]
    assert list(inspect.signature(shmalloc.Queue.get).parameters) == ["self", "block", "timeout"]
    q = shmalloc.Queue(arena=mgr)
    q.put(b"warm-up")  # (the first call of a queue object is the Python half's)
    assert q.get() == b"warm-up"
    ref = mgr.put(b"by reference")
    q.put(b"one")
    q.put("two", True, None)
    q.put(obj=3.0)
    q.put((4, "four"), block=False)
    q.put(ref, timeout=5)
    with pytest.raises(TypeError):
        q.put()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.put(1, colour="red")  # type: ignore[call-arg]
    used = mgr.stats().used
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        q.put(lambda: None)
    assert mgr.stats().used == used
    assert q.get() == b"one"
    assert q.get(True, None) == "two"
    assert q.get(timeout=5) == 3.0
    assert q.get(block=False) == (4, "four")
    got = q.get(False, 0)
    assert isinstance(got, shmalloc.ObjectRef) and mgr.get(got) == b"by reference"
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    del got, ref
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.put(b"late")
    with pytest.raises(ValueError, match="closed"):
        q.get()


def test_the_queue_c_half_alone_is_harmless() -> None:
    bare = C.QueueBase()
    with pytest.raises(AttributeError):
        bare.put(b"x")
    with pytest.raises(AttributeError):
        bare.get()
    with pytest.raises(TypeError):
        C.bind_queues(1, 2, 3, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        C.bind_queues(len, len, int, 0.0)


def test_a_signal_pending_as_get_begins_is_handled_at_once(mgr: MemoryManager) -> None:
    """A signal already pending when get() starts (sent from C, with no bytecode between the
    send and the call to run its handler) is handled before get() waits."""
    q = shmalloc.Queue(arena=mgr)
    q.put(b"first")
    assert q.get() == b"first"
    kill = functools.partial(ctypes.CDLL(None).kill, os.getpid(), signal.SIGALRM)
    fired = threading.Event()

    def rescue() -> None:  # a get that missed the signal returns this (and the test fails)
        fired.set()
        q.put(b"guard")

    def ring(signum: int, frame: Any) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, ring)
    guard = threading.Timer(20, rescue)
    guard.start()
    try:
        with pytest.raises(_Alarm):
            list(map(operator.call, [kill, q.get]))  # C calls both, back to back
    finally:
        guard.cancel()
        signal.signal(signal.SIGALRM, old)
    assert not fired.is_set(), "get() ran the handler only once the guard's item came"


def test_a_default_put_on_a_full_queue_waits_for_room(mgr: MemoryManager) -> None:
    """put(obj) on a full queue: its C half's attempt is refused, the Python half waits for room
    (woken by a get in another thread) and puts the item it made, once."""
    q = shmalloc.Queue(1, arena=mgr)
    q.put("warm-up")
    assert q.get() == "warm-up"
    q.put((1, "first"))
    second = threading.Thread(target=q.put, args=((2, "second"),))
    second.start()
    assert q.get() == (1, "first")
    second.join()
    assert q.get() == (2, "second")
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    del q
    assert mgr.stats().used == 0


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_queue_pickles_with_every_protocol(mgr: MemoryManager, protocol: int) -> None:
    q = shmalloc.JoinableQueue(arena=mgr)
    other = pickle.loads(pickle.dumps(q, protocol))
    assert type(other) is shmalloc.JoinableQueue
    other.put(b"through the copy")
    assert q.get(timeout=5) == b"through the copy"
