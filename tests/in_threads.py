"""run_in_threads: a test's work run by several threads of this process at once, each failure
reported by the test's own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], None], n: int) -> None:
    """Run ``work(0)`` .. ``work(n - 1)``, each in a thread of its own, all started before any is
    joined; then fail with every exception the threads raised."""
    errors: list[str] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # collected and asserted on below, in the test's thread
            errors.append(f"thread {i}: {e!r}")

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
