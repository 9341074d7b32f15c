"""The bad-input catalog (loadtest/bad_inputs.py) against a server with small limits: every hostile
input gets its answer, no answer is an unplanned 5xx or shows internals, and afterwards the server
still transcribes JFK word for word."""

from __future__ import annotations

from loadtest.bad_inputs import Limits, markdown_table, run_catalog
from loadtest.evalset import normalize
from configs import Settings
from tests.conftest import JFK_TEXT, LIMITED_SETTINGS, Server

LIMITED_SERVER = Limits.from_settings(Settings(**LIMITED_SETTINGS))
INTERNALS = ("Traceback", "/site-packages/", "/work/")


def test_every_bad_input_gets_its_answer_and_the_server_survives(limited_server: Server) -> None:
    rows = run_catalog(limited_server.url, LIMITED_SERVER)
    ran = [row for row in rows if not row.skipped]
    assert len(ran) >= 30
    assert not [row.skipped for row in rows if row.skipped]
    failed = [row for row in ran if not row.ok]
    assert not failed, "\n" + markdown_table(failed)

    outcomes = [row.outcome for row in ran if row.outcome is not None]
    assert len(outcomes) == len(ran) and all(outcome.status is not None for outcome in outcomes)
    # the one 5xx is the planned refusal of a stream past the slots
    assert [outcome.codes for outcome in outcomes if outcome.status >= 500] == [("server_busy",)]
    leaks = [(row.name, marker) for row in ran for marker in INTERNALS if any(marker in body for body in row.outcome.bodies)]
    assert not leaks

    last = rows[-1]  # the catalog ends with JFK, transcribed after everything else
    assert last.name == "JFK FLAC, after everything above" and normalize(last.outcome.text) == JFK_TEXT
