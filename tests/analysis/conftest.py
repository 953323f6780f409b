"""One demo run for every analysis test (the notebooks, the figures script, the demo's own
output): ``python -m jobs.demo`` on the session's Ray cluster and tiny model."""

from __future__ import annotations

import contextlib
import io
import os
import time

import pytest


@pytest.fixture(scope="session")
def demo_run(ray_session, tiny_model, tmp_path_factory):
    from jobs import demo

    work = tmp_path_factory.mktemp("demo")
    os.symlink(tiny_model, work / "tiny-colqwen2")  # the demo builds it when absent; the session has one
    out = io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(out):
        rc = demo.main(["--workdir", str(work)])
    print(out.getvalue())
    assert rc == 0
    return {"dir": str(work), "stdout": out.getvalue(), "seconds": time.time() - started}
