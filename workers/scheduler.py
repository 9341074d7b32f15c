"""DynamicBatchScheduler: the batching policy in front of a stage, and nothing else.

A batch closes when it reaches the target size, when its oldest item has waited ``max_wait_ms``, or
as soon as the caller says nothing more is on its way, whichever comes first: a real deadline, not a
polling interval. The end of an utterance goes before a stream's interim steps, which go before bulk
work (REST files), which goes before job windows (durable jobs), except that ``bulk_share`` of the items
taken go to bulk work ahead of interim steps whenever some waits, and ``job_share`` to job windows ahead
of bulk work: a steady stream load cannot starve a REST request forever, nor a REST load a job (finals are
never passed: there are never more of them than open streams; job windows never pass live work). While
finals wait, a batch holds finals only: on the CPU a batch costs in proportion to what it holds, so each
other item in it would delay them. Job windows wait, too, while a live stream's window is anywhere in the
stages (:class:`LiveWindows`): the stages share the cores, so a job's encoder pass beside a stream's
decoder steps would make them slower as surely as a place in their batch.

The queue is bounded, and room is reserved per priority (Triton's per-priority queue policy): bulk work and
job windows may fill the queue only up to ``capacity - reserved_final - reserved_realtime``, interim steps up to
``capacity - reserved_final``, so a burst of REST files can never leave a stream's final without room.
``put`` waits for room (back-pressure on the stage before), ``offer`` refuses at once.

With a :class:`Packer` (the acoustic stage's), a batch is not a count of items but what fits its encoder
passes: items are taken in the same priority order, each one that still fits, so a short window later in
the queue fills the room a long one left; the head of the queue always goes first, so none starves.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    FINAL = 0  # the end of a live utterance: somebody is waiting for it
    REALTIME = 1  # a live stream's interim step
    BULK = 2  # REST files
    JOB = 3  # durable jobs: nobody waits on the line for them


class QueueFull(Exception):
    """The scheduler has no room left for this priority."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # a batch closes as soon as it has this many items
    max_wait_ms: float  # ... or once its oldest item has waited this long
    capacity: int  # most items waiting; beyond it put() waits and offer() refuses
    bulk_share: float = 0.0  # least share of the items taken that go to waiting bulk work
    job_share: float = 0.0  # ... and to waiting job windows, ahead of bulk work
    reserved_final: int = 0  # room only finals may take
    reserved_realtime: int = 0  # room only finals and interim steps may take

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")
        if self.reserved_final < 0 or self.reserved_realtime < 0:
            raise ValueError("reserved room cannot be negative")
        if self.room_for(Priority.BULK) < self.max_batch_size:
            raise ValueError(f"capacity ({self.capacity}) less the reserved room ({self.reserved_final} + {self.reserved_realtime}) "
                             f"must hold at least one batch ({self.max_batch_size})")
        for name in ("bulk_share", "job_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")

    def room_for(self, priority: Priority) -> int:
        """How full the queue may be once an item of ``priority`` is in it."""
        if priority is Priority.FINAL:
            return self.capacity
        if priority is Priority.REALTIME:
            return self.capacity - self.reserved_final
        return self.capacity - self.reserved_final - self.reserved_realtime


class Packer(Protocol[T]):
    def fits(self, items: list[T]) -> bool:
        """Whether these items make one batch."""
        ...


