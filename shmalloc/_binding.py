"""The boundary to the C core: the only importer of the compiled modules (_native, _fastcall).

One typed function per C call (the shape of pynacl's bindings). Each checks the call's status
through one table, ``_EXCEPTIONS``, from status code to exception class; no status is ignored.
Where a status is an expected answer rather than a failure (a name that is not bound, a slot
that went to another process), the function says so in its return value and docstring.

The hot paths (``alloc_raw``, ``free_raw``, ``block_size_raw``, ``block_span_raw``,
``block_write_raw``) are the compiled functions themselves, re-exported: they return a result
when >= 0 and a status when < 0, and the caller passes a negative one to :func:`raise_status`.
The hottest also have a second door (``shmalloc._fastcall``, native/fastcall.c and halves.c),
which calls the same core functions without cffi's generic argument conversion: a queue's put,
take and wait are methods of a :class:`Port`, which an Attachment keeps per handle;
MemoryManager's allocate and deallocate and a queue's put and get are C methods of their base
classes (:class:`Manager`, :class:`QueueBase`), which read the Attachment's C base
(:class:`Fields`: port, slot, collector).
Everything else about the C core's types stays in this module; other modules see ints, bytes
and the small dataclasses below.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cache, partial
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

from . import errors as E
from ._fastcall import BYTES_MARK as BYTES_MARK  # first byte of a bytes value's stream
from ._fastcall import MARSHAL_MARK as MARSHAL_MARK  # ... and of a marshalled value's
from ._fastcall import STREAM_COPY_MAX as STREAM_COPY_MAX  # (re-exported: what other modules see)
from ._fastcall import TAKE_EMPTY as TAKE_EMPTY  # port.take's answers
from ._fastcall import TAKE_HELD as TAKE_HELD
from ._fastcall import TAKE_REF as TAKE_REF
from ._fastcall import TAKE_STREAM as TAKE_STREAM
from ._fastcall import TAKE_VALUE as TAKE_VALUE
from ._fastcall import TAKE_VIEW as TAKE_VIEW
from ._fastcall import Fields as Fields  # Attachment's base: port, slot, collector
from ._fastcall import Manager as Manager  # MemoryManager's base: allocate, deallocate
from ._fastcall import Port as Port
from ._fastcall import QueueBase as QueueBase  # the queues' base: put, get
from ._fastcall import bind as _bind_fastcall
from ._fastcall import bind_queues as bind_queues
from ._fastcall import marshal_stream as marshal_stream  # a value's stream, if marshalled
from ._native import ffi, lib

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Handle = Any  # a cffi ``shm_handle_t *``: process-local, never shared
CData = Any  # any other cffi object (an out-parameter struct, a buffer)
_Row = TypeVar("_Row", bound="DataclassInstance")


@cache
def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _read(cls: type[_Row], c: CData, **given: Any) -> _Row:
    """A ``cls`` whose fields are the C struct ``c``'s of the same names, as ints, but for the
    ones ``given``."""
    read = {f: int(getattr(c, f)) for f in _field_names(cls) if f not in given}
    return cls(**read, **given)


def _fetch(
    cls: type[_Row], ctype: str, fn: Callable[..., int], *args: Any, address: int = 0, **given: Any
) -> _Row:
    """Call ``fn(*args, out)`` with a new C struct ``ctype`` to fill; return it read as a ``cls``
    (see _read). ``address`` names the block an error is about."""
    out = ffi.new(ctype)
    _check(fn(*args, out), address)
    return _read(cls, out, **given)


# ------------------------------------------------------------------ constants read from C

OK: int = lib.SHM_OK
ENOMEM: int = lib.SHM_ENOMEM
ENOSPC: int = lib.SHM_ENOSPC
EADDR: int = lib.SHM_EADDR
EINVAL: int = lib.SHM_EINVAL
EPROCS: int = lib.SHM_EPROCS
ENOENT: int = lib.SHM_ENOENT
EEXIST: int = lib.SHM_EEXIST
ETIMEDOUT: int = lib.SHM_ETIMEDOUT
EINTR: int = lib.SHM_EINTR
ECLOSED: int = lib.SHM_ECLOSED
ADDRESS_MASK: int = lib.SHM_ALLOC_ADDRESS_MASK
TRIM_FLAG: int = lib.SHM_ALLOC_TRIM_FLAG
PRESSURE_FLAG: int = lib.SHM_ALLOC_PRESSURE_FLAG
PROC_FREE: int = lib.SHM_PROC_FREE
PROC_LIVE: int = lib.SHM_PROC_LIVE
PROC_DEAD: int = lib.SHM_PROC_DEAD
BLOCK_SEALED: int = lib.SHM_BF_SEALED
BLOCK_PERSISTENT: int = lib.SHM_BF_PERSIST
MAX_PROCS: int = lib.SHM_MAX_PROCS
RING_SLOTS: int = lib.SHM_RING_SLOTS
MAX_NAMES: int = lib.SHM_MAX_NAMES
NAME_LEN: int = lib.SHM_NAME_LEN
SEG_ARENA: int = lib.SHM_SEG_ARENA
SEG_FORMATTING: int = lib.SHM_SEG_FORMATTING
SEG_OTHER_VERSION: int = lib.SHM_SEG_OTHER_VERSION
SEG_FOREIGN: int = lib.SHM_SEG_FOREIGN
OBJECT_MAX_BUFFERS: int = lib.SHM_OBJECT_MAX_BUFFERS
OBJ_DELETED: int = lib.SHM_OBJ_DELETED
OBJ_WRITABLE: int = lib.SHM_OBJ_WRITABLE
U64_MAX = (1 << 64) - 1

# ------------------------------------------------------------------ status -> exception


def _oom(e: CData, detail: str, address: int) -> Exception:
    return E.OutOfMemory(int(e.requested), int(e.available), int(e.used), int(e.total), detail)


def _limit(e: CData, detail: str, address: int) -> Exception:
    return E.ProcessLimitExceeded(int(e.pid), int(e.limit), int(e.used), int(e.requested))


def _system(e: CData, detail: str, address: int) -> Exception:
    return OSError(int(e.sys_errno), detail)


# One entry per SHM_E* status: how the error the C core recorded becomes an exception.
_EXCEPTIONS: dict[int, Callable[[CData, str, int], Exception]] = {
    lib.SHM_ENOMEM: _oom,
    lib.SHM_ENOSPC: _oom,
    lib.SHM_EADDR: lambda e, detail, address: E.InvalidAddress(address, detail),
    lib.SHM_ECORRUPT: lambda e, detail, address: E.CorruptionDetected(int(e.offset), detail),
    lib.SHM_ELAYOUT: lambda e, detail, address: E.CorruptionDetected(int(e.offset), detail),
    lib.SHM_EALIGN: lambda e, detail, address: E.AlignmentError(int(e.offset)),
    lib.SHM_EPROTECT: lambda e, detail, address: E.ProtectionViolation(address),
    lib.SHM_ELIMIT: _limit,
    lib.SHM_EINVAL: lambda e, detail, address: ValueError(detail),
    lib.SHM_EPROCS: lambda e, detail, address: E.ShmallocError(detail),
    lib.SHM_ESYS: _system,
    lib.SHM_EEXIST: lambda e, detail, address: FileExistsError(detail),
    lib.SHM_ENOENT: lambda e, detail, address: E.ObjectNotFound(address, detail),
    lib.SHM_EFULL: lambda e, detail, address: E.ShmallocError(detail),
    lib.SHM_EBUSY: lambda e, detail, address: E.ShmallocError(detail),
    lib.SHM_ENOTARENA: lambda e, detail, address: E.NotAnArena("", detail),
    lib.SHM_ECLOSED: lambda e, detail, address: ValueError(detail),
    lib.SHM_ETIMEDOUT: lambda e, detail, address: TimeoutError(detail),
    lib.SHM_EINTR: lambda e, detail, address: InterruptedError(detail),
}


def last_detail() -> str:
    """What the C core recorded about this thread's last failure, for a person."""
    return str(ffi.string(lib.shm_last_error().detail).decode("utf-8", "replace"))


