"""How the server scales with load: REST RTFx at growing concurrency, then real-time streams at growing
counts, up to the most streams it holds with the last final's p95 under a bound.

Run on the machine the service will run on; ``--device cuda`` starts the server on the GPU (fp16) and sweeps
further (REST up to 64 in flight, streams up to 256), which is what the GPU figures of the README come from:

    python -m loadtest.bench_scaling --start-server --device cuda --plot loadtest/results/scaling_gpu.png
    python -m loadtest.bench_scaling --start-server --plot loadtest/results/scaling.png --json after.json

A stream count is *held* when every session ran to its close, none fell behind the real-time pace, no error
event came and the last final's p95 (the wait after the last audio, as ``loadtest.stream`` defines it) is
within ``--final-bound-s``; the sweep stops at the first count that is not held. ``--compare OTHER.json``
draws another run (an older commit's server, say) on the same axes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loadtest.bench_rest import SystemResult
from loadtest.evalset import EvalRow
from loadtest.harness import Json, add_common_arguments, log, rows_or_exit, seconds, stream_url, target_server, write_json
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import positive_int, run_rest_load
from loadtest.stream import StreamClient, assign, decode_file, run_streams, summarize

SWEEPS = {  # (REST concurrency, stream counts) by device: a GPU holds far more before it saturates
    "cpu": ((1, 2, 4, 8), (1, 2, 4, 8)),
    "cuda": ((1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16, 32, 64, 128, 256)),
}
DEFAULT_FINAL_BOUND_S = {"cpu": 1.5, "cuda": 0.3}


def counts(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(part) for part in text.split(","))
    return tuple(sorted(set(values)))


def rest_point(url: str, rows: Sequence[EvalRow], concurrency: int) -> Json:
    result = SystemResult.from_rest(f"c={concurrency}", asyncio.run(run_rest_load(url, rows, concurrency)))
    point = {"concurrency": concurrency, "rtfx": result.rtfx, "wer": result.wer, "latency_p50_s": result.latency_p50_s,
             "latency_p95_s": result.latency_p95_s, "errors": result.errors}
    log(f"REST c={concurrency:<3} RTFx {result.rtfx:6.1f}  WER {100 * result.wer:5.2f} %  "
        f"p50/p95 {seconds(result.latency_p50_s)} / {seconds(result.latency_p95_s)} s  errors {result.errors}")
    return point


def stream_point(url: str, rows: Sequence[EvalRow], streams: int, files_per_stream: int, bound_s: float,
                 audio: dict[Path, np.ndarray]) -> Json:
    files = [(rows[j % len(rows)].audio, rows[j % len(rows)].text) for j in range(streams * files_per_stream)]
    started = time.monotonic()
    results = asyncio.run(run_streams(StreamClient(stream_url(url)), assign(files, streams), audio, quiet=True))
    summary = summarize(results, streams=streams, wall_s=time.monotonic() - started)
    last_p95 = summary["last_final_latency_p95_s"]
    held = (summary["failed_sessions"] == 0 and summary["frames_behind"] == 0 and not summary["error_events"]
            and last_p95 is not None and last_p95 <= bound_s)
    point = {"streams": streams, "held": held, "wer": summary["wer"], "last_final_p50_s": summary["last_final_latency_p50_s"],
             "last_final_p95_s": last_p95, "first_partial_p50_s": summary["first_partial_p50_s"],
             "frames_behind": summary["frames_behind"], "failed_sessions": summary["failed_sessions"],
             "error_events": summary["error_events"]}
    log(f"streams {streams:<4} last final p50/p95 {seconds(point['last_final_p50_s'])} / {seconds(last_p95)} s  "
        f"WER {100 * (summary['wer'] or 0):5.2f} %  behind {summary['frames_behind']}  failed {summary['failed_sessions']}  "
        f"{'held' if held else 'NOT held'}")
    return point


def format_table(run: Json) -> str:
    lines = [f"REST ({run['rows']} rows)", f"{'in flight':>9} {'RTFx':>7} {'WER %':>6} {'p50 s':>6} {'p95 s':>6} {'errors':>6}"]
    lines += [f"{p['concurrency']:>9} {p['rtfx']:>7.1f} {100 * p['wer']:>6.2f} {p['latency_p50_s']:>6.2f} {p['latency_p95_s']:>6.2f} {p['errors']:>6}"
              for p in run["rest"]]
    lines += ["", f"real-time streams ({run['files_per_stream']} files each; held: last final p95 <= {run['final_bound_s']:g} s)",
              f"{'streams':>9} {'last p50':>8} {'last p95':>8} {'WER %':>6} {'behind':>6} {'held':>5}"]
    lines += [f"{p['streams']:>9} {seconds(p['last_final_p50_s']):>8} {seconds(p['last_final_p95_s']):>8} {100 * (p['wer'] or 0):>6.2f} "
              f"{p['frames_behind']:>6} {'yes' if p['held'] else 'no':>5}" for p in run["streams"]]
    lines.append(f"most real-time streams held: {run['most_streams_held']}")
    return "\n".join(lines)


def save_plot(runs: Sequence[Json], path: Path) -> None:
    """RTFx against requests in flight, and the last final's p95 against streams, one line per run."""
    figure = new_figure(ncols=2, figsize=(11, 4))
    if figure is None:
        return
    fig, (ax_rest, ax_stream) = figure
    for run in runs:
        ax_rest.plot([p["concurrency"] for p in run["rest"]], [p["rtfx"] for p in run["rest"]], marker="o", label=run["label"])
        shown = [p for p in run["streams"] if p["last_final_p95_s"] is not None]
        ax_stream.plot([p["streams"] for p in shown], [p["last_final_p95_s"] for p in shown], marker="o", label=run["label"])
    for ax in (ax_rest, ax_stream):
        ax.set_xscale("log", base=2)
        ax.legend()
    ax_rest.set(xlabel="REST requests in flight", ylabel="RTFx (audio s / wall s), higher is better", title="throughput")
    ax_stream.axhline(runs[0]["final_bound_s"], color="grey", linestyle="--", linewidth=1)
    ax_stream.set(xlabel="concurrent real-time streams", ylabel="last final p95 s, lower is better", title="stream latency")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_scaling", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_port=8769)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="ASR_DEVICE of the server started here; also picks the default sweeps (default: %(default)s)")
    parser.add_argument("--concurrency", type=counts, metavar="N,N,...", help="REST requests in flight (default: by device)")
    parser.add_argument("--streams", type=counts, metavar="N,N,...", help="stream counts (default: by device)")
    parser.add_argument("--files-per-stream", type=positive_int, default=3, help="files each stream plays (default: %(default)s)")
    parser.add_argument("--final-bound-s", type=float, help="last-final p95 a held stream count stays within (default: 1.5 on the CPU, 0.3 on CUDA)")
    parser.add_argument("--label", help="this run's name in the plot (default: the device)")
    parser.add_argument("--compare", type=Path, metavar="OTHER.json", help="also draw the run saved in OTHER.json (--json of an earlier run)")
    args = parser.parse_args(argv)
    rows = rows_or_exit(parser, args)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rest_counts, stream_counts = SWEEPS[device]
    bound_s = args.final_bound_s if args.final_bound_s is not None else DEFAULT_FINAL_BOUND_S[device]
    audio = {row.audio: decode_file(row.audio) for row in rows}
    run: Json = {"label": args.label or device, "device": device, "rows": len(rows), "files_per_stream": args.files_per_stream,
                 "final_bound_s": bound_s, "rest": [], "streams": []}
    with target_server(args.url, args.port, env={"ASR_DEVICE": args.device}) as target:
        for concurrency in args.concurrency or rest_counts:
            run["rest"].append(rest_point(target.url, rows, concurrency))
        for streams in args.streams or stream_counts:
            point = stream_point(target.url, rows, streams, args.files_per_stream, bound_s, audio)
            run["streams"].append(point)
            if not point["held"]:
                break
    run["most_streams_held"] = max((p["streams"] for p in run["streams"] if p["held"]), default=0)
    print(format_table(run))
    if args.json:
        write_json(args.json, run)
    if args.plot:
        save_plot([run, *([json.loads(args.compare.read_text())] if args.compare else [])], args.plot)


if __name__ == "__main__":
    main()
