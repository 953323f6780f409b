"""pipeline.keepalive: when a kept actor (--keep-embedders, --keep-scorers) ends itself.
Real threads and clocks, short keep-alives."""

from __future__ import annotations

import time

from pipeline.keepalive import KeepAlive


def ended_after(keep: KeepAlive, ended: list, t0: float, limit_s: float = 10.0) -> float:
    deadline = time.monotonic() + limit_s
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(ended) == 1, "the kept actor did not end"
    return ended[0] - t0


def test_a_job_with_a_long_keep_alive_is_not_cut_short_by_a_later_job_with_a_short_one():
    ended: list = []
    t0 = time.monotonic()
    keep = KeepAlive(1.5, lambda: ended.append(time.monotonic()))  # job A's keep-alive: 1.5 s
    with keep.call(1.5):
        pass
    time.sleep(0.2)
    keep.set(0.1)  # job B takes the actor over later, keeping it 0.1 s
    with keep.call(0.1):
        pass
    time.sleep(0.6)
    assert ended == []  # B's 0.1 s ran out long ago; A's 1.5 s has not
    at = ended_after(keep, ended, t0)
    assert 1.4 <= at <= 2.5  # A's last call (~0 s) + 1.5 s
    time.sleep(0.3)
    assert len(ended) == 1  # once


def test_a_later_job_with_a_longer_keep_alive_extends_it():
    ended: list = []
    t0 = time.monotonic()
    keep = KeepAlive(0.2, lambda: ended.append(time.monotonic()))
    keep.set(1.0)
    assert ended_after(keep, ended, t0) >= 0.95


def test_never_ended_during_a_call_and_ended_after_it_by_the_keep_alive():
    ended: list = []
    keep = KeepAlive(0.2, lambda: ended.append(time.monotonic()))
    with keep.call():  # a call longer than the keep-alive
        time.sleep(0.6)
        assert ended == []
        t_exit = time.monotonic()
    assert ended_after(keep, ended, t_exit) >= 0.15


def test_zero_never_ends():
    ended: list = []
    keep = KeepAlive(0.0, lambda: ended.append(time.monotonic()))
    keep.touch()
    time.sleep(0.3)
    assert ended == [] and keep._thread is None
