"""read_capacity / choose_device against real clusters: a plain local Ray (no autoscaler) and a
fake autoscaling cluster (v1 autoscaler, fake_multinode provider) whose GPU node type starts
at zero nodes. The scale-up and scale-down times measured here are printed (``-s``)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from .conftest import IDLE_TIMEOUT_MINUTES, run_driver, stop_cluster_processes

pytestmark = pytest.mark.slow


def _report(name: str, **values) -> None:
    print(f"\n[autoscaling] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# ----------------------------------------------------------------------------- (d) no autoscaler


def test_plain_local_cluster_has_no_autoscaler():
    """``ray.init(address="local")`` with 1 CPU and no GPU: max is what exists now, auto -> cpu."""
    temp_dir = tempfile.mkdtemp(prefix="rtpl", dir="/tmp")
    try:
        out = run_driver(f"""
            t0 = time.monotonic()
            import ray
            ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     _temp_dir={temp_dir!r})
            from pipeline.cluster import choose_device, max_gpu_actors, read_capacity
            t1 = time.monotonic()
            cap = read_capacity(timeout_s=10)
            emit({{"cap": cap.to_dict(), "device": choose_device("auto", cap, None),
                   "max_gpu_actors": max_gpu_actors(cap, 1), "read_s": time.monotonic() - t1,
                   "init_s": t1 - t0}})
            ray.shutdown()
        """, address=None)
    finally:
        stop_cluster_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    cap = out["cap"]
    _report("plain cluster", init_s=round(out["init_s"], 1), read_capacity_s=round(out["read_s"], 2),
            source=cap["source"])
    assert cap["gpus_now"] == cap["gpus_max"] == 0
    assert cap["cpus_now"] == cap["cpus_max"] == 1
    assert cap["source"].startswith("no autoscaler")
    assert out["device"][0] == "cpu" and "no GPU" in out["device"][1]
    assert out["max_gpu_actors"] == 0
    assert out["read_s"] < 5


# ----------------------------------------------------------------------------- (a) before any worker


def test_capacity_before_any_worker_node(fake_autoscaling_cluster):
    c = fake_autoscaling_cluster
    out = run_driver(f"""
        import ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        from pipeline.cluster import (HEAD_MARKER, _autoscaler_status_types, _monitor_scanner,
                                       choose_device, max_gpu_actors, read_capacity)
        t0 = time.monotonic()
        cap = read_capacity(timeout_s=15)
        read_s = time.monotonic() - t0
        nodes = [n for n in ray.nodes() if n["Alive"]]
        # The path a driver on a worker node takes: a zero-CPU task pinned to the head reads it.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        head = next(n for n in nodes if HEAD_MARKER in n["Resources"])
        t0 = time.monotonic()
        probe = ray.get(ray.remote(num_cpus=0)(_monitor_scanner()).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)).remote(
            {str(c["gcs_port"])!r}, None), timeout=60)
        probe_s = time.monotonic() - t0
        # The autoscaler's own status (the fallback when the config cannot be read): the v1
        # monitor writes it once it has load metrics.
        status, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:
            status = _autoscaler_status_types()
            if status:
                break
            time.sleep(0.5)
        emit({{"cap": cap.to_dict(), "device": choose_device("auto", cap, None),
               "max_gpu_actors": max_gpu_actors(cap, 1), "read_s": read_s, "alive_nodes": len(nodes),
               "probe": {{k: v for k, v in probe.items() if k != "config_text"}},
               "probe_has_text": bool(probe.get("config_text")), "probe_s": probe_s,
               "status": [status[0], sorted(status[1])] if status else None}})
    """, address=c["address"])
    cap = out["cap"]
    _report("before any worker", cluster_start_s=c["started_s"], read_capacity_s=round(out["read_s"], 2),
            head_probe_s=round(out["probe_s"], 2), source=cap["source"], device=out["device"])
    assert out["alive_nodes"] == 1  # the head only
    assert cap["gpus_now"] == 0 and cap["cpus_now"] == 0
    assert cap["gpus_max"] == 1
    assert cap["cpus_max"] == 2 * 2 + 1  # max_workers 3: two cpu_render and one gpu_embed
    assert cap["source"] == f"autoscaler v1 config ({c['config_path']})"
    assert {t["name"]: t["max"] for t in cap["node_types"]} == {"ray.head.default": 1, "cpu_render": 2, "gpu_embed": 1}
    assert out["device"][0] == "cuda" and "gpu_embed" in out["device"][1]
    assert out["max_gpu_actors"] == 1
    assert out["probe"]["monitor"] == "v1" and out["probe"]["config_path"] == c["config_path"]
    assert out["probe_has_text"]
    assert out["status"] == ["v1", ["ray.head.default"]]


# ----------------------------------------------------------------------------- (b) + (c)


@pytest.fixture(scope="module")
def gpu_scale_cycle(fake_autoscaling_cluster):
    """One driver: a ``num_gpus=1`` task on the cluster with no GPU node, the node's arrival,
    the task's result, then the node's removal once idle. Times in seconds from submission
    (scale-up) and from the task's end (scale-down)."""
    return run_driver("""
        import ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        from pipeline.cluster import read_capacity

        def gpu_nodes():
            return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]

        @ray.remote(num_gpus=1)
        def on_gpu():
            import os, ray, torch
            from pipeline.cluster import actor_device
            device, warning = actor_device("cuda")
            return {"gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                    "node_id": ray.get_runtime_context().get_node_id(),
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "torch_cuda_available": torch.cuda.is_available(),
                    "actor_device": device, "warning": warning}

        before = len(gpu_nodes())
        t0 = time.monotonic()
        ref = on_gpu.remote()
        joined_s, node_id = None, None
        while True:
            ready, _ = ray.wait([ref], timeout=0.25)
            if joined_s is None:
                g = gpu_nodes()
                if g:
                    joined_s, node_id = time.monotonic() - t0, g[0]["NodeID"]
            if ready or time.monotonic() - t0 > 150:
                break
        result = ray.get(ref, timeout=5)
        t_done = time.monotonic()
        done_s = t_done - t0
        alive_after_task = [sorted(k for k in n["Resources"] if k in ("CPU", "GPU")) for n in ray.nodes() if n["Alive"]]
        cap_with_node = read_capacity(timeout_s=15).to_dict()
        gone_s = None
        while time.monotonic() - t_done < 120:
            if not gpu_nodes():
                gone_s = time.monotonic() - t_done
                break
            time.sleep(0.5)
        cap_after = read_capacity(timeout_s=15).to_dict()
        emit({"gpu_nodes_before": before, "joined_s": joined_s, "joined_node_id": node_id, "done_s": done_s,
              "result": result, "alive_after_task": alive_after_task, "cap_with_node": cap_with_node,
              "gone_after_idle_s": gone_s, "cap_after": cap_after})
    """, address=fake_autoscaling_cluster["address"], timeout=330)


