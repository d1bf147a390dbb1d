"""CPython's own multiprocessing queue tests (``_TestQueue`` in ``test/_test_multiprocessing.py``
of the running interpreter) against shmalloc.Queue and shmalloc.JoinableQueue.

The import is swapped the way test_compat.py swaps shared_memory: the test methods are rebuilt
over a copy of their module's globals in which ``multiprocessing`` is a stand-in module whose
``Queue``, ``JoinableQueue``, ``SimpleQueue`` and ``queues.Queue`` are shmalloc's (each queue in
this module's arena) and whose every other name is the real module's; the test class's
``self.Queue`` / ``self.JoinableQueue`` are shmalloc's too. The suite runs once with fork and once
with spawn children.

Two tests are left out, both about the stdlib's feeder thread: an unpicklable item given to the
stdlib's put() fails later, in its feeder thread, and put() returns; shmalloc's put() pickles at
once and raises there, so ``test_queue_feeder_donot_stop_onexc`` and
``test_queue_feeder_on_queue_feeder_error`` (which also subclasses the stdlib's Queue to hook the
feeder's error path) do not apply. test_queue.py checks that put() raises for such an item and
that the queue goes on working. ``test_no_import_lock_contention`` imports ``multiprocessing``
afresh in a module it writes, so it runs the stdlib's queue, unswapped, as in CPython.
"""

from __future__ import annotations

import multiprocessing
import os
import types
import unittest
from typing import Any

import test._test_multiprocessing as test_mp  # CPython's test package: installed with Python

from shmalloc import MemoryManager, queues

EXCEPTED = {"test_queue_feeder_donot_stop_onexc", "test_queue_feeder_on_queue_feeder_error"}
_arena: list[MemoryManager] = []  # this process's arena for the suite's queues (set up by class)


def _queue(maxsize: int = 0) -> queues.Queue:
    return queues.Queue(maxsize, arena=_arena[0])


def _joinable(maxsize: int = 0) -> queues.JoinableQueue:
    return queues.JoinableQueue(maxsize, arena=_arena[0])


def _simple() -> queues.SimpleQueue:
    return queues.SimpleQueue(arena=_arena[0])


def _swapped_multiprocessing() -> types.ModuleType:
    """``multiprocessing`` with shmalloc's queues in place of its own."""
    mod = types.ModuleType("multiprocessing")
    mod.__dict__.update(vars(multiprocessing))
    sub = types.ModuleType("multiprocessing.queues")
    sub.__dict__.update(vars(multiprocessing.queues))
    sub.Queue, sub.JoinableQueue, sub.SimpleQueue = (
        queues.Queue,
        queues.JoinableQueue,
        queues.SimpleQueue,
    )
    mod.queues = sub
    mod.Queue, mod.JoinableQueue, mod.SimpleQueue = _queue, _joinable, _simple
    return mod


def _rebind(f: Any, globs: dict[str, Any]) -> Any:
    """``f`` (a function, classmethod or staticmethod) over ``globs`` instead of its module's."""
    if isinstance(f, (classmethod, staticmethod)):
        return type(f)(_rebind(f.__func__, globs))
    if not isinstance(f, types.FunctionType):
        return f
    g = types.FunctionType(f.__code__, globs, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__qualname__ = f.__qualname__
    return g


_GLOBALS = dict(vars(test_mp))
_GLOBALS["multiprocessing"] = _swapped_multiprocessing()
_GLOBALS["close_queue"] = _rebind(test_mp.close_queue, _GLOBALS)
_METHODS = {
    name: _rebind(f, _GLOBALS)
    for name, f in vars(test_mp._TestQueue).items()
    if name not in EXCEPTED and not name.startswith("__")
}


class _Mixin:
    """ProcessesMixin of the stdlib suite, with shmalloc's queues and a start method."""

    TYPE = "processes"
    START = "fork"
    Queue = staticmethod(_queue)
    JoinableQueue = staticmethod(_joinable)

    @classmethod
    def setUpClass(cls) -> None:
        ctx = multiprocessing.get_context(cls.START)
        cls.Process = ctx.Process  # type: ignore[attr-defined]
        cls.Event = staticmethod(ctx.Event)  # type: ignore[attr-defined]
        name = f"shmalloc-test-stdq-{os.getpid()}-{cls.START}"
        _arena.append(MemoryManager.create(name, 32 << 20))

    @classmethod
    def tearDownClass(cls) -> None:
        m = _arena.pop()
        m.close()
        m.destroy()


def _suite(start: str) -> type:
    body = dict(_METHODS, START=start, __module__=__name__)
    name = f"TestStdlibQueue{start.capitalize()}"
    cls = type(name, (_Mixin, test_mp.BaseTestCase, unittest.TestCase), body)
    cls.__qualname__ = name
    return cls


TestStdlibQueueFork = _suite("fork")
TestStdlibQueueSpawn = _suite("spawn")


def test_the_suite_runs_shmalloc_queues() -> None:
    """The swap took: the rebuilt tests see shmalloc's queues, and none but the two feeder
    tests is left out."""
    wanted = {n for n in vars(test_mp._TestQueue) if n.startswith("test_")}
    assert wanted - EXCEPTED <= set(vars(TestStdlibQueueFork)) and len(wanted - EXCEPTED) >= 8
    globs = TestStdlibQueueFork.test_timeout.__globals__
    assert globs["multiprocessing"].Queue is _queue
    assert globs["multiprocessing"].queues.Queue is queues.Queue
    assert globs["close_queue"].__globals__ is globs
    assert TestStdlibQueueSpawn.Queue is _queue
