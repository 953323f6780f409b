"""deploy/kuberay/*.yaml are KubeRay resources that an API server and the operator accept, and
that run the pipeline the way the README says: autoscaling from zero, GPUs planned by the
autoscaler, no resource flags on the jobs.

Each document is validated against the openAPIV3Schema of its CRD version, as published by
KubeRay (../shared/schemas/kuberay, skipped when absent), with the API server's rules for the
Kubernetes extensions and kubectl's default strict field validation (unknown fields are errors).
Offline: no cluster, no Ray started."""

from __future__ import annotations

import copy
import functools
import glob
import os
import re

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy", "kuberay")
SCHEMAS = os.path.join(os.path.dirname(ROOT), "shared", "schemas", "kuberay")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
# The operator's own limits (ray-operator/controllers/ray/utils/constant.go): names become
# Service and Pod names with suffixes.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
RESOURCE_FLAGS = ("--gpus-per-actor", "--max-actors", "--min-actors", "--num-actors",
                  "--cpus-per-actor", "--device")
# The CRDs are 3 MB of YAML: libyaml reads them in about 1 s, PyYAML's Python loader in 7.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def manifests() -> list[tuple[str, int, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "*.yaml"))):
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=LOADER) if d is not None]
        out.extend((os.path.basename(path), i, d) for i, d in enumerate(docs))
    return out


MANIFESTS = manifests()


def of_kind(kind: str) -> list[dict]:
    return [d for _, _, d in MANIFESTS if d.get("kind") == kind]


