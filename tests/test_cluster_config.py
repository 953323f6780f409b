"""cluster.yaml is a valid Ray autoscaler config with a CPU and a GPU worker type."""

import os

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import validate_config

    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        config = yaml.safe_load(f)
    validate_config(config)  # raises on a schema error
    types = config["available_node_types"]
    assert {"cpu_render", "gpu_embed"} <= set(types)
    assert config["head_node_type"] in types
    for t in types.values():
        assert t.get("min_workers", 0) <= t.get("max_workers", 0) or t is types[config["head_node_type"]]
