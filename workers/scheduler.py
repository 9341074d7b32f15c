"""DynamicBatchScheduler: the batching policy in front of a stage, and nothing else.

A batch closes when it reaches the target size, when its oldest item has waited ``max_wait_ms``, or
as soon as the caller says nothing more is on its way, whichever comes first: a real deadline, not a
polling interval. Live-stream work is served before bulk work (REST files), and the end of an
utterance before a stream's interim steps, except that ``bulk_share`` of the items taken go to bulk
work whenever some waits: a steady stream load cannot starve a REST request forever. The queue is
bounded: ``put`` waits for room (back-pressure on the stage before), ``offer`` refuses at once.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    FINAL = 0  # the end of a live utterance: somebody is waiting for it
    REALTIME = 1  # a live stream's interim step
    BULK = 2  # REST files


class QueueFull(Exception):
    """The scheduler's queue holds ``capacity`` items already."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # a batch closes as soon as it has this many items
    max_wait_ms: float  # ... or once its oldest item has waited this long
    capacity: int  # most items waiting; beyond it put() waits and offer() refuses
    bulk_share: float = 0.0  # least share of the items taken that go to waiting bulk work

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")
        if self.capacity < self.max_batch_size:
            raise ValueError(f"capacity ({self.capacity}) must hold at least one batch ({self.max_batch_size})")
        if not 0 <= self.bulk_share <= 1:
            raise ValueError(f"bulk_share must be between 0 and 1, got {self.bulk_share}")


@dataclass
class _Entry(Generic[T]):
    item: T
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatchScheduler(Generic[T]):
    def __init__(self, policy: BatchPolicy):
        self.policy = policy
        self._queues: dict[Priority, deque[_Entry[T]]] = {p: deque() for p in Priority}
        self._changed = asyncio.Condition()
        # earned by every item taken, spent by a bulk item taken ahead of live work; capped at one so an
        # idle bulk queue cannot bank a burst for later
        self._bulk_credit = 0.0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def oldest_wait_s(self) -> float:
        heads = [q[0].enqueued for q in self._queues.values() if q]
        return time.monotonic() - min(heads) if heads else 0.0

    def has_room(self, items: int = 1) -> bool:
        return len(self) + items <= self.policy.capacity

    async def put(self, item: T, priority: Priority) -> None:
        """Enqueue, waiting while the queue is full."""
        async with self._changed:
            await self._changed.wait_for(self.has_room)
            self._queues[priority].append(_Entry(item))
            self._changed.notify_all()

    def offer(self, item: T, priority: Priority) -> None:
        """Enqueue now or raise :class:`QueueFull`."""
        if not self.has_room():
            raise QueueFull(f"{len(self)} items waiting, capacity {self.policy.capacity}")
        self._queues[priority].append(_Entry(item))
        self._wake()

    def requeue(self, item: T, priority: Priority) -> None:
        """Put an item that was taken back at the head of its queue, room or not: it was admitted once."""
        self._queues[priority].appendleft(_Entry(item))
        self._wake()

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def next_batch(self, max_items: int | None = None, more_coming: Callable[[], bool] = lambda: True) -> list[T]:
        """Wait for work, then for the batch to fill or its deadline; return it (never empty).

        ``more_coming`` says whether items are on their way (the stage before is busy); once it says
        no, waiting longer cannot fill the batch and it closes at once. Live-stream work never waits
        for a batch to fill.
        """
        limit = min(max_items or self.policy.max_batch_size, self.policy.max_batch_size)
        async with self._changed:
            await self._changed.wait_for(lambda: len(self) > 0)
            deadline = self._oldest_enqueued() + self.policy.max_wait_ms / 1000
            while len(self) < limit and more_coming() and not self._live_waiting():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(limit)
            self._changed.notify_all()
            return batch

    def take_ready(self, max_items: int) -> list[T]:
        """Whatever is waiting, up to ``max_items``, without waiting (joins a running batch)."""
        batch = self._take(min(max_items, self.policy.max_batch_size))
        if batch:
            self._wake()
        return batch

    def _live_waiting(self) -> bool:
        return bool(self._queues[Priority.FINAL] or self._queues[Priority.REALTIME])

    def _oldest_enqueued(self) -> float:
        return min(q[0].enqueued for q in self._queues.values() if q)

    def _take(self, limit: int) -> list[T]:
        batch: list[T] = []
        bulk = self._queues[Priority.BULK]
        while len(batch) < limit and len(self):
            self._bulk_credit = min(1.0, self._bulk_credit + self.policy.bulk_share)
            if bulk and self._bulk_credit >= 1.0:
                self._bulk_credit -= 1.0
                batch.append(bulk.popleft().item)
            else:
                batch.append(next(q for q in self._queues.values() if q).popleft().item)
        return batch
