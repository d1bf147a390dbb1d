"""A drop-in for ``multiprocessing.shared_memory`` and ``SharedMemoryManager``, on arena blocks.

    from shmalloc import compat as shared_memory  # was: from multiprocessing import shared_memory
    from shmalloc.compat import SharedMemoryManager  # was: from multiprocessing.managers import ...

``SharedMemory``, ``ShareableList`` and ``SharedMemoryManager`` have the standard library's public
API and behaviour, but each object is a block of one shmalloc arena instead of a POSIX segment of
its own: creating one is an allocation, not a ``shm_open`` + ``ftruncate`` + ``mmap``.

Which arena
    Objects go to the *current arena* of this process. By default that is the arena named by the
    environment variable ``SHMALLOC_COMPAT_ARENA``, else ``shmalloc-compat-<uid>``: one per user,
    created on first use with a capacity of ``default_capacity()``: the size of ``/dev/shm``, at
    most 1 TiB (reserved lazily: it costs only what is used, so objects as large as the machine
    allows fit)
    and attached by every later process. When two processes race to create it, the loser's
    ``FileExistsError`` turns into an attach. ``set_arena(manager_or_name)`` picks another arena
    (a ``MemoryManager``, or a name that is attached or created); it also exports the name in
    ``SHMALLOC_COMPAT_ARENA`` so that spawned children and subprocesses find the same arena, while
    fork children inherit it anyway. ``set_arena(None)`` goes back to the default.
    ``get_arena()`` returns the current arena's ``MemoryManager``.

    The default name is predictable and ``/dev/shm`` is writable by every user, so the default
    arena is created with mode 0600 and an existing one is used only if this user owns it and
    its mode is 0600 or narrower: one planted by another user raises ``PermissionError`` naming
    its owner and mode (``MemoryManager.attach``), and nothing is written into it.

What a name is
    A block's name (``psm_`` and 8 hex digits when generated, like the standard library's) is
    bound in the arena's named-block directory with ``MemoryManager.bind``: any process attached
    to the arena attaches by that string. Names are 1 to 55 bytes of UTF-8, and the directory
    holds 1024 names per arena. Pickling a ``SharedMemory`` records the arena's name too, so it
    unpickles in the right arena whatever the receiver's current arena is.

Lifetime: ``close()``, ``unlink()``, and processes that end
    There is no resource tracker, so the standard library's trap cannot happen here: a process
    that attaches and exits (cleanly or by ``kill -9``) never destroys a block. A named block lives
    until ``unlink()``, like a POSIX segment without a tracker.

    Every open object holds a reference on its block for its process (``MemoryManager.retain``;
    a fork child takes its own on the objects it inherits, since it may go on using them).
    ``close()`` lets go of this object's view and reference. ``unlink()`` removes the name at once:
    new attaches fail, the name may be reused, and objects already open keep working. The memory
    is freed when the last reference goes, by whichever process closes last. So, as with POSIX,
    unlinking memory still mapped elsewhere is safe: its space is never reused under a live view.
    (Freeing at unlink, the other choice, would hand the space to the next allocation while
    other processes still write to it.)

    References of processes that ended without closing die with them when the arena collects
    them; ``close``/``unlink`` run that collection before keeping a block for someone else. An
    unlinked block kept for other processes is owned by the process that unlinked or closed it
    last: that process retries it on its next ``close``/``unlink``/create, and the arena's
    collector frees it once that process ends. These decisions are made under a lock on the
    arena (``flock`` on its segment, dropped by the kernel if its holder dies), so two processes
    closing at once free a block exactly once.

    Like the standard library's, ``close()`` raises ``BufferError`` (and may be retried) while
    arrays or memoryview slices made from ``.buf`` are alive: the block cannot be freed under them.

Differences from the standard library, all deliberate
    * ``size`` on attach is the size the creator asked for (Linux's behaviour), and a new block
      reads as zeros (zeroed when created: a reused block is not fresh tmpfs); its buffer is
      64-byte aligned (the standard library's is page aligned).
    * A process that never unlinks leaves its blocks in the arena (there is no tracker to unlink
      them at exit, and no warning). ``SharedMemoryManager`` frees what it handed out on exit;
      ``shmalloc destroy shmalloc-compat-<uid>`` removes the whole default arena.
    * Over-long names raise ``ValueError`` (55 bytes here, 255 for POSIX); an arena whose name
      directory is full (1024 names) raises ``ShmallocError`` saying so and how to pick another
      arena (``set_arena``, ``SHMALLOC_COMPAT_ARENA``), as does an ``OutOfMemory``.
    * ``ShareableList`` stores its items in the standard library's formats (``.format`` matches)
      but with its own layout; an item of an unsupported type raises a ``TypeError`` that is also
      a ``KeyError`` (the standard library raises a bare ``KeyError``), and a str/bytes item of
      10 MB or more raises ``ValueError`` (the standard library fails an ``assert``).
    * ``SharedMemory(..., track=...)`` is accepted (Python 3.13's spelling) and changes nothing.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import operator
import os
import pickle
import secrets
import struct
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from multiprocessing import managers as _mp_managers
from typing import Any

import posix_ipc

from .errors import InvalidAddress, OutOfMemory, ShmallocError
from .manager import DEFAULT_CAPACITY, MemoryManager

__all__ = [
    "ARENA_ENV",
    "ShareableList",
    "SharedMemory",
    "SharedMemoryManager",
    "default_capacity",
    "get_arena",
    "set_arena",
]

ARENA_ENV = "SHMALLOC_COMPAT_ARENA"
_SHM_DIR = "/dev/shm"
_MAX_CAPACITY = 1 << 40  # the largest arena there is


def default_arena_name() -> str:
    """``$SHMALLOC_COMPAT_ARENA``, else ``shmalloc-compat-<uid>``."""
    return os.environ.get(ARENA_ENV) or f"shmalloc-compat-{os.getuid()}"


def default_capacity() -> int:
    """The capacity compat creates arenas with: the size of /dev/shm, where every block ends up,
    at most 1 TiB (1 GiB if it cannot be read). An arena costs only the pages in use, so sizing
    it for the machine costs nothing and lets objects as large as the machine allows fit."""
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return DEFAULT_CAPACITY
    size = min(st.f_frsize * st.f_blocks, _MAX_CAPACITY)
    size -= size % mmap.PAGESIZE
    if size < 1 << 20:  # a file system that reports (nearly) no size: keep the old default
        return DEFAULT_CAPACITY
    return size


def _with_compat_advice(e: ShmallocError, mgr: MemoryManager) -> ShmallocError:
    """The same error, with what a compat user can change: the arena (set_arena or the
    environment variable), since compat chose it for them."""
    advice = (
        f"shmalloc.compat puts objects in arena {mgr.name!r} ({mgr.capacity} bytes); give it "
        f"another, larger arena: compat.set_arena(MemoryManager.create(name, capacity)) or "
        f"${ARENA_ENV}=name"
    )
    if isinstance(e, OutOfMemory):
        detail = e.detail or "the arena has no free block large enough"
        return OutOfMemory(e.requested, e.available, e.used, e.total, f"{detail}. {advice}")
    return ShmallocError(f"{e}; {advice}")


# ------------------------------------------------------------------------------------ arenas


class _Arena:
    """One arena as compat uses it: its manager, and the lock under which attach, close and unlink
    decide a block's fate (an ``flock`` on a descriptor of the arena's segment).

    The lock is an RLock (``__del__`` may close an object while this thread holds it) around an
    ``flock`` taken on the outermost entry. ``flock`` belongs to an open file description, which a
    fork child shares with its parent, so a child opens its own on first use."""

    def __init__(self, mgr: MemoryManager) -> None:
        self.mgr = mgr
        self.fd = posix_ipc.SharedMemory("/" + mgr.name, read_only=True).fd
        self._fd_pid = os.getpid()
        self._mutex = threading.RLock()
        self._depth = 0

    @contextmanager
    def locked(self) -> Iterator[MemoryManager]:
        if self.mgr.closed:
            raise ValueError(f"arena {self.mgr.name!r} was closed in this process; attach again")
        with self._mutex:
            if self._depth == 0:
                if self._fd_pid != os.getpid():
                    self._reopen()
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield self.mgr
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _reopen(self) -> None:
        # /proc/self/fd reaches the segment even if its name was unlinked since
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)  # the parent keeps its own descriptor, and with it its lock
        self.fd, self._fd_pid = fd, os.getpid()

    def after_fork_in_child(self) -> None:
        self._mutex = threading.RLock()
        self._depth = 0

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # os.close is bound here: at interpreter exit this may run after the module's globals
        # were cleared (an object held by multiprocessing's Process, e.g. a spawn child's args)
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            _close(fd)


_state = threading.RLock()
# Arenas in use by this process, by name: held by their objects, by _current and by _default
# (so a test's arena is let go with its last object, while the default one stays attached).
_arenas: weakref.WeakValueDictionary[str, _Arena] = weakref.WeakValueDictionary()
_current: _Arena | None = None  # set by set_arena(); None: the default arena
_default: _Arena | None = None
_ENV_UNSET = object()
_env_before: object = _ENV_UNSET  # SHMALLOC_COMPAT_ARENA before the first set_arena()


def _open_arena(name: str, *, create: bool) -> _Arena:
    """The arena ``name``, attached once per process; with ``create``, created if absent."""
    with _state:
        a = _arenas.get(name)
        if a is not None and not a.mgr.closed:
            return a
        for _ in range(3):
            try:
                mgr = MemoryManager.attach(name)
                break
            except FileNotFoundError:
                if not create:
                    raise
            except PermissionError as e:  # another user's, or open to other users: not ours
                raise PermissionError(
                    f"shmalloc.compat will not put objects in arena {name!r}: {e}. Pick another "
                    f"arena with compat.set_arena() or ${ARENA_ENV}"
                ) from None
            try:
                mgr = MemoryManager.create(name, default_capacity())
                break
            except FileExistsError:
                continue  # another process created it meanwhile: attach to theirs
        else:
            raise FileExistsError(f"arena {name!r} keeps appearing and vanishing; retry later")
        a = _arenas[name] = _Arena(mgr)
        return a


def _arena_for(arena: MemoryManager | str | None, *, create: bool) -> _Arena:
    global _default
    if arena is None:
        with _state:
            if _current is not None and not _current.mgr.closed:
                return _current
            name = default_arena_name()
            if _default is None or _default.mgr.name != name or _default.mgr.closed:
                _default = _open_arena(name, create=True)
            return _default
    if isinstance(arena, MemoryManager):
        with _state:
            a = _arenas.get(arena.name)
            if a is None or a.mgr.closed:  # one _Arena (one lock) per arena in a process
                a = _arenas[arena.name] = _Arena(arena)
            return a
    if isinstance(arena, str):
        return _open_arena(arena, create=create)
    raise TypeError(f"an arena is a MemoryManager or its name, not {type(arena).__name__}")


def set_arena(arena: MemoryManager | str | None) -> MemoryManager | None:
    """Make ``arena`` (a MemoryManager, or the name of an arena to attach or create) the one new
    objects go to, in this process and (through ``SHMALLOC_COMPAT_ARENA``) in the processes it
    starts. ``None`` goes back to the default. Returns the arena's manager (None for the default,
    which is opened lazily)."""
    global _current, _env_before
    with _state:
        if _env_before is _ENV_UNSET:
            _env_before = os.environ.get(ARENA_ENV)
        if arena is None:
            _current = None
            if _env_before is None:
                os.environ.pop(ARENA_ENV, None)
            else:
                os.environ[ARENA_ENV] = str(_env_before)
            return None
        a = _arena_for(arena, create=True)
        _current = a
        os.environ[ARENA_ENV] = a.mgr.name
        return a.mgr


def get_arena() -> MemoryManager:
    """The current arena's manager (the default one is attached or created here)."""
    return _arena_for(None, create=True).mgr


