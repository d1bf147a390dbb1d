"""MemoryGuard: a block that is freed when its ``with`` statement ends."""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol


class _Blocks(Protocol):
    """What a guard needs of its arena (a MemoryManager)."""

    def size_of(self, address: int) -> int: ...
    def view(self, address: int, n: int | None = None, offset: int = 0) -> memoryview: ...
    def read(self, address: int, n: int | None = None, offset: int = 0) -> bytes: ...
    def write(self, address: int, data: Any, offset: int = 0) -> int: ...
    def deallocate(self, address: int) -> int: ...


class MemoryGuard:
    """Owns one block until the ``with`` block ends (then frees it) or :meth:`release` is called
    (then the caller owns it)."""

    __slots__ = ("_mgr", "_address", "_done")

    def __init__(self, mgr: _Blocks, address: int) -> None:
        self._mgr, self._address, self._done = mgr, address, False

    @property
    def address(self) -> int:
        if self._done:
            raise ValueError("this guard's block was already freed or released")
        return self._address

    @property
    def size(self) -> int:
        return self._mgr.size_of(self.address)

    def view(self, n: int | None = None, offset: int = 0) -> memoryview:
        return self._mgr.view(self.address, n, offset)

    def read(self, n: int | None = None, offset: int = 0) -> bytes:
        return self._mgr.read(self.address, n, offset)

    def write(self, data: Any, offset: int = 0) -> int:
        return self._mgr.write(self.address, data, offset)

    def release(self) -> int:
        """Stop guarding: the block stays allocated; return its address."""
        address = self.address
        self._done = True
        return address

    def free(self) -> int:
        """Free the block now; return its size. A second call does nothing and returns 0."""
        if self._done:
            return 0
        self._done = True
        return self._mgr.deallocate(self._address)

    def __enter__(self) -> MemoryGuard:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.free()

    def __repr__(self) -> str:
        state = "done" if self._done else f"address={self._address:#x}"
        return f"<MemoryGuard {state}>"
