"""loadtest.abuse's part 1 (the review's findings) against a real server whose deadlines are 2 s, so that
the tool's own clients, timings and checks are tested in a fraction of its full run."""

from __future__ import annotations

import asyncio

from loadtest.abuse import ALLOWED_ORIGIN, Deadlines, Good, Run, part1, speech_folder
from loadtest.harness import Target
from tests.conftest import running_server

SHORT_S = 2.0


def test_part1_passes_against_a_server_with_short_deadlines() -> None:
    short = str(SHORT_S)
    with speech_folder() as folder, running_server(folder, cors_origins=ALLOWED_ORIGIN, header_timeout_s=short,
                                                   body_grace_s=short, stream_first_audio_timeout_s=short) as server:
        run = Run()
        asyncio.run(part1(Target(server.url, server.process.pid), Good.load(), Deadlines(SHORT_S, SHORT_S, SHORT_S), run, speech_placed=True))
    assert [c.name for c in run.checks] == ["1 ffconcat list", "2 SDP upload", "3 8 SDP + good file", "4 200 slow headers",
                                            "5 trickle at 1 KB/s", "6 foreign Origin", "7 3 idle streams"]
    assert not run.failed, "\n".join(run.notes)
    assert run.figures["part1"]["2_sdp"]["server_udp_sockets"] == 0