# ------------------------------------------------------------------------------ SharedMemory

# The block of a SharedMemory: this header, then the user's bytes. The header is one cache line,
# so the bytes are 64-byte aligned. It records the size asked for (what attach reports) and a
# random tag that tells this block from a later one at the same address.
_HEADER = struct.Struct("8sQ8s40x")  # magic, size, tag
_MAGIC = b"shmcompt"
_ZEROS = bytes(1 << 20)

_holding: weakref.WeakSet[SharedMemory] = weakref.WeakSet()  # objects holding a reference
# Unlinked blocks this process owns and could not free yet because other processes held
# references: (address, tag) by arena name. Retried under the lock by later close/unlink/create.
_unfreed: dict[str, set[tuple[int, bytes]]] = {}


def _make_name() -> str:
    """A fresh name like the standard library's: ``psm_`` and 8 hex digits."""
    return "psm_" + secrets.token_hex(4)


def _not_found(name: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _header(mgr: MemoryManager, address: int) -> tuple[bytes, int, bytes]:
    magic, size, tag = _HEADER.unpack(mgr.read(address, _HEADER.size))
    return magic, size, tag


def _lookup(mgr: MemoryManager, name: str) -> tuple[int, int]:
    """(address, size) of the compat block bound to ``name``; FileNotFoundError if none."""
    try:
        address = mgr.lookup(name)
    except KeyError:
        raise _not_found(name) from None
    magic, size, _ = _header(mgr, address)
    if magic != _MAGIC:
        raise ValueError(
            f"the block named {name!r} in arena {mgr.name!r} was not made by shmalloc.compat; "
            "open it with MemoryManager.lookup() instead"
        )
    return address, size


def _refcount(mgr: MemoryManager, address: int) -> int:
    """References on a block this process owns; FileNotFoundError if it owns no such block."""
    try:
        b = mgr.block_info(address)
    except InvalidAddress:
        raise _not_found(f"block {address:#x}") from None
    if b.pid != os.getpid():
        raise _not_found(f"block {address:#x}")
    return b.refcount


def _free_if_unreferenced(mgr: MemoryManager, address: int) -> None:
    """Free an unlinked block, which this process owns, if no process references it. References
    of processes that ended are dropped by a collection, so run one before keeping the block; a
    block kept is retried by later calls (_sweep). Call under the arena's lock."""
    if _refcount(mgr, address):
        mgr.collect()
        if _refcount(mgr, address):
            _unfreed.setdefault(mgr.name, set()).add((address, _header(mgr, address)[2]))
            return
    mgr.deallocate(address)


def _sweep(mgr: MemoryManager) -> None:
    """Retry the unlinked blocks this process kept for others. Call under the arena's lock."""
    pending = _unfreed.pop(mgr.name, None)
    for address, tag in pending or ():
        try:
            if _header(mgr, address)[2] != tag:
                continue  # freed by its last user and reused since
            _free_if_unreferenced(mgr, address)
        except (ShmallocError, FileNotFoundError):
            continue  # freed, or adopted by a process that closed it after us: theirs now


def _unlink_name(arena: _Arena, name: str) -> None:
    with arena.locked() as mgr:
        _sweep(mgr)
        address, _ = _lookup(mgr, name)
        mgr.unbind(name)
        mgr.adopt(address)  # owned by a live process from now on: no collector frees it under us
        _free_if_unreferenced(mgr, address)


def _drop_reference(arena: _Arena, name: str, address: int) -> None:
    with arena.locked() as mgr:
        _sweep(mgr)
        try:
            bound = mgr.lookup(name) == address
        except KeyError:
            bound = False
        if bound:
            mgr.release(address)  # a named block lives until unlinked
            return
        mgr.adopt(address)
        mgr.release(address)
        _free_if_unreferenced(mgr, address)


class SharedMemory:
    """A block of shared memory with a name: ``multiprocessing.shared_memory.SharedMemory``'s API,
    held in a shmalloc arena.

    ``SharedMemory(create=True, size=n)`` makes a new zero-filled block with a generated name;
    ``SharedMemory(name)`` attaches to an existing one from any process using the same arena.
    ``arena`` (a ``MemoryManager`` or an arena name) overrides the current arena."""

    # Defaults: close() and unlink() work on an object whose __init__ failed.
    _name: str | None = None
    _size = 0
    _address = 0
    _arena: _Arena | None = None
    _view: memoryview | None = None  # of the block's bytes in the arena's mapping
    _buf: memoryview | None = None
    _holder = 0  # the pid whose reference this object holds; 0 when it holds none

    def __init__(
        self,
        name: str | None = None,
        create: bool = False,
        size: int = 0,
        *,
        track: bool = True,
        arena: MemoryManager | str | None = None,
    ) -> None:
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            size = operator.index(size)
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
        if name is None and not create:
            raise ValueError("'name' can only be None if create=True")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a shared memory name must be a str, not {type(name).__name__}")
        a = _arena_for(arena, create=create)
        if create:
            if _unfreed.get(a.mgr.name):
                with a.locked() as mgr:
                    _sweep(mgr)
            self._address, self._name = self._create(a.mgr, name, size)
            self._size = size
        else:
            assert name is not None
            with a.locked() as mgr:
                self._address, self._size = _lookup(mgr, name)
                mgr.retain(self._address)
            self._name = name
        self._arena, self._holder = a, os.getpid()
        _holding.add(self)
        self._map()

    @staticmethod
    def _create(mgr: MemoryManager, name: str | None, size: int) -> tuple[int, str]:
        try:
            address = mgr.allocate(_HEADER.size + size, align=_HEADER.size)
        except OutOfMemory as e:
            raise _with_compat_advice(e, mgr) from None
        try:
            mgr.write(address, _HEADER.pack(_MAGIC, size, secrets.token_bytes(8)))
            view = mgr.view(address, size, _HEADER.size)
            for start in range(0, size, len(_ZEROS)):  # a new block reads as zeros, like ftruncate
                chunk = view[start : start + len(_ZEROS)]
                chunk[:] = _ZEROS[: len(chunk)]
                chunk.release()
            view.release()
            mgr.retain(address)  # before the name exists, so no unlink can free it first
            while True:
                candidate = _make_name() if name is None else name
                try:
                    mgr.bind(candidate, address)
                    return address, candidate
                except FileExistsError:
                    if name is not None:
                        raise FileExistsError(
                            errno.EEXIST, os.strerror(errno.EEXIST), name
                        ) from None
                except ShmallocError as e:  # the names directory is full
                    raise _with_compat_advice(e, mgr) from None
        except BaseException:
            mgr.deallocate(address)  # drops its references too
            raise

    def _map(self) -> None:
        """.buf: the block's bytes in the arena's mapping, behind a PickleBuffer. The PickleBuffer
        holds an export of _view for as long as .buf or any slice of it is alive, so close() can
        refuse (BufferError) exactly when the standard library's would: while views remain."""
        assert self._arena is not None
        self._view = self._arena.mgr.view(self._address, self._size, _HEADER.size)
        self._buf = memoryview(pickle.PickleBuffer(self._view))

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - views still exported (the block stays ours until
            pass  # this process ends), or the interpreter is shutting down: nothing to report to

    def __reduce__(self) -> tuple[Any, ...]:
        assert self._arena is not None
        return (_reattach, (type(self), self._arena.mgr.name, self.name))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self) -> memoryview | None:
        "A memoryview of contents of the shared memory block."
        return self._buf

    @property
    def name(self) -> str | None:
        "Unique name that identifies the shared memory block."
        return self._name

    @property
    def size(self) -> int:
        "Size in bytes."
        return self._size

    @property
    def arena(self) -> MemoryManager | None:
        """The arena holding this block (not in the standard library)."""
        return self._arena.mgr if self._arena is not None else None

    def close(self) -> None:
        """Closes access to the shared memory from this instance but does not destroy the shared
        memory block. The block is freed here if it was unlinked and this was its last user."""
        if self._buf is not None:
            self._buf.release()  # BufferError while arrays over .buf are alive, like the stdlib
            self._buf = None
        if self._view is not None:
            self._view.release()  # BufferError while slices of .buf are alive, like the stdlib
            self._view = None
        _holding.discard(self)
        holder, self._holder = self._holder, 0
        if holder and holder == os.getpid() and self._arena is not None and self._name:
            _drop_reference(self._arena, self._name, self._address)

    def unlink(self) -> None:
        """Requests that the underlying shared memory block be destroyed: the name goes now (new
        attaches fail), the memory once no process has the block open.

        In order to ensure proper cleanup of resources, unlink should be called once (and only
        once) across all processes which have access to the shared memory block."""
        if self._arena is not None and self._name:
            _unlink_name(self._arena, self._name)


def _reattach(cls: type[SharedMemory], arena: str, name: str) -> SharedMemory:
    """Unpickle a SharedMemory: attach to it in the arena it was made in."""
    return cls(name, arena=_open_arena(arena, create=False).mgr)


def _after_fork_in_child() -> None:
    """A fork child inherits open objects and their mappings: take a reference for each, so that
    the block outlives the parent's close()/unlink() while the child may still use it."""
    global _state
    _state = threading.RLock()  # another thread of the parent may have held it
    for a in list(_arenas.values()):
        a.after_fork_in_child()
    _unfreed.clear()  # the parent's to retry, not ours
    pid = os.getpid()
    for shm in list(_holding):
        if not shm._holder or shm._arena is None:
            continue
        try:
            shm._arena.mgr.retain(shm._address)
            shm._holder = pid
        except Exception:  # noqa: BLE001 - an at-fork hook must not raise: hold nothing instead
            shm._holder = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------- ShareableList

# The block of a ShareableList, each part defined by one struct:
#   _COUNT            the number of items, n
#   _ENTRY * n        per item: the bytes reserved for it, its struct format now, its kind
#   the items         back to back, item i in the bytes reserved for it
# Formats are the standard library's, so .format reads the same. What an item may become is
# bounded by its reservation: a fixed-size value takes _SLOT bytes, a str/bytes value whole slots
# with room for at least one more byte (and never more than its reservation later on).
_COUNT = struct.Struct("q")
_MAX_FORMAT = 8  # characters of an item's struct format
_ENTRY = struct.Struct(f"q{_MAX_FORMAT}sb7x")
_ENCODING = "utf8"
_FIXED = {int: "q", float: "d", bool: "xxxxxxx?", type(None): "xxxxxx?x"}
_SLOT = struct.calcsize("q")
assert all(struct.calcsize(f) == _SLOT for f in _FIXED.values())

# kinds: how the unpacked value turns back into the Python value (the stdlib's numbering)
_PLAIN, _STR, _BYTES, _NONE = range(4)
_KIND = {int: _PLAIN, float: _PLAIN, bool: _PLAIN, str: _STR, bytes: _BYTES, type(None): _NONE}
_BACK: dict[int, Callable[[Any], Any]] = {
    _PLAIN: lambda v: v,
    _STR: lambda v: v.rstrip(b"\x00").decode(_ENCODING),
    _BYTES: lambda v: v.rstrip(b"\x00"),
    _NONE: lambda v: None,
}


class UnsupportedItemType(TypeError, KeyError):
    """A ShareableList item of a type it cannot store (a KeyError too, like the stdlib's)."""

    __str__ = Exception.__str__


def _kind(value: object) -> int:
    try:
        return _KIND[type(value)]
    except KeyError:
        raise UnsupportedItemType(
            f"a ShareableList cannot store a {type(value).__name__}: use int, float, bool, str, "
            "bytes or None"
        ) from None


def _reserve(value: object) -> int:
    """Bytes reserved for ``value`` when a list is built."""
    kind = _kind(value)
    if kind in (_STR, _BYTES):
        raw = value.encode(_ENCODING) if isinstance(value, str) else value
        assert isinstance(raw, bytes)
        return _SLOT * (len(raw) // _SLOT + 1)
    return _SLOT


def _packing(value: object, reserved: int) -> tuple[str, int, object]:
    """(struct format, kind, what to pack) for ``value`` stored in ``reserved`` bytes."""
    kind = _kind(value)
    if kind not in (_STR, _BYTES):
        return _FIXED[type(value)], kind, value
    raw = value.encode(_ENCODING) if isinstance(value, str) else value
    assert isinstance(raw, bytes)
    if len(raw) > reserved:
        raise ValueError("bytes/str item exceeds available storage")
    fmt = f"{reserved}s"
    if len(fmt) > _MAX_FORMAT:
        raise ValueError(
            f"a str/bytes item of {len(raw)} bytes is too long for a ShareableList: its format "
            f"{fmt!r} exceeds {_MAX_FORMAT} characters (items must stay under 10 MB)"
        )
    return fmt, kind, raw


class ShareableList:
    """A fixed-length list of int, float, bool, str, bytes and None values in shared memory:
    ``multiprocessing.shared_memory.ShareableList``'s API, held in a shmalloc arena.

    ``ShareableList(sequence)`` creates one (named ``name`` if given); ``ShareableList(name=n)``
    attaches to an existing one. Items can be replaced but the length never changes, and a
    str/bytes item can never grow beyond the bytes reserved when the list was built."""

    shm: SharedMemory
    _reserved: list[int]  # bytes reserved for each item
    _at: list[int]  # where each item starts in the block

    def __init__(self, sequence: Iterable[Any] | None = None, *, name: str | None = None) -> None:
        if name is None or sequence is not None:
            items = list(sequence or ())
            reserved = [_reserve(v) for v in items]
            packing = [_packing(v, r) for v, r in zip(items, reserved, strict=True)]
            self._layout(reserved)
            # build the whole image first: a value that cannot be packed leaves nothing behind
            image = bytearray(self._end)
            _COUNT.pack_into(image, 0, len(items))
            for i, (r, (fmt, kind, packed)) in enumerate(zip(reserved, packing, strict=True)):
                _ENTRY.pack_into(image, self._entry(i), r, fmt.encode(_ENCODING), kind)
                struct.pack_into(fmt, image, self._at[i], packed)
            self.shm = SharedMemory(name, create=True, size=len(image))
            assert self.shm.buf is not None
            self.shm.buf[:] = image
        else:
            self._open(SharedMemory(name))

    def _open(self, shm: SharedMemory) -> None:
        self.shm = shm
        buf = self._buf
        (n,) = _COUNT.unpack_from(buf, 0)
        self._layout([_ENTRY.unpack_from(buf, self._entry(i))[0] for i in range(n)])

    def _layout(self, reserved: list[int]) -> None:
        """Where everything is, from the reservations alone."""
        self._reserved = reserved
        data = self._entry(len(reserved))
        self._at = list(itertools.accumulate(reserved[:-1], initial=data)) if reserved else []
        self._end = data + sum(reserved)

    @staticmethod
    def _entry(i: int) -> int:
        return _COUNT.size + i * _ENTRY.size

    @property
    def _buf(self) -> memoryview:
        buf = self.shm.buf
        if buf is None:
            raise ValueError("this ShareableList's shared memory is closed")
        return buf

    def _position(self, position: int, message: str) -> int:
        n = len(self._reserved)
        i = operator.index(position)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(message)
        return i

    def _format(self, i: int) -> tuple[str, int]:
        _, fmt, kind = _ENTRY.unpack_from(self._buf, self._entry(i))
        return fmt.rstrip(b"\x00").decode(_ENCODING), kind

    def __getitem__(self, position: int) -> Any:
        i = self._position(position, "index out of range")
        fmt, kind = self._format(i)
        (v,) = struct.unpack_from(fmt, self._buf, self._at[i])
        return _BACK[kind](v)

    def __setitem__(self, position: int, value: Any) -> None:
        i = self._position(position, "assignment index out of range")
        fmt, kind, packed = _packing(value, self._reserved[i])
        raw = struct.pack(fmt, packed)  # fails (struct.error) before anything is written
        buf = self._buf
        _ENTRY.pack_into(buf, self._entry(i), self._reserved[i], fmt.encode(_ENCODING), kind)
        buf[self._at[i] : self._at[i] + len(raw)] = raw

    def __len__(self) -> int:
        return int(_COUNT.unpack_from(self._buf, 0)[0])

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self._reserved)):
            yield self[i]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_list, (type(self), self.shm))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self) -> str:
        "The struct packing format used by all currently stored items."
        return "".join(self._format(i)[0] for i in range(len(self._reserved)))

    def count(self, value: Any) -> int:
        "L.count(value) -> integer -- return number of occurrences of value."
        return sum(value == entry for entry in self)

    def index(self, value: Any) -> int:
        """L.index(value) -> integer -- return first index of value.
        Raises ValueError if the value is not present."""
        for position, entry in enumerate(self):
            if value == entry:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__: Any = classmethod(types.GenericAlias)


