"""The segment layout as shm_layout.h documents it: every "+0x.." offset in its comments is the
offset the compiler gave the field, and every status has its own message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shmalloc._binding import ffi, lib

LAYOUT_H = Path(__file__).resolve().parent.parent / "native" / "shm_layout.h"

_STRUCT_OPEN = re.compile(r"^typedef struct (\w+) \{")
_STRUCT_CLOSE = re.compile(r"^\} (\w+_t);")
_FIELD = re.compile(r"^\s+[\w ]+?\b(\w+)(?:\[\w+\])?;\s*/\* \+0x([0-9a-f]+)\b")


def documented_offsets() -> list[tuple[str, str, int]]:
    """(struct type, field, offset) for every field whose comment starts with "+0x..."."""
    out: list[tuple[str, str, int]] = []
    fields: list[tuple[str, int]] = []
    inside = False
    for line in LAYOUT_H.read_text().splitlines():
        if _STRUCT_OPEN.match(line):
            inside, fields = True, []
        elif inside and (m := _STRUCT_CLOSE.match(line)):
            out += [(m.group(1), name, off) for name, off in fields]
            inside = False
        elif inside and (m := _FIELD.match(line)):
            fields.append((m.group(1), int(m.group(2), 16)))
    return out


OFFSETS = documented_offsets()


def test_the_header_documents_offsets_of_every_struct() -> None:
    structs = {t for t, _, _ in OFFSETS}
    assert {"shm_arena_t", "shm_block_t", "shm_cache_t", "shm_counters_t", "shm_lease_t"} <= structs
    assert len(OFFSETS) > 80


@pytest.mark.parametrize(
    ("ctype", "field", "offset"), OFFSETS, ids=[f"{t}.{f}" for t, f, _ in OFFSETS]
)
def test_documented_offset_is_the_real_one(ctype: str, field: str, offset: int) -> None:
    assert ffi.offsetof(ctype, field) == offset


def test_every_status_has_its_own_message() -> None:
    statuses = {
        name: int(getattr(lib, name)) for name in dir(lib) if re.fullmatch(r"SHM_E[A-Z]+", name)
    }
    assert len(statuses) >= 16 and all(v < 0 for v in statuses.values())
    assert len(set(statuses.values())) == len(statuses), "two statuses share a number"
    messages = {name: ffi.string(lib.shm_strerror(v)).decode() for name, v in statuses.items()}
    unknown = ffi.string(lib.shm_strerror(-1000)).decode()
    assert unknown not in messages.values()
    assert len(set(messages.values())) == len(messages), messages
