"""Offline planner: how many workers per stage and how many replicas meet a target throughput and a
latency bound within a budget, by the same greedy rule as the online allocator (grow the bottleneck).

Run: python -m allocator.plan allocator/profiles/example.yaml --target-rtfx 100 --latency-s 6 \\
         --budget-per-hour 20 --price-cpu-hour 0.05 --price-gpu-hour 2 --cpus-per-replica 4 --gpus-per-replica 1

The profile is a YAML file (see ``allocator/profiles/example.yaml``), the JSON of ``GET /v1/pipeline``
saved to a ``.json`` file, or a running server's URL (its base URL or the ``/v1/pipeline`` URL). Each
stage gives its device, its cost in ms of work per 100 ms of audio for one worker at batch 1, and
optionally ``batch.speedup``: how many times more audio a worker gets through at its largest batch
than at batch 1. A stage without it counts as 1; where that may be wrong (a GPU stage, or one that
batches) the output says so.

Model
- A replica is one server process on one machine with ``cpus`` CPU cores and ``gpus`` GPUs, and costs
  ``cpus * price_cpu_hour + gpus * price_gpu_hour`` per hour. A CPU stage worker takes one core; a GPU
  stage worker is one in-flight batch slot, and each GPU holds ``gpu_slots`` slots shared by the GPU
  stages. Every stage has at least one worker in every replica.
- Throughput (x RT: audio seconds per wall second) of a stage in one replica is
  ``workers * speedup * 100 / cost_ms_per_100ms``; the replica's is its slowest stage's (the
  bottleneck: ties go to the stage whose requests take longest, the one that adds most queueing);
  the plan's is ``replicas`` times that.
- Utilization of a stage at the target is ``target_rtfx / (replicas * its throughput per replica)``.
  A plan meets the target only if its bottleneck is at most ``max_utilization`` busy: the headroom
  that absorbs bursts the average hides.
- Latency of one request of ``request_audio_s`` seconds: each stage takes
  ``request_audio_s * cost_ms_per_100ms / 100`` seconds for it at batch 1 (batching buys throughput,
  not the latency of one request). Their sum is the zero-load latency. Queueing is counted at the
  bottleneck only, as in an M/M/1 queue: its time is inflated by ``1 / (1 - utilization)``. The other
  stages, less busy, are taken to add no wait. If the bound is not above the zero-load latency no
  plan meets it, since no worker or replica shortens one request in this model.
- Cost per request is the cost per hour over the requests per hour at the target,
  ``target_rtfx * 3600 / request_audio_s`` (for a plan that cannot carry the target, at what it
  carries).

Greedy: start from one replica with one worker per stage. While the plan does not meet the target,
add a worker to the bottleneck if the replica has a core (CPU) or a slot (GPU) left for it. Workers
cost nothing (the replica is paid for whole), so this runs without the budget. Once the bottleneck
cannot grow, every further step would add a replica with the same workers, so the planner adds as
many as the target needs in one step, or as many as the budget pays for, and says what is missing.

Exit status: 0 the plan meets the target; 2 the input is unusable (a bad option, a profile that
cannot be read, a replica too small to hold one worker per stage: argparse's own code); 3 the target
cannot be met (within the budget, or at all under the latency bound); the best plan the budget allows
and what would meet the target are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml

Device = Literal["cpu", "gpu"]
DEVICES: tuple[Device, ...] = ("cpu", "gpu")
PIPELINE_PATH = "/v1/pipeline"
FETCH_TIMEOUT_S = 10.0
# float rounding must not buy an extra replica: 0.8000000000000002 busy meets a 0.8 bound
TOLERANCE = 1e-9
EXIT_NOT_MET = 3  # 2 is argparse's code for unusable input


class PlanError(ValueError):
    """The inputs cannot be planned from; the message says what to change."""


@dataclass(frozen=True)
class StageProfile:
    name: str
    device: Device
    cost_ms_per_100ms: float  # ms of work per 100 ms of audio, one worker, batch 1
    batch_speedup: float = 1.0  # audio per unit time at the largest batch, over that at batch 1

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise PlanError(f"stage {self.name!r}: device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0 < self.cost_ms_per_100ms < math.inf:
            raise PlanError(f"stage {self.name!r}: cost_ms_per_100ms must be a finite number above 0, "
                            f"got {self.cost_ms_per_100ms}")
        if not 0 < self.batch_speedup < math.inf:
            raise PlanError(f"stage {self.name!r}: batch.speedup must be a finite number above 0, "
                            f"got {self.batch_speedup}")

    def rtfx_per_worker(self) -> float:
        """Audio seconds one worker gets through per wall second, batching included."""
        return self.batch_speedup * 100 / self.cost_ms_per_100ms

    def latency_s(self, request_audio_s: float) -> float:
        """Seconds one worker takes for one request alone, at batch 1."""
        return request_audio_s * self.cost_ms_per_100ms / 100


@dataclass(frozen=True)
class Profile:
    stages: tuple[StageProfile, ...]  # in pipeline order
    request_audio_s: float  # audio per request: sets latency and cost per request
    notes: tuple[str, ...] = ()  # assumptions made while reading it, printed with the plan

    def __post_init__(self) -> None:
        if not self.stages:
            raise PlanError("the profile has no stages")
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise PlanError(f"stage names must be unique, got {', '.join(names)}")
        if not 0 < self.request_audio_s < math.inf:
            raise PlanError(f"request_audio_s must be a finite number above 0, got {self.request_audio_s}")

    def zero_load_latency_s(self) -> float:
        return sum(stage.latency_s(self.request_audio_s) for stage in self.stages)


@dataclass(frozen=True)
class Target:
    rtfx: float  # audio seconds per wall second, all replicas together (--target-rtfx)
    latency_s: float  # bound on one request's latency (--latency-s)
    max_utilization: float = 0.8  # the bottleneck may be planned this busy at the target, no busier

    def __post_init__(self) -> None:
        if not 0 < self.rtfx < math.inf:
            raise PlanError(f"--target-rtfx must be a finite number above 0, got {self.rtfx}")
        if not 0 < self.latency_s < math.inf:
            raise PlanError(f"--latency-s must be a finite number above 0, got {self.latency_s}")
        if not 0 < self.max_utilization < 1:
            raise PlanError(f"--max-utilization must be between 0 and 1 (exclusive), got {self.max_utilization}")


@dataclass(frozen=True)
class Replica:
    cpus: int = 2  # CPU cores: one per CPU stage worker (--cpus-per-replica)
    gpus: int = 0  # GPUs: needed when any stage runs on the GPU (--gpus-per-replica)
    gpu_slots: int = 4  # in-flight batch slots of one GPU, shared by the GPU stages (--gpu-slots)

    def __post_init__(self) -> None:
        if self.cpus < 1:
            raise PlanError(f"--cpus-per-replica must be at least 1, got {self.cpus}")
        if self.gpus < 0:
            raise PlanError(f"--gpus-per-replica must be 0 or more, got {self.gpus}")
        if self.gpu_slots < 1:
            raise PlanError(f"--gpu-slots must be at least 1, got {self.gpu_slots}")

    def capacity(self, device: Device) -> int:
        """Workers of that device's stages one replica holds."""
        return self.cpus if device == "cpu" else self.gpus * self.gpu_slots


