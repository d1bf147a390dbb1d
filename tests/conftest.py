"""Shared fixtures: every test gets its own uniquely named arena and destroys it; children (see
children.py) are killed and joined after the test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from children import Child

from shmalloc import MemoryManager

SHM_DIR = "/dev/shm"
_SESSION = secrets.token_hex(3)  # per test process: concurrent pytest runs never share a prefix


def unique_name(tag: str = "t") -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"shmalloc-test-{worker}-{_SESSION}-{tag}-{secrets.token_hex(5)}"


@pytest.fixture
def arena_name() -> Iterator[str]:
    """A fresh name; whatever segment ends up under it is unlinked after the test."""
    name = unique_name()
    yield name
    path = os.path.join(SHM_DIR, name)
    if os.path.exists(path):
        os.unlink(path)


@pytest.fixture
def mgr(arena_name: str) -> Iterator[MemoryManager]:
    """A 64 MiB arena, closed and destroyed after the test."""
    m = MemoryManager.create(arena_name, 64 << 20)
    try:
        yield m
    finally:
        m.destroy()
        if not m.closed:
            m.close()


@pytest.fixture
def heap_mgr(arena_name: str) -> Iterator[MemoryManager]:
    """A 64 MiB arena with the per-process caches off: every call takes the heap lock, so a
    test can pin the heap's own placement, splitting and merging (native/heap.c)."""
    with destroyed_after(MemoryManager.create(arena_name, 64 << 20, cache_limit=0)) as m:
        yield m


@contextmanager
def destroyed_after(m: MemoryManager) -> Iterator[MemoryManager]:
    """Yield ``m``; afterwards close it (unless that is done) and destroy its segment."""
    try:
        yield m
    finally:
        if not m.closed:
            m.close()
        m.destroy()


@pytest.fixture
def small(arena_name: str) -> Iterator[MemoryManager]:
    """A 1 MiB arena: small enough to fill, or to compare the whole segment byte for byte."""
    with destroyed_after(MemoryManager.create(arena_name, 1 << 20)) as m:
        yield m


@pytest.fixture
def children() -> Iterator[Any]:
    """Start children with children(method, mgr); every one is killed and joined afterwards."""
    started: list[Child] = []

    def start(method: str, m: MemoryManager) -> Child:
        c = Child(method, m)
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


@pytest.fixture(autouse=True, scope="session")
def _no_segments_left() -> Iterator[None]:
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    left = [n for n in os.listdir(SHM_DIR) if n.startswith(f"shmalloc-test-{worker}-{_SESSION}-")]
    assert not left, f"tests left segments behind: {left}"
