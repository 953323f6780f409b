"""The Ray cluster as the jobs see it: connecting a driver (a given cluster, the one a job was
submitted to, or an embedded one), what the cluster has now and can grow to, the device a
job's actors use, and the Jobs API client of the scheduler.

What the connected Ray cluster has now, and what its autoscaler can grow it to.

An autoscaling cluster whose GPU node type starts at zero nodes shows no GPU in
``ray.cluster_resources()`` when a job starts. A job that picked its device from that
alone would run on CPU and never ask for a GPU node. :func:`read_capacity` also reads the
node types the autoscaler may add, and :func:`choose_device` / :func:`max_gpu_actors`
turn that into the job's device and actor pool size.

Where the node types come from (Ray 2.60), first match wins:

1. The GCS ``ClusterConfig``: ``ray._private.state.state.get_cluster_config()``. Ray Data
   reads the same thing (``ray.data._internal.cluster_autoscaler.util.is_autoscaling_enabled``,
   ``default_cluster_autoscaler_v2._get_node_resource_spec_and_count``), and so do
   ``hash_shuffle`` and Ray Train via ``get_max_resources_from_cluster_config()``. The open
   source v1 and v2 autoscalers of Ray 2.60 never write it (nothing in the wheel calls
   ``GcsClient.report_cluster_config``); autoscalers that do (later Ray releases, hosted
   platforms) are picked up here first.
2. The autoscaling config that the cluster's autoscaler process runs with: the monitor
   (``ray/autoscaler/_private/monitor.py``, or ``ray/autoscaler/v2/monitor.py``) is
   started by ``ray start --head --autoscaling-config=PATH`` (the cluster launcher
   passes ``~/ray_bootstrap_config.yaml``, with node resources already filled in from the
   instance types). The process is found on the head node by the cluster's GCS port
   and session name; from a driver on another node, a zero-CPU task pinned to the head
   node reads it. A monitor without ``--autoscaling-config`` is the read-only one that
   every ``ray start --head`` runs: no autoscaler.
3. The autoscaler's status (v1: the ``__autoscaling_status`` internal KV key the monitor
   writes every update; v2: ``ray.autoscaler.v2.sdk.get_cluster_status``): proves that an
   autoscaler manages named node types, but carries no maximum counts. ``gpus_max`` is
   then ``None`` (unknown). Before this step, on KubeRay (``RAY_CLUSTER_NAME`` set), the
   RayCluster resource is read the way its autoscaler sidecar reads it
   (:func:`kuberay_node_types`).
4. Otherwise the cluster is what it is now.

Every step runs under a deadline; nothing here waits for long on a broken cluster.
"""

from __future__ import annotations

import logging
import os
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)
logger = log


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """``ray.init`` unless already connected. ``address`` (or ``RAY_ADDRESS``, which
    ``ray job submit`` sets) joins a cluster; with neither, Ray joins a cluster started on
    this machine by ``ray start`` or starts an embedded local one.

    How the workers get this code (a driver started with ``python -m jobs.NAME``; a submitted
    job's runtime env already carries it): see :func:`ship_code`. ``$PIPELINE_SHIP_CODE``:
    ``auto`` (default), ``always``, or ``never`` (every node's image has the package)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = init_kwargs.pop("runtime_env", None)
    mode = ship_code_mode()
    decide_later = False
    submitted = _in_submitted_job()
    if runtime_env is None and not submitted and mode != "never":
        if mode == "always" or not _code_under_cwd():
            runtime_env = code_runtime_env()
        else:
            decide_later = True  # once connected: this machine alone, and no autoscaler?
    if not submitted:
        runtime_env = with_worker_env(runtime_env)
    stale = stale_local_cluster() if address is None else None
    if stale:
        # Ray would try to join it for minutes, saying only "Failed to connect to GCS"
        log.warning("the Ray cluster last started on this machine (%s, recorded in %s) does not answer: it was "
                    "stopped without `ray stop`. Starting a local Ray for this job instead; `ray stop` removes the "
                    "record, and --ray-address / RAY_ADDRESS name a cluster to join", *stale)
        address = "local"
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **init_kwargs)
    if decide_later:
        alive = [n.get("NodeID") for n in ray.nodes() if n.get("Alive")]
        driver = ray.get_runtime_context().get_node_id()
        # the autoscaler is looked up only where it decides: this node alone
        capacity = read_capacity(timeout_s=5.0) if alive == [driver] else None
        ship, why = ship_code(True, alive, driver, capacity)
        log.info("code for the workers: %s", why)
        if ship:  # joined a cluster (not one this call started): join it again with the code
            ray.shutdown()
            ray.init(address=address or "auto", runtime_env=with_worker_env(code_runtime_env()), log_to_driver=True,
                     **init_kwargs)
    log.info("Ray resources: %s", {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")})


def stale_local_cluster(temp_dir: str | None = None, timeout_s: float = 2.0) -> tuple[str, str] | None:
    """(address, record file) of the cluster that ``ray start`` last recorded on this machine
    (``/tmp/ray/ray_current_cluster``), where that cluster's head ran on this machine and its
    port now refuses connections: stopped without ``ray stop``. None where there is no record,
    the head is another machine (a worker or login node: a slow or restarting head is Ray's to
    wait for), it answers, or the record cannot be read."""
    import socket

    try:
        from ray._common.network_utils import parse_address
        from ray._common.utils import get_ray_address_file

        record = get_ray_address_file(temp_dir)
        with open(record) as f:
            address = f.read().strip()
        host, port = parse_address(address)  # [::1]:6379 too
        port_number = int(port)
        local = {"localhost", "127.0.0.1", "::1"}
        try:
            local |= set(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
    except Exception:  # noqa: BLE001 - no record (the usual case), or a Ray without this layout
        return None
    if host.strip("[]") not in local and not host.startswith("127."):
        return None
    try:
        socket.create_connection((host.strip("[]"), port_number), timeout=timeout_s).close()
        return None
    except ConnectionRefusedError:
        return address, record
    except OSError:  # a timeout or another failure: not clearly gone
        return None


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init`` with no cluster
    to join: an embedded local Ray, which no node joins), not a cluster it joined."""
    try:
        import ray._private.worker as worker

        return bool(getattr(worker._global_node, "head", False))
    except Exception:  # noqa: BLE001 - a Ray without this attribute: not known, so not claimed
        return False