@dataclass(frozen=True)
class Budget:
    per_hour: float  # most all replicas together may cost per hour; 0 pays for nothing
    price_cpu_hour: float
    price_gpu_hour: float

    def __post_init__(self) -> None:
        for option, value in (("--budget-per-hour", self.per_hour), ("--price-cpu-hour", self.price_cpu_hour),
                              ("--price-gpu-hour", self.price_gpu_hour)):
            if not 0 <= value < math.inf:
                raise PlanError(f"{option} must be a finite number, 0 or more, got {value}")

    def replica_cost_per_hour(self, replica: Replica) -> float:
        return replica.cpus * self.price_cpu_hour + replica.gpus * self.price_gpu_hour


@dataclass(frozen=True)
class StageForecast:
    name: str
    device: Device
    workers: int  # per replica
    rtfx_per_replica: float
    utilization: float  # at the target load; above 1 when the plan cannot carry it


@dataclass(frozen=True)
class Forecast:
    """What one candidate plan would do at the target load."""

    replicas: int
    stages: tuple[StageForecast, ...]
    bottleneck: str
    rtfx: float  # all replicas together
    latency_s: float  # at the target load; inf when the bottleneck cannot carry it
    queueing_s: float  # the part of latency_s spent waiting at the bottleneck
    cost_per_hour: float
    cost_per_request: float  # at the target load, or at what the plan carries when that is less


