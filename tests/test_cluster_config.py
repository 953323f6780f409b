"""cluster.yaml is a Ray 2.60 cluster-launcher config that Ray itself accepts, whose autoscaler
can start GPU nodes from zero, and whose setup installs this project without replacing torch.

Offline: Ray's own schema and planner, no AWS call, no Ray started."""

from __future__ import annotations

import copy
import os
import re
from functools import partial

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def config() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> None:
    """What `ray up` runs before it touches AWS: defaults merged in, then Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)  # raises on a schema error
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_validates_against_rays_schema(config):
    _validate(config)
    types = config["available_node_types"]
    assert {"cpu_render", "gpu_embed"} <= set(types)
    assert config["head_node_type"] in types


def test_validation_can_fail(config):
    import jsonschema

    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_embed"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_embed"]["min_worker"] = 0  # typo: unknown key
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


def test_node_types_advertise_resources_and_start_at_zero(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "tasks and actors must stay off the head"
    gpu, cpu = types["gpu_embed"], types["cpu_render"]
    assert gpu["node_config"]["InstanceType"] == "g6e.2xlarge"
    assert gpu["resources"] == {"CPU": 8, "GPU": 1}
    assert cpu["node_config"]["InstanceType"] == "c6i.8xlarge"
    assert cpu["resources"] == {"CPU": 32}
    for name in ("gpu_embed", "cpu_render"):
        assert types[name]["min_workers"] == 0, f"{name} must scale from zero"
        assert types[name]["max_workers"] >= 1
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if t is not head)
    # workers read and write S3 with their instance profile (the launcher gives one to the head only)
    assert all("IamInstanceProfile" in types[n]["node_config"] for n in ("gpu_embed", "cpu_render"))


def test_autoscaler_plans_gpu_nodes_from_zero(config):
    """Ray's own bin-packing: with no worker node yet, GPU actors get GPU nodes and CPU tasks
    get CPU nodes (never a GPU node), from the resources declared above."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    types, head = config["available_node_types"], config["head_node_type"]
    plan = lambda demands: get_nodes_for(types, {head: 1}, head, config["max_workers"], demands, scorer)[0]
    assert dict(plan([{"GPU": 1, "CPU": 1}] * 3)) == {"gpu_embed": 3}
    assert dict(plan([{"CPU": 1}] * 40)) == {"cpu_render": 2}
    assert dict(plan([{"GPU": 1}] * 20)) == {"gpu_embed": 8}  # capped at max_workers


def test_head_runs_the_autoscaler(config):
    # jobs read the node types they may grow to from this file (pipeline/capacity.py)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(config["head_start_ray_commands"])


def test_idle_scale_down(config):
    assert 1 <= config["idle_timeout_minutes"] <= 30
    assert config["provider"]["cache_stopped_nodes"] is False


def test_dashboard_is_reached_by_tunnel_only(config):
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "security_group" not in config["provider"]


def _pip_requirements(command: str) -> list[str]:
    return re.findall(r'"([^"]+)"', command)


def test_setup_installs_the_project_without_replacing_torch(config):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    torch_pin = next(d for d in deps if re.match(r"torch\b", d))
    setup = config["setup_commands"]
    assert "~/vdr-pipeline" in config["file_mounts"]
    # torch only when the image has none, at the project's pin
    assert any("import torch" in c and f'pip install "{torch_pin}"' in c for c in setup)
    # the project itself never resolves dependencies (it would reinstall torch)
    project = [c for c in setup if "~/vdr-pipeline" in c]
    assert project == ["pip install --no-deps -e ~/vdr-pipeline"]
    # every other pinned dependency, exactly as in pyproject.toml
    others = [r for c in setup if c.startswith("pip install") and c not in project for r in _pip_requirements(c)]
    assert sorted(others) == sorted(d for d in deps if d != torch_pin)
    assert not any(re.match(r"torch\b", r) for r in others)




def test_the_optional_fa4_step_uncommented_is_valid_and_names_pyprojects_pins(config, tmp_path):
    """cluster.yaml's commented FlashAttention 4 step, uncommented as its comment says (the "# " of
    three lines removed), is one more setup command, valid for `ray up`, that installs exactly the
    [fa4] extra's pins with the node's own torch as a constraint, and only on a Hopper GPU: run
    here in bash (no GPU), it installs nothing and succeeds."""
    import subprocess
    import sys

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        fa4 = tomllib.load(f)["project"]["optional-dependencies"]["fa4"]
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - if python"))
    block = [line.replace("# ", "", 1) for line in lines[start:start + 3]]
    uncommented = yaml.safe_load("\n".join(lines[:start] + block + lines[start + 3:]))
    _validate(uncommented)
    assert uncommented["setup_commands"][:-1] == config["setup_commands"]
    command = uncommented["setup_commands"][-1]
    guard = "torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9"
    assert command.startswith("if python -c ") and guard in command and command.endswith("; fi")
    writes_pin = """python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-pin.txt"""
    assert f"then {writes_pin} && pip install -c /tmp/torch-pin.txt " in command
    assert sorted(re.findall(r'"([\w.-]+==[^"]+)"', command)) == sorted(fa4)
    shell = (f'python() {{ "{sys.executable}" "$@"; }}\n'
             f'pip() {{ echo "$@" > "{tmp_path}/pip_args"; }}\n'
             + command.replace("/tmp/", f"{tmp_path}/"))
    subprocess.run(["bash", "-c", shell], check=True)
    assert not (tmp_path / "pip_args").exists()  # no CUDA here: skipped