# The pipeline's own switches that the workers read (the model actors, the renderers, the
# scorers). Workers of a cluster that is already running (``ray start``, KubeRay) do not see a
# driver's environment; an embedded Ray's would. Per-node paths (VDR_COMPILE_CACHE,
# VDR_MODEL_CACHE) are left out: each node or pod sets its own.
WORKER_ENV = ("VDR_POOL_PROCESSES", "VDR_WARD_ON_DEVICE", "VDR_COMPILE_HELPER", "VDR_COMPILE_HELPER_TIMEOUT_S",
              "VDR_COMPILE_HELPER_PROCESSES", "VDR_MODEL_FETCH_THREADS",
              "VDR_PERSISTENT_NORMS", "VDR_PRECOMPILE", "VDR_LINEAR_PATCH_EMBED",
              "VDR_IMAGE_ATTENTION_SPLIT", "PIPELINE_RENDER_NICENESS", "PIPELINE_RENDER_MEMORY_LIMIT_BYTES",
              "PIPELINE_SCORER_DECODE_THREADS", "PIPELINE_STORAGE_ATTEMPTS", "PIPELINE_STORAGE_TIMEOUT_S",
              "PIPELINE_DEBUG")


def worker_env_vars(environ=None) -> dict[str, str]:
    """The switches of :data:`WORKER_ENV` set in this driver's environment."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in WORKER_ENV if k in environ}


def with_worker_env(runtime_env: dict | None) -> dict | None:
    """``runtime_env`` with :func:`worker_env_vars` added to its ``env_vars`` (a value given there
    wins), so ``VDR_POOL_PROCESSES=4 python -m jobs.embed_corpus ...`` reaches the actors on a
    running cluster as it does on an embedded one. Only when one is set: a runtime env with
    ``env_vars`` makes each new worker go through Ray's runtime-env setup (a CPU actor's start,
    embedded local Ray: 0.57 against 0.34 s, median of 4, benchmarks/bench_env_vars_start.py,
    RESULTS fifteenth session). A submitted
    job (``ray job submit``) passes its own ``--runtime-env-json`` env_vars instead."""
    env_vars = worker_env_vars()
    if not env_vars:
        return runtime_env
    runtime_env = dict(runtime_env or {})
    runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
    return runtime_env


SHIP_CODE_ENV = "PIPELINE_SHIP_CODE"
SHIP_CODE_MODES = ("auto", "always", "never")


def ship_code_mode(environ=os.environ) -> str:
    """``$PIPELINE_SHIP_CODE`` (default ``auto``); anything else is refused by name."""
    mode = (environ.get(SHIP_CODE_ENV) or "auto").strip().lower()
    if mode not in SHIP_CODE_MODES:
        raise ValueError(f"{SHIP_CODE_ENV} must be one of {', '.join(SHIP_CODE_MODES)}, got {mode!r}")
    return mode


def _code_under_cwd() -> bool:
    """Whether the ``pipeline`` package sits in the driver's working directory, which Ray puts
    on the path of every worker of the job (``JobConfig._py_driver_sys_path``) on a node that
    has the same folder: this one."""
    import pipeline

    return os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__))) == os.path.abspath(os.curdir)


def ship_code(code_under_cwd: bool, alive_nodes: list[str], driver_node: str | None,
              capacity: ClusterCapacity | None) -> tuple[bool, str]:
    """``(ship, why)``: whether the job's workers need this code sent to them (Ray's
    ``py_modules``), or already import it from the driver's working directory.

    Sent unless every worker the job can ever have runs on this machine: the cluster is this
    one node, and cannot grow (no autoscaler, or one at its maximum). A new node (an
    autoscaled GPU node) would not have the driver's folder. Not sending it where it is not
    needed saves each worker process the runtime env's setup: on an H200 node a GPU actor's
    constructor started 1.40 s after it was asked for with ``py_modules`` against 0.45 s
    without (median of 4, RESULTS.md, tenth session). ``capacity`` None: not known (sent)."""
    if not code_under_cwd:
        return True, "sent (py_modules): the driver does not run from the folder that holds the pipeline package"
    if len(alive_nodes) != 1 or driver_node not in alive_nodes:
        return True, f"sent (py_modules): {len(alive_nodes)} node(s), the driver's among them: {driver_node in alive_nodes}"
    can_grow = (capacity is None or capacity.gpus_max is None or capacity.cpus_max is None
                or capacity.gpus_max > capacity.gpus_now or capacity.cpus_max > capacity.cpus_now)
    if can_grow:
        return True, f"sent (py_modules): the cluster can grow ({capacity.source if capacity else 'capacity unknown'})"
    return False, ("not sent: one node, this one, that cannot grow; its workers import it from the driver's "
                   f"folder {os.path.abspath(os.curdir)}")


def in_actor() -> bool:
    """Whether this process runs a Ray actor (a kept actor can end itself only there).
    ``ray.get_runtime_context()`` would start a local Ray where none is connected, and its
    actor fields assert in a driver (a test process with a Ray session)."""
    import ray

    try:
        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001
        return False


def _in_submitted_job() -> bool:
    """A ``ray job submit`` entrypoint: its runtime env (``--working-dir .``, or the image's
    installed package) already carries the code. The job supervisor hands that runtime env
    to the driver in this variable (``ray/dashboard/modules/job/job_supervisor.py``)."""
    return bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def code_runtime_env() -> dict:
    """How a driver started with ``python -m jobs.NAME`` gives its workers this code: Ray's
    ``py_modules`` uploads the ``pipeline`` package once (cached by content hash), as Ray
    Jobs users expect of a runtime environment. A submitted job (``--working-dir .``) or an
    image with the package installed needs nothing; a ``py_modules`` copy is harmless there."""
    import pipeline

    return {"py_modules": [os.path.dirname(os.path.abspath(pipeline.__file__))],
            "excludes": ["__pycache__", "*.pyc"]}


def _use_ray_auth_token() -> None:
    """Send the Ray auth token when one exists, as ``ray start`` does.

    Clusters started where ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH``)
    exists require it, but a plain JobSubmissionClient only sends it when RAY_AUTH_MODE=token.
    An explicit RAY_AUTH_MODE is respected."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str | None):
    """A JobSubmissionClient for the dashboard at ``address`` (default: RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    _use_ray_auth_token()
    return JobSubmissionClient(address)

HEAD_MARKER = "node:__internal_head__"


class ClusterFitError(ValueError):
    """The job's actors can never be placed on this cluster (as asked): the job would wait forever."""


