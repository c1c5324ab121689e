"""The run's memory budget for expensive parses: a weighted semaphore counted in bytes.

Per-input caps bound one parse; they do not bound several at once. With C workers the
worst case would be C times the largest parse the caps allow, so a provider whose parse
can take tens of MB (an iCalendar feed) first reserves its estimated cost here and waits
while other workers' reservations leave too little. The sum of what is reserved never
passes the capacity, so however many workers run and whoever the tenants are, these
parses together stay within :data:`PARSE_MEMORY_BYTES`.

Reservations are served first come, first served (a large one is not starved by a
stream of small ones), and a wait never outlives the request's deadline. A reservation
can shrink once the cost is better known, never grow: growing while holding could
deadlock two workers that each wait for the other's share.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import RetryableProviderError

if TYPE_CHECKING:
    from .base import FetchRequest

#: What the run's expensive parses may hold at once (see benchmarks/README.md, memory).
PARSE_MEMORY_BYTES = 64 * 1024 * 1024


class Reservation:
    """Bytes held in a :class:`MemoryBudget` until the ``reserve`` block ends."""

    def __init__(self, budget: MemoryBudget, weight: int) -> None:
        self._budget = budget
        self.weight = weight

    def shrink(self, weight: int) -> None:
        """Hold only ``weight`` bytes from now on (no-op if that is not less)."""
        self._budget._shrink(self, weight)


class MemoryBudget:
    """A FIFO weighted semaphore of ``capacity`` bytes. Thread-safe."""

    def __init__(self, capacity: int = PARSE_MEMORY_BYTES) -> None:
        self.capacity = capacity
        self._used = 0
        self._queue: deque[int] = deque()
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        with self._changed:
            return self._used

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    @contextmanager
    def reserve(self, weight: int, request: FetchRequest, what: str) -> Iterator[Reservation]:
        """Hold ``weight`` bytes for the block; wait in turn until they are free.

        Raises RetryableProviderError if the request's deadline passes first (nothing is
        held then), ValueError if ``weight`` can never fit. On exit from the block,
        whatever is still held is released, also on error.
        """
        if not 0 <= weight <= self.capacity:
            raise ValueError(f"a reservation of {weight} bytes cannot fit in {self.capacity}")
        with self._changed:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while self._queue[0] != ticket or self._used + weight > self.capacity:
                    left = request.time_left()
                    if left <= 0:
                        raise RetryableProviderError(
                            f"{what}: no time left while waiting for memory to parse in "
                            "(other workspaces' feeds were being parsed)"
                        )
                    self._changed.wait(min(left, 1.0))
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now
            self._used += weight
        held = Reservation(self, weight)
        try:
            yield held
        finally:
            self._shrink(held, 0)

    def _shrink(self, held: Reservation, weight: int) -> None:
        with self._changed:
            if 0 <= weight < held.weight:
                self._used -= held.weight - weight
                held.weight = weight
                self._changed.notify_all()