@dataclass(frozen=True)
class Step:
    number: int
    action: Literal["add worker", "add replicas"]
    stage: str  # the bottleneck the step is for
    stage_rtfx_before: float  # that stage's, all replicas
    stage_rtfx_after: float
    rtfx_before: float  # the plan's, all replicas: a step can leave it where it was when stages tie
    rtfx_after: float
    replicas: int  # after the step
    reason: str = ""  # why replicas rather than a worker


@dataclass(frozen=True)
class Plan:
    met: bool
    steps: tuple[Step, ...]
    # the best plan the budget allows; None when it pays for no replica or nothing meets the latency bound
    best: Forecast | None
    needed: Forecast | None  # the plan that meets the target, budget aside; None when nothing does
    problems: tuple[str, ...]  # why the target is not met and what would change that; empty when met
    notes: tuple[str, ...]  # assumptions behind the numbers


def plan(profile: Profile, target: Target, budget: Budget, replica: Replica = Replica()) -> Plan:
    """Plan workers per stage and replicas greedily for the bottleneck (the module docstring has the model).

    Raises :class:`PlanError` when one replica cannot hold a worker for every stage.
    """
    _check_fits(profile, replica)
    notes = profile.notes + _replica_notes(profile, replica)
    zero_load_s = profile.zero_load_latency_s()
    if zero_load_s >= target.latency_s - TOLERANCE:
        parts = " + ".join(f"{s.name} {_num(s.latency_s(profile.request_audio_s))} s" for s in profile.stages)
        problem = (f"the latency bound {_num(target.latency_s)} s is not above the zero-load latency "
                   f"{_num(zero_load_s)} s ({parts}) of a {_num(profile.request_audio_s)} s request: "
                   f"no number of workers or replicas shortens one request in this model; "
                   f"raise --latency-s above {_num(zero_load_s)} or plan for shorter requests (--request-audio-s)")
        return Plan(met=False, steps=(), best=None, needed=None, problems=(problem,), notes=notes)

    workers, steps = _grow_one_replica(profile, target, budget, replica)
    replicas_needed = _replicas_needed(profile, target, budget, replica, workers)
    needed = _forecast(profile, target, budget, replica, workers, replicas_needed)
    replica_cost = budget.replica_cost_per_hour(replica)
    # the division is nudged so that a budget of 0.3 counts as 3 replicas of 0.1 despite float rounding
    affordable = math.floor(budget.per_hour / replica_cost + TOLERANCE) if replica_cost > 0 else replicas_needed
    if affordable == 0:
        problem = (f"cannot meet target within budget: the budget {_num(budget.per_hour)}/h pays for no replica, "
                   f"one costs {_num(replica_cost)}/h ({_replica_price(replica, budget)}); "
                   f"the target {_num(target.rtfx)} x RT needs {replicas_needed} replica(s) "
                   f"({_num(needed.cost_per_hour)}/h): raise --budget-per-hour to {_num(needed.cost_per_hour)}")
        return Plan(met=False, steps=(), best=None, needed=needed, problems=(problem,), notes=notes)

    replicas = min(replicas_needed, affordable)
    best = _forecast(profile, target, budget, replica, workers, replicas)
    if replicas > 1:
        one = _forecast(profile, target, budget, replica, workers, 1)
        bottleneck = profile.stages[_bottleneck(profile, workers)]
        steps.append(Step(number=len(steps) + 1, action="add replicas", stage=bottleneck.name,
                          stage_rtfx_before=one.rtfx, stage_rtfx_after=best.rtfx,
                          rtfx_before=one.rtfx, rtfx_after=best.rtfx, replicas=replicas,
                          reason=f"{bottleneck.name} cannot grow: "
                                 f"{_usage(profile, replica, workers, bottleneck.device)}"))
    if replicas == replicas_needed:
        return Plan(met=True, steps=tuple(steps), best=best, needed=needed, problems=(), notes=notes)
    carries = _max_target_rtfx(profile, target, workers, replicas)
    problem = (f"cannot meet target within budget: {_num(target.rtfx)} x RT needs {replicas_needed} replicas at "
               f"{_num(replica_cost)}/h each = {_num(needed.cost_per_hour)}/h; the budget "
               f"{_num(budget.per_hour)}/h pays for {replicas} ({_num(best.cost_per_hour)}/h), which carry "
               f"{_num(carries)} x RT within the utilization and latency bounds: raise --budget-per-hour to "
               f"{_num(needed.cost_per_hour)}, or lower --target-rtfx to {_num(carries)}")
    return Plan(met=False, steps=tuple(steps), best=best, needed=needed, problems=(problem,), notes=notes)


