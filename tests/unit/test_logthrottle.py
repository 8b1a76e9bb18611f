"""LogThrottle: a flood of one kind of log line is cut to a burst per interval, with a count of what was left out."""

from __future__ import annotations

import logging

import pytest

from p2pmsg.logthrottle import LogThrottle, flush_all


def test_a_burst_per_key_and_interval_then_a_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("p2pmsg.test"), burst=3, interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="p2pmsg.test")
    for i in range(1000):
        throttle.log(logging.INFO, "forged", "dropped %d", i)
    throttle.log(logging.INFO, "other", "another kind")
    now[0] = 61.0
    throttle.log(logging.INFO, "forged", "dropped %d", 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "dropped 0",
        "dropped 1",
        "dropped 2",
        "another kind",
        "997 more of 'forged' left out of the log in 60 s",
        "dropped 1000",
    ]


def test_the_number_of_keys_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    throttle = LogThrottle(logging.getLogger("p2pmsg.test"), burst=1, interval=60.0, clock=lambda: 0.0)
    caplog.set_level(logging.INFO, logger="p2pmsg.test")
    for i in range(1000):  # keys made from remote input: one per distinct bad value
        throttle.log(logging.INFO, f"kind {i}", "line %d", i)
    assert len(caplog.records) == 257  # 256 keys, then every other kind shares one


def test_keys_whose_interval_is_over_make_room_and_report_what_was_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("p2pmsg.test"), burst=1, interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="p2pmsg.test")
    for i in range(256):
        throttle.log(logging.INFO, f"kind {i}", "line %d", i)
    throttle.log(logging.INFO, "kind 0", "again")  # left out: its burst is used
    now[0] = 61.0
    caplog.clear()
    throttle.log(logging.INFO, "a new kind", "new")  # the expired kinds make room: it gets its own line
    assert [r.getMessage() for r in caplog.records] == ["1 more of 'kind 0' left out of the log in 60 s", "new"]


def test_flush_all_reports_a_flood_that_stopped_and_never_came_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = LogThrottle(logging.getLogger("p2pmsg.test"), burst=2, interval=60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="p2pmsg.test")
    for i in range(50):
        throttle.log(logging.WARNING, "flood", "dropped %d", i)
    caplog.clear()
    flush_all()  # the interval is not over: nothing to say yet
    assert caplog.records == []
    now[0] = 60.0
    flush_all()
    flush_all()  # said once
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "48 more of 'flood' left out of the log in 60 s")
    ]
    caplog.clear()
    throttle.log(logging.WARNING, "flood", "dropped again")  # a new interval: logged at once
    assert [r.getMessage() for r in caplog.records] == ["dropped again"]
