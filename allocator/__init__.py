"""Sees the pipeline's bottleneck and moves compute there: the stage profiler, the greedy allocator that
resizes the pools while the server runs, and the offline planner (``python -m allocator.plan``)."""