def strerror(status: int) -> str:
    """The C core's one-line meaning of a status code."""
    return str(ffi.string(lib.shm_strerror(status)).decode())


def raise_status(status: int, address: int = 0) -> NoReturn:
    """Raise the exception for a negative status returned by the C core."""
    make = _EXCEPTIONS.get(status)
    if make is None:
        raise E.ShmallocError(f"the C core returned an unknown status {status}")
    raise make(lib.shm_last_error(), last_detail() or strerror(status), address)


def _check(status: int, address: int = 0) -> int:
    if status < 0:
        raise_status(status, address)
    return status


# ------------------------------------------------------------------ hot paths (raw)

alloc_raw: Callable[[Handle, int, int, int], int] = lib.shm_alloc
free_raw: Callable[[Handle, int], int] = lib.shm_free
block_size_raw: Callable[[Handle, int, int], int] = lib.shm_block_size
block_span_raw: Callable[[Handle, int, int, int, int], int] = lib.shm_block_span
block_write_raw: Callable[[Handle, int, int, bytes, int], int] = lib.shm_block_write

# ------------------------------------------------------------------ arena and handle


def header_size() -> int:
    """Bytes of the arena header in front of the heap."""
    return int(lib.shm_header_size())


def debug_level() -> int:
    """The SHMALLOC_DEBUG level the core was built with."""
    return int(lib.shm_debug_level())


def layout_version() -> int:
    return int(lib.shm_layout_version())


def segment_probe_size() -> int:
    """How many bytes of a segment's head :func:`segment_probe` needs."""
    return int(lib.shm_segment_probe_size())