@dataclass
class ClusterCapacity:
    """Resources of the cluster now and at most (``None``: unknown, ``math.inf``: unlimited).

    ``node_types``: ``{"name", "resources", "min", "max"}`` per node type the cluster can
    have (``max`` ``None`` when unlimited); the head node's type included, with min = max = 1.
    Without an autoscaler, one entry per distinct node shape alive now.
    """

    gpus_now: float
    cpus_now: float
    gpus_max: float | None
    cpus_max: float | None
    node_types: list[dict] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("gpus_max", "cpus_max"):
            if d[k] is not None and math.isinf(d[k]):
                d[k] = "unlimited"
        return d


# --------------------------------------------------------------------------- pure logic


def choose_device(requested: str, capacity: ClusterCapacity, gpus_per_actor: float | None,
                  embedded: bool = False) -> tuple[str, str]:
    """``("cuda" | "cpu", one-line reason)`` for the model actors.

    ``requested``: ``"auto"``, ``"cuda"`` or ``"cpu"``. ``gpus_per_actor``: what each actor
    asks Ray for (``None``: not given, 1 is assumed; ``0``: run on CPU). An explicit
    ``gpus_per_actor > 0`` under ``"auto"`` means GPU actors whenever they can exist (also
    when the autoscaler's limits are unknown), and raises ``ValueError`` when the cluster
    is known to have no node that could hold one (a job would wait forever).

    >>> now = ClusterCapacity(gpus_now=0, cpus_now=4, gpus_max=0, cpus_max=4, source="no autoscaler: resources now")
    >>> choose_device("auto", now, None)
    ('cpu', 'no GPU in the cluster and no autoscaler can add one (no autoscaler: resources now)')
    >>> choose_device("cuda", now, None)[0]   # a cluster of its own: GPU nodes may still join
    'cuda'
    >>> choose_device("cuda", now, None, embedded=True)  # a Ray the job started here: it would wait forever
    Traceback (most recent call last):
    ...
    pipeline.cluster.ClusterFitError: --device cuda: this machine has no GPU that Ray can use, and the job runs on a Ray it started here; drop --device cuda (auto picks the CPU), or pass --ray-address of a cluster with GPU nodes
    >>> gpu_types = [{"name": "gpu", "resources": {"CPU": 8, "GPU": 1}, "min": 0, "max": 4}]
    >>> scale = ClusterCapacity(0, 0, 4, 32, gpu_types, "autoscaler v1 config")
    >>> choose_device("auto", scale, None)
    ('cuda', 'no GPU in the cluster now; the autoscaler can add up to 4 (gpu: 1 GPU x 4 nodes)')
    >>> choose_device("auto", scale, 0)
    ('cpu', '--gpus-per-actor 0 asks for CPU actors')
    >>> choose_device("auto", scale, 2)          # asked for 2 GPUs per actor; no node type holds 2
    Traceback (most recent call last):
    ...
    pipeline.cluster.ClusterFitError: --gpus-per-actor 2: no node the cluster has or can add holds 2 GPUs for one actor (autoscaler v1 config)
    >>> unknown = ClusterCapacity(0, 4, None, None, [], "autoscaler v1 status")
    >>> choose_device("auto", unknown, 1)[0]     # explicit GPUs per actor, limits unknown: trust the user
    'cuda'
    >>> choose_device("auto", ClusterCapacity(2, 16, 2, 16, [], "x"), None)
    ('cuda', '2 GPUs in the cluster now')
    >>> choose_device("auto", unknown, None)
    ('cpu', 'no GPU in the cluster now, and what its autoscaler can add is unknown (autoscaler v1 status): pass --gpus-per-actor 1 --max-actors N to use GPU nodes')
    """
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, not {requested!r}")
    if requested == "cuda":
        # Refused now where the actors could never start: a Ray this job started on this machine
        # (``embedded``), without a GPU, would wait for one forever. A cluster of its own may
        # still get GPU nodes (one joining, an autoscaler not seen): there Ray waits.
        if embedded and capacity.gpus_now == 0:
            raise ClusterFitError("--device cuda: this machine has no GPU that Ray can use, and the job runs on a "
                                  "Ray it started here; drop --device cuda (auto picks the CPU), or pass "
                                  "--ray-address of a cluster with GPU nodes")
        return "cuda", "--device cuda requested"
    if requested == "cpu":
        return "cpu", "--device cpu requested"
    if gpus_per_actor is not None and gpus_per_actor <= 0:
        return "cpu", "--gpus-per-actor 0 asks for CPU actors"
    per_actor = 1.0 if gpus_per_actor is None else float(gpus_per_actor)
    n = max_gpu_actors(capacity, per_actor)
    if n == 0 and (capacity.gpus_now > 0 or (capacity.gpus_max or 0) > 0):
        msg = f"no node the cluster has or can add holds {_num(per_actor)} GPUs for one actor ({capacity.source})"
        if gpus_per_actor is not None:
            raise ClusterFitError(f"--gpus-per-actor {_num(per_actor)}: {msg}")
        return "cpu", msg
    if capacity.gpus_now > 0:
        return "cuda", f"{_num(capacity.gpus_now)} GPU{'s' if capacity.gpus_now != 1 else ''} in the cluster now"
    if capacity.gpus_max is None:
        if gpus_per_actor is not None:
            return "cuda", (f"--gpus-per-actor {_num(per_actor)} asks for GPU actors; no GPU in the cluster now "
                            f"and what its autoscaler can add is unknown ({capacity.source})")
        return "cpu", (f"no GPU in the cluster now, and what its autoscaler can add is unknown ({capacity.source}): "
                       "pass --gpus-per-actor 1 --max-actors N to use GPU nodes")
    if capacity.gpus_max > 0:
        kinds = [t for t in capacity.node_types if t["resources"].get("GPU", 0) > 0]
        detail = ", ".join(f"{t['name']}: {_num(t['resources']['GPU'])} GPU x "
                           f"{'unlimited' if t['max'] is None else t['max']} nodes" for t in kinds)
        most = "unlimited GPUs" if math.isinf(capacity.gpus_max) else f"up to {_num(capacity.gpus_max)}"
        return "cuda", f"no GPU in the cluster now; the autoscaler can add {most}" + (f" ({detail})" if detail else "")
    if gpus_per_actor is not None:
        raise ClusterFitError(f"--gpus-per-actor {_num(per_actor)}: the cluster has no GPU and cannot add one "
                              f"({capacity.source})")
    return "cpu", f"no GPU in the cluster and no autoscaler can add one ({capacity.source})"


