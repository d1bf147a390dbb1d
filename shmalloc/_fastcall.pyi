# The types of native/fastcall.c and native/halves.c (the module shmalloc._fastcall); see there.
from collections.abc import Callable
from typing import Any

STREAM_COPY_MAX: int
BYTES_MARK: int
MARSHAL_MARK: int
TAKE_VALUE: int
TAKE_STREAM: int
TAKE_EMPTY: int
TAKE_VIEW: int
TAKE_REF: int
TAKE_HELD: int

def marshal_stream(value: Any, /) -> bytes | None: ...
def bind(alloc: int, free: int, put_new: int, take: int, wait: int, /) -> None: ...
def bind_queues(
    encode: Callable[[Any], tuple[bytes, list[Any]]],
    decode: Callable[[Any], Any],
    ref: type,
    recheck: float,
    /,
) -> None: ...

class Port:
    def __init__(self, handle: Any, address: int, /) -> None: ...
    def put_bytes(
        self, slot: int, queue: int, queue_id: int, value: bytes, /
    ) -> None | int | tuple[int, list[int]]: ...
    def put_new(
        self, slot: int, queue: int, queue_id: int, stream: bytes, buffers: list[Any], /
    ) -> None | int | tuple[int, list[int]]: ...
    def take(self, slot: int, queue: int, queue_id: int, copy_only: bool, /) -> tuple[int, Any]: ...
    def wait(self, control: int, which: int, seq: int, ns: int, /) -> int: ...

class Fields:
    port: Port | None
    slot: int
    collector: Callable[[Any], None] | None

class Manager:
    _state: Fields
    def allocate(self, size: int, pid: int | None = None, *, align: int | None = None) -> int: ...
    def deallocate(self, address: int, /) -> int: ...

class QueueBase:
    _att: Fields
    _address: int
    _id: int
    _control: int
    _pid: int
    _closed: bool
    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...