class Signal:
    """Wakes every waiter at once, and can be set from plain synchronous code: unlike asyncio.Condition it
    needs no lock, so no task has to be spawned to notify."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until the next notify, or ``timeout_s``."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait([waiter], timeout=timeout_s)
        finally:
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)


@dataclass
class _Entry(Generic[T]):
    item: T
    enqueued: float = field(default_factory=time.monotonic)


class LiveWindows:
    """How many live streams' windows (finals and interim steps) are in flight anywhere in the stages, queued or
    being worked on. With ``holds_jobs``, each stage's scheduler holds its job windows back while any is, and is
    woken (its ``changed``) when the last one is answered, so that they go on."""

    def __init__(self, holds_jobs: bool = True) -> None:
        self.holds_jobs = holds_jobs
        self.count = 0
        self.listeners: list[Signal] = []

    @property
    def holding(self) -> bool:
        return self.holds_jobs and self.count > 0

    def started(self) -> None:
        self.count += 1

    def finished(self) -> None:
        self.count -= 1
        if not self.count:
            for signal in self.listeners:
                signal.notify()


class DynamicBatchScheduler(Generic[T]):
    def __init__(self, policy: BatchPolicy, packer: Packer[T] | None = None, live: LiveWindows | None = None):
        self.policy = policy
        self.packer = packer
        self._queues: dict[Priority, deque[_Entry[T]]] = {p: deque() for p in Priority}
        self.changed = Signal()  # an item came or went, or the last live window in flight was answered
        self.live = live or LiveWindows()  # the pipeline's: while any live window is in flight, job windows are not taken
        self.live.listeners.append(self.changed)
        # earned by every item taken, spent by a bulk item taken ahead of interim steps (a job window ahead of
        # bulk work); capped at one so an idle queue cannot bank a burst for later
        self._credit = {Priority.BULK: 0.0, Priority.JOB: 0.0}
        self._share = {Priority.BULK: policy.bulk_share, Priority.JOB: policy.job_share}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def depth(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def oldest_wait_s(self) -> float:
        heads = [q[0].enqueued for q in self._queues.values() if q]
        return time.monotonic() - min(heads) if heads else 0.0

    def has_room(self, items: int = 1, priority: Priority = Priority.JOB) -> bool:
        return len(self) + items <= self.policy.room_for(priority)

    async def put(self, item: T, priority: Priority) -> None:
        """Enqueue, waiting while there is no room for this priority."""
        while not self.has_room(1, priority):
            await self.changed.wait()
        self._queues[priority].append(_Entry(item))
        self.changed.notify()

    def offer(self, item: T, priority: Priority) -> None:
        """Enqueue now or raise :class:`QueueFull`."""
        if not self.has_room(1, priority):
            raise QueueFull(f"{len(self)} items waiting, room for {self.policy.room_for(priority)} at priority {priority.name}")
        self._queues[priority].append(_Entry(item))
        self.changed.notify()

    def requeue(self, item: T, priority: Priority) -> None:
        """Put an item at the head of its queue, room or not: it was admitted once (taken back, or the undecoded end of a window)."""
        self._queues[priority].appendleft(_Entry(item))
        self.changed.notify()

    def promote(self, item: T, priority: Priority) -> bool:
        """Move a waiting ``item`` to the (higher) ``priority``'s queue, keeping its place in time; False if
        it is not waiting here. Room is not checked: it was admitted once."""
        for queue in list(self._queues.values())[priority + 1 :]:
            for entry in queue:
                if entry.item is item:
                    queue.remove(entry)
                    target = self._queues[priority]
                    target.insert(next((i for i, e in enumerate(target) if e.enqueued > entry.enqueued), len(target)), entry)
                    self.changed.notify()
                    return True
        return False

    def take_all(self) -> list[T]:
        """Empty the queue (the stage is stopping): every item, so that each can be answered."""
        items = [entry.item for queue in self._queues.values() for entry in queue]
        for queue in self._queues.values():
            queue.clear()
        self.changed.notify()
        return items

    async def next_batch(self, max_items: int | None = None, more_coming: Callable[[], bool] = lambda: True) -> list[T]:
        """Wait for work, then for the batch to fill or its deadline; return it (never empty).

        ``more_coming`` says whether items are on their way (the stage before is busy); once it says
        no, waiting longer cannot fill the batch and it closes at once. Live-stream work never waits
        for a batch to fill.
        """
        limit = min(max_items or self.policy.max_batch_size, self.policy.max_batch_size)
        while True:
            while not self._open():
                await self.changed.wait()
            deadline = min(entry.enqueued for queue in self._open() for entry in queue) + self.policy.max_wait_ms / 1000
            while self._open() and not self._fills(limit) and more_coming() and not self._live_waiting():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self.changed.wait(remaining)
            if self._open():  # else another worker took it meanwhile: wait again
                return self._take(limit)

    def jobs_held(self) -> bool:
        """Whether job windows must wait: a live stream's window is in flight somewhere in the stages."""
        return self.live.holding

    def _lowest(self, lowest: Priority = Priority.JOB) -> Priority:
        """The least urgent priority that may be taken now: finals alone while any wait, no job window while live work is in flight."""
        if self._queues[Priority.FINAL]:
            return Priority.FINAL
        return min(lowest, Priority.BULK) if self.jobs_held() else lowest

    def _open(self) -> list[deque[_Entry[T]]]:
        """The queues that hold something that may be taken now."""
        return [self._queues[p] for p in Priority if p <= self._lowest() and self._queues[p]]

    def take_ready(self, max_items: int, lowest: Priority = Priority.JOB) -> list[T]:
        """Whatever is waiting at ``lowest`` priority or more urgent, up to ``max_items``, without waiting
        (joins a running batch)."""
        return self._take(min(max_items, self.policy.max_batch_size), lowest)

    def take_lane(self, max_items: int, priority: Priority) -> list[T]:
        """Up to ``max_items`` of what waits at ``priority`` alone, oldest first, without waiting (a lane of its own
        joins its running batch)."""
        queue = self._queues[priority]
        batch = [queue.popleft().item for _ in range(min(max_items, len(queue)))]
        if batch:
            self.changed.notify()
        return batch

    def _fills(self, limit: int) -> bool:
        """Whether what may be taken makes a full batch."""
        if self.packer is None:
            return sum(map(len, self._open())) >= limit
        return not self.packer.fits([entry.item for queue in self._open() for entry in queue])

    def _live_waiting(self) -> bool:
        return bool(self._queues[Priority.FINAL] or self._queues[Priority.REALTIME])

    def _take(self, limit: int, lowest: Priority = Priority.JOB) -> list[T]:
        """Finals alone while any wait: each other item in their batch would make it, and them, longer."""
        lowest = self._lowest(lowest)
        if self.packer is not None:
            return self._take_packed(lowest)
        batch: list[T] = []
        while len(batch) < limit and any(self._queues[p] for p in Priority if p <= lowest):
            batch.append(next(q for q in map(self._queues.__getitem__, self._order(lowest)) if q).popleft().item)
        if batch:
            self.changed.notify()  # room for whoever waits in put()
        return batch

    def _order(self, lowest: Priority) -> list[Priority]:
        """The queues the next item (a packed batch: the next pass) is taken from, in turn: by priority, but bulk
        work ahead of interim steps, or job windows ahead of bulk work, when it has earned its share. Each item
        taken while no final waits earns each lane its share of credit; a whole credit is spent when the lane
        may be taken and some of its work waits, and so does the work it passes."""
        order = [p for p in Priority if p <= lowest]
        if lowest is Priority.FINAL:
            return order
        for lane, share in self._share.items():
            self._credit[lane] = min(1.0, self._credit[lane] + share)
        for lane, passes in ((Priority.BULK, Priority.REALTIME), (Priority.JOB, Priority.BULK)):  # one lane at a time
            if lane <= lowest and self._queues[lane] and self._queues[passes] and self._credit[lane] >= 1.0:
                self._credit[lane] -= 1.0
                order.remove(lane)
                order.insert(order.index(passes), lane)
                break
        return order

    def _take_packed(self, lowest: Priority) -> list[T]:
        """Each waiting item that still fits the batch, at ``lowest`` priority or more urgent, in the order
        :meth:`_take` would give them (a lane ahead of the one before it when it has earned its share)."""
        batch: list[T] = []
        for priority in self._order(lowest):
            queue = self._queues[priority]
            for entry in list(queue):
                if not batch or self.packer.fits([*batch, entry.item]):
                    queue.remove(entry)
                    batch.append(entry.item)
        if batch:
            self.changed.notify()
        return batch
