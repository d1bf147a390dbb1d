"""Ownership across processes: adopt, retain/release, persist, and named blocks.

A mixin of MemoryManager; every method is one call into the C core (native/own.c, names.c)."""

from __future__ import annotations

from typing import Any

from ._binding import ffi, lib, raise_status
from .tracking import mark_if_dead, read_slot


def _encode_block_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a block name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 0 < len(raw) < lib.SHM_NAME_LEN or b"\0" in raw:
        raise ValueError(
            f"invalid block name {name!r}: use 1 to {lib.SHM_NAME_LEN - 1} bytes of UTF-8, no NUL"
        )
    return raw


class OwnershipMixin:
    _h: Any

    def _handle(self) -> Any: ...
    def _slot_for(self, pid: int | None) -> int: ...
    def _block_size(self, address: int, for_write: int) -> int: ...

    def adopt(self, address: int) -> None:
        """Make the calling process the block's owner (a consumer taking over a producer's block)."""
        self._block_size(address, 0)
        rc = lib.shm_block_adopt(self._handle(), address, self._slot_for(None))
        if rc < 0:
            raise_status(rc, address)

    def retain(self, address: int) -> None:
        """Hold a reference: the block outlives its owner while this process lives."""
        self._block_size(address, 0)
        rc = lib.shm_block_retain(self._handle(), address, self._slot_for(None))
        if rc < 0:
            raise_status(rc, address)

    def release(self, address: int) -> bool:
        """Drop a reference taken with retain(). Returns True if that freed an orphaned block."""
        self._block_size(address, 0)
        self._mark_owner_if_dead(address)
        rc = lib.shm_block_release(self._handle(), address, self._slot_for(None))
        if rc == lib.SHM_ENOENT:
            raise ValueError(
                f"this process holds no reference on the block at {address:#x}; call retain() first"
            )
        if rc < 0:
            raise_status(rc, address)
        return rc == 1

    def _mark_owner_if_dead(self, address: int) -> None:
        """If the block's owner has ended, mark its slot dead now, so that dropping the last
        reference frees the orphan at once instead of at the next collection."""
        h = self._handle()
        info = ffi.new("shm_block_info_t *")
        if lib.shm_block_info(h, address, info) != 0 or info.slot < 0:
            return
        mark_if_dead(h, read_slot(h, info.slot))

    def persist(self, address: int) -> None:
        """Give the block no owner: it is never collected, only freed by deallocate()."""
        self._block_size(address, 0)
        rc = lib.shm_block_persist(self._handle(), address)
        if rc < 0:
            raise_status(rc, address)

    def bind(self, name: str, address: int) -> None:
        """Name the block (any process can lookup() it) and make it persistent."""
        raw = _encode_block_name(name)
        self._block_size(address, 0)
        rc = lib.shm_name_bind(self._handle(), raw, address)
        if rc == lib.SHM_EEXIST:
            raise FileExistsError(f"the name {name!r} is already bound; unbind() it first")
        if rc < 0:
            raise_status(rc, address)

    def lookup(self, name: str) -> int:
        """The address bound to ``name``; KeyError if none."""
        r = lib.shm_name_lookup(self._handle(), _encode_block_name(name))
        if r == lib.SHM_ENOENT:
            raise KeyError(name)
        if r < 0:
            raise_status(r)
        return int(r)

    def unbind(self, name: str) -> None:
        """Remove a name; the block stays (persistent) until deallocated. KeyError if unbound."""
        rc = lib.shm_name_unbind(self._handle(), _encode_block_name(name))
        if rc == lib.SHM_ENOENT:
            raise KeyError(name)
        if rc < 0:
            raise_status(rc)

    def names(self) -> list[str]:
        """Every bound name, in directory order."""
        h = self._handle()
        buf = ffi.new("char[]", lib.SHM_NAME_LEN)
        addr = ffi.new("uint64_t *")
        out = []
        for i in range(lib.SHM_MAX_NAMES):
            rc = lib.shm_name_at(h, i, buf, addr)
            if rc < 0:
                raise_status(rc)
            if rc == 1:
                out.append(ffi.string(buf).decode("utf-8", "replace"))
        return out