def max_gpu_actors(capacity: ClusterCapacity, gpus_per_actor: float | None) -> int | None:
    """How many actors of ``gpus_per_actor`` GPUs (default 1) the cluster can hold at its
    largest: per node type, ``max nodes x actors per node``. ``None``: unknown or unlimited.

    >>> types = [{"name": "head", "resources": {"CPU": 0}, "min": 1, "max": 1},
    ...          {"name": "g1", "resources": {"CPU": 8, "GPU": 1}, "min": 0, "max": 8},
    ...          {"name": "g4", "resources": {"CPU": 32, "GPU": 4}, "min": 0, "max": 2}]
    >>> cap = ClusterCapacity(0, 0, 16, 128, types, "autoscaler v1 config")
    >>> max_gpu_actors(cap, 1), max_gpu_actors(cap, 0.5), max_gpu_actors(cap, 2), max_gpu_actors(cap, 8)
    (16, 32, 4, 0)
    >>> max_gpu_actors(ClusterCapacity(0, 4, None, None, [], "autoscaler v1 status"), 1) is None
    True
    >>> types[1]["max"] = None                       # unlimited node count
    >>> max_gpu_actors(ClusterCapacity(0, 0, math.inf, math.inf, types, "gcs"), 1) is None
    True
    >>> max_gpu_actors(ClusterCapacity(3, 8, 3, 8, [], "no autoscaler: resources now"), 1)  # no shapes known
    3
    """
    per_actor = 1.0 if not gpus_per_actor or gpus_per_actor <= 0 else float(gpus_per_actor)
    if capacity.gpus_max is None:
        return None
    if not capacity.node_types:
        return None if math.isinf(capacity.gpus_max) else int(capacity.gpus_max / per_actor + 1e-9)
    total = 0
    for t in capacity.node_types:
        per_node = int(t["resources"].get("GPU", 0) / per_actor + 1e-9)
        if per_node == 0:
            continue
        if t["max"] is None:
            return None
        total += per_node * int(t["max"])
    return total