def _check_fits(profile: Profile, replica: Replica) -> None:
    for device in DEVICES:
        names = [stage.name for stage in profile.stages if stage.device == device]
        if len(names) <= replica.capacity(device):
            continue
        if device == "cpu":
            raise PlanError(f"the profile has {len(names)} CPU stages ({', '.join(names)}), each needing a core, "
                            f"but a replica has {replica.cpus}: pass --cpus-per-replica {len(names)} or more")
        if replica.gpus == 0:
            raise PlanError(f"stages {', '.join(names)} run on the GPU but a replica has none: "
                            f"pass --gpus-per-replica 1 (or more)")
        raise PlanError(f"the profile has {len(names)} GPU stages ({', '.join(names)}), each needing a slot, "
                        f"but a replica has {replica.capacity(device)}: "
                        f"pass --gpu-slots {math.ceil(len(names) / replica.gpus)} or more")


def _replica_notes(profile: Profile, replica: Replica) -> tuple[str, ...]:
    if replica.gpus and not any(stage.device == "gpu" for stage in profile.stages):
        return (f"each replica pays for {replica.gpus} GPU(s) that no stage uses: --gpus-per-replica 0 is cheaper",)
    return ()


def _grow_one_replica(profile: Profile, target: Target, budget: Budget,
                      replica: Replica) -> tuple[tuple[int, ...], list[Step]]:
    """Workers per stage of one replica: the bottleneck grows until the target is met or it has no room."""
    workers = [1] * len(profile.stages)
    steps: list[Step] = []
    while True:
        before = _forecast(profile, target, budget, replica, tuple(workers), 1)
        if _meets(before, target):
            return tuple(workers), steps
        index = _bottleneck(profile, tuple(workers))
        stage = profile.stages[index]
        if _used(profile, tuple(workers), stage.device) >= replica.capacity(stage.device):
            return tuple(workers), steps
        workers[index] += 1
        after = _forecast(profile, target, budget, replica, tuple(workers), 1)
        steps.append(Step(number=len(steps) + 1, action="add worker", stage=stage.name,
                          stage_rtfx_before=before.stages[index].rtfx_per_replica,
                          stage_rtfx_after=after.stages[index].rtfx_per_replica,
                          rtfx_before=before.rtfx, rtfx_after=after.rtfx, replicas=1))


def _replicas_needed(profile: Profile, target: Target, budget: Budget, replica: Replica,
                     workers: tuple[int, ...]) -> int:
    per_replica_rtfx = _max_target_rtfx(profile, target, workers, 1)
    replicas = max(1, math.ceil(target.rtfx / per_replica_rtfx - TOLERANCE))
    # the closed form can land one short where rounding meets a bound exactly; the check is the rule
    while not _meets(_forecast(profile, target, budget, replica, workers, replicas), target):
        replicas += 1
    return replicas


def _max_target_rtfx(profile: Profile, target: Target, workers: tuple[int, ...], replicas: int) -> float:
    """The largest target these replicas meet: the bottleneck at most max_utilization busy, and busy
    little enough that its queueing keeps the latency within the bound."""
    index = _bottleneck(profile, workers)
    stage = profile.stages[index]
    service_s = stage.latency_s(profile.request_audio_s)
    slack_s = target.latency_s - profile.zero_load_latency_s()
    # zero_load + service * u / (1 - u) <= bound  <=>  u <= slack / (service + slack)
    utilization = min(target.max_utilization, slack_s / (service_s + slack_s))
    return utilization * replicas * workers[index] * stage.rtfx_per_worker()