def _attach_list(cls: type[ShareableList], shm: SharedMemory) -> ShareableList:
    """Unpickle a ShareableList: over its (already re-attached) SharedMemory."""
    sl = cls.__new__(cls)
    sl._open(shm)
    return sl


# ----------------------------------------------------------------------- SharedMemoryManager


class _Tracker:
    """The manager process's list of the blocks it handed out, as (name, arena); unlinks them at
    shutdown. Stands in for the standard library's _SharedMemoryTracker."""

    def __init__(self, name: str) -> None:
        self.shared_memory_context_name = name
        self.segment_names: list[str] = []
        self._arena_of: dict[str, str] = {}

    def register_segment(self, segment_name: str, arena: str | None = None) -> None:
        self.segment_names.append(segment_name)
        self._arena_of[segment_name] = arena or get_arena().name

    def destroy_segment(self, segment_name: str) -> None:
        self.segment_names.remove(segment_name)
        arena = self._arena_of.pop(segment_name)
        try:
            _unlink_name(_open_arena(arena, create=False), segment_name)
        except FileNotFoundError:
            pass  # unlinked by its user already, or the arena is gone

    def unlink(self) -> None:
        for segment_name in self.segment_names[:]:
            self.destroy_segment(segment_name)

    def __del__(self) -> None:
        try:
            self.unlink()
        except Exception:  # noqa: BLE001, S110 - the manager process is exiting; nowhere to report
            pass


