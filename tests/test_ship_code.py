"""How a job's workers get this code: sent with Ray's ``py_modules`` unless every worker the
job can ever have runs on the driver's machine, where Ray puts the driver's folder on their
path (``pipeline.cluster.ship_code`` / ``ensure_ray``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from pipeline.cluster import ClusterCapacity, ship_code

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed(gpus=1.0, cpus=16.0):
    return ClusterCapacity(gpus, cpus, gpus, cpus, [], "no autoscaler: resources now")


def test_ship_code_only_where_a_worker_could_miss_the_folder():
    one = ["n1"]
    ship, why = ship_code(True, one, "n1", fixed())
    assert not ship and "not sent" in why
    # the driver runs elsewhere than the package's folder: its workers would not find it
    assert ship_code(False, one, "n1", fixed())[0]
    # two nodes, or a driver on another machine than the cluster's one node
    assert ship_code(True, ["n1", "n2"], "n1", fixed())[0]
    assert ship_code(True, ["n2"], "n1", fixed())[0]
    # an autoscaler may add a node (an autoscaled GPU node has no copy of the driver's folder)
    grows = ClusterCapacity(0.0, 4.0, 2.0, 12.0, [], "autoscaler")
    ship, why = ship_code(True, one, "n1", grows)
    assert ship and "can grow" in why and "autoscaler" in why
    unknown = ClusterCapacity(0.0, 4.0, None, None, [], "autoscaler status without counts")
    assert ship_code(True, one, "n1", unknown)[0]
    assert ship_code(True, one, "n1", None)[0]  # not read: sent


DRIVER = r"""
import json, os, sys
from pipeline.cluster import ensure_ray
import ray
ensure_ray(address="local", num_cpus=1, num_gpus=0, include_dashboard=False)
where = ray.get(ray.remote(lambda: __import__("pipeline").__file__).remote())
print("RESULT " + json.dumps({"runtime_env": ray.get_runtime_context().runtime_env, "where": where}))
ray.shutdown()
"""


def _driver(cwd: str, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIPELINE_SHIP_CODE")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **env_extra)
    if cwd == ROOT:
        env.pop("PYTHONPATH", None)  # found through the driver's folder (or an editable install)
    else:
        env["PYTHONPATH"] = ROOT
    p = subprocess.run([sys.executable, "-c", DRIVER], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_a_one_node_cluster_runs_the_drivers_folder_without_shipping_it():
    """An embedded one-node Ray, the driver in the project folder: no ``py_modules``, and a
    worker imports the package all the same. From another folder, or with
    ``PIPELINE_SHIP_CODE=always``, the package is sent; with ``never`` it is not."""
    here = _driver(ROOT)
    assert "py_modules" not in here["runtime_env"]
    assert here["where"].endswith(os.path.join("pipeline", "__init__.py"))
    forced = _driver(ROOT, PIPELINE_SHIP_CODE="always")
    assert forced["runtime_env"].get("py_modules")
    with tempfile.TemporaryDirectory() as elsewhere:
        away = _driver(elsewhere)
        # never: the workers' environment has the package (here PYTHONPATH, as an image would)
        installed = _driver(elsewhere, PIPELINE_SHIP_CODE="never")
    assert away["runtime_env"].get("py_modules")
    assert "py_modules" not in installed["runtime_env"] and installed["where"] == here["where"]


def test_ship_code_setting_is_checked():
    from pipeline.cluster import ship_code_mode

    assert ship_code_mode({}) == "auto"
    assert ship_code_mode({"PIPELINE_SHIP_CODE": " Never "}) == "never"
    with pytest.raises(ValueError, match="PIPELINE_SHIP_CODE must be one of auto, always, never, got 'sometimes'"):
        ship_code_mode({"PIPELINE_SHIP_CODE": "sometimes"})


def test_with_worker_env_adds_the_pipelines_switches(monkeypatch):
    from pipeline.cluster import with_worker_env

    for k in list(os.environ):
        if k.startswith(("VDR_", "PIPELINE_")):
            monkeypatch.delenv(k)
    assert with_worker_env(None) is None and with_worker_env({"py_modules": ["x"]}) == {"py_modules": ["x"]}
    monkeypatch.setenv("VDR_POOL_PROCESSES", "3")
    monkeypatch.setenv("PIPELINE_RENDER_NICENESS", "5")
    monkeypatch.setenv("OTHER_SETTING", "1")  # not the pipeline's: not sent
    monkeypatch.setenv("VDR_COMPILE_CACHE", "/Users/me/cache")  # a per-node path: each node keeps its own
    monkeypatch.setenv("PIPELINE_SHIP_CODE", "auto")  # read by the driver only
    got = with_worker_env({"py_modules": ["x"], "env_vars": {"PIPELINE_RENDER_NICENESS": "7"}})
    assert got == {"py_modules": ["x"], "env_vars": {"VDR_POOL_PROCESSES": "3", "PIPELINE_RENDER_NICENESS": "7"}}


REMOTE_ENV_DRIVER = r"""
import json, os, sys
from pipeline.cluster import ensure_ray
import ray
ensure_ray(address=sys.argv[1])
got = ray.get(ray.remote(lambda: os.environ.get("VDR_POOL_PROCESSES")).remote())
print("RESULT " + json.dumps({"worker_sees": got}))
ray.shutdown()
"""


def test_a_drivers_switches_reach_the_workers_of_a_running_cluster(ray_cluster):
    """The session's cluster was started by ``ray start``, before this driver: without the
    driver's switches in the job's runtime env its workers would not see them (in the fifteenth
    session an A/B of an actor setting set on the driver compared nothing, for this reason)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=ROOT, VDR_POOL_PROCESSES="3")
    p = subprocess.run([sys.executable, "-c", REMOTE_ENV_DRIVER, ray_cluster["gcs_address"]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    assert json.loads(lines[-1][len("RESULT "):]) == {"worker_sees": "3"}