def _meets(forecast: Forecast, target: Target) -> bool:
    bottleneck = next(stage for stage in forecast.stages if stage.name == forecast.bottleneck)
    return (bottleneck.utilization <= target.max_utilization + TOLERANCE
            and forecast.latency_s <= target.latency_s + TOLERANCE)


def _bottleneck(profile: Profile, workers: tuple[int, ...]) -> int:
    """Index of the slowest stage; of equally slow ones, the one whose requests take longest."""
    return min(range(len(profile.stages)),
               key=lambda i: (workers[i] * profile.stages[i].rtfx_per_worker(), -profile.stages[i].cost_ms_per_100ms))


def _used(profile: Profile, workers: tuple[int, ...], device: Device) -> int:
    return sum(count for stage, count in zip(profile.stages, workers) if stage.device == device)


def _usage(profile: Profile, replica: Replica, workers: tuple[int, ...], device: Device) -> str:
    unit = "CPU cores" if device == "cpu" else "GPU slots"
    return f"{_used(profile, workers, device)} of {replica.capacity(device)} {unit} used"


def _forecast(profile: Profile, target: Target, budget: Budget, replica: Replica, workers: tuple[int, ...],
              replicas: int) -> Forecast:
    stages = tuple(
        StageForecast(name=stage.name, device=stage.device, workers=count,
                      rtfx_per_replica=count * stage.rtfx_per_worker(),
                      utilization=target.rtfx / (replicas * count * stage.rtfx_per_worker()))
        for stage, count in zip(profile.stages, workers))
    index = _bottleneck(profile, workers)
    bottleneck = stages[index]
    utilization = bottleneck.utilization
    service_s = profile.stages[index].latency_s(profile.request_audio_s)
    queueing_s = service_s * utilization / (1 - utilization) if utilization < 1 else math.inf
    rtfx = replicas * bottleneck.rtfx_per_replica
    cost_per_hour = replicas * budget.replica_cost_per_hour(replica)
    requests_per_hour = min(target.rtfx, rtfx) * 3600 / profile.request_audio_s
    return Forecast(replicas=replicas, stages=stages, bottleneck=bottleneck.name, rtfx=rtfx,
                    latency_s=profile.zero_load_latency_s() + queueing_s, queueing_s=queueing_s,
                    cost_per_hour=cost_per_hour,
                    cost_per_request=cost_per_hour / requests_per_hour)


# --- reading profiles --------------------------------------------------------------------------------------


def load_profile(source: str, request_audio_s: float | None = None) -> Profile:
    """Read a profile from a server URL, a saved ``/v1/pipeline`` JSON file or a YAML file.

    ``request_audio_s`` overrides the profile's.
    """
    if source.startswith(("http://", "https://")):
        return profile_from_mapping(_fetch(source), source, request_audio_s)
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"cannot read the profile {source}: {exc.strerror}") from exc
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise PlanError(f"{source}: name the profile .yaml, .yml (a profile) or .json (GET /v1/pipeline)")
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise PlanError(f"{source} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    return profile_from_mapping(data, source, request_audio_s)


def _fetch(url: str) -> Any:
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + PIPELINE_PATH
    try:
        response = httpx.get(url, timeout=FETCH_TIMEOUT_S)
        response.raise_for_status()
        return response.json()
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise PlanError(f"cannot fetch the profile from {url}: {exc}; give a running server's base URL or "
                        f"its {PIPELINE_PATH} URL, or a saved profile file") from exc
    except ValueError as exc:
        raise PlanError(f"{url} did not answer JSON: {exc}") from exc


def profile_from_mapping(data: Any, source: str, request_audio_s: float | None = None) -> Profile:
    """The profile in a parsed YAML profile or ``/v1/pipeline`` JSON; fields other than the model's are ignored."""
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list):
        raise PlanError(f"{source}: expected a mapping with a 'stages' list, as GET {PIPELINE_PATH} returns")
    stages = tuple(_stage(raw, f"{source}: stages[{i}]") for i, raw in enumerate(data["stages"]))
    notes = tuple(f"{stage.name}: {why}, batch.speedup assumed 1 (its throughput may be underestimated)"
                  for raw, stage in zip(data["stages"], stages) if (why := _speedup_unknown(raw)))
    if request_audio_s is None:
        if data.get("request_audio_s") is None:
            raise PlanError(f"{source} gives no request_audio_s: pass --request-audio-s")
        request_audio_s = _number(data["request_audio_s"], f"{source}: request_audio_s")
    return Profile(stages=stages, request_audio_s=request_audio_s, notes=notes)