def actor_device(device: str) -> tuple[str, str | None]:
    """The device an actor can really use, and a warning when it differs: ``"cuda"`` needs
    ``torch.cuda.is_available()``. Ray grants a GPU *resource*, which a test cluster (fake
    nodes) or a misconfigured node may grant with no usable CUDA device behind it (CPU
    torch build, no driver): then the actor runs on CPU and says why. Call it inside the
    actor (``__init__``), not on the driver.

    >>> actor_device("cpu")
    ('cpu', None)
    """
    if not device.startswith("cuda"):
        return device, None
    import os

    import torch

    if torch.cuda.is_available():
        return device, None
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - only used in the message
        ids = []
    granted = f"Ray granted GPU {ids}" if ids else "no GPU granted by Ray"
    return "cpu", (f"{granted} but CUDA is unavailable here (torch {torch.__version__}, cuda build "
                   f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                   "running on CPU")


# Files whose import a model actor pays at every start, per package (torch and transformers:
# thousands of source files; a package's __init__ can be compiled while most of it is not, as
# on the H200 host of 2026-12-04). Checked by :func:`bytecode_warning`.
HEAVY_FILES = {"torch": ("__init__.py", "_dynamo/__init__.py", "nn/modules/module.py"),
               "transformers": ("__init__.py", "modeling_utils.py", "utils/import_utils.py")}


def modules_without_bytecode(files: dict = HEAVY_FILES, dont_write: bool | None = None) -> list[str]:
    """The packages of ``files`` that every new process compiles from source: one of their
    listed files has no cached bytecode and none can be written (``PYTHONDONTWRITEBYTECODE``,
    or a read-only folder). Cheap: a few ``stat`` calls, nothing imported. Packages that are
    not installed are skipped."""
    import importlib.util
    import sys

    dont_write = sys.flags.dont_write_bytecode if dont_write is None else dont_write
    missing = []
    for name, rel_paths in files.items():
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec else None
        if not origin or not origin.endswith("__init__.py"):
            continue
        root = os.path.dirname(origin)
        for rel in rel_paths:
            source = os.path.join(root, rel)
            if not os.path.exists(source) or os.path.exists(importlib.util.cache_from_source(source)):
                continue
            if dont_write or not os.access(os.path.dirname(source), os.W_OK):
                missing.append(name)
                break
    return missing


def bytecode_warning(files: dict = HEAVY_FILES, dont_write: bool | None = None) -> str | None:
    """What to change when :func:`modules_without_bytecode` finds any, else None."""
    missing = modules_without_bytecode(files, dont_write)
    if not missing:
        return None
    import importlib.util
    import sys

    where = os.path.dirname(os.path.dirname(importlib.util.find_spec(missing[0]).origin))
    return (f"{' and '.join(missing)} {'have' if len(missing) > 1 else 'has'} no compiled bytecode in this Python "
            f"({sys.executable}) and none can be written here (PYTHONDONTWRITEBYTECODE is set, or the folder is "
            "read-only), so every new model actor compiles the sources before it starts: on an H200 host "
            "(2026-12-04) importing torch took 7.4 s and transformers' ColQwen2 7.7-14.5 s, against 1.8 s and 5.1 s "
            "with bytecode, and a 3,000-page job 80 s against 68-71 s. Compile it once in the image: "
            f"python -m compileall -q -j 0 {where} (pip does this unless installed with --no-compile), or unset "
            "PYTHONDONTWRITEBYTECODE")


