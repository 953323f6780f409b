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


def test_started_here_tells_an_embedded_ray_from_a_joined_cluster(ray_session):
    """--device cuda is refused only on a Ray the job started itself (no GPU node can join it)."""
    import os
    import subprocess
    import sys

    from pipeline.cluster import started_here

    assert started_here() is False  # the test session joined a `ray start` cluster
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import ray; ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
            "from pipeline.cluster import started_here; print('embedded', started_here())")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=180)
    assert "embedded True" in proc.stdout, proc.stderr[-2000:]