def segment_probe(head: bytes) -> int:
    """What the first bytes of a segment are: SEG_ARENA, SEG_FORMATTING, SEG_OTHER_VERSION or
    SEG_FOREIGN."""
    return int(lib.shm_segment_probe(head, len(head)))


def buffer_of(mm: Any) -> CData:
    """A cffi pointer to a writable buffer (an mmap); release it with :func:`release`."""
    return ffi.from_buffer(mm)


def release(buf: CData) -> None:
    ffi.release(buf)


def arena_format(base: CData, capacity: int, fd: int, salt: int, now_ns: int) -> None:
    _check(lib.shm_arena_format(base, capacity, fd, salt, now_ns))


def handle_open(base: CData, capacity: int, fd: int) -> Handle:
    """A handle on the arena mapped at ``base``. Its memory is freed when the last reference to
    the returned object goes, never under a thread that still holds it (native/arena.c, the
    gate): a thread that read it before a close is refused by the gate, not crashed."""
    out = ffi.new("shm_handle_t **")
    _check(lib.shm_handle_open(base, capacity, fd, out))
    return ffi.gc(out[0], lib.shm_handle_free)


# The hot calls' second door (native/fastcall.c): METH_FASTCALL methods of a Port over the same
# core functions, which it finds through these addresses.
_bind_fastcall(
    *(
        int(ffi.cast("uintptr_t", ffi.addressof(lib, f)))
        for f in ("shm_alloc", "shm_free", "shm_queue_put_new", "shm_queue_take", "shm_queue_wait")
    )
)


def port(h: Handle) -> Port:
    """The Port of handle ``h``: it keeps ``h`` (and so its memory) alive."""
    return Port(h, int(ffi.cast("uintptr_t", h)))


def handle_shutdown(h: Handle) -> bool:
    """Refuse new calls on ``h`` (ValueError) from every thread but this one, and wait until no
    other thread is inside one. True for the one caller that may now detach and unmap; False if
    the handle was closing already."""
    return int(lib.shm_handle_shutdown(h)) == 1


def handle_reopen(h: Handle) -> None:
    """Undo :func:`handle_shutdown` (the segment could not be unmapped after all)."""
    lib.shm_handle_reopen(h)


def handle_closed(h: Handle) -> None:
    """After :func:`handle_shutdown` and the unmap: refuse the closing thread's calls too."""
    lib.shm_handle_closed(h)


@dataclass(frozen=True)
class RawStats:
    """The C core's counters (shm_stats_t), read without a lock."""

    total: int
    used: int
    available: int
    overhead: int
    peak: int
    allocated_blocks: int
    free_blocks: int
    allocations: int
    deallocations: int
    frees_since_gc: int
    reserved: int
    capacity: int
    lock_recoveries: int
    oom_events: int
    gc_runs: int
    cached: int
    cache_limit: int


def stats_read(h: Handle) -> RawStats:
    return _fetch(RawStats, "shm_stats_t *", lib.shm_stats_read, h)


def pressure_level(h: Handle) -> int:
    """The arena's pressure level as the C core last computed it (SHM_PRESSURE_*)."""
    return _check(int(lib.shm_pressure_level(h)))


def usage_percent(total: int, available: int) -> float:
    """The one formula for how full an arena is: the share of the heap not available."""
    return float(lib.shm_usage_percent(total, available))


def pressure_of_percent(pct: float) -> int:
    """The pressure level (0 LOW .. 3 CRITICAL) of a usage percentage."""
    return int(lib.shm_pressure_of_percent(pct))


def largest_free(h: Handle) -> int:
    return _check(int(lib.shm_largest_free(h)))


# ------------------------------------------------------------------ blocks


def block_seal(h: Handle, address: int) -> None:
    _check(lib.shm_block_seal(h, address), address)


def block_info(h: Handle, address: int) -> BlockInfo:
    return _fetch(BlockInfo, "shm_block_info_t *", lib.shm_block_info, h, address, address=address)


@dataclass(frozen=True)
class BlockInfo:
    """One allocated block as the C core reports it (shm_block_info_t)."""

    address: int
    size: int
    pid: int
    flags: int
    refcount: int
    slot: int


def block_adopt(h: Handle, address: int, slot: int) -> None:
    _check(lib.shm_block_adopt(h, address, slot), address)


def block_persist(h: Handle, address: int) -> None:
    _check(lib.shm_block_persist(h, address), address)


def block_retain(h: Handle, address: int, slot: int) -> None:
    _check(lib.shm_block_retain(h, address, slot), address)


def block_release(h: Handle, address: int, slot: int) -> bool | None:
    """Drop slot's reference: True if that freed an orphaned block, False if not, None if the
    slot held no reference on it."""
    rc = lib.shm_block_release(h, address, slot)
    if rc == lib.SHM_ENOENT:
        return None
    return _check(rc, address) == 1


