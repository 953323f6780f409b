"""Session fixtures: one real Ray cluster (``ray start --head``), one real S3 endpoint
(moto's server on 127.0.0.1), one tiny random ColQwen2 built offline.

Only processes of the cluster started here are stopped at the end (never ``ray stop``,
which ends every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from pipeline.devtools.local_cluster import free_port, free_ports, stop_cluster_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CORPORA = os.path.join(os.path.dirname(ROOT), "shared", "corpora")

# Google clients must never reach outside 127.0.0.0/8: with no other credentials, google-auth
# and gcsfs ask the metadata server (169.254.169.254) and retry for minutes. A closed loopback
# port answers at once. google-auth reads these when it is imported, and the session Ray
# cluster copies this environment for its workers: so they are set here, at import.
os.environ.update({"NO_GCE_CHECK": "True", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                   "GCE_METADATA_ROOT": "127.0.0.1:9", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
# gs:// in tests means the GCS emulator (tests/test_gcs.py starts it on this port when needed).
# Its address is fixed now because Ray workers read STORAGE_EMULATOR_HOST as the jobs'
# drivers do, and they get the environment the cluster was started with.
GCS_EMULATOR_PORT = free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{GCS_EMULATOR_PORT}"


class S3Server:
    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_folder(self, folder: str, bucket: str, prefix: str = "") -> None:
        c = self.client()
        for dirpath, _, files in os.walk(folder):
            for f in files:
                full = os.path.join(dirpath, f)
                key = prefix + os.path.relpath(full, folder).replace(os.sep, "/")
                c.upload_file(full, bucket, key)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)


@pytest.fixture(scope="session")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-not-for-logs",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield S3Server(endpoint)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A real local cluster, as users run one: ``ray start --head`` with the dashboard
    (for ``ray job submit``). Workers inherit this environment, S3 settings included."""
    if shutil.which("ray") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "ray")):
        pytest.skip("the ray CLI is not installed")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    gcs_port, dash_port, agent_port = free_ports(3)  # distinct: Ray refuses to start on a repeated one
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray 2.60 turns on token authentication for `ray start`; a throwaway local test cluster
    # does not need it, and the driver and `ray job submit` would each need the token.
    env["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # This cluster's node compile caches (ours and Inductor's), not the machine's /tmp ones:
    # a test that compiles under Ray starts cold in each session and can empty them.
    env["VDR_COMPILE_CACHE"] = os.path.join(temp_dir, "vdr-compile-cache")
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(temp_dir, "inductor")
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           f"--dashboard-port={dash_port}", f"--dashboard-agent-listen-port={agent_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    info = {"gcs_address": f"127.0.0.1:{gcs_port}", "dashboard_url": f"http://127.0.0.1:{dash_port}",
            "temp_dir": temp_dir, "compile_cache": env["VDR_COMPILE_CACHE"],
            "inductor_cache": env["TORCHINDUCTOR_CACHE_DIR"]}
    deadline = time.time() + 60
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(info["dashboard_url"] + "/api/version", timeout=2)
            # the job agent starts a little after the dashboard
            urllib.request.urlopen(info["dashboard_url"] + "/api/jobs/", timeout=2)
            break
        except Exception:
            if time.time() > deadline:
                break
            time.sleep(1)
    yield info
    stop_cluster_processes(temp_dir, gcs_port)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def submit_job(ray_cluster):
    """submit_job(module_args, env_vars=None, timeout=600): ``ray job submit`` of ``python -m
    ...`` to :func:`ray_cluster`, this folder as the working dir (less the venv, git, notebooks
    and benchmarks), as users submit; tried again while the dashboard's job agent is starting.
    Returns the finished ``subprocess.CompletedProcess``."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")

    def submit(module_args: list[str], env_vars: dict | None = None, timeout: float = 600):
        runtime_env = {"excludes": [".venv", ".git", ".whl", "benchmarks", "notebooks"]}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        cmd = [ray_bin, "job", "submit", "--address", ray_cluster["dashboard_url"], "--working-dir", ROOT,
               "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, "-m", *module_args]
        for _ in range(20):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(3)
        return proc

    return submit


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    ray.init(address=ray_cluster["gcs_address"], log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


class KeptActors:
    """The named actors of one namespace (a job's kept actors): listed, waited for, ended."""

    def __init__(self, ray, namespace: str):
        self.ray, self.namespace = ray, namespace

    def __call__(self) -> list[dict]:
        return [a for a in self.ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == self.namespace]

    def wait_gone(self, timeout_s: float = 40.0) -> list[dict]:
        """What is still alive after up to ``timeout_s`` (a keep-alive is checked every <= 5 s)."""
        deadline = time.monotonic() + timeout_s
        while self() and time.monotonic() < deadline:
            time.sleep(0.5)
        return self()

    def kill_all(self) -> None:
        for a in self():
            try:
                self.ray.kill(self.ray.get_actor(a["name"], namespace=a["namespace"]))
            except ValueError:  # ended itself since it was listed
                pass


@pytest.fixture
def kept_actors(ray_session):
    """kept_actors(namespace) -> KeptActors; whatever a test leaves alive is ended after it."""
    made: list[KeptActors] = []

    def make(namespace: str) -> KeptActors:
        made.append(KeptActors(ray_session, namespace))
        return made[-1]

    yield make
    for k in made:
        k.kill_all()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from pipeline.devtools.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-colqwen2"))


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    from pipeline.devtools.samples import make_sample_corpus

    folder = tmp_path_factory.mktemp("sample-corpus")
    make_sample_corpus(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def page_rows(sample_corpus):
    """page_rows(n, tokens=64) -> a table of ``n`` rendered pages (a real PDF's first page, as
    the render stage leaves it), the input of an embedding actor's call."""
    import numpy as np

    from pipeline.embed import stages
    from pipeline.embed.rasterize import PageItem, RenderSpec, iter_document

    def make(n: int, tokens: int = 64):
        with open(os.path.join(sample_corpus, "reports/2023/annual.pdf"), "rb") as f:
            page = next(i for i in iter_document(f.read(), RenderSpec(max_visual_tokens=tokens))
                        if isinstance(i, PageItem))
        rows = stages._Rows()
        h, w, _ = page.image.shape
        for i in range(n):
            rows.add(doc_id=f"d{i}.pdf", page_number=1, source_uri=f"d{i}.pdf", doc_pages=1, width=w, height=h,
                     pixels=np.ascontiguousarray(page.image).tobytes(), source_size=1)
        return rows.table()

    return make


@pytest.fixture(scope="session")
def shared_corpora():
    if not os.path.isdir(SHARED_CORPORA):
        pytest.skip(f"{SHARED_CORPORA} is absent")
    return SHARED_CORPORA
