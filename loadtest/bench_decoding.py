"""WER per slice of the eval set for the server's decoding choices (greedy, beam, ...) against faster-whisper
with its own defaults (beam 5, condition_on_previous_text, temperature fallback), same weights, same run.

Each server configuration is the same server with different request options (/v1/transcribe's beam_size,
...), ``--concurrency`` requests in flight; the peer transcribes one file at a time. A table per slice, the
RTFx of each, and a grouped bar chart with --plot.

Run: python -m loadtest.bench_decoding --plot loadtest/results/decoding.png --json loadtest/results/decoding.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.bench_rest import Peer, log, start_server, stop_server
from loadtest.evalset import DEFAULT_MANIFEST, EvalRow, load_rows, normalize, word_error_rate
from loadtest.plotting import new_figure, save_figure
from loadtest.rest import positive_int, print_progress, run_rest_load

SERVER_CONFIGS: dict[str, dict] = {  # name -> the query parameters of every request
    "greedy": {"beam_size": 1, "condition_on_previous_text": "false"},
    "beam 5": {"beam_size": 5, "condition_on_previous_text": "false"},
    "beam 5 + context": {"beam_size": 5, "condition_on_previous_text": "true"},
    "default": {},
}
PEER = "faster-whisper defaults"


@dataclass(frozen=True)
class ConfigResult:
    name: str
    hypotheses: list[str]
    audio_s: float
    wall_s: float  # the server: the whole run at its concurrency; the peer: the sum of its calls
    errors: int

    @property
    def rtfx(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0


def run_server(url: str, rows: Sequence[EvalRow], concurrency: int, name: str, params: dict) -> ConfigResult:
    log(f"server {name}: {len(rows)} rows, concurrency {concurrency}, {params or 'its defaults'}")
    result = asyncio.run(run_rest_load(url, rows, concurrency, progress=print_progress, params=params))
    return ConfigResult(name, [r.hypothesis for r in result.records], result.audio_s, result.wall_s,
                        sum(result.errors_by_status.values()))


def run_peer(rows: Sequence[EvalRow]) -> ConfigResult:
    peer = Peer(beam_size=5)
    run = peer.transcribe(rows, PEER)
    return ConfigResult(PEER, run.hypotheses, run.audio_s, sum(run.latencies), run.errors)


def slice_table(rows: Sequence[EvalRow], results: Sequence[ConfigResult]) -> list[dict]:
    """One line per source_set and one for all rows: rows, words, and each configuration's WER %."""
    sets = sorted({r.source_set for r in rows})
    lines = []
    for name, keep in [*((s, lambda r, s=s: r.source_set == s) for s in sets), ("all", lambda r: True)]:
        picked = [i for i, r in enumerate(rows) if keep(r)]
        refs = [rows[i].text for i in picked]
        lines.append({"slice": name, "rows": len(picked), "words": sum(len(normalize(t).split()) for t in refs),
                      **{res.name: round(100 * word_error_rate(refs, [res.hypotheses[i] for i in picked]), 2) for res in results}})
    return lines


def format_table(lines: list[dict], results: Sequence[ConfigResult]) -> str:
    names = [r.name for r in results]
    out = ["| slice | rows | words | " + " | ".join(f"{n} WER %" for n in names) + " |",
           "|---|---:|---:|" + "---:|" * len(names)]
    for line in lines:
        label = f"**{line['slice']}**" if line["slice"] == "all" else line["slice"]
        out.append(f"| {label} | {line['rows']} | {line['words']} | " + " | ".join(f"{line[n]:.2f}" for n in names) + " |")
    out.append("| RTFx | | | " + " | ".join(f"{r.rtfx:.1f}" for r in results) + " |")
    return "\n".join(out)


def save_plot(lines: list[dict], results: Sequence[ConfigResult], path: Path) -> None:
    figure = new_figure(figsize=(11, 4.5))
    if figure is None:
        return
    fig, ax = figure
    width = 0.8 / len(results)
    for k, result in enumerate(results):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(lines))]
        ax.bar(xs, [line[result.name] for line in lines], width, label=f"{result.name} (RTFx {result.rtfx:.1f})")
    ax.set_xticks(range(len(lines)), [line["slice"].replace("_", "\n", 1) for line in lines], fontsize=7)
    ax.set_ylabel("WER %, lower is better")
    ax.set_title("WER per slice of ../shared/eval: the server's decodings and faster-whisper's defaults")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_decoding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", metavar="N", type=positive_int, default=8, help="server requests in flight (default: %(default)s)")
    parser.add_argument("--config", dest="configs", action="append", choices=list(SERVER_CONFIGS),
                        help="server configurations to run; repeat for several (default: all)")
    parser.add_argument("--no-peer", action="store_true", help="skip faster-whisper")
    parser.add_argument("--url", help="a server already running at URL (keep it idle); default: start one")
    parser.add_argument("--port", type=int, default=8766, help="port of the server started here (default: %(default)s)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="eval manifest.jsonl (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="only the first K rows (a smoke run)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the table and every transcript as JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="save a grouped bar chart (needs matplotlib)")
    args = parser.parse_args(argv)

    rows = load_rows(args.manifest, limit=args.limit)
    # admission is widened so that no row is refused and every row is scored
    proc = None if args.url else start_server(args.port, {"ASR_ADMISSION_MAX_WAIT_S": "300", "ASR_ADMISSION_MAX_WAITING": "192"})
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        results = [run_server(url, rows, args.concurrency, name, SERVER_CONFIGS[name]) for name in args.configs or SERVER_CONFIGS]
    finally:
        if proc is not None:
            stop_server(proc)
    if not args.no_peer:
        results.append(run_peer(rows))
    lines = slice_table(rows, results)
    print(format_table(lines, results))
    if any(r.errors for r in results):
        print("errors: " + ", ".join(f"{r.name} {r.errors}" for r in results if r.errors), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"table": lines, "results": [{**asdict(r), "rtfx": r.rtfx} for r in results],
                                         "rows": [str(r.audio) for r in rows]}, indent=1) + "\n")
    if args.plot:
        save_plot(lines, results, args.plot)


if __name__ == "__main__":
    main()