def blocks_list(h: Handle, slot: int, hint: int) -> list[BlockInfo]:
    """The blocks slot owns (slot -2: every allocated block), in address order. ``hint`` (a
    count read from the segment) sizes the first buffer only: it is not trusted."""
    count = ffi.new("uint64_t *")
    cap = max(16, min(hint, 1 << 16) + 16)
    while True:
        buf = ffi.new("shm_block_info_t[]", cap)
        _check(lib.shm_blocks_list(h, slot, buf, cap, count))
        if count[0] <= cap:
            return [_read(BlockInfo, buf[i]) for i in range(count[0])]
        cap = count[0] + 16


# ------------------------------------------------------------------ processes


def proc_attach(h: Handle, pid: int, start_time: int) -> int | None:
    """The slot of (pid, start_time), claimed if new; None when the process table is full."""
    slot = lib.shm_proc_attach(h, pid, start_time)
    if slot == lib.SHM_EPROCS:
        return None
    return _check(int(slot))


def proc_detach(h: Handle, slot: int) -> None:
    _check(lib.shm_proc_detach(h, slot))


@dataclass
class SlotRow:
    """One slot of the process table as read (without the lock: each field is atomic)."""

    slot: int
    state: int
    pid: int
    start_time: int
    usage: int
    peak: int
    limit: int
    nblocks: int
    nallocs: int
    nfrees: int


def proc_info(h: Handle, slot: int) -> SlotRow:
    return _fetch(SlotRow, "shm_proc_info_t *", lib.shm_proc_info, h, slot, slot=slot)


def proc_rows(h: Handle) -> Iterator[SlotRow]:
    """Every slot of the process table, in order."""
    return (proc_info(h, slot) for slot in range(MAX_PROCS))


def proc_set_limit(h: Handle, slot: int, limit: int) -> None:
    _check(lib.shm_proc_set_limit(h, slot, limit))


def proc_mark_dead(h: Handle, slot: int, pid: int, start_time: int) -> bool:
    """Mark slot DEAD if it still holds (pid, start_time) as LIVE and its life lock is not held;
    False if it did not (the slot changed, or its process runs)."""
    return _check(lib.shm_proc_mark_dead(h, slot, pid, start_time)) == 1


LIFE_UNHELD: int = lib.SHM_LIFE_UNHELD
LIFE_HELD: int = lib.SHM_LIFE_HELD
LIFE_DEAD: int = lib.SHM_LIFE_DEAD


def proc_life(h: Handle, slot: int) -> int:
    """What slot's life lock says, read without a lock: LIFE_HELD (its process runs, in whatever
    PID namespace), LIFE_DEAD (it has ended) or LIFE_UNHELD (nobody holds it: ask /proc)."""
    return _check(int(lib.shm_proc_life(h, slot)))


def proc_trim_request(h: Handle, slot: int) -> None:
    _check(lib.shm_proc_trim_request(h, slot))


def proc_trim_ack(h: Handle, slot: int) -> None:
    _check(lib.shm_proc_trim_ack(h, slot))


# ------------------------------------------------------------------ coordinator lease


def lease_get(h: Handle) -> tuple[int, int]:
    """The coordinator lease's holder as (pid, start time); (0, 0) when nobody holds it."""
    pid, start = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    _check(lib.shm_lease_get(h, pid, start))
    return int(pid[0]), int(start[0])


def lease_swap(h: Handle, old: tuple[int, int], new: tuple[int, int]) -> bool:
    """Hand the lease from ``old`` to ``new`` (each (pid, start time)) if ``old`` holds it;
    False if someone else does."""
    return _check(int(lib.shm_lease_swap(h, old[0], old[1], new[0], new[1]))) == 1


# ------------------------------------------------------------------ caches


def cache_flush(h: Handle, slot: int) -> None:
    _check(lib.shm_cache_flush(h, slot))


def cache_set_limit(h: Handle, limit: int) -> None:
    _check(lib.shm_cache_set_limit(h, min(limit, U64_MAX)))


@dataclass(frozen=True)
class CacheInfo:
    """One process's cache (shm_cache_info_t)."""

    cached_bytes: int
    cached_blocks: int
    nallocs: int
    nfrees: int
    remote_bytes: int
    remote_pending: int


def cache_info(h: Handle, slot: int) -> CacheInfo:
    return _fetch(CacheInfo, "shm_cache_info_t *", lib.shm_cache_info, h, slot)


# ------------------------------------------------------------------ names


def name_bind(h: Handle, name: bytes, address: int) -> None:
    _check(lib.shm_name_bind(h, name, address), address)


def name_lookup(h: Handle, name: bytes) -> int | None:
    """The address bound to ``name``, or None."""
    r = lib.shm_name_lookup(h, name)
    if r == lib.SHM_ENOENT:
        return None
    return _check(int(r))


def name_unbind(h: Handle, name: bytes) -> bool:
    """Remove ``name``; False if it was not bound."""
    rc = lib.shm_name_unbind(h, name)
    if rc == lib.SHM_ENOENT:
        return False
    _check(rc)
    return True


