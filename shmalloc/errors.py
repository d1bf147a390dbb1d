"""The exceptions of shmalloc (docs/api.md, "Errors"). Each carries the fields documented there,
pickles with them, and has a message that says what was asked, what was found, and what to do."""

from __future__ import annotations

from typing import Any

from .sizes import format_bytes


class ShmallocError(Exception):
    """Base class of every shmalloc error."""

    _fields: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, tuple(getattr(self, f) for f in self._fields))


class OutOfMemory(ShmallocError, MemoryError):
    """The arena (or the tmpfs behind it) cannot supply the requested bytes."""

    _fields = ("requested", "available", "used", "total", "detail")

    def __init__(
        self, requested: int, available: int, used: int, total: int, detail: str = ""
    ) -> None:
        self.requested, self.available, self.used, self.total = requested, available, used, total
        self.detail = detail
        why = detail or "the arena has no free block large enough"
        super().__init__(
            f"cannot allocate {format_bytes(requested)}: {why} (available "
            f"{format_bytes(available)}, used {format_bytes(used)} of {format_bytes(total)}); "
            "free blocks, run a collection, or create the arena with a larger capacity"
        )


class ProcessLimitExceeded(ShmallocError):
    """An allocation would take a process past the limit set with set_process_limit()."""

    _fields = ("pid", "limit", "used", "requested")

    def __init__(self, pid: int, limit: int, used: int, requested: int) -> None:
        self.pid, self.limit, self.used, self.requested = pid, limit, used, requested
        super().__init__(
            f"process {pid} asked for {format_bytes(requested)} but already uses "
            f"{format_bytes(used)} of its {format_bytes(limit)} limit; free some of its blocks or "
            "raise the limit with set_process_limit()"
        )


class InvalidAddress(ShmallocError):
    """Not a live block of this arena: out of bounds, interior, already freed, or reused since."""

    _fields = ("address", "detail")

    def __init__(self, address: int, detail: str = "") -> None:
        self.address, self.detail = address, detail
        super().__init__(
            f"invalid address {address:#x}: {detail or 'not a live block of this arena'}; "
            "pass an address returned by allocate() that has not been freed"
        )


class CorruptionDetected(ShmallocError):
    """A structure in the segment fails its invariants; it was not followed."""

    _fields = ("offset", "detail")

    def __init__(self, offset: int, detail: str) -> None:
        self.offset, self.detail = offset, detail
        super().__init__(
            f"corruption at segment offset {offset:#x}: {detail}; stop writing to this arena, "
            "run `shmalloc check` and recreate it"
        )


class AlignmentError(ShmallocError, ValueError):
    """An alignment that is not a power of two up to the page size (4096)."""

    _fields = ("alignment",)

    def __init__(self, alignment: int) -> None:
        self.alignment = alignment
        super().__init__(
            f"alignment {alignment} is not supported: use a power of two up to 4096 "
            "(every block is 16-byte aligned already)"
        )


class ProtectionViolation(ShmallocError):
    """A write to a sealed (immutable) block."""

    _fields = ("address",)

    def __init__(self, address: int) -> None:
        self.address = address
        super().__init__(
            f"the block at {address:#x} is sealed and cannot be written; copy it into a new block"
        )


class ObjectNotFound(ShmallocError, KeyError):
    """A name that is not bound, or a reference whose object is gone."""

    _fields = ("key", "detail")

    def __init__(self, key: object, detail: str = "") -> None:
        self.key, self.detail = key, detail
        ShmallocError.__init__(self, f"{key!r}: {detail or 'no such object in this arena'}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class NotAnArena(ShmallocError):
    """A segment that exists but was never a shmalloc arena (another program's, or not a file).

    Never called corruption and never advised to be recreated: it may be someone else's data."""

    _fields = ("name", "detail")

    def __init__(self, name: str, detail: str = "") -> None:
        self.name, self.detail = name, detail
        super().__init__(
            f"{name!r} is not a shmalloc arena: "
            f"{detail or 'its first bytes are not an arena header'}; leave it alone and use "
            "another name"
        )
