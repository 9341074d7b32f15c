"""Offline planner: the greedy trace, the numbers of the design's worked example, and what it says
when the budget, or the latency bound, rules the target out."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from allocator import plan as planner
from allocator.plan import Budget, PlanError, Profile, Replica, Target, load_profile, main, plan

EXAMPLE = Path(__file__).resolve().parents[1] / "allocator" / "profiles" / "example.yaml"
# one replica: 4 cores x 0.05 + 1 GPU x 2.00 = 2.20 per hour
REPLICA = Replica(cpus=4, gpus=1, gpu_slots=4)
PRICES = {"price_cpu_hour": 0.05, "price_gpu_hour": 2.0}
TARGET = Target(rtfx=100, latency_s=6)
CLI = [str(EXAMPLE), "--target-rtfx", "100", "--latency-s", "6", "--price-cpu-hour", "0.05",
       "--price-gpu-hour", "2", "--cpus-per-replica", "4", "--gpus-per-replica", "1"]


def example() -> Profile:
    return load_profile(str(EXAMPLE))


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


def test_worked_example_grows_the_bottleneck_and_meets_the_target() -> None:
    result = plan(example(), TARGET, Budget(per_hour=20, **PRICES), REPLICA)

    # x RT of one worker = speedup * 100 / cost: features 100/5 = 20, acoustic 8*100/20 = 40,
    # decoder 6*100/15 = 40, post 100/2 = 50. Acoustic is the slowest at batch 1 (20 ms), but
    # batching makes it 40 x RT, so features (20) is the bottleneck and grows first. Then
    # features, acoustic and decoder tie at 40; the tie goes to the longest request (acoustic 2 s,
    # then decoder 1.5 s); then features (40) again, to 60. Post (50) is then the bottleneck and the
    # 4 cores hold features 3 + post 1: only replicas can grow it.
    assert [(s.action, s.stage) for s in result.steps] == [
        ("add worker", "features"), ("add worker", "acoustic"), ("add worker", "decoder"),
        ("add worker", "features"), ("add replicas", "post")]
    assert result.steps[0].stage_rtfx_before == 20 and result.steps[0].stage_rtfx_after == 40
    assert result.met and not result.problems
    best = result.best
    assert {s.name: s.workers for s in best.stages} == {"features": 3, "acoustic": 2, "decoder": 2, "post": 1}
    # replicas = ceil(100 / (0.8 * 50)) = ceil(2.5) = 3, carrying 3 * 50 = 150 x RT
    assert best.replicas == 3 and best.rtfx == pytest.approx(150)
    assert best.bottleneck == "post"
    # latency: zero-load 10 s * (5 + 20 + 15 + 2) / 100 = 4.2 s; post takes 0.2 s at batch 1 and is
    # 100 / 150 = 2/3 busy, so its 0.2 s becomes 0.2 / (1 - 2/3) = 0.6 s: 4.2 - 0.2 + 0.6 = 4.6 s
    assert best.latency_s == pytest.approx(4.6)
    # cost: 3 replicas * 2.2 = 6.6 per hour; 100 x RT of 10 s requests = 100 * 3600 / 10 = 36,000
    # requests per hour; 6.6 / 36,000 = 0.00018333 per request
    assert best.cost_per_hour == pytest.approx(6.6)
    assert best.cost_per_request == pytest.approx(6.6 / 36_000)


def test_without_batching_the_acoustic_stage_is_the_first_bottleneck() -> None:
    no_batching = dataclasses.replace(
        example(), stages=tuple(dataclasses.replace(s, batch_speedup=1.0) for s in example().stages))

    result = plan(no_batching, TARGET, Budget(per_hour=1000, **PRICES), REPLICA)

    # acoustic at 20 ms per 100 ms gives 100/20 = 5 x RT, the slowest of 20, 5, 6.7 and 50
    assert result.steps[0].stage == "acoustic"
    assert result.steps[0].stage_rtfx_before == pytest.approx(5)
    assert result.met


def test_latency_bound_sets_the_replicas_when_it_binds_first() -> None:
    result = plan(example(), Target(rtfx=100, latency_s=4.3), Budget(per_hour=1000, **PRICES), REPLICA)

    # 0.1 s of slack over the 4.2 s zero-load latency: 0.2 * u / (1 - u) <= 0.1 gives u <= 1/3 at post,
    # below the 0.8 cap: replicas = 100 / (1/3 * 50) = 6
    assert result.met
    assert result.best.replicas == 6
    assert result.best.latency_s == pytest.approx(4.3)


def test_zero_budget_is_not_met_and_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([*CLI, "--budget-per-hour", "0"]) == 3

    out = capsys.readouterr().out
    assert "cannot meet target within budget" in out
    assert "pays for no replica" in out
    assert "raise --budget-per-hour to 6.6" in out  # 3 replicas * 2.2


def test_target_beyond_the_budget_names_the_budget_needed() -> None:
    result = plan(example(), TARGET, Budget(per_hour=5, **PRICES), REPLICA)

    # 5 / 2.2 pays for 2 replicas (4.4 per hour), 100 x RT, which carry 0.8 * 100 = 80 x RT
    assert not result.met
    assert result.best.replicas == 2 and result.best.rtfx == pytest.approx(100)
    assert result.needed.replicas == 3
    assert result.steps[-1].action == "add replicas" and result.steps[-1].replicas == 2
    (problem,) = result.problems
    assert "needs 3 replicas" in problem
    assert "raise --budget-per-hour to 6.6" in problem
    assert "lower --target-rtfx to 80" in problem


def test_the_cli_prints_the_plan_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code([*CLI, "--budget-per-hour", "20"]) == 0

    out = capsys.readouterr().out
    assert "plan (meets the target)" in out and "cost per hour     6.6" in out


def test_latency_bound_below_zero_load_says_so() -> None:
    result = plan(example(), Target(rtfx=100, latency_s=4), Budget(per_hour=1000, **PRICES), REPLICA)

    assert not result.met and result.steps == () and result.best is None
    (problem,) = result.problems
    assert "zero-load latency 4.2 s" in problem and "no number of workers or replicas" in problem


def test_gpu_stages_need_gpus_per_replica() -> None:
    with pytest.raises(PlanError, match="--gpus-per-replica"):
        plan(example(), TARGET, Budget(per_hour=20, **PRICES), Replica(cpus=4))


def test_loads_a_saved_v1_pipeline_json(tmp_path: Path) -> None:
    saved = tmp_path / "pipeline.json"
    saved.write_text(json.dumps({
        "stages": [
            {"name": "features", "device": "cpu", "workers": 1, "cost_ms_per_100ms": 4.1,
             "batch": {"avg": 1.0, "max_size": 1}, "queue_depth": 0, "pressure": 0.1},
            {"name": "acoustic", "device": "cpu", "workers": 1, "cost_ms_per_100ms": 30,
             "batch": {"avg": 2.5, "max_size": 8}},
            {"name": "decoder", "device": "cpu", "workers": 2, "cost_ms_per_100ms": 25,
             "batch": {"avg": 3.2, "max_size": 8, "speedup": 3}},
            {"name": "post", "device": "cpu", "workers": 1, "cost_ms_per_100ms": 0.5, "batch": {"max_size": 1}},
        ],
        "request_audio_s": 7.6,
        "allocator": {"decisions": []},
    }))

    profile = load_profile(str(saved))

    assert [(s.name, s.cost_ms_per_100ms, s.batch_speedup) for s in profile.stages] == [
        ("features", 4.1, 1), ("acoustic", 30, 1), ("decoder", 25, 3), ("post", 0.5, 1)]
    assert profile.request_audio_s == 7.6
    # only the batching stage without a measured speedup is flagged
    (note,) = profile.notes
    assert note.startswith("acoustic:") and "assumed 1" in note
    # 7.6 s * (4.1 + 30 + 25 + 0.5) / 100 = 4.5296 s
    assert profile.zero_load_latency_s() == pytest.approx(4.5296)
    result = plan(profile, Target(rtfx=5, latency_s=10), Budget(per_hour=10, price_cpu_hour=0.05, price_gpu_hour=2),
                  Replica(cpus=4))
    assert result.met and result.notes == profile.notes
    assert load_profile(str(saved), request_audio_s=3).request_audio_s == 3


def test_a_server_base_url_is_read_at_v1_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def get(url: str, timeout: float) -> httpx.Response:
        asked.append(url)
        body = {"stages": [{"name": "features", "device": "cpu", "cost_ms_per_100ms": 4}], "request_audio_s": 5}
        return httpx.Response(200, json=body, request=httpx.Request("GET", url))

    monkeypatch.setattr(planner.httpx, "get", get)

    assert load_profile("http://127.0.0.1:8000").stages[0].cost_ms_per_100ms == 4
    assert asked == ["http://127.0.0.1:8000/v1/pipeline"]


def test_an_unmeasured_stage_says_to_send_traffic_first(tmp_path: Path) -> None:
    saved = tmp_path / "pipeline.json"
    for unmeasured in (None, 0.0):
        saved.write_text(json.dumps({"stages": [{"name": "features", "device": "cpu",
                                                 "cost_ms_per_100ms": unmeasured}], "request_audio_s": 5}))

        with pytest.raises(PlanError, match="send it traffic"):
            load_profile(str(saved))
