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
    # a history row of an earlier demo in the same folder: this demo starts its history afresh
    # (test_demo_outputs_are_complete checks the history holds only its two runs)
    from pipeline.analysis import inputs
    from pipeline.evaluate import history

    history.append_run(inputs.demo_paths(str(work))["history"], history.history_row("tokens-64", {"nDCG@10": 0.9}))
    out = io.StringIO()
    started = time.time()
    with contextlib.redirect_stdout(out):
        rc = demo.main(["--workdir", str(work)])
    print(out.getvalue())
    assert rc == 0
    return {"dir": str(work), "stdout": out.getvalue(), "seconds": time.time() - started}