def names(h: Handle) -> list[str]:
    """Every bound name, in directory order."""
    buf = ffi.new("char[]", NAME_LEN)
    addr = ffi.new("uint64_t *")
    out = []
    for i in range(MAX_NAMES):
        if _check(lib.shm_name_at(h, i, buf, addr)) == 1:
            out.append(ffi.string(buf).decode("utf-8", "replace"))
    return out


# ------------------------------------------------------------------ collection


@dataclass(frozen=True)
class GcResult:
    """What one C collection freed (shm_gc_result_t)."""

    freed_blocks: int = 0
    freed_bytes: int = 0
    procs_cleaned: int = 0
    refs_dropped: int = 0


def gc(h: Handle, slot: int, all_blocks: bool, who: tuple[int, int] = (0, 0)) -> GcResult | None:
    """Collect dead slots (slot -1: all of them) or, with ``all_blocks``, every block of slot.
    With ``who`` = (pid, start time), only while the slot still holds that process: None when it
    went to another process meanwhile (nothing freed)."""
    res = ffi.new("shm_gc_result_t *")
    rc = lib.shm_gc(h, slot, int(all_blocks), who[0], who[1], res)
    if rc == lib.SHM_ENOENT:
        return None
    _check(rc)
    return _read(GcResult, res)


def segment_check(h: Handle) -> None:
    """CorruptionDetected if the segment was truncated under this mapping (one fstat; touches
    nothing in the segment)."""
    _check(lib.shm_segment_check(h))


def check(h: Handle, into: type[_Row], **given: Any) -> _Row:
    """The full heap walk's counts (shm_check_report_t), read into ``into`` (see _read)."""
    return _fetch(into, "shm_check_report_t *", lib.shm_check, h, **given)


# ------------------------------------------------------------------ event ring


def event_push(h: Handle, kind: int, pid: int, time_ns: int, fields: list[int]) -> bool:
    """Put an event in the ring; False if the ring was full (counted as dropped)."""
    rc = lib.shm_event_push(h, kind, pid, time_ns, *fields)
    if rc == lib.SHM_EFULL or rc == lib.SHM_EBUSY:
        return False
    _check(rc)
    return True


@dataclass(frozen=True)
class RingEvent:
    kind: int
    pid: int
    time_ns: int
    fields: tuple[int, ...]


def event_pop(h: Handle) -> RingEvent | None:
    """The oldest event in the ring, or None when it is empty."""
    cell = ffi.new("shm_event_t *")
    if _check(lib.shm_event_pop(h, cell)) != 1:
        return None
    return RingEvent(
        int(cell.kind), int(cell.pid), int(cell.time_ns), tuple(int(v) for v in cell.f)
    )


def event_dropped(h: Handle) -> int:
    return int(lib.shm_event_dropped(h))


# ------------------------------------------------------------------ waiting on words (wait.c)


def _sleep(call: Callable[[int], int], timeout: float | None, address: int) -> bool:
    """Run ``call(ns)``, a C wait of at most ns nanoseconds (-1: no limit), until it reports a wake
    or the timeout passes; a signal's interruption (EINTR) waits again for the time left."""
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    while True:
        ns = -1 if deadline is None else max(int((deadline - time.monotonic()) * 1e9), 0)
        rc = call(ns)
        if rc == lib.SHM_OK:
            return True
        if rc == lib.SHM_ETIMEDOUT:
            return False
        if rc != lib.SHM_EINTR:
            _check(rc, address)


def wait(h: Handle, word_offset: int, expected: int, timeout: float | None) -> bool:
    """Sleep while the 32-bit word at ``word_offset`` holds ``expected``, at most ``timeout``
    seconds (None: no limit). True when woken or the word changed (re-check the condition),
    False at the timeout. A signal interrupts the sleep: its Python handler runs (and may raise)
    as this function returns to the interpreter between two waits, then the wait goes on with the
    time left."""
    return _sleep(lambda ns: lib.shm_wait(h, word_offset, expected, ns), timeout, word_offset)


def wake(h: Handle, word_offset: int, n: int = -1) -> int:
    """Wake up to ``n`` sleepers on the word (-1: all); returns how many were woken."""
    return _check(int(lib.shm_wake(h, word_offset, n)), word_offset)


def word_bump(h: Handle, word_offset: int, n: int = -1) -> int:
    """Add 1 to the word, then wake up to ``n`` sleepers on it: a waker's half of the protocol."""
    return _check(int(lib.shm_word_bump(h, word_offset, n)), word_offset)


def word_load(h: Handle, word_offset: int) -> int:
    """The 32-bit word at ``word_offset``, read atomically."""
    return _check(int(lib.shm_word_load(h, word_offset)), word_offset)


def bind_seq_offset() -> int:
    """Segment offset of the word every bind bumps (get(name) sleeps on it)."""
    return int(lib.shm_bind_seq_offset())


# ------------------------------------------------------------------ objects (objects.c)