def test_gpu_task_makes_the_autoscaler_add_the_gpu_node(gpu_scale_cycle):
    out = gpu_scale_cycle
    r = out["result"]
    _report("scale up", gpu_node_joined_s=round(out["joined_s"], 1), task_done_s=round(out["done_s"], 1),
            gpu_ids=r["gpu_ids"], node=r["node_id"][-8:], cuda_visible_devices=r["cuda_visible_devices"],
            torch_cuda=r["torch_cuda_available"])
    assert out["gpu_nodes_before"] == 0
    assert out["joined_s"] is not None, "no GPU node joined within 150 s"
    assert r["node_id"] == out["joined_node_id"]
    assert r["gpu_ids"] == ["0"] and r["cuda_visible_devices"] == "0"
    # Only the GPU node was added (head + gpu_embed), nothing for cpu_render.
    assert sorted(out["alive_after_task"]) == [[], ["CPU", "GPU"]]  # the head has no CPU
    assert out["cap_with_node"]["gpus_now"] == 1 and out["cap_with_node"]["gpus_max"] == 1
    # A fake GPU node: Ray grants GPU 0, torch (CPU build here) sees no CUDA device.
    if not r["torch_cuda_available"]:
        assert r["actor_device"] == "cpu" and "Ray granted GPU [0]" in r["warning"]


def test_idle_gpu_node_is_removed_after_the_idle_timeout(gpu_scale_cycle):
    out = gpu_scale_cycle
    _report("scale down", idle_timeout_s=IDLE_TIMEOUT_MINUTES * 60, gpu_node_gone_after_task_s=out["gone_after_idle_s"]
            and round(out["gone_after_idle_s"], 1))
    assert out["gone_after_idle_s"] is not None, "the idle GPU node was still alive 120 s after its task"
    assert out["gone_after_idle_s"] >= IDLE_TIMEOUT_MINUTES * 60 - 2
    cap = out["cap_after"]
    assert cap["gpus_now"] == 0 and cap["gpus_max"] == 1
