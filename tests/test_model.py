"""A hypothesis state machine drives one arena and a pure-Python model side by side: the model
is a dict address -> (bytes of the block, sealed). After every step the arena must agree with it:
live blocks never overlap, their bytes are intact, and the counters add up."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from conftest import unique_name
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmalloc import InvalidAddress, MemoryManager, OutOfMemory, ProtectionViolation

HDR = 32
CAPACITY = 16 << 20

BOUNDARIES = [1, 15, 16, 17, 48, 63, 64, 65, 127, 128, 4063, 4064, 4095, 4096, 4097, 65536, 65537]
sizes = st.one_of(st.sampled_from(BOUNDARIES), st.integers(1, 300), st.integers(1, 100_000))
aligns = st.sampled_from([None, None, None, 32, 64, 256, 4096])


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = MemoryManager.create(unique_name("model"), CAPACITY)
        self.live: dict[int, bytearray] = {}  # address -> the block's whole usable contents
        self.sealed: set[int] = set()
        self.freed: set[int] = set()  # addresses handed out once and freed since
        self.counter = 0
        self.allocs = 0
        self.frees = 0

    def teardown(self) -> None:
        try:
            rep = self.m.check()
            assert rep.allocated_blocks == len(self.live)
            for a in list(self.live):
                assert self.m.deallocate(a) == len(self.live.pop(a))
            st_ = self.m.stats()
            assert st_.used == 0 and st_.allocated_blocks == 0 and st_.free_blocks == 1
            self.m.check()
        finally:
            self.m.destroy()  # first: the segment must go even if close() were to fail
            self.m.close()

    # ---------------------------------------------------------------- helpers

    def _fill(self, n: int) -> bytes:
        self.counter += 1
        unit = self.counter.to_bytes(4, "little")
        return (unit * (n // 4 + 1))[:n]

    def _unchanged(self, fn: Any, exc: Any) -> None:
        before = self.m.stats()
        try:
            fn()
        except exc:
            pass
        else:
            raise AssertionError(f"expected {exc}")
        assert self.m.stats() == before

    def _dead_address(self, a: int) -> bool:
        return a not in self.live

    # ---------------------------------------------------------------- valid operations

    @rule(size=sizes, align=aligns)
    def allocate(self, size: int, align: int | None) -> None:
        try:
            a = self.m.allocate(size, align=align)
        except OutOfMemory:
            # the model never gets near the capacity
            used = sum(len(v) + HDR for v in self.live.values())
            raise AssertionError(
                f"OutOfMemory for {size} bytes with {used} of {CAPACITY} in use"
            ) from None
        assert a not in self.live
        assert a % (align or 16) == 0
        n = self.m.size_of(a)
        assert n >= size and n % 16 == 0
        data = self._fill(n)
        assert self.m.write(a, data) == n
        self.live[a] = bytearray(data)
        self.freed.discard(a)
        self.allocs += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        assert self.m.deallocate(a) == len(self.live[a])
        del self.live[a]
        self.sealed.discard(a)
        self.freed.add(a)
        self.frees += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        n = len(self.live[a])
        off = data.draw(st.integers(0, n))
        payload = data.draw(st.binary(max_size=n - off))
        if a in self.sealed:
            self._unchanged(lambda: self.m.write(a, payload, offset=off), ProtectionViolation)
            return
        assert self.m.write(a, payload, offset=off) == len(payload)
        self.live[a][off : off + len(payload)] = payload

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def write_view(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        n = len(self.live[a])
        off = data.draw(st.integers(0, n - 1))
        v = self.m.view(a, offset=off)
        try:
            assert len(v) == n - off
            assert v.readonly == (a in self.sealed)
            assert bytes(v) == bytes(self.live[a][off:])
            if not v.readonly:
                v[0] = (v[0] + 1) & 0xFF
                self.live[a][off] = (self.live[a][off] + 1) & 0xFF
        finally:
            v.release()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        n = len(self.live[a])
        off = data.draw(st.integers(0, n))
        k = data.draw(st.one_of(st.none(), st.integers(0, n - off)))
        expect = self.live[a][off:] if k is None else self.live[a][off : off + k]
        assert self.m.read(a, k, off) == bytes(expect)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def seal(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        self.m.seal(a)
        self.sealed.add(a)

    # ---------------------------------------------------------------- invalid operations

    @precondition(lambda self: any(self._dead_address(a) for a in self.freed))
    @rule(data=st.data(), op=st.sampled_from(["deallocate", "size_of", "read", "write", "seal"]))
    def use_after_free(self, data: st.DataObject, op: str) -> None:
        a = data.draw(st.sampled_from(sorted(x for x in self.freed if self._dead_address(x))))
        fn = {
            "deallocate": lambda: self.m.deallocate(a),
            "size_of": lambda: self.m.size_of(a),
            "read": lambda: self.m.read(a, 1),
            "write": lambda: self.m.write(a, b"!"),
            "seal": lambda: self.m.seal(a),
        }[op]
        self._unchanged(fn, InvalidAddress)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def interior_address(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        k = data.draw(st.integers(1, len(self.live[a]) // 16 - 1)) if len(self.live[a]) >= 32 else 0
        if not k:
            return
        bad = a + 16 * k
        if bad in self.live:  # cannot be: blocks do not overlap
            raise AssertionError(f"{bad:#x} is both interior to {a:#x} and a block")
        self._unchanged(lambda: self.m.deallocate(bad), InvalidAddress)
        self._unchanged(lambda: self.m.size_of(bad), InvalidAddress)

    @rule(address=st.integers(-(1 << 64), 1 << 65))
    def random_address(self, address: int) -> None:
        if address in self.live:
            return
        self._unchanged(lambda: self.m.size_of(address), InvalidAddress)
        self._unchanged(lambda: self.m.deallocate(address), InvalidAddress)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def out_of_bounds(self, data: st.DataObject) -> None:
        a = data.draw(st.sampled_from(sorted(self.live)))
        n = len(self.live[a])
        off = data.draw(st.integers(0, n))
        over = data.draw(st.integers(n - off + 1, n - off + 64))
        self._unchanged(lambda: self.m.read(a, over, off), ValueError)
        if a not in self.sealed:
            self._unchanged(lambda: self.m.write(a, b"\0" * over, offset=off), ValueError)
        self._unchanged(lambda: self.m.read(a, 1, n + data.draw(st.integers(1, 64))), ValueError)

    @rule(size=st.one_of(st.integers(-(1 << 70), 0), st.just(0)))
    def bad_size(self, size: int) -> None:
        self._unchanged(lambda: self.m.allocate(size), ValueError)

    @rule(size=st.integers(CAPACITY, 1 << 80))
    def too_large(self, size: int) -> None:
        st_ = self.m.stats()
        try:
            self.m.allocate(size)
        except OutOfMemory as e:
            assert e.requested == min(size, (1 << 64) - 1)
            assert e.available == st_.available and e.used == st_.used and e.total == st_.total
        else:
            raise AssertionError("a request beyond the capacity succeeded")
        after = self.m.stats()
        if hasattr(st_, "oom_events"):  # the one counter an OutOfMemory rightly moves
            assert after.oom_events == st_.oom_events + 1
            after, st_ = (dataclasses.replace(s, oom_events=0) for s in (after, st_))
        assert after == st_

    # ---------------------------------------------------------------- invariants

    @invariant()
    def blocks_do_not_overlap(self) -> None:
        spans = sorted((a - HDR, a + len(d)) for a, d in self.live.items())
        for (_, hi), (lo, _) in itertools.pairwise(spans):
            assert hi <= lo, "two live blocks overlap"
        if spans:
            assert spans[0][0] >= self.m.capacity - self.m.stats().total
            assert spans[-1][1] <= self.m.capacity

    @invariant()
    def data_intact(self) -> None:
        for a, d in self.live.items():
            assert self.m.size_of(a) == len(d)
            assert self.m.read(a) == bytes(d), f"block {a:#x} lost its data"

    @invariant()
    def counters_match_model(self) -> None:
        s = self.m.stats()
        assert s.used == sum(len(d) for d in self.live.values())
        assert s.allocated_blocks == len(self.live)
        assert s.allocations == self.allocs and s.deallocations == self.frees
        assert s.used + s.available + HDR * (s.allocated_blocks + s.free_blocks) == s.total
        assert s.peak >= s.used


ArenaMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    database=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_arena_matches_model = ArenaMachine.TestCase


def test_model_machine_cleans_up() -> None:
    """The machine's arenas are destroyed at teardown (the session fixture also checks)."""
    m = ArenaMachine()
    name = m.m.name
    m.allocate(100, None)
    m.teardown()
    import os

    assert not os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(FileNotFoundError):
        MemoryManager.attach(name)
