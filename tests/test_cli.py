"""How a job's unexpected error reaches the user: one line (pipeline.cli), with a real Ray."""

from __future__ import annotations

import pytest

from pipeline import cli


def test_an_actor_that_could_not_start_is_reported_by_its_own_error(ray_session):
    """The model actor's constructor raised (a checkpoint that does not load): the line names
    that error and the actor, not Ray's 'The actor died because of an error raised in its
    creation task' (the real cause was 200 lines up the log)."""
    ray = ray_session

    class FailsToStart:  # defined here: pickled by value for the worker
        def __init__(self, path):
            raise OSError(f"could not load a ColQwen2 checkpoint from {path!r}: not found")

        def ping(self):
            return 1

    actor = ray.remote(num_cpus=0, max_restarts=0)(FailsToStart).remote("models/tiny-colqwen2")
    with pytest.raises(ray.exceptions.ActorDiedError) as caught:
        ray.get(actor.ping.remote(), timeout=120)
    line = cli.one_line(caught.value)
    assert line.startswith("OSError (FailsToStart could not start): could not load a ColQwen2 checkpoint from "
                           "'models/tiny-colqwen2'"), line