def kubernetes_schema(node):
    """A CRD's structural OpenAPI v3 schema as a JSON Schema that checks what the API server
    checks: ``x-kubernetes-int-or-string`` is an integer or a string, ``nullable`` admits null,
    and an object with ``properties`` rejects other fields (kubectl's default
    ``--validate=strict``) unless ``x-kubernetes-preserve-unknown-fields`` or
    ``additionalProperties`` says otherwise. Not evaluated: CEL rules
    (``x-kubernetes-validations``) and formats such as int32.

    >>> kubernetes_schema({"type": "object", "properties": {"n": {"x-kubernetes-int-or-string": True}}})
    {'type': 'object', 'properties': {'n': {'x-kubernetes-int-or-string': True, 'anyOf': [{'type': 'integer'}, {'type': 'string'}]}}, 'additionalProperties': False}
    """
    if isinstance(node, list):
        return [kubernetes_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: kubernetes_schema(v) for k, v in node.items() if k != "description"}
    if out.get("x-kubernetes-int-or-string") and not ({"anyOf", "oneOf", "type"} & set(out)):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def validator(kind: str, api_version: str):
    """The jsonschema validator of ``kind`` at ``api_version`` (``ray.io/v1``) from its CRD."""
    import jsonschema

    if not os.path.isdir(SCHEMAS):
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    assert kind in CRD_FILES, f"no CRD for kind {kind!r} (known: {sorted(CRD_FILES)})"
    with open(os.path.join(SCHEMAS, CRD_FILES[kind])) as f:
        crd = yaml.load(f, Loader=LOADER)
    group, _, version = api_version.partition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind} has versions {sorted(versions)}, not {version!r}"
    assert versions[version]["served"], f"{api_version} {kind} is not served"
    # OpenAPI 3.0's schema object is JSON Schema draft 4 (boolean exclusiveMinimum and all).
    return jsonschema.Draft4Validator(kubernetes_schema(versions[version]["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    v = validator(doc["kind"], doc["apiVersion"])
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc))


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec here: the clusters, and those a RayJob would create."""
    specs = [(d["metadata"]["name"], d["spec"]) for d in of_kind("RayCluster")]
    for name, job in job_specs():
        if "rayClusterSpec" in job:
            specs.append((f"{name} (own cluster)", job["rayClusterSpec"]))
    return specs


def job_specs() -> list[tuple[str, dict]]:
    return ([(d["metadata"]["name"], d["spec"]) for d in of_kind("RayJob")]
            + [(d["metadata"]["name"], d["spec"]["jobTemplate"]) for d in of_kind("RayCronJob")])


def ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    return [g["template"]["spec"]["containers"][0] for g in groups]  # KubeRay: Ray runs in the first


def worker_group(spec: dict, gpu: bool) -> list[dict]:
    return [g for g in spec.get("workerGroupSpecs", [])
            if ("nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})) == gpu]


# --- the resources are what the API server and the operator accept -------------------------

def test_every_manifest_is_a_kuberay_resource():
    kinds = [d.get("kind") for _, _, d in MANIFESTS]
    assert sorted(set(kinds)) == ["RayCluster", "RayCronJob", "RayJob"], kinds
    assert all(d.get("apiVersion") == "ray.io/v1" for _, _, d in MANIFESTS)


@pytest.mark.parametrize("doc", [d for _, _, d in MANIFESTS], ids=[f"{f}[{i}]" for f, i, _ in MANIFESTS])
def test_manifest_validates_against_its_crd(doc):
    assert schema_errors(doc) == []
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{name}: not a DNS-1035 label"
    assert len(name) <= MAX_NAME_LENGTH[doc["kind"]], f"{name}: the operator allows {MAX_NAME_LENGTH[doc['kind']]} characters"


def _mutated(kind: str, mutate) -> dict:
    doc = copy.deepcopy(of_kind(kind)[0])
    mutate(doc)
    return doc


def test_validation_rejects_broken_manifests():
    """The schema check can fail: wrong types, missing required fields and unknown fields."""
    gpu = lambda d: worker_group(d["spec"], gpu=True)[0]
    cases = {
        "string minReplicas": (lambda d: gpu(d).update(minReplicas="zero"), "minReplicas"),
        "missing groupName": (lambda d: gpu(d).pop("groupName"), "groupName"),
        "unknown field": (lambda d: gpu(d).update(minReplica=0), "minReplica"),
        "quantity": (lambda d: gpu(d)["template"]["spec"]["containers"][0]["resources"]["limits"]
                     .update({"nvidia.com/gpu": "one"}), "nvidia.com/gpu"),
        "enum": (lambda d: d["spec"]["autoscalerOptions"].update(version="v3"), "version"),
        "nested pod field": (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                             .update(imagePullPolicy=1), "imagePullPolicy"),
    }
    for case, (mutate, field) in cases.items():
        errors = schema_errors(_mutated("RayCluster", mutate))
        assert errors, f"{case}: accepted"
        assert any(field in e for e in errors), (case, errors)
    # an integer-or-string quantity accepts both spellings
    assert schema_errors(_mutated("RayCluster", lambda d: gpu(d)["template"]["spec"]["containers"][0]
                                  ["resources"]["limits"].update({"nvidia.com/gpu": "1"}))) == []
    assert schema_errors(_mutated("RayJob", lambda d: d["spec"].update(entrypoint=["python"])))
    assert schema_errors(_mutated("RayCronJob", lambda d: d["spec"].pop("schedule")))


def test_operator_rules():
    """What the operator's validation (ray-operator/controllers/ray/utils/validation.go) refuses
    beyond the schema."""
    for name, spec in cluster_specs():
        for g in [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", []):
            params = g.get("rayStartParams", {})
            assert not (g.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params)), \
                f"{name}: resources in both rayStartParams and resources"
            assert "labels" not in params
        head_env = {e["name"] for e in ray_containers(spec)[0].get("env", [])}
        assert not ("RAY_enable_autoscaler_v2" in head_env and "version" in spec.get("autoscalerOptions", {})), name
    clusters = {d["metadata"]["name"] for d in of_kind("RayCluster")}
    for name, job in job_specs():
        selector = job.get("clusterSelector", {})
        assert bool(selector) != bool(job.get("rayClusterSpec")), f"{name}: one of clusterSelector, rayClusterSpec"
        if selector:
            assert selector.get("ray.io/cluster") in clusters, f"{name}: selects a cluster not defined here"
            assert not job.get("backoffLimit") and not job.get("shutdownAfterJobFinishes"), name
        else:
            assert job.get("shutdownAfterJobFinishes") or job.get("deletionStrategy"), f"{name}: its cluster would stay"
        if job.get("ttlSecondsAfterFinished"):
            assert job.get("shutdownAfterJobFinishes"), name
        rules = job.get("deletionStrategy", {}).get("deletionRules", [])
        assert not (rules and job.get("shutdownAfterJobFinishes")), name
        for rule in rules:
            cond = rule["condition"]
            assert ("jobStatus" in cond) != ("jobDeploymentStatus" in cond), name
            if selector:
                assert rule["policy"] not in ("DeleteCluster", "DeleteWorkers"), name
        yaml.safe_load(job.get("runtimeEnvYAML", "") or "{}")


# --- the cluster autoscales from zero and the autoscaler knows the GPUs ----------------------

def test_raycluster_autoscales_both_groups_from_zero():
    (cluster,) = of_kind("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 1800
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    cpu, gpu = worker_group(spec, gpu=False), worker_group(spec, gpu=True)
    assert len(cpu) == 1 and len(gpu) == 1, "one CPU and one GPU worker group"
    for g in cpu + gpu:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and g["maxReplicas"] >= 1
    (gpu,) = gpu
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert int(gpu["rayStartParams"]["num-gpus"]) == int(limits["nvidia.com/gpu"])
    assert rayversion_of_images() == {spec["rayVersion"]}


def test_ray_autoscaler_plans_gpu_pods_from_zero():
    """Ray's own KubeRay config reader and bin-packing: with no worker pod yet, GPU actors get
    GPU pods and CPU tasks get CPU pods, never the head."""
    from functools import partial

    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    cr = copy.deepcopy(of_kind("RayCluster")[0])
    cr["metadata"].setdefault("namespace", "default")
    config = _derive_autoscaling_config_from_ray_cr(cr)
    types, head = config["available_node_types"], config["head_node_type"]
    assert types[head]["resources"]["CPU"] == 0
    assert config["idle_timeout_minutes"] == cr["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] / 60
    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    plan = lambda demands: dict(get_nodes_for(types, {head: 1}, head, config["max_workers"], demands, scorer)[0])
    gpu_group = worker_group(cr["spec"], gpu=True)[0]["groupName"]
    cpu_group = worker_group(cr["spec"], gpu=False)[0]["groupName"]
    assert plan([{"GPU": 1, "CPU": 1}] * 2) == {gpu_group: 2}
    assert set(plan([{"CPU": 1}] * 40)) == {cpu_group}



def test_jobs_choose_gpus_on_this_raycluster_without_flags():
    """What a job on the head pod reads (pipeline.cluster.kuberay_node_types, through Ray's own
    KubeRay converter) makes the plain commands choose GPU actors, as many as the GPU group's
    maxReplicas, before any GPU pod exists."""
    from pipeline.cluster import capacity_from_node_types, choose_device, kuberay_node_types, max_gpu_actors

    cr = copy.deepcopy(of_kind("RayCluster")[0])
    cr["metadata"].setdefault("namespace", "default")
    types, global_max, _ = kuberay_node_types(cr)
    cap = capacity_from_node_types(types, gpus_now=0, cpus_now=0, source="KubeRay RayCluster", max_workers=global_max)
    gpu_group = worker_group(cr["spec"], gpu=True)[0]
    assert choose_device("auto", cap, None)[0] == "cuda"
    assert max_gpu_actors(cap, 1) == gpu_group["maxReplicas"]
    no_gpu = copy.deepcopy(cr)
    no_gpu["spec"]["workerGroupSpecs"] = [g for g in no_gpu["spec"]["workerGroupSpecs"] if g is not None
                                          and g["groupName"] != gpu_group["groupName"]]
    types, global_max, _ = kuberay_node_types(no_gpu)
    cap = capacity_from_node_types(types, 0, 0, "KubeRay RayCluster", max_workers=global_max)
    assert choose_device("auto", cap, None)[0] == "cpu"

# --- every Ray pod runs the project image with the S3 credentials ----------------------------

def rayversion_of_images() -> set[str]:
    """Ray versions named by the images here (the project image is built FROM Ray's)."""
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", f.read(), re.M)
    versions = set()
    for _, spec in cluster_specs():
        for c in ray_containers(spec):
            m = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", c["image"])
            versions.add(m.group(1) if m else base.group(1))
    return versions


def test_ray_pods_get_the_s3_secret_and_one_image():
    for name, spec in cluster_specs():
        containers = ray_containers(spec)
        assert len({c["image"] for c in containers}) == 1, f"{name}: one image for head and workers"
        for c in containers:
            secrets = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})}
            assert secrets, f"{name}/{c['name']}: no Secret for the S3 credentials"
            assert not any(e.get("name", "").startswith("AWS_SECRET") and "value" in e for e in c.get("env", []))


