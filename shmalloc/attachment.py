"""This process's attachment to one arena: the mapping, the descriptor, the C handle, the slot.

An :class:`Attachment` is everything about an arena that is local to one process. The arena's
state itself lives in the segment and is read through the C core; the modules of functions
(tracking, ownership, collection) and the :class:`~shmalloc.manager.MemoryManager` façade all
act on an Attachment.
"""

from __future__ import annotations

import mmap
import operator
import os
import re
import secrets
import stat
import time
import weakref
from collections.abc import Callable
from typing import Any, SupportsIndex

import posix_ipc

from . import _binding as C
from . import process
from .errors import NotAnArena
from .events import RARE, Event, encode

__all__ = ["Attachment", "check_int", "own_arena_mode", "validate_name"]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:@+-]{0,199}")
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory segments

# A segment being formatted, before it is linked to its name: this prefix, the creator's pid, a
# random part. One left by a creator killed mid-way is swept by a later create once it is older
# than ABANDONED_AFTER seconds (formatting takes milliseconds; the age, not the pid, decides,
# since the creator may run in another pid namespace sharing /dev/shm).
_CREATING = ".shmalloc-creating-"
ABANDONED_AFTER = 600.0


def _sweep_abandoned() -> None:
    """Unlink this user's half-formatted segments that their creators abandoned long ago."""
    now = time.time()
    with os.scandir(SHM_DIR) as it:
        for e in it:
            if not e.name.startswith(_CREATING):
                continue
            try:
                st = e.stat(follow_symlinks=False)
                if st.st_uid == os.geteuid() and now - st.st_mtime > ABANDONED_AFTER:
                    os.unlink(e.path)
            except FileNotFoundError:
                continue  # its creator finished, or another sweep took it


# Attachments open in this process: a fork child forgets their slots (it is a new process).
_open: weakref.WeakSet[Attachment] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for a in list(_open):
        a.slot = -1


os.register_at_fork(after_in_child=_after_fork_in_child)


def validate_name(name: object) -> str:
    """An arena name: 1-200 characters of [A-Za-z0-9._:@+-], not starting with a dot or dash."""
    if not isinstance(name, str):
        raise TypeError(f"an arena name must be a str, not {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid arena name {name!r}: use 1-200 characters of letters, digits and ._:@+- "
            "(no '/', no NUL), starting with a letter, digit or underscore"
        )
    return name


def check_int(value: object, what: str) -> int:
    """``value`` as an int (anything ``operator.index`` takes, e.g. numpy integers, but not a
    bool), or TypeError naming ``what``."""
    if value.__class__ is int:
        return value  # the hot case, checked exactly
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(operator.index(value))


def _owner_of(name: str) -> str:
    """``it belongs to uid U with mode 0MMM`` for the segment ``name`` (without following a
    symbolic link), for messages."""
    try:
        st = os.lstat(os.path.join(SHM_DIR, name))
    except OSError:
        return "it belongs to another user"
    return f"it belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}"


def _not_a_segment(name: str) -> str:
    """Why /dev/shm/NAME, which shm_open refused, is no segment at all ('' if it looks like
    one)."""
    try:
        st = os.lstat(os.path.join(SHM_DIR, name))
    except OSError:
        return ""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link, not a shared-memory segment (links are never followed)"
    if stat.S_ISDIR(st.st_mode):
        return "it is a directory, not a shared-memory segment"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a shared-memory segment (not a regular file)"
    return ""


def _check_owner(name: str, st: os.stat_result, mode: int) -> None:
    """Refuse a segment that another user could have planted or can read: one owned by another
    uid (unless ``mode`` itself lets other users in: the caller shares on purpose), or one
    whose permission bits go beyond ``mode``."""
    found = stat.S_IMODE(st.st_mode)
    me = os.geteuid()
    if st.st_uid != me and not mode & 0o077:
        raise PermissionError(
            f"arena {name!r} belongs to uid {st.st_uid} (mode {found:04o}), not to this user "
            f"(uid {me}): another user may have planted it to read what is written there; "
            "refused. Remove it if it is not yours, or attach with the mode it was shared with "
            "(e.g. mode=0o660) if another user shares it with you on purpose"
        )
    if found & ~mode:
        raise PermissionError(
            f"arena {name!r} has mode {found:04o} (owner uid {st.st_uid}), wider than the "
            f"{mode:04o} asked for: other users can open it; attach with mode=0o{found:o} if "
            "that is intended, or recreate it with a narrower mode"
        )


def own_arena_mode(name: str) -> int:
    """The mode an operator's tool (the command line, the coordinator) attaches with: an arena of
    this user is taken with the mode it was created with (``create(..., mode=)``: its creator
    chose it); any other is held to 0600, so that one planted by another user is refused."""
    try:
        st = os.lstat(os.path.join(SHM_DIR, name))
    except OSError:
        return 0o600
    if st.st_uid != os.geteuid():
        return 0o600
    return stat.S_IMODE(st.st_mode) | 0o600