class _Server(_mp_managers.SharedMemoryServer):
    """The standard library's SharedMemoryServer with a tracker that unlinks arena blocks."""

    shared_memory_context: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stdlib_tracker: Any = self.shared_memory_context
        self.shared_memory_context = _Tracker(stdlib_tracker.shared_memory_context_name)

    def track_segment(self, c: Any, segment_name: str, arena: str | None = None) -> None:
        "Adds the supplied shared memory block name to Server's tracker."
        self.shared_memory_context.register_segment(segment_name, arena)


class SharedMemoryManager(_mp_managers.SharedMemoryManager):
    """``multiprocessing.managers.SharedMemoryManager`` handing out arena blocks.

    ``start()`` (or ``with``) starts the manager process; ``SharedMemory(size)`` and
    ``ShareableList(sequence)`` return new objects that the manager process unlinks at
    ``shutdown()`` (the end of the ``with`` block), wherever they were made. Unlike the standard
    library's, it starts no resource tracker."""

    _Server = _Server

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _mp_managers.BaseManager.__init__(self, *args, **kwargs)

    def _tracked(self, make: Callable[[], Any], shm_of: Callable[[Any], SharedMemory]) -> Any:
        """Make an object and have the manager process track its block (as the stdlib does:
        connect first, unlink the block if tracking fails)."""
        with self._Client(self._address, authkey=self._authkey) as conn:  # type: ignore[attr-defined]
            obj = make()
            shm = shm_of(obj)
            try:
                assert shm.arena is not None
                _mp_managers.dispatch(  # type: ignore[attr-defined]  # not in typeshed
                    conn, None, "track_segment", (shm.name, shm.arena.name)
                )
            except BaseException:
                shm.unlink()
                raise
        return obj

    def SharedMemory(self, size: int) -> SharedMemory:  # type: ignore[override]
        """Returns a new SharedMemory instance with the specified size in bytes, to be tracked by
        the manager."""
        shm: SharedMemory = self._tracked(
            lambda: SharedMemory(None, create=True, size=size), lambda s: s
        )
        return shm

    def ShareableList(self, sequence: Iterable[Any]) -> ShareableList:  # type: ignore[override]
        """Returns a new ShareableList instance populated with the values from the input
        sequence, to be tracked by the manager."""
        sl: ShareableList = self._tracked(lambda: ShareableList(sequence), lambda s: s.shm)
        return sl
