"""Ownership across processes: adopt, retain/release, persist, and named blocks.

Each function is one call into the C core (native/own.c, names.c) on an :class:`Attachment`;
the block is first checked to be a live block of the arena (``size_of``), so that a bad address
is reported before any lock is taken.
"""

from __future__ import annotations

from . import _binding as C
from .access import checked_address, size_of
from .attachment import Attachment
from .tracking import mark_if_dead, read_slot, slot_for

__all__ = [
    "adopt",
    "bind",
    "encode_block_name",
    "lookup",
    "names",
    "persist",
    "release",
    "retain",
    "unbind",
]


def encode_block_name(name: object) -> bytes:
    """A block name as the directory stores it: 1 to NAME_LEN - 1 bytes of UTF-8, no NUL."""
    if not isinstance(name, str):
        raise TypeError(f"a block name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 0 < len(raw) < C.NAME_LEN or b"\0" in raw:
        raise ValueError(
            f"invalid block name {name!r}: use 1 to {C.NAME_LEN - 1} bytes of UTF-8, no NUL"
        )
    return raw


def _live_block(a: Attachment, address: int) -> C.Handle:
    size_of(a, address)
    return a.handle()


def adopt(a: Attachment, address: int) -> None:
    """Make the calling process the block's owner."""
    address = checked_address(address)
    C.block_adopt(_live_block(a, address), address, slot_for(a, None))


def retain(a: Attachment, address: int) -> None:
    """Hold a reference: the block outlives its owner while this process lives."""
    address = checked_address(address)
    C.block_retain(_live_block(a, address), address, slot_for(a, None))


def release(a: Attachment, address: int) -> bool:
    """Drop a reference taken with retain(). True if that freed an orphaned block."""
    address = checked_address(address)
    h = _live_block(a, address)
    _mark_owner_if_dead(h, address)
    freed = C.block_release(h, address, slot_for(a, None))
    if freed is None:
        raise ValueError(
            f"this process holds no reference on the block at {address:#x}; call retain() first"
        )
    return freed


def _mark_owner_if_dead(h: C.Handle, address: int) -> None:
    """If the block's owner has ended, mark its slot dead now, so that dropping the last
    reference frees the orphan at once instead of at the next collection."""
    info = C.block_info(h, address)
    if info.slot >= 0:
        mark_if_dead(h, read_slot(h, info.slot))


def persist(a: Attachment, address: int) -> None:
    """Give the block no owner: it is never collected, only freed by deallocate()."""
    address = checked_address(address)
    C.block_persist(_live_block(a, address), address)


def bind(a: Attachment, name: str, address: int) -> None:
    """Name the block (any process can lookup() it) and make it persistent."""
    raw = encode_block_name(name)
    address = checked_address(address)
    h = _live_block(a, address)
    try:
        C.name_bind(h, raw, address)
    except FileExistsError:
        raise FileExistsError(f"the name {name!r} is already bound; unbind() it first") from None


def lookup(a: Attachment, name: str) -> int:
    """The address bound to ``name``; KeyError if none."""
    address = C.name_lookup(a.handle(), encode_block_name(name))
    if address is None:
        raise KeyError(name)
    return address


def unbind(a: Attachment, name: str) -> None:
    """Remove a name; the block stays (persistent) until deallocated. KeyError if unbound."""
    if not C.name_unbind(a.handle(), encode_block_name(name)):
        raise KeyError(name)


def names(a: Attachment) -> list[str]:
    """Every bound name, in directory order."""
    return C.names(a.handle())