def pin_buffer(view: memoryview, on_release: Callable[[], None]) -> Any:
    """A buffer over ``view``'s memory that keeps ``view`` (and so its exporter, the arena's
    mapping) alive, and calls ``on_release`` once neither it nor any memoryview made from it
    is alive any more."""
    pinned = ffi.gc(ffi.from_buffer(view), lambda _: on_release())
    return ffi.buffer(pinned, view.nbytes)


class ObjectView(NamedTuple):
    """Where an open object's bytes are (shm_object_get's words and its buffer table)."""

    address: int
    id: int
    pickle: int
    pickle_len: int
    nbytes: int
    flags: int
    buffers: tuple[tuple[int, int], ...]  # (address, nbytes) of each out-of-band buffer


GET_WORDS: int = lib.SHM_GET_WORDS
# STREAM_COPY_MAX (from _fastcall): a buffer-less stream up to this size is copied out


class _Scratch(threading.local):
    """This thread's out-parameters of the combined calls, made once per thread instead of per
    call (a thread's own: a call releases the GIL while C fills them)."""

    def __init__(self) -> None:
        self.out = ffi.new("uint64_t[]", GET_WORDS + 2 * OBJECT_MAX_BUFFERS)
        self.dst = ffi.new("char[]", STREAM_COPY_MAX)
        self.seq = ffi.new("uint32_t *")


_scratch = _Scratch()


def _put_args(bufs: Sequence[Any] | None, sizes: Sequence[int]) -> tuple[Any, Any]:
    """The (buffer pointers, sizes) arguments of a put: C arrays made by cffi for the call."""
    if not sizes:
        return ffi.NULL, ffi.NULL
    return (ffi.NULL if bufs is None else [ffi.from_buffer(b) for b in bufs]), sizes


def object_put(
    h: Handle,
    slot: int,
    data: bytes,
    sizes: Sequence[int],
    bufs: Sequence[Any] | None,
    writable: bool,
) -> tuple[int, int, list[int]]:
    """put() in one call: a new object with the pickle stream ``data`` and one block per buffer
    (``sizes``; ``bufs`` copied in unless None), published and held by slot. Returns its
    address, its id and the buffers' addresses."""
    out = _scratch.out
    ptrs, sz = _put_args(bufs, sizes) if sizes else (ffi.NULL, ffi.NULL)
    rc = lib.shm_object_put(h, slot, data, len(data), len(sizes), ptrs, sz, writable, out)
    if rc < 0:
        raise_status(rc)
    return out[0], out[1], ffi.unpack(out + 2, len(sizes)) if sizes else []


def object_create(
    h: Handle, slot: int, pickle_len: int, sizes: Sequence[int]
) -> tuple[int, int, list[int]]:
    """Allocate an unpublished object: (header address, pickle stream address, buffer
    addresses). Write them, then :func:`object_publish` (:func:`object_put` does all three)."""
    n = len(sizes)
    out = ffi.new("uint64_t[]", n + 2)
    _check(lib.shm_object_create(h, slot, pickle_len, n, list(sizes), out))
    return int(out[0]), int(out[1]), [int(out[2 + i]) for i in range(n)]


def object_publish(h: Handle, slot: int, address: int, writable: bool) -> int:
    """Make the written object live, held by slot; returns its id."""
    oid = ffi.new("uint64_t *")
    _check(lib.shm_object_publish(h, slot, address, int(writable), oid), address)
    return int(oid[0])


# ObjectView(...) runs NamedTuple's Python-level __new__; tuple.__new__ builds the same in C
new_view: Callable[[tuple[Any, ...]], ObjectView] = partial(tuple.__new__, ObjectView)


def _view(out: CData) -> ObjectView:
    """The ObjectView of a combined call's out words (with its first buffer pair: one unpack
    for the common object of at most one buffer)."""
    w = ffi.unpack(out, GET_WORDS + 2)
    n = w[6]
    if n <= 1:
        bufs = ((w[GET_WORDS], w[GET_WORDS + 1]),) if n else ()
        return new_view((w[0], w[1], w[2], w[3], w[4], w[5], bufs))
    it = iter(ffi.unpack(out + GET_WORDS, 2 * n))
    return new_view((w[0], w[1], w[2], w[3], w[4], w[5], tuple(zip(it, it, strict=True))))


def object_get(
    h: Handle, slot: int, address: int, oid: int, name: bytes | None = None, copy: bool = False
) -> tuple[ObjectView | None, bytes | None, int]:
    """get() in one call: the object (address, oid), or the one bound to ``name``, opened for
    slot: (its view, None, bind_seq), slot holding it from now on (idempotent). With ``copy``,
    an object without out-of-band buffers whose stream is at most STREAM_COPY_MAX bytes comes
    back as (None, the stream's bytes, bind_seq) instead, slot's hold left as it was.
    ObjectNotFound if gone; for a name that is not bound, (None, None, the bind sequence word
    read with the lookup: sleep on it with :func:`wait` to learn of the next bind)."""
    s = _scratch
    out = s.out
    rc = lib.shm_object_get(
        h,
        slot,
        address,
        oid,
        ffi.NULL if name is None else name,
        out,
        OBJECT_MAX_BUFFERS,
        s.dst,
        STREAM_COPY_MAX if copy else 0,
    )
    if rc < 0:
        if rc == lib.SHM_ENOENT and name is not None:
            return None, None, out[7]
        raise_status(rc, address)
    if rc == 1:
        return None, ffi.unpack(s.dst, out[3]), out[7]
    return _view(out), None, out[7]