def _stage(raw: Any, where: str) -> StageProfile:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise PlanError(f"{where}: expected a mapping with a 'name', got {raw!r}")
    # a server that has not yet seen audio in its window reports no cost (null) or a cost of 0
    if raw.get("cost_ms_per_100ms") in (None, 0):
        raise PlanError(f"{where}: no measured cost_ms_per_100ms; a server measures it over its recent window: "
                        f"send it traffic, then fetch the profile again")
    batch = raw.get("batch") or {}
    if not isinstance(batch, Mapping):
        raise PlanError(f"{where}: batch must be a mapping such as {{max_size: 16, speedup: 8}}, got {batch!r}")
    cost_ms_per_100ms = _number(raw["cost_ms_per_100ms"], f"{where}: cost_ms_per_100ms")
    batch_speedup = _number(batch.get("speedup", 1), f"{where}: batch.speedup")
    try:
        return StageProfile(name=raw["name"], device=raw.get("device"), cost_ms_per_100ms=cost_ms_per_100ms,
                            batch_speedup=batch_speedup)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from exc


def _speedup_unknown(raw: Mapping[str, Any]) -> str:
    """Why a missing batch.speedup may matter for this stage, or '' where 1 is simply right."""
    batch = raw.get("batch") or {}
    if "speedup" in batch:
        return ""
    max_size = batch.get("max_size", 1)
    if isinstance(max_size, int | float) and max_size > 1:
        return f"batches up to {max_size} but the profile gives no speedup"
    if raw.get("device") == "gpu":
        return "runs on the GPU but the profile gives no batching speedup"
    return ""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{what} must be a number, got {value!r}")
    return float(value)


# --- output --------------------------------------------------------------------------------------------------


def render(result: Plan, profile: Profile, target: Target, budget: Budget, replica: Replica) -> str:
    gpus = f", {replica.gpus} GPU x {replica.gpu_slots} slots" if replica.gpus else ""
    lines = [
        f"target: {_num(target.rtfx)} x RT, latency <= {_num(target.latency_s)} s for "
        f"{_num(profile.request_audio_s)} s requests, bottleneck at most {target.max_utilization:.0%} busy; "
        f"budget {_num(budget.per_hour)}/h",
        f"replica: {replica.cpus} CPU cores{gpus} = {_num(budget.replica_cost_per_hour(replica))}/h "
        f"({_replica_price(replica, budget)})",
    ]
    lines += [f"note: {note}" for note in result.notes]
    if result.steps:
        lines += ["", "greedy steps (x RT before -> after, all replicas):",
                  f"  {'step':>4}  {'action':<12}  {'stage':<10}  {'the stage':<16}  the pipeline"]
        for step in result.steps:
            line = (f"  {step.number:>4}  {step.action:<12}  {step.stage:<10}  "
                    f"{f'{step.stage_rtfx_before:.1f} -> {step.stage_rtfx_after:.1f}':<16}  "
                    f"{step.rtfx_before:.1f} -> {step.rtfx_after:.1f}")
            if step.action == "add replicas":
                line += f"  (1 -> {step.replicas} replicas; {step.reason})"
            lines.append(line)
    if result.met:
        lines += ["", "plan (meets the target):", *_table(result.best, target)]
        return "\n".join(lines)
    lines += ["", "TARGET NOT MET", *(f"  {problem}" for problem in result.problems)]
    if result.best is not None:
        lines += ["", "best plan within the budget:", *_table(result.best, target)]
    if result.needed is not None:
        lines += ["", "plan that meets the target:", *_table(result.needed, target)]
    return "\n".join(lines)