def available_host_bytes() -> int:
    """Host memory available to new allocations on this node (psutil, else sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# Kept free of a GPU's memory when it is read through NVML, before this process has a CUDA
# context (a context takes ~0.5 GiB on an H200; torch's own figure comes after it).
NVML_CONTEXT_RESERVE_BYTES = 1 << 30


def _mig_enabled(pynvml, handle) -> bool:
    try:
        return bool(pynvml.nvmlDeviceGetMigMode(handle)[0])
    except Exception:  # noqa: BLE001 - a GPU without MIG (NotSupported), an old binding
        return False


def visible_gpu_free_bytes(environ=os.environ) -> int | None:
    """Free memory of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``, as Ray sets it
    for a GPU actor), the smallest of them, through NVML: no torch and no CUDA context needed,
    so an actor can answer while torch is still importing. ``NVML_CONTEXT_RESERVE_BYTES`` is
    taken off for the context this process will create. None where NVML is unavailable (no
    NVIDIA driver, no NVML binding), for MIG devices, or when nothing is visible: callers
    then ask torch (:func:`torch.cuda.mem_get_info`).

    Which NVML device an index names: NVML counts in PCI bus order, CUDA by default fastest
    first (``CUDA_DEVICE_ORDER``); the two agree where every GPU of the node is the same model,
    so on a node with mixed GPUs, indices answer None unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    (an index there may name another GPU, with more free memory than this process's). A GPU
    in MIG mode answers None too: the process gets one slice of it, not its free memory."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return None
    try:
        try:
            import pynvml  # nvidia-ml-py, where installed
        except ImportError:
            import ray._private.thirdparty.pynvml as pynvml  # the copy Ray uses to count GPUs
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver / library: the caller asks torch
        return None
    try:
        every = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if visible is None:
            handles = every
        else:
            handles, by_index = [], False
            for d in (x.strip() for x in visible.split(",")):
                if d.startswith("MIG-"):
                    return None
                if d.startswith("GPU-"):
                    handles.append(pynvml.nvmlDeviceGetHandleByUUID(d))
                else:
                    handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(d)))
                    by_index = True
            if by_index and environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" and len(
                    {(str(pynvml.nvmlDeviceGetName(h)), int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
                     for h in every}) > 1:
                return None  # mixed GPUs: CUDA's index i need not be NVML's
        if not handles or any(_mig_enabled(pynvml, h) for h in handles):
            return None
        free = min(int(pynvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles)
        return max(0, free - NVML_CONTEXT_RESERVE_BYTES)
    except Exception:  # noqa: BLE001 - an index NVML does not know, an old driver: ask torch
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def capacity_from_node_types(node_types: list[dict], gpus_now: float, cpus_now: float, source: str,
                             max_workers: int | None = None) -> ClusterCapacity:
    """Totals over ``node_types`` (``max`` None = unlimited); ``max_workers`` caps the
    worker nodes of all types together (the autoscaling config's global ``max_workers``),
    so each resource's maximum fills the cap with the richest node types first.

    >>> t = [{"name": "head", "resources": {"CPU": 0}, "min": 1, "max": 1, "head": True},
    ...      {"name": "cpu", "resources": {"CPU": 2}, "min": 0, "max": 2},
    ...      {"name": "gpu", "resources": {"CPU": 1, "GPU": 1}, "min": 0, "max": 1}]
    >>> c = capacity_from_node_types(t, 0, 0, "test")
    >>> c.gpus_max, c.cpus_max
    (1.0, 5.0)
    >>> capacity_from_node_types(t, 0, 0, "test", max_workers=1).cpus_max
    2.0
    >>> t[2]["resources"] = {}                     # resources not listed: unknown, not zero
    >>> c = capacity_from_node_types(t, 0, 0, "test")
    >>> c.gpus_max, c.cpus_max, c.source
    (None, 4.0, 'test; node type gpu lists no resources')
    """
    unknown = [t["name"] for t in node_types if not t.get("head") and not t["resources"] and t["max"] != 0]
    out: dict[str, float | None] = {}
    for key in ("GPU", "CPU"):
        head = sum(t["resources"].get(key, 0) for t in node_types if t.get("head"))
        workers = sorted((t for t in node_types if not t.get("head")), key=lambda t: -t["resources"].get(key, 0))
        left = math.inf if max_workers is None else max_workers
        total = float(head)
        for t in workers:
            per = t["resources"].get(key, 0)
            if per <= 0 or left <= 0:
                continue
            n = min(math.inf if t["max"] is None else t["max"], left)
            total += per * n
            left -= n
        total = max(total, gpus_now if key == "GPU" else cpus_now)
        out[key] = None if unknown and total == 0 else total
    if unknown:
        source += f"; node type{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} list{'s' if len(unknown) == 1 else ''} no resources"
    types = [{k: t[k] for k in ("name", "resources", "min", "max")} for t in node_types]
    return ClusterCapacity(gpus_now=gpus_now, cpus_now=cpus_now, gpus_max=out["GPU"], cpus_max=out["CPU"],
                           node_types=types, source=source)


def node_types_from_autoscaling_config(config: dict) -> tuple[list[dict], int | None]:
    """Node types of a Ray cluster config (``available_node_types``), with the defaults of
    ``ray.autoscaler._private.util.fill_node_type_min_max_workers`` (a worker type's
    ``max_workers`` defaults to the global ``max_workers``, ``min_workers`` to 0); the head
    type counts once. Returns ``(node_types, global max_workers)``.

    >>> cfg = {"max_workers": 3, "head_node_type": "h", "available_node_types": {
    ...     "h": {"resources": {"CPU": 0}},
    ...     "gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 1},
    ...     "cpu": {"resources": {"CPU": 2}}}}
    >>> types, cap = node_types_from_autoscaling_config(cfg)
    >>> [(t["name"], t["min"], t["max"]) for t in types], cap
    ([('h', 1, 1), ('gpu', 0, 1), ('cpu', 0, 3)], 3)
    """
    avail = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    global_max = config.get("max_workers")
    global_max = int(global_max) if global_max is not None else None
    types = []
    for name, spec in avail.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if name == head_type:
            types.append({"name": name, "resources": resources, "min": 1, "max": 1, "head": True})
            continue
        mx = spec.get("max_workers", global_max)
        types.append({"name": name, "resources": resources, "min": int(spec.get("min_workers", 0) or 0),
                      "max": None if mx is None else int(mx)})
    return types, global_max


# --------------------------------------------------------------------------- reading the cluster


def read_capacity(timeout_s: float = 15.0) -> ClusterCapacity:
    """The connected cluster's capacity (``ray.init`` first). Never raises for a cluster
    that cannot say more: falls back to the resources present now, and says so in
    ``source``. Each step has a deadline; the whole call takes at most about ``timeout_s``."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("read_capacity() needs a connected Ray cluster: call ray.init() first")
    deadline = time.monotonic() + timeout_s

    def left(cap: float) -> float:
        return max(0.5, min(cap, deadline - time.monotonic()))

    nodes = _call(lambda: [n for n in ray.nodes() if n.get("Alive")], left(5.0))
    if nodes is _TIMEOUT or isinstance(nodes, Exception):
        res = _call(ray.cluster_resources, left(5.0))
        res = res if isinstance(res, dict) else {}
        g, c = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        return ClusterCapacity(g, c, g, c, [], f"no autoscaler info: node list unavailable, {_why(nodes)}; resources now")
    gpus_now = float(sum(n["Resources"].get("GPU", 0) for n in nodes))
    cpus_now = float(sum(n["Resources"].get("CPU", 0) for n in nodes))
    head = next((n for n in nodes if HEAD_MARKER in n["Resources"]), None)

    # 1. GCS ClusterConfig, as Ray Data reads it.
    cfg = _call(_gcs_cluster_config, left(5.0))
    if isinstance(cfg, list) and cfg:
        types = _with_head(cfg, head)
        return capacity_from_node_types(types, gpus_now, cpus_now, "autoscaler cluster config (GCS ClusterConfig)")

    # 2. The config file the autoscaler (monitor) process runs with, read on the head node.
    found = _call(lambda: _find_monitor_config(head, deadline), left(timeout_s))
    if isinstance(found, dict) and found.get("monitor"):
        version = found["monitor"]
        if found.get("config_text") is not None:
            try:
                config = _parse_config(found["config_text"])
                types, global_max = node_types_from_autoscaling_config(config)
                if head is not None:  # the head as it runs (its config may list no resources)
                    for t in types:
                        if t.get("head"):
                            t["resources"] = {**t["resources"], "CPU": float(head["Resources"].get("CPU", 0)),
                                              "GPU": float(head["Resources"].get("GPU", 0))}
                if types:
                    return capacity_from_node_types(
                        types, gpus_now, cpus_now,
                        f"autoscaler {version} config ({found['config_path']})", max_workers=global_max)
            except Exception as e:  # noqa: BLE001 - unreadable config: fall through to the status
                logger.warning("could not read the autoscaling config %s: %r", found.get("config_path"), e)
        elif found.get("config_path") is None:
            return _now(nodes, gpus_now, cpus_now,
                        f"no autoscaler: the {version} monitor runs without --autoscaling-config; resources now")

    # 2b. KubeRay: the autoscaler is a sidecar of the head pod, reading the RayCluster resource.
    #     A driver on the head pod reads the same resource with the same service account.
    kuberay = _call(kuberay_node_types, left(10.0)) if os.environ.get("RAY_CLUSTER_NAME") else None
    if isinstance(kuberay, tuple) and kuberay[0]:
        types, global_max, where = kuberay
        return capacity_from_node_types(types, gpus_now, cpus_now, f"KubeRay RayCluster {where}",
                                        max_workers=global_max)

    # 3. The autoscaler's status: an autoscaler with named node types, limits unknown.
    status = _call(_autoscaler_status_types, left(5.0))
    if isinstance(status, tuple):
        version, names = status
        managed = sorted(n for n in names if not n.startswith("node_"))
        if managed:
            return ClusterCapacity(gpus_now, cpus_now, None, None,
                                   [{"name": n, "resources": {}, "min": None, "max": None} for n in managed],
                                   f"autoscaler {version} status (node types {', '.join(managed)}; "
                                   "their maximum counts are not published)")
    problem = found is _TIMEOUT or isinstance(found, Exception) or (isinstance(found, dict) and found.get("error"))
    why = f"; autoscaling config lookup: {_why(found)}" if problem else ""
    return _now(nodes, gpus_now, cpus_now, f"no autoscaler: resources now{why}")


def kuberay_node_types(ray_cr: dict | None = None) -> tuple[list[dict], int | None, str]:
    """Node types of a KubeRay ``RayCluster``, converted by Ray's own KubeRay autoscaler code
    (``ray.autoscaler._private.kuberay.autoscaling_config``), exactly as the autoscaler sees
    them: worker groups with their ``minReplicas``/``maxReplicas`` and the CPUs and GPUs
    (``nvidia.com/gpu`` limits, ``num-gpus``) of their pods. Without ``ray_cr`` the resource is
    fetched from the Kubernetes API (the cluster named by ``RAY_CLUSTER_NAME``, which KubeRay
    sets in every Ray container; the pod's namespace)."""
    from ray.autoscaler._private.kuberay import autoscaling_config as kuberay

    if ray_cr is None:
        name = os.environ["RAY_CLUSTER_NAME"]
        ns_file = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        namespace = open(ns_file).read().strip() if os.path.exists(ns_file) else os.environ.get("POD_NAMESPACE", "default")
        config = kuberay.AutoscalingConfigProducer(name, namespace)()
        where = f"{namespace}/{name}"
    else:
        config = kuberay._derive_autoscaling_config_from_ray_cr(ray_cr)
        where = ray_cr.get("metadata", {}).get("name", "?")
    types, global_max = node_types_from_autoscaling_config(config)
    return types, global_max, where


def _now(nodes: list[dict], gpus_now: float, cpus_now: float, source: str) -> ClusterCapacity:
    shapes: dict[str, dict] = {}
    for n in nodes:
        res = {k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU", "memory") or not (
            k.startswith(("node:", "accelerator_type")) or k == "object_store_memory")}
        key = json.dumps(res, sort_keys=True)
        s = shapes.setdefault(key, {"name": f"node_shape_{len(shapes)}", "resources": res, "min": 0, "max": 0})
        s["min"] += 1
        s["max"] += 1
    return ClusterCapacity(gpus_now, cpus_now, gpus_now, cpus_now, list(shapes.values()), source)


def _with_head(types: list[dict], head: dict | None) -> list[dict]:
    """Add the head node to GCS node groups unless a group already describes it (Ray Data's rule:
    a group with max 1 and the head's shape)."""
    if head is None:
        return types
    head_res = {k: float(v) for k, v in head["Resources"].items() if k in ("CPU", "GPU")}
    for t in types:
        if t["max"] == 1 and {k: v for k, v in t["resources"].items() if k in ("CPU", "GPU")} == head_res:
            t["head"] = True
            return types
    return [{"name": "head", "resources": head_res, "min": 1, "max": 1, "head": True}] + types


def _gcs_cluster_config() -> list[dict]:
    import ray._private.state

    cfg = ray._private.state.state.get_cluster_config()
    if not cfg or not cfg.node_group_configs:
        return []
    out = []
    for g in cfg.node_group_configs:
        if not g.resources or g.max_count == 0:
            continue
        out.append({"name": g.name or f"group_{len(out)}", "resources": {k: float(v) for k, v in g.resources.items()},
                    "min": int(g.min_count), "max": None if g.max_count == -1 else int(g.max_count)})
    return out


def _parse_config(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        import yaml

        return yaml.safe_load(text)


def _autoscaler_status_types() -> tuple[str, set[str]] | None:
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        st = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
        names = {n.ray_node_type_name for n in (st.active_nodes + st.idle_nodes + st.pending_nodes + st.failed_nodes)}
        names |= {p.ray_node_type_name for p in st.pending_launches + st.failed_launches}
        return "v2", {n for n in names if n}
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    names = set((report.get("active_nodes") or {}) | (report.get("idle_nodes") or {}) | (report.get("pending_launches") or {}))
    names |= set((report.get("node_type_mapping") or {}).values())
    names |= {p[1] for p in report.get("pending_nodes") or []} | {f[1] for f in report.get("failed_nodes") or []}
    return "v1", names


def _find_monitor_config(head: dict | None, deadline: float) -> dict | None:
    """Find the cluster's autoscaler process on this node, else on the head node (a tiny task)."""
    import ray

    gcs_address = ray.get_runtime_context().gcs_address
    port = gcs_address.rsplit(":", 1)[-1]
    try:
        session = ray._private.worker.global_worker.node.session_name
    except Exception:  # noqa: BLE001 - Ray Client, or a private attribute that moved
        session = None
    scan = _monitor_scanner()
    found = scan(port, session)
    if found.get("monitor") or head is None:
        return found
    if head.get("NodeID") == ray.get_runtime_context().get_node_id():
        return found  # this is the head and no monitor runs here
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(scan).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False), name="read_autoscaling_config")
    ref = task.remote(port, session)
    wait_s = max(0.5, deadline - time.monotonic() - 0.5)
    ready, _ = ray.wait([ref], timeout=wait_s)
    if not ready:
        ray.cancel(ref)
        return {"error": f"head-node probe did not answer in {wait_s:.0f} s"}
    return ray.get(ref)


