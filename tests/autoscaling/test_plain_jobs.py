"""The README's plain commands (no resource flags) on a fake autoscaling cluster whose GPU
node type starts at zero: the jobs must ask for GPU actors, the autoscaler must add a GPU
node (and CPU nodes for rendering), the outputs must equal a one-node run, and the GPU
node must go away after the idle timeout. A fake GPU node has no CUDA device: the actors
run on CPU there, with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import embed_corpus, score_queries

from .conftest import ROOT, _base_env, run_driver

pytestmark = pytest.mark.slow


def _job(module: str, args: list[str], address: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = _base_env()
    env["RAY_ADDRESS"] = address
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _pages(folder: str) -> dict:
    t = pq.read_table(os.path.join(folder, "pages")).sort_by("page_id")
    return {"ids": t.column("page_id").to_pylist(), "n": t.column("n_vectors").to_pylist(),
            "emb": [np.asarray(v, dtype=np.float32) for v in t.column("embedding").to_pylist()],
            "dtype": {f.metadata.get(b"vdr.dtype") for f in [pq.read_schema(os.path.join(folder, "pages", p))
                                                             for p in os.listdir(os.path.join(folder, "pages"))]}}


def _alive_gpu_nodes(address: str) -> int:
    out = run_driver("""
        import ray
        ray.init(log_to_driver=False)
        emit({"gpu_nodes": sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))})
    """, address=address)
    return out["gpu_nodes"]


def _where_tasks_ran(dashboard_url: str, address: str) -> dict:
    """Node kinds ("cpu"/"gpu") that ran the render tasks and the embedding actors, from Ray's
    state API (task events of the finished job)."""
    return run_driver(f"""
        import ray
        from ray.util.state import list_actors, list_tasks
        ray.init(log_to_driver=False)
        kind = {{n["NodeID"]: ("gpu" if n["Resources"].get("GPU") else "cpu") for n in ray.nodes()}}
        tasks = list_tasks(address={dashboard_url!r}, filters=[("state", "=", "FINISHED")], limit=10000, detail=True)
        render = [kind.get(t.node_id, "?") for t in tasks if "render_documents" in (t.name or "")]
        actors = list_actors(address={dashboard_url!r}, limit=1000, detail=True)
        embed = [kind.get(a.node_id, "?") for a in actors if "PageEmbedder" in (a.class_name or "")]
        emit({{"render": sorted(set(render)), "n_render": len(render), "embed": sorted(set(embed))}})
    """, address=address)


def test_plain_commands_scale_up_a_gpu_node_and_match_one_node(fake_autoscaling_cluster, ray_session, tiny_model,
                                                               sample_corpus, tmp_path):
    address = fake_autoscaling_cluster["address"]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "text": t}) + "\n"
                               for i, t in enumerate(["quarterly revenue", "a scanned letter", "table of results"])))

    # The one-node reference: the test session's own cluster, in this process.
    ref, ref_run = str(tmp_path / "ref"), str(tmp_path / "ref_run")
    assert embed_corpus.main(["--input", sample_corpus, "--output", ref, "--model", tiny_model]) == 0
    assert score_queries.main(["--corpus", ref, "--queries", str(queries), "--output", ref_run, "--top-k", "3"]) == 0

    # The plain commands against the autoscaling cluster: no GPU there yet, no resource flags.
    assert _alive_gpu_nodes(address) == 0
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    t0 = time.monotonic()
    proc = _job("jobs.embed_corpus", ["--input", sample_corpus, "--output", out, "--model", tiny_model], address)
    embed_s = time.monotonic() - t0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["device"] == "cuda", summary.get("device_reason")
    assert "autoscaler can add" in summary["device_reason"]
    assert "CUDA is unavailable here" in proc.stderr  # the fake GPU node's actor said why it runs on CPU
    placed = _where_tasks_ran(fake_autoscaling_cluster["dashboard_url"], address)
    assert placed["embed"] == ["gpu"], placed  # the model ran on the GPU node the autoscaler added
    # Where rendering ran is reported, not asserted: the autoscaler packs CPU work onto a GPU
    # node's free CPUs before it starts CPU nodes, and that race is timing-dependent here.
    print(f"\n[autoscaling] render tasks ran on {placed['render']} node(s) ({placed['n_render']} tasks)")
    _job("jobs.score_queries", ["--corpus", out, "--queries", str(queries), "--output", run, "--top-k", "3"], address)
    score_summary = json.load(open(os.path.join(run, "summary.json")))
    assert score_summary["gpus_per_actor"] == 1.0, score_summary["device_reason"]

    # Outputs equal to the one-node run (CPU float32 both: the fake GPU has no device).
    got, want = _pages(out), _pages(ref)
    assert got["ids"] == want["ids"] and got["n"] == want["n"]
    for a, b in zip(got["emb"], want["emb"]):
        np.testing.assert_allclose(a, b, atol=2e-3)
    assert got["dtype"] == want["dtype"] == {b"float32"}  # what the actors really used, not "bfloat16"
    errors = lambda f: sorted(pq.read_table(os.path.join(f, "errors")).select(["doc_id", "error_type"]).to_pylist(),
                              key=str)
    assert errors(out) == errors(ref)
    r_got = pq.read_table(os.path.join(run, "results.parquet")).to_pylist()
    r_want = pq.read_table(os.path.join(ref_run, "results.parquet")).to_pylist()
    assert [(r["query_id"], r["rank"], r["page_id"]) for r in r_got] == \
           [(r["query_id"], r["rank"], r["page_id"]) for r in r_want]
    np.testing.assert_allclose([r["score"] for r in r_got], [r["score"] for r in r_want], rtol=1e-4, atol=1e-4)

    # Nothing of the jobs keeps holding the GPU node: it goes after the idle timeout.
    deadline = time.monotonic() + 120
    while _alive_gpu_nodes(address) and time.monotonic() < deadline:
        time.sleep(3)
    assert _alive_gpu_nodes(address) == 0
    print(f"\n[autoscaling] plain embed job on the fake cluster: {embed_s:.1f} s")
