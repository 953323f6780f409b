"""pipeline.keepalive: when a kept actor (--keep-embedders, --keep-scorers) ends itself.
Real threads and clocks, short keep-alives."""

from __future__ import annotations

import time

from pipeline.keepalive import KeepAlive


def ended_at(ended: list, limit_s: float = 10.0) -> float:
    deadline = time.monotonic() + limit_s
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ended) == 1, "the kept actor did not end"
    return ended[0]


def test_one_job_after_another_the_later_jobs_keep_alive_applies():
    ended: list = []
    keep = KeepAlive(1.5, lambda: ended.append(time.monotonic()))
    keep.set(1.5, "a")  # job a takes the actor, keeps it 1.5 s
    with keep.call("a", 1.5):
        pass
    time.sleep(0.1)  # job a is done; job b takes the actor over and keeps it 0.2 s
    keep.set(0.2, "b")
    with keep.call("b", 0.2):
        pass
    b_last = time.monotonic()
    assert ended_at(ended) - b_last < 1.0  # b's 0.2 s, not a's 1.5 s
    time.sleep(0.3)
    assert len(ended) == 1  # once


def test_jobs_at_the_same_time_each_keep_alive_counts():
    """Until 2026-12-04 the keep-alive set last won: job b (0.2 s), calling after job a
    (1.5 s), ended the actor 0.2 s after b, cutting a's keep-alive short."""
    ended: list = []
    keep = KeepAlive(1.5, lambda: ended.append(time.monotonic()))
    keep.set(1.5, "a")
    keep.set(0.2, "b")  # b takes it over while a still runs
    with keep.call("a", 1.5):  # a's last call, after b's first
        pass
    a_last = time.monotonic()
    with keep.call("b", 0.2):  # b's last call
        pass
    time.sleep(0.6)
    assert ended == []  # b's 0.2 s ran out long ago; a's 1.5 s has not
    assert ended_at(ended) - a_last >= 1.45


def test_never_ended_during_a_call_and_ended_after_it_by_the_keep_alive():
    ended: list = []
    keep = KeepAlive(0.2, lambda: ended.append(time.monotonic()))
    with keep.call("a"):  # a call longer than the keep-alive
        time.sleep(0.6)
        assert ended == []
        t_exit = time.monotonic()
    assert ended_at(ended) - t_exit >= 0.15


def test_zero_never_ends():
    ended: list = []
    keep = KeepAlive(0.0, lambda: ended.append(time.monotonic()))
    keep.touch("a")
    time.sleep(0.3)
    assert ended == [] and keep._thread is None