def _monitor_scanner() -> Callable[[str, str | None], dict]:
    """A self-contained function (pickled by value, so the head node needs none of this
    project's code) that finds the autoscaler monitor process of the cluster with GCS
    port ``port`` (and session ``session``) in /proc and reads its --autoscaling-config."""

    def scan(port: str, session: str | None) -> dict:
        import os

        out: dict[str, Any] = {"monitor": None, "config_path": None, "config_text": None}
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
        except OSError as e:
            out["error"] = f"no /proc: {e!r}"
            return out
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            script = next((a for a in args if a.endswith("/monitor.py")), None)
            if script is None or not ("autoscaler/_private/" in script or "autoscaler/v2/" in script):
                continue
            opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
            if opts.get("--gcs-address", "").rsplit(":", 1)[-1] != port:
                continue
            if session and session not in opts.get("--logs-dir", session):
                continue
            out["monitor"] = "v2" if "autoscaler/v2/" in script else "v1"
            path = opts.get("--autoscaling-config")
            if path:
                path = os.path.expanduser(path)
                out["config_path"] = path
                try:
                    with open(path, encoding="utf-8") as f:
                        out["config_text"] = f.read()
                except OSError as e:
                    out["error"] = f"cannot read {path}: {e!r}"
            return out
        return out

    return scan


