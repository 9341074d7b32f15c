"""DynamicBatchScheduler: batch size, deadline, priority, bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from workers.scheduler import BatchPolicy, DynamicBatchScheduler, LiveWindows, Priority, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_batch_closes_at_target_size() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=3, max_wait_ms=60_000, capacity=10))
        for i in range(5):
            await s.put(i, Priority.BULK)
        return await s.next_batch(), len(s)

    first, left = run(main())
    assert first == [0, 1, 2] and left == 2


def test_batch_closes_at_deadline_with_what_it_has() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=8, max_wait_ms=20, capacity=10))
        await s.put("a", Priority.BULK)
        # the batch is not full: it must still close once "a" has waited 20 ms
        return await asyncio.wait_for(s.next_batch(), timeout=5)

    assert run(main()) == ["a"]


def test_item_arriving_before_deadline_joins_batch() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=2, max_wait_ms=5_000, capacity=10))
        await s.put("a", Priority.BULK)
        batch = asyncio.create_task(s.next_batch())
        await asyncio.sleep(0.01)
        await s.put("b", Priority.BULK)
        return await asyncio.wait_for(batch, timeout=5)

    assert run(main()) == ["a", "b"]


def test_batch_waits_while_more_is_coming_and_closes_when_nothing_is() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=8, max_wait_ms=60_000, capacity=10))
        upstream = ["b", "c"]  # the stage before still holds two items
        await s.put("a", Priority.BULK)
        batch = asyncio.create_task(s.next_batch(more_coming=lambda: bool(upstream)))
        for _ in range(2):
            await asyncio.sleep(0.01)
            assert not batch.done()
            await s.put(upstream.pop(0), Priority.BULK)
        # the last item arrived and nothing is upstream: no reason to wait out the minute
        return await asyncio.wait_for(batch, timeout=5)

    assert run(main()) == ["a", "b", "c"]


def test_realtime_goes_first() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=2, max_wait_ms=0, capacity=10))
        for item in ("bulk1", "bulk2"):
            await s.put(item, Priority.BULK)
        await s.put("live", Priority.REALTIME)
        return await s.next_batch(), await s.next_batch()

    assert run(main()) == (["live", "bulk1"], ["bulk2"])


def test_bulk_keeps_its_share_under_steady_live_load() -> None:
    """Live work goes first, but with a bulk share of 0.25 every fourth item taken is bulk while bulk waits."""

    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=1, max_wait_ms=0, capacity=100, bulk_share=0.25))
        for i in range(3):
            await s.put(f"bulk{i}", Priority.BULK)
        taken = []
        for i in range(16):  # the live queue never runs dry
            await s.put(f"live{i}", Priority.REALTIME)
            taken += await s.next_batch()
        return taken

    taken = run(main())
    assert [i for i, item in enumerate(taken) if item.startswith("bulk")] == [3, 7, 11]
    assert taken[:3] == ["live0", "live1", "live2"]


def test_job_windows_keep_their_share_ahead_of_bulk_work_but_never_pass_live_work() -> None:
    """Job windows go last; with a job share of 0.25 every fourth item taken while bulk work waits is a job
    window, but one never goes before a waiting interim step, whatever its credit."""

    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=1, max_wait_ms=0, capacity=100, job_share=0.25))
        for i in range(3):
            await s.put(f"job{i}", Priority.JOB)
        taken = []
        for i in range(8):  # bulk work never runs dry
            await s.put(f"bulk{i}", Priority.BULK)
            taken += await s.next_batch()
        for i in range(8):  # now live work: no job window passes it, however much credit the lane holds
            await s.put(f"live{i}", Priority.REALTIME)
            taken += await s.next_batch()
        return taken

    taken = run(main())
    assert [i for i, item in enumerate(taken) if item.startswith("job")] == [3, 7]
    assert all(item.startswith("live") for item in taken[8:])


def test_job_windows_wait_while_a_live_window_is_in_flight_in_any_stage() -> None:
    """Two stages share one count of live windows: a job window waiting in the second is not taken while a live
    window is still in the first (queued or worked on), bulk work beside it is, and the job window is taken as
    soon as the last live window is answered, without another item arriving to wake the worker."""

    async def main():
        live = LiveWindows()
        first = DynamicBatchScheduler(BatchPolicy(max_batch_size=4, max_wait_ms=0, capacity=10), live=live)
        second = DynamicBatchScheduler(BatchPolicy(max_batch_size=4, max_wait_ms=0, capacity=10, job_share=1.0), live=live)
        live.started()
        await first.put("live", Priority.REALTIME)
        await second.put("job", Priority.JOB)
        await second.put("bulk", Priority.BULK)
        taken = [await second.next_batch()]
        waiting = asyncio.create_task(second.next_batch())
        await asyncio.sleep(0.05)
        held = not waiting.done()
        taken.append(await first.next_batch())  # the live window is worked on: the job window still waits
        await asyncio.sleep(0.05)
        held = held and not waiting.done()
        live.finished()  # ... and answered
        taken.append(await asyncio.wait_for(waiting, 1))
        return held, taken

    held, taken = run(main())
    assert held and taken == [["bulk"], ["live"], ["job"]]


def test_no_bulk_share_means_strict_priority() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=4, max_wait_ms=0, capacity=100))
        await s.put("bulk", Priority.BULK)
        for i in range(8):
            await s.put(f"live{i}", Priority.REALTIME)
        return await s.next_batch(), await s.next_batch(), await s.next_batch()

    assert run(main()) == (["live0", "live1", "live2", "live3"], ["live4", "live5", "live6", "live7"], ["bulk"])


def test_bounded_queue() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=1, max_wait_ms=0, capacity=2))
        s.offer(1, Priority.BULK)
        s.offer(2, Priority.BULK)
        with pytest.raises(QueueFull):
            s.offer(3, Priority.BULK)
        blocked = asyncio.create_task(s.put(3, Priority.BULK))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # back-pressure: waits for room
        assert await s.next_batch() == [1]
        await asyncio.wait_for(blocked, timeout=5)
        return [await s.next_batch(), await s.next_batch()]

    assert run(main()) == [[2], [3]]


def test_room_is_reserved_per_priority() -> None:
    """Bulk work fills the queue only up to the reserves; interim steps up to the finals' reserve; a final
    always finds room, however much bulk work came first."""

    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=1, max_wait_ms=0, capacity=6, reserved_final=2, reserved_realtime=2))
        for i in range(2):
            s.offer(f"bulk{i}", Priority.BULK)
        with pytest.raises(QueueFull):
            s.offer("bulk2", Priority.BULK)
        blocked = asyncio.create_task(s.put("bulk2", Priority.BULK))
        for i in range(2):
            s.offer(f"live{i}", Priority.REALTIME)
        with pytest.raises(QueueFull):
            s.offer("live2", Priority.REALTIME)
        for i in range(2):
            s.offer(f"final{i}", Priority.FINAL)
        with pytest.raises(QueueFull):
            s.offer("final2", Priority.FINAL)
        await asyncio.sleep(0.01)
        assert not blocked.done()  # bulk waits for bulk room, although the queue has room for a final
        taken = [await s.next_batch() for _ in range(5)]
        await asyncio.wait_for(blocked, 5)  # bulk0 taken: room for bulk again
        return taken + [await s.next_batch() for _ in range(2)]

    assert run(main()) == [["final0"], ["final1"], ["live0"], ["live1"], ["bulk0"], ["bulk1"], ["bulk2"]]


def test_bulk_share_never_passes_a_final() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=1, max_wait_ms=0, capacity=100, bulk_share=1.0))
        s.offer("bulk", Priority.BULK)
        s.offer("final", Priority.FINAL)
        s.offer("live", Priority.REALTIME)
        return [await s.next_batch() for _ in range(3)]

    assert run(main()) == [["final"], ["bulk"], ["live"]]


def test_a_promoted_item_moves_ahead_and_finals_are_taken_alone() -> None:
    async def main():
        s = DynamicBatchScheduler(BatchPolicy(max_batch_size=4, max_wait_ms=0, capacity=100))
        for item in ("bulk", "step1", "step2"):
            s.offer(item, Priority.BULK if item == "bulk" else Priority.REALTIME)
        s.offer("final", Priority.FINAL)
        assert s.promote("step2", Priority.FINAL) and not s.promote("missing", Priority.FINAL)
        assert not s.promote("final", Priority.FINAL)  # not below the target priority: nothing to do
        return s.take_ready(4, Priority.REALTIME), s.take_ready(4)

    finals, rest = run(main())
    assert finals == ["step2", "final"]  # step2 waited before the final: it keeps its place; step1 would slow them
    assert rest == ["step1", "bulk"]


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=0, max_wait_ms=1, capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        BatchPolicy(max_batch_size=8, max_wait_ms=1, capacity=4)
    with pytest.raises(ValueError, match="reserved room"):
        BatchPolicy(max_batch_size=8, max_wait_ms=1, capacity=12, reserved_final=2, reserved_realtime=4)
    with pytest.raises(ValueError, match="bulk_share"):
        BatchPolicy(max_batch_size=1, max_wait_ms=1, capacity=4, bulk_share=1.5)