def _table(forecast: Forecast, target: Target) -> list[str]:
    lines = [f"  {'stage':<10}  {'device':<6}  {'workers/replica':>15}  {'x RT/replica':>12}  utilization at target"]
    for stage in forecast.stages:
        lines.append(f"  {stage.name:<10}  {stage.device:<6}  {stage.workers:>15}  {stage.rtfx_per_replica:>12.1f}  "
                     f"{stage.utilization:.0%}")
    latency = (f"{forecast.latency_s:.2f} s ({_num(forecast.queueing_s)} s of it queueing at {forecast.bottleneck})"
               if math.isfinite(forecast.latency_s) else f"unbounded ({forecast.bottleneck} over capacity)")
    return lines + [
        f"  replicas          {forecast.replicas}",
        f"  throughput        {forecast.rtfx:.1f} x RT (target {_num(target.rtfx)}; bottleneck {forecast.bottleneck})",
        f"  latency           {latency}",
        f"  cost per hour     {_num(forecast.cost_per_hour)}",
        f"  cost per request  {_num(forecast.cost_per_request)}",
    ]


def _replica_price(replica: Replica, budget: Budget) -> str:
    price = f"{replica.cpus} x {_num(budget.price_cpu_hour)} CPU"
    return price + (f" + {replica.gpus} x {_num(budget.price_gpu_hour)} GPU" if replica.gpus else "")


def _num(value: float) -> str:
    return f"{value:.4g}"


def to_json(result: Plan, profile: Profile, target: Target, budget: Budget, replica: Replica) -> str:
    document = {name: dataclasses.asdict(value) for name, value in
                (("profile", profile), ("target", target), ("budget", budget), ("replica", replica), ("plan", result))}
    return json.dumps(_finite(document), indent=2)


def _finite(value: Any) -> Any:
    """JSON has no infinity: an unbounded latency becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m allocator.plan", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 target met, 2 unusable input, 3 target not met")
    parser.add_argument("profile", metavar="PROFILE",
                        help="a .yaml profile, a saved GET /v1/pipeline .json, or a server URL (http://...)")
    parser.add_argument("--target-rtfx", type=float, required=True, metavar="X",
                        help="audio seconds per wall second, all replicas together")
    parser.add_argument("--latency-s", type=float, required=True, metavar="S", help="bound on one request's latency")
    parser.add_argument("--budget-per-hour", type=float, required=True, metavar="B",
                        help="most all replicas together may cost per hour")
    parser.add_argument("--price-cpu-hour", type=float, required=True, metavar="P",
                        help="price of one CPU core for an hour")
    parser.add_argument("--price-gpu-hour", type=float, required=True, metavar="G", help="price of one GPU for an hour")
    parser.add_argument("--cpus-per-replica", type=int, default=Replica.cpus, metavar="N",
                        help="CPU cores per replica, one per CPU stage worker (default: %(default)s)")
    parser.add_argument("--gpus-per-replica", type=int, default=Replica.gpus, metavar="N",
                        help="GPUs per replica; needed when a stage runs on the GPU (default: %(default)s)")
    parser.add_argument("--gpu-slots", type=int, default=Replica.gpu_slots, metavar="N",
                        help="in-flight batch slots per GPU, shared by the GPU stages (default: %(default)s)")
    parser.add_argument("--max-utilization", type=float, default=Target.max_utilization, metavar="U",
                        help="most the bottleneck may be planned busy at the target (default: %(default)s)")
    parser.add_argument("--request-audio-s", type=float, metavar="S", help="audio per request (overrides the profile)")
    parser.add_argument("--json", action="store_true", help="print the inputs and the plan as JSON")
    args = parser.parse_args(argv)

    try:
        profile = load_profile(args.profile, args.request_audio_s)
        target = Target(rtfx=args.target_rtfx, latency_s=args.latency_s, max_utilization=args.max_utilization)
        budget = Budget(per_hour=args.budget_per_hour, price_cpu_hour=args.price_cpu_hour,
                        price_gpu_hour=args.price_gpu_hour)
        replica = Replica(cpus=args.cpus_per_replica, gpus=args.gpus_per_replica, gpu_slots=args.gpu_slots)
        result = plan(profile, target, budget, replica)
    except PlanError as exc:
        parser.error(str(exc))
    output = to_json if args.json else render
    print(output(result, profile, target, budget, replica))
    sys.exit(0 if result.met else EXIT_NOT_MET)


if __name__ == "__main__":
    main()