class _Timeout:
    def __repr__(self) -> str:
        return "timed out"


_TIMEOUT = _Timeout()


def _call(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread; its result, the exception it raised, or ``_TIMEOUT``."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn())
        except Exception as e:  # noqa: BLE001 - reported to the caller as a value
            box.append(e)

    t = threading.Thread(target=run, daemon=True, name="read_capacity")
    t.start()
    t.join(timeout_s)
    if not box:
        return _TIMEOUT
    if isinstance(box[0], Exception):
        logger.debug("read_capacity step failed: %r", box[0])
    return box[0]


def _why(x: Any) -> str:
    if x is _TIMEOUT:
        return "timed out"
    if isinstance(x, Exception):
        return f"{type(x).__name__}: {x}"
    if isinstance(x, dict) and x.get("error"):
        return x["error"]
    return "not found"


if __name__ == "__main__":  # python -m pipeline.cluster [ADDRESS]: print the connected cluster's capacity
    import sys

    import ray

    ray.init(address=sys.argv[1] if len(sys.argv) > 1 else "auto", log_to_driver=False)
    cap = read_capacity()
    print(json.dumps(cap.to_dict(), indent=1))
    print("auto device:", choose_device("auto", cap, None), "max GPU actors:", max_gpu_actors(cap, 1))
