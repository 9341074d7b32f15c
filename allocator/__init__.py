"""Stage profiler, greedy pool allocator and offline planner: not built yet (issue 4)."""