class Attachment(C.Fields):
    """One process's view of an arena. Made by :meth:`create` or :meth:`open`."""

    # port, slot and collector are members of the C base (C.Fields): the C halves of allocate,
    # deallocate and a queue's put and get read them without a lookup.
    __slots__ = (
        "name", "capacity", "h", "fd", "slot_pid", "pressure_callbacks", "mm", "base", "mv",
        "__weakref__",
    )  # fmt: skip

    name: str
    capacity: int
    h: C.Handle  # None once closed
    # port: the hot calls' door to ``h`` (native/fastcall.c), None once closed
    # slot: this process's slot in the process table, -1 until the first allocation
    # collector: the callback of this process's events, or None
    fd: int  # the segment's descriptor, open while attached
    slot_pid: int  # the pid that claimed ``slot`` (a fork child has another)
    pressure_callbacks: list[Callable[[], None]]

    def __init__(self, name: str) -> None:
        self.name = validate_name(name)
        self.h = None
        self.port = None
        self.slot = -1
        self.slot_pid = 0
        self.collector = None
        self.pressure_callbacks = []

    # ------------------------------------------------------------ opening and closing

    @classmethod
    def create(cls, name: str, capacity: int, mode: int) -> Attachment:
        """Create, size, map and format the segment ``name``. It is formatted under a private
        name (a dot name, which no arena has) and then linked to ``name``, which fails if the
        name exists: no process ever sees a half-formatted arena under its name."""
        a = cls(name)
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        rounded = -(-capacity // mmap.PAGESIZE) * mmap.PAGESIZE
        minimum = C.header_size() + mmap.PAGESIZE
        if rounded < minimum or rounded > 1 << 40:
            raise ValueError(
                f"capacity {capacity} is out of range: give between {minimum} bytes and 1 TiB"
            )
        exists = FileExistsError(
            f"an arena named {name!r} already exists; attach to it or pick another name"
        )
        if os.path.lexists(os.path.join(SHM_DIR, name)):
            raise exists
        _sweep_abandoned()
        private = f"{_CREATING}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            shm = posix_ipc.SharedMemory("/" + private, posix_ipc.O_CREX, mode=mode, size=rounded)
        except posix_ipc.PermissionsError as e:
            raise PermissionError(f"cannot create arena {name!r}: {e}") from None
        try:
            a._map(shm.fd, rounded)
            C.arena_format(a.base, rounded, shm.fd, secrets.randbits(64), time.time_ns())
            a._set_handle(C.handle_open(a.base, rounded, shm.fd))
            os.link(os.path.join(SHM_DIR, private), os.path.join(SHM_DIR, name))
        except BaseException as e:
            a._set_handle(None)  # (freed with its last reference) so that __del__ leaves the fd
            a._unmap()
            shm.close_fd()
            if isinstance(e, FileExistsError):
                raise exists from None
            raise
        finally:
            posix_ipc.unlink_shared_memory("/" + private)
        a.fd = shm.fd
        _open.add(a)
        return a

    @classmethod
    def open(cls, name: str, mode: int = 0o600) -> Attachment:
        """Map the existing segment ``name`` and check that it is an arena that this user owns
        (or, when ``mode`` lets other users in, that the caller agreed to share) and whose mode
        is no wider than ``mode``: PermissionError naming the owner and the mode otherwise."""
        a = cls(name)
        try:
            shm = posix_ipc.SharedMemory("/" + name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                f"no arena named {name!r} (see `shmalloc list`); create it first"
            ) from None
        except posix_ipc.PermissionsError:
            raise PermissionError(
                f"arena {name!r} exists but this user (uid {os.geteuid()}) may not open it; "
                f"{_owner_of(name)}: run as that user"
            ) from None
        except (OSError, ValueError):  # ELOOP: a symbolic link; EINVAL/EISDIR: a directory
            why = _not_a_segment(name)
            if not why:
                raise  # a failure of the system (e.g. no descriptor left), not of the segment
            raise NotAnArena(name, why) from None
        try:
            st = os.fstat(shm.fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotAnArena(name, "it is not a shared-memory segment (not a regular file)")
            capacity = st.st_size  # create() links it sized and formatted
            if capacity < C.header_size() + mmap.PAGESIZE:
                raise NotAnArena(name, f"the segment is {capacity} bytes, too small for an arena")
            _check_owner(name, st, mode)  # before the C core reads or writes a byte of it
        except BaseException:
            shm.close_fd()
            raise
        try:
            a._map(shm.fd, capacity)
            try:
                a._set_handle(C.handle_open(a.base, capacity, shm.fd))  # create() formatted it
            except NotAnArena as e:
                raise NotAnArena(name, e.detail) from None
        except BaseException:
            a._unmap()
            shm.close_fd()
            raise
        a.fd = shm.fd
        _open.add(a)
        return a

    def _map(self, fd: int, capacity: int) -> None:
        self.capacity = capacity
        self.mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
        self.base = C.buffer_of(self.mm)
        self.mv = memoryview(self.mm)

    def _unmap(self) -> None:
        mv = getattr(self, "mv", None)
        if mv is not None:
            mv.release()
        base = getattr(self, "base", None)
        if base is not None:
            C.release(base)
        mm = getattr(self, "mm", None)
        if mm is not None:
            mm.close()

    def _set_handle(self, h: C.Handle) -> None:
        self.h = h
        self.port = None if h is None else C.port(h)

    @property
    def closed(self) -> bool:
        return self.h is None

    def handle(self) -> C.Handle:
        """The C handle; ValueError once closed in this process."""
        h = self.h
        if h is None:
            raise self.closed_error()
        return h

    def open_port(self) -> C.Port:
        """The Port of the handle (native/fastcall.c); ValueError once closed in this process."""
        port = self.port
        if port is None:
            raise self.closed_error()
        return port

    def closed_error(self) -> ValueError:
        """The error of a call on an arena closed in this process (also by another thread while
        the call ran: the mapping's views are then released under it)."""
        return ValueError(f"arena {self.name!r} is closed in this process; attach again")

    def close(self) -> None:
        """Give the slot back (if this process owns nothing there), unmap, close the handle.

        A thread of this process inside a call when the close begins is waited for; a call that
        begins after it raises ValueError (the C core's gate: native/arena.c), and so does one
        made during a close that is then refused. BufferError (and
        still open) while views or arrays into the mapping are alive."""
        h = self.h
        if h is None:
            return
        if not C.handle_shutdown(h):
            return  # another thread of this process is closing it
        # Python cannot ask an mmap how many views it has, so detach first (the gate lets this
        # thread through) and, if the close is refused, forget the slot: the next allocation
        # claims it again.
        try:
            self._detach_slot(h)
        except BaseException:
            C.handle_reopen(h)
            raise
        # No thread is inside the C core with this handle now, and none can enter, this one
        # included from here on (a signal handler run in it meanwhile would find the gate shut):
        # unmapping is safe. Python's own reads and writes through the mapping hold the GIL, as
        # this does: they come before the unmap, or after it and raise ValueError (closed mmap,
        # released view).
        C.handle_closed(h)
        self.mv.release()
        C.release(self.base)
        try:
            self.mm.close()
        except BufferError:
            self.base = C.buffer_of(self.mm)
            self.mv = memoryview(self.mm)
            self.slot = -1
            C.handle_reopen(h)
            raise BufferError(
                f"cannot close arena {self.name!r}: views or arrays into it are still alive; "
                "release them (view.release(), del array) first"
            ) from None
        self._set_handle(None)  # its memory goes with its last reference (C.handle_open)
        self.slot = -1
        os.close(self.fd)
        _open.discard(self)

    def _detach_slot(self, h: C.Handle) -> None:
        """Give this process's slot back unless another open attachment of this process to the
        same arena uses it (they share the slot: it is keyed by pid and start time)."""
        if self.slot < 0 or self.slot_pid != os.getpid():
            return
        if any(a is not self and not a.closed and a.name == self.name for a in list(_open)):
            return
        C.proc_detach(h, self.slot)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # os.close bound as a default: at interpreter exit this may run after the module's globals
        # were cleared (an arena object still held by multiprocessing's Process in a spawn child)
        if getattr(self, "h", None) is not None:
            self._set_handle(None)  # the handle is freed with its last reference (ffi.gc)
            _close(self.fd)

    def destroy(self) -> None:
        """Unlink the segment (idempotent). Mappings already open keep working until closed."""
        try:
            posix_ipc.unlink_shared_memory("/" + self.name)
        except posix_ipc.ExistentialError:
            pass  # already unlinked: destroy is idempotent

    # ------------------------------------------------------------ events

    def emit(self, name: str, **fields: Any) -> None:
        """Deliver an event to this process's collector, if any; rare events (all but
        allocated/deallocated) also go to the arena's ring for the coordinator, collector or not.
        The hot pair stays out of the ring: the coordinator reads their totals from counters."""
        collector = self.collector
        rare = name in RARE
        if collector is None and not rare:
            return
        ev = Event(name, process.current_pid(), time.time(), fields)
        if collector is not None:
            collector(ev)
        if rare:
            kind, values = encode(ev)
            C.event_push(self.handle(), kind, ev.pid, int(ev.time * 1e9), values)
