"""Sizes as people write and read them: ``64M`` in, ``64.0 MiB`` out, and ``3 blocks``."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["count", "format_bytes", "parse_size"]

_UNITS = {"": 0, "b": 0, "k": 1, "kib": 1, "m": 2, "mib": 2, "g": 3, "gib": 3, "t": 4, "tib": 4}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from a size a person typed: ``4096``, ``64K``, ``64M``, ``1.5G``, ``64MiB``.

    K, M, G and T are binary (1024-based), like KiB, MiB, GiB and TiB; the letter's case does not
    matter. ``MB``-style units are refused rather than guessed at.
    """
    m = _SIZE_RE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: write a number of bytes, optionally with a unit K, M, G, T "
            "or KiB, MiB, GiB, TiB (all 1024-based), e.g. 64M"
        )
    try:
        value = Decimal(m.group(1)) * (1024 ** _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimal numbers
        raise ValueError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: it is not a whole number of bytes")
    return int(value)


def format_bytes(n: float) -> str:
    """``512 B``, ``3.0 KiB``, ``64.0 MiB``: what a person reads."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def count(n: int, noun: str) -> str:
    """``1 block``, ``2 blocks``, ``0 processes``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}{'es' if noun.endswith('s') else 's'}"
