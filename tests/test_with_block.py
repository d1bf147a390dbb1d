"""Leaving ``with MemoryManager(...) as mgr:`` always destroys the arena it created (even when the
close is refused because a view is still alive) and never replaces the exception in flight."""

from __future__ import annotations

import os

import pytest
from conftest import SHM_DIR

from shmalloc import MemoryManager


class Boom(Exception):
    pass


def test_a_live_view_at_exit_still_destroys_the_arena() -> None:
    alive = "views or arrays into it are still alive"
    with pytest.raises(BufferError, match=alive), MemoryManager(1 << 20) as mgr:
        name = mgr.name
        v = mgr.view(mgr.allocate(64))
    assert not os.path.exists(os.path.join(SHM_DIR, name))  # destroyed although not closed
    assert not mgr.closed
    v.release()
    mgr.close()


def test_the_exception_in_flight_is_kept_and_the_failed_close_noted() -> None:
    with pytest.raises(Boom) as ei, MemoryManager(1 << 20) as mgr:
        name = mgr.name
        v = mgr.view(mgr.allocate(64))
        raise Boom("the user's own error")
    assert str(ei.value) == "the user's own error"
    notes = getattr(ei.value, "__notes__", [])
    assert len(notes) == 1 and name in notes[0] and "still alive" in notes[0], notes
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    v.release()
    mgr.close()


def test_exception_without_views_closes_and_destroys() -> None:
    with pytest.raises(Boom) as ei, MemoryManager(1 << 20) as mgr:
        name = mgr.name
        raise Boom
    assert not getattr(ei.value, "__notes__", None)
    assert mgr.closed and not os.path.exists(os.path.join(SHM_DIR, name))


def test_a_named_arena_is_closed_not_destroyed(arena_name: str) -> None:
    with pytest.raises(BufferError), MemoryManager.create(arena_name, 1 << 20) as mgr:
        v = mgr.view(mgr.allocate(64))
    assert os.path.exists(os.path.join(SHM_DIR, arena_name))
    v.release()
    mgr.close()
    with MemoryManager.attach(arena_name) as again:
        assert again.stats().allocated_blocks == 1
    again.destroy()