def object_open(h: Handle, slot: int, address: int, oid: int) -> ObjectView:
    """slot holds the object (idempotent) and learns its layout; ObjectNotFound if gone."""
    view = object_get(h, slot, address, oid)[0]
    assert view is not None
    return view


def object_release(h: Handle, slot: int, address: int, oid: int) -> bool | None:
    """Drop slot's reference: True if that freed the object, False if not, None if slot held
    none (or the object is gone), or if ``h`` is closing (a finalizer that runs during close: the
    reference stays the slot's, reclaimed with it)."""
    rc = lib.shm_object_release(h, slot, address, oid)
    if rc == lib.SHM_ENOENT or rc == lib.SHM_ECLOSED:
        return None
    return _check(rc, address) == 1


def object_delete(h: Handle, address: int, oid: int) -> bool:
    """No new references; names and tickets go. True if that freed it; ObjectNotFound if gone."""
    return _check(lib.shm_object_delete(h, address, oid), address) == 1


def object_own(h: Handle, slot: int, address: int, oid: int) -> None:
    """slot owns the object: holds it until it ends or anyone deletes it."""
    _check(lib.shm_object_own(h, slot, address, oid), address)


def object_hold(h: Handle, address: int) -> None:
    """An anonymous hold (a queue slot, a reference in transit); ObjectNotFound if gone."""
    _check(lib.shm_object_hold(h, address), address)


def object_drop(h: Handle, address: int) -> bool:
    """Drop an anonymous hold: True if that freed the object."""
    return _check(lib.shm_object_drop(h, address), address) == 1


def ticket_issue(h: Handle, address: int, oid: int) -> tuple[int, int]:
    """A transit ticket (address, id) holding the object until claimed or expired."""
    t, tid = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    _check(lib.shm_ticket_issue(h, address, oid, t, tid), address)
    return int(t[0]), int(tid[0])


def ticket_claim(h: Handle, slot: int, ticket: int, ticket_id: int, address: int, oid: int) -> bool:
    """slot holds the object: True if it took the ticket's hold, False if the ticket was gone
    (a plain reference then); ObjectNotFound if the object is gone."""
    return _check(lib.shm_ticket_claim(h, slot, ticket, ticket_id, address, oid), address) == 1


def objects_expire(h: Handle) -> int:
    """Drop the transit tickets whose deadline passed; returns how many."""
    return _check(int(lib.shm_objects_expire(h)))


def objects_set_transit_timeout(h: Handle, seconds: float) -> None:
    _check(lib.shm_objects_set_transit_timeout(h, max(int(seconds * 1e9), 1)))


@dataclass(frozen=True)
class ObjectsInfo:
    """The arena's object counts (shm_objects_info_t)."""

    live: int
    tickets: int
    dying: int
    transit_timeout: float
    held: int


def objects_info(h: Handle, slot: int = -1) -> ObjectsInfo:
    i = ffi.new("shm_objects_info_t *")
    _check(lib.shm_objects_info(h, slot, i))
    return ObjectsInfo(
        int(i.live), int(i.tickets), int(i.dying), int(i.transit_timeout_ns) / 1e9, int(i.held)
    )


# ------------------------------------------------------------------ numpy's handler (npalloc.c)


@dataclass(frozen=True)
class NpStats:
    """What one arena handler gave numpy (shm_np_stats_t)."""

    arena_allocs: int
    arena_blocks: int
    fallbacks: int
    lent: int
    lent_live: int
    free_failures: int


def np_new(h: Handle, slot: int, threshold: int, fallback: int) -> CData:
    """A numpy memory handler over the arena of ``h`` for ``slot``, falling back to the
    PyDataMem_Handler at address ``fallback``; freed by its capsule's destructor only."""
    np = lib.shm_np_new(h, slot, threshold, ffi.cast("void *", fallback))
    if np == ffi.NULL:
        raise MemoryError("no memory for a numpy handler")
    return np


def np_handler(np: CData) -> int:
    """The address of the handler's PyDataMem_Handler (the capsule's pointer)."""
    return int(ffi.cast("uintptr_t", lib.shm_np_handler(np)))


def np_capsule_name() -> int:
    """The address of the C core's static "mem_handler", the name numpy wants on the capsule."""
    return int(ffi.cast("uintptr_t", lib.shm_np_capsule_name()))


