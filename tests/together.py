"""Run a function in several threads released at the same instant (concurrency tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable


def at_once(count: int, target: Callable[[int], object], timeout: float = 60) -> None:
    """Call ``target(0)`` ... ``target(count - 1)``, each in its own thread, all released
    together by a barrier; wait for them; raise the first error any of them raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        barrier.wait()
        try:
            target(index)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), (
        f"threads still running after {timeout} s"
    )
    if errors:
        raise errors[0]