def test_dockerfile_keeps_the_cuda_torch():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        dockerfile = f.read()
    torch_pin = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    ray_pin = next(d for d in project["dependencies"] if re.match(r"ray\b", d))
    assert f'pip install --no-cache-dir "{torch_pin}"' in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    assert ray_pin.endswith("==" + rayversion_of_images().pop())
    images = {c["image"] for _, spec in cluster_specs() for c in ray_containers(spec)}
    assert all(i.endswith(":" + project["version"]) for i in images if not i.startswith("rayproject/")), images


def _dockerfile_run(marker: str) -> str:
    """The shell command of the Dockerfile's RUN instruction that contains ``marker``, with its
    line continuations joined as Docker joins them."""
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        text = f.read().replace("\\\n", "")
    (run,) = [line[len("RUN "):] for line in text.splitlines() if line.startswith("RUN ") and marker in line]
    return run


@pytest.mark.parametrize("extras", ["", "fa4", "nonexistent"])
def test_dockerfile_extras_install_pyprojects_pins_under_the_torch_pin(extras, tmp_path):
    """--build-arg VDR_EXTRAS=fa4 installs the [fa4] extra's pins from pyproject.toml, constrained
    to the project's torch pin (so that no extra replaces the image's CUDA torch); by default
    (an empty build argument, declared before the RUN line that reads it) nothing; an unknown
    extra fails the build. The RUN line runs as written, in sh, with pip recording what it was
    asked instead of installing."""
    import shutil
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        dockerfile = f.read()
    declared = re.search(r'^ARG VDR_EXTRAS=""$', dockerfile, re.M)
    assert declared and declared.start() < dockerfile.index("RUN if [ -n \"$VDR_EXTRAS\" ]")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    run = _dockerfile_run("VDR_EXTRAS").replace("/tmp/", f"{tmp_path}/")
    script = (f'python() {{ "{sys.executable}" "$@"; }}\n'
              f'pip() {{ printf "%s\\n" "$@" > "{tmp_path}/pip_args"; }}\n{run}\n')
    built = subprocess.run(["sh", "-c", script], cwd=tmp_path, env={**os.environ, "VDR_EXTRAS": extras},
                           capture_output=True, text=True)
    if extras == "nonexistent":
        assert built.returncode != 0 and "nonexistent" in built.stderr
        assert not (tmp_path / "pip_args").exists()
        return
    assert built.returncode == 0, built.stderr
    if not extras:
        assert not (tmp_path / "pip_args").exists()
        return
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    torch_pin = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    assert (tmp_path / "extras.txt").read_text().split() == project["optional-dependencies"]["fa4"]
    assert (tmp_path / "constraints.txt").read_text().split() == [torch_pin]
    args = (tmp_path / "pip_args").read_text().split()
    assert args[:2] == ["install", "--no-cache-dir"]
    assert ["-c", f"{tmp_path}/constraints.txt"] == args[2:4] and ["-r", f"{tmp_path}/extras.txt"] == args[4:6]