def np_capsule_destructor() -> int:
    """The address of the C function that frees a handler when its capsule goes."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "shm_np_capsule_free")))


def np_address(np: CData, data: int) -> int | None:
    """The arena address of ``data`` if numpy got that pointer from this handler's arena."""
    r = lib.shm_np_address(np, data)
    return None if r < 0 else int(r)


def np_lend(np: CData, data: int, pickle: bytes, nbytes: int) -> tuple[int, int]:
    """Publish, without a copy, an object whose buffer is the block under ``data`` (``nbytes``
    of it) and whose stream is ``pickle``: (its address, its id), held by the handler's slot."""
    out = ffi.new("uint64_t[2]")
    _check(lib.shm_np_lend(np, data, pickle, len(pickle), nbytes, out))
    return int(out[0]), int(out[1])


def np_stats(np: CData) -> NpStats:
    out = ffi.new("shm_np_stats_t *")
    lib.shm_np_stats(np, out)
    return _read(NpStats, out)


# ------------------------------------------------------------------ queues (queue.c)

QPUT_NEW: int = lib.SHM_QPUT_NEW
QPUT_VALUE: int = lib.SHM_QPUT_VALUE
QPUT_REF: int = lib.SHM_QPUT_REF
QPUT_FORCE: int = lib.SHM_QPUT_FORCE
QWAIT_NOT_EMPTY: int = lib.SHM_QWAIT_NOT_EMPTY
QWAIT_NOT_FULL: int = lib.SHM_QWAIT_NOT_FULL
QWAIT_ALL_DONE: int = lib.SHM_QWAIT_ALL_DONE


def queue_create(h: Handle, slot: int, maxsize: int, joinable: bool) -> tuple[int, int]:
    """A new queue object held by slot: (address, id)."""
    q, qid = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    _check(lib.shm_queue_create(h, slot, maxsize, int(joinable), q, qid))
    return int(q[0]), int(qid[0])


def queue_put(
    h: Handle, slot: int, queue: int, queue_id: int, address: int, oid: int, mode: int
) -> int | None:
    """Put the object at ``address`` (QPUT_* mode): None when done, else the queue is full and
    the value of its not_full wait word is returned (sleep on it with ``Port.wait``)."""
    seq = _scratch.seq
    rc = lib.shm_queue_put(h, slot, queue, queue_id, address, oid, mode, seq)
    if rc == lib.SHM_OK:
        return None
    if rc == lib.SHM_QPUT_FULL:
        return int(seq[0])
    raise_status(rc, address)


def queue_task_done(h: Handle, queue: int, queue_id: int) -> None:
    _check(lib.shm_queue_task_done(h, queue, queue_id), queue)


@dataclass(frozen=True)
class QueueInfo:
    """A queue's counts (shm_queue_info_t), read together under the heap lock."""

    size: int
    maxsize: int
    capacity: int
    unfinished: int
    put: int
    control: int
    all_done_seq: int
    joinable: bool


def queue_info(h: Handle, queue: int, queue_id: int) -> QueueInfo:
    i = ffi.new("shm_queue_info_t *")
    _check(lib.shm_queue_info(h, queue, queue_id, i), queue)
    return _read(QueueInfo, i, joinable=bool(i.joinable))


# ------------------------------------------------------------------ debugging and tests


def lock_owner(h: Handle, which: int) -> int:
    """The thread id holding the heap lock (which = -1) or a slot's lock; 0 when free."""
    tid = ffi.new("uint32_t *")
    _check(lib.shm_lock_owner(h, which, tid))
    return int(tid[0])


def lock_offset(which: int) -> int:
    """Segment offset of the heap lock (-1) or a slot's lock."""
    return _check(int(lib.shm_lock_offset(which)))


def debug_lock_forge(h: Handle, which: int, tid: int, ns: int = 0, slot: int = -1) -> None:
    """Tests only: make a lock look held by thread ``tid`` (0: unlocked), stamped as a holder in
    the PID namespace ``ns`` (an inode; 0: unknown) with the slot ``slot`` (-1: none) stamps it."""
    _check(lib.shm_debug_lock_forge(h, which, tid, ns, slot))


def pid_namespace() -> int:
    """The inode of this process's PID namespace (/proc/self/ns/pid); 0 if unknown."""
    return int(lib.shm_pid_namespace())


def debug_block_checksum(base: CData, capacity: int, header_offset: int) -> int:
    """The checksum block.c expects in the block header at ``header_offset`` (fuzzers)."""
    return int(lib.shm_debug_block_checksum(base, capacity, header_offset))


def fault_steps() -> list[str]:
    """The names of the fault-injection steps compiled into the core (SHMALLOC_FAULT)."""
    n = int(lib.shm_fault_step_count())
    return [ffi.string(lib.shm_fault_step_name(i)).decode() for i in range(n)]


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))


def offsetof(ctype: str, *fields: str) -> int:
    return int(ffi.offsetof(ctype, *fields))
