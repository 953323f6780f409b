"""A fake autoscaling Ray cluster on this machine (no Docker, no cloud), as
../shared/docs/FACTS.md ("Ray 2.60") describes: the v1 autoscaler with the ``fake_multinode``
provider, started by ``ray start --head --autoscaling-config``. Its worker "nodes" are extra
raylets on this host; the GPU type gets a GPU *resource* with no device behind it.

It runs beside the cluster of ``tests/conftest.py`` (own temp dir, own ports), and only its
own processes are stopped: those whose command line holds its temp dir or its GCS port
(never ``ray stop``). A pytest process can hold one ``ray.init``, so drivers for this cluster
run in subprocesses (:func:`run_driver`) that print one JSON line.

``free_port`` and ``stop_cluster_processes`` come from :mod:`pipeline.devtools.local_cluster`,
shared with ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pipeline.devtools.local_cluster import free_port, free_ports, stop_cluster_processes  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULT_PREFIX = "RESULT_JSON "

# Seconds; the v1 autoscaler accepts any number >= 0 here (ray-schema.json: "number").
IDLE_TIMEOUT_MINUTES = 0.1


def autoscaling_config(gcs_port: int) -> dict:
    return {
        "cluster_name": "vdr-fake-autoscaling",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Fake worker raylets dial this; the default (this host's IP, port 6379) is not ours.
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_render": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
            "gpu_embed": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_driver(code: str, address: str | None, timeout: float = 180) -> dict:
    """Run ``code`` (a Python body) in a fresh interpreter; it must call ``emit(dict)``.
    ``address``: the cluster to reach through ``RAY_ADDRESS`` (None: the code starts its own)."""
    env = _base_env()
    if address:
        env["RAY_ADDRESS"] = address
    prelude = textwrap.dedent(f"""
        import json, os, sys, time
        def emit(d):
            print({RESULT_PREFIX!r} + json.dumps(d), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"driver failed (rc {proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


@pytest.fixture(scope="module")
def fake_autoscaling_cluster():
    """``{"address", "gcs_port", "temp_dir", "config_path", "started_s"}`` of a running
    fake autoscaling cluster: head with ``{"CPU": 0}``, ``cpu_render`` ``{"CPU": 2}`` x 0..2,
    ``gpu_embed`` ``{"CPU": 1, "GPU": 1}`` x 0..1. The dashboard runs (the state API shows where tasks ran)."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_bin):
        pytest.skip("the ray CLI is not installed")
    temp_dir = tempfile.mkdtemp(prefix="rtas", dir="/tmp")  # short: Unix socket paths live under it
    # all at once: ports chosen one by one can repeat, and Ray then refuses to start (seen in CI)
    gcs_port, dashboard_port, metric_port, agent_port, agent_grpc_port, metrics_export_port, \
        runtime_env_port, client_port = free_ports(8)
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(autoscaling_config(gcs_port), f, indent=1)
    env = _base_env()
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # the autoscaler's metrics port is fixed (44217) unless set: keep off the other cluster's
                "AUTOSCALER_METRIC_PORT": str(metric_port)})
    cmd = [ray_bin, "start", "--head", f"--port={gcs_port}", "--num-cpus=0", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--dashboard-agent-listen-port={agent_port}", f"--dashboard-agent-grpc-port={agent_grpc_port}",
           f"--metrics-export-port={metrics_export_port}", f"--runtime-env-agent-port={runtime_env_port}",
           f"--ray-client-server-port={client_port}", "--disable-usage-stats"]

    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        yield {"address": f"127.0.0.1:{gcs_port}", "gcs_port": gcs_port, "temp_dir": temp_dir,
               "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
               "config_path": config_path, "started_s": round(time.monotonic() - t0, 1)}
    finally:
        stop_cluster_processes(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)