# --- the jobs run the pipeline's commands, without resource flags -----------------------------

def test_jobs_run_the_pipeline_without_resource_flags():
    entrypoints = {name: job["entrypoint"] for name, job in job_specs()}
    for name, entrypoint in entrypoints.items():
        flags = set(re.findall(r"--[a-z][-a-z0-9]*", entrypoint))
        assert not flags & set(RESOURCE_FLAGS), f"{name}: {sorted(flags & set(RESOURCE_FLAGS))}"
    modules = {re.search(r"python -m (jobs\.\w+)", e).group(1): e for e in entrypoints.values()}
    assert {"jobs.embed_corpus", "jobs.score_queries", "jobs.offline_eval"} <= set(modules)
    embed, score = modules["jobs.embed_corpus"].split(), modules["jobs.score_queries"].split()
    assert all(embed[embed.index(f) + 1].startswith("s3://") for f in ("--input", "--output", "--compile-cache"))
    assert all(score[score.index(f) + 1].startswith("s3://") for f in ("--corpus", "--queries", "--output"))
    assert score[score.index("--top-k") + 1] == "100"
    config = re.search(r"--config (\S+)", modules["jobs.offline_eval"]).group(1)
    assert os.path.isfile(os.path.join(ROOT, config)), config


def test_raycronjob_is_scheduled_and_behind_its_feature_gate():
    (cron,) = of_kind("RayCronJob")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and "TZ" not in cron["spec"]["schedule"]
    assert cron["spec"].get("timeZone")
    assert 0 < cron["spec"]["jobTemplate"].get("activeDeadlineSeconds", 0) < 24 * 3600, "runs must not overlap"
    with open(os.path.join(DEPLOY, "raycronjob-eval.yaml")) as f:
        assert "RayCronJob feature gate" in " ".join(f.read().split())
    # a relative --config needs a working dir that holds it
    working_dir = yaml.safe_load(cron["spec"]["jobTemplate"]["runtimeEnvYAML"])["working_dir"]
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        assert re.search(rf"^WORKDIR {re.escape(working_dir)}$", f.read(), re.M)
