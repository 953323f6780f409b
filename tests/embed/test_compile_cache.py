"""Warm starts: an actor loads the compiled artefacts an earlier actor saved (this node's
cache or a shared --compile-cache), instead of compiling again, with the same embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ACTOR = r"""
import json, sys, time
import numpy as np
import pyarrow as pa
from torch._dynamo.utils import counters
from pipeline.embed.compile_cache import compile_times
from pipeline.embed.stages import PageEmbedder, PIXELS, STREAM_SCHEMA

model, shared = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
images = [rng.integers(0, 255, (224, 168, 3), dtype=np.uint8) for _ in range(2)]
cols = {f.name: [None] * 2 for f in STREAM_SCHEMA}
cols.update(doc_id=["a.pdf", "b.pdf"], page_number=[1, 1], source_uri=["a.pdf", "b.pdf"], doc_pages=[1, 1],
            height=[224, 224], width=[168, 168])
cols[PIXELS] = [im.tobytes() for im in images]
emb = PageEmbedder(model, device="cpu", compile_model=True, compile_cache=shared)
t = time.perf_counter()
out = emb(pa.table(cols, schema=STREAM_SCHEMA))
print(json.dumps({"first_batch_s": time.perf_counter() - t, "loaded_from": emb.compile_cache_from,
                  "precompiled_from": emb.precompiled_from,
                  "precompiled": {pf.name: [pf.loaded, pf.compiled, pf.fallback_reason] for pf in emb.lm.precompiled},
                  "fxgraph_hits": counters["inductor"]["fxgraph_cache_hit"],
                  "fxgraph_misses": counters["inductor"]["fxgraph_cache_miss"], "compile_times": compile_times(),
                  "embedding": [np.asarray(v, np.float32).tolist() for v in out.column("embedding").to_pylist()]}))
"""


def run_actor(model, shared, local, inductor, **extra_env):
    env = dict(os.environ, PYTHONPATH=ROOT, VDR_COMPILE_CACHE=str(local), TORCHINDUCTOR_CACHE_DIR=str(inductor),
               **extra_env)
    proc = subprocess.run([sys.executable, "-c", ACTOR, model, str(shared)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_new_node_loads_precompiled_blocks_and_compiles_nothing(tiny_model, tmp_path):
    """The default: each block type compiled ahead of time and saved whole; an actor on another
    node loads it from the shared --compile-cache and neither traces nor compiles anything."""
    shared = tmp_path / "shared-cache"
    cold = run_actor(tiny_model, shared, tmp_path / "node1", tmp_path / "inductor1")
    assert cold["loaded_from"] is None and cold["precompiled_from"] is None
    assert {name: (loaded, compiled >= 1, reason) for name, (loaded, compiled, reason) in cold["precompiled"].items()} \
        == {"vision_block": (0, True, None), "text_layer": (0, True, None)}
    assert cold["compile_times"]["trace"] > 0
    saved = sorted(os.listdir(shared))
    assert [name.split("-")[0] for name in saved] == ["compile", "precompiled"], saved
    assert sorted(os.listdir(tmp_path / "node1")) == saved
    warm = run_actor(tiny_model, shared, tmp_path / "node2", tmp_path / "inductor2")
    assert warm["precompiled_from"] == os.path.join(str(shared), saved[1])
    # the node keeps what it loaded: its next actors start warm without the shared store
    assert (tmp_path / "node2" / saved[1]).read_bytes() == (shared / saved[1]).read_bytes()
    assert {name: (loaded, compiled) for name, (loaded, compiled, _) in warm["precompiled"].items()} \
        == {name: (compiled, 0) for name, (_, compiled, _) in cold["precompiled"].items()}
    assert warm["compile_times"].get("trace", 0) == 0 and warm["compile_times"].get("backend", 0) == 0
    assert warm["first_batch_s"] < cold["first_batch_s"] / 5
    for a, b in zip(cold["embedding"], warm["embedding"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_new_node_loads_compiled_artefacts_instead_of_compiling(tiny_model, tmp_path):
    """VDR_PRECOMPILE=0 (torch.compile on each block, as before 2026-12-05): torch's portable cache."""
    shared = tmp_path / "shared-cache"
    # First actor: a node that never compiled this model (empty caches everywhere).
    cold = run_actor(tiny_model, shared, tmp_path / "node1", tmp_path / "inductor1", VDR_PRECOMPILE="0")
    assert cold["loaded_from"] is None and cold["fxgraph_misses"] > 0 and cold["precompiled"] == {}
    saved = sorted(os.listdir(shared))
    assert len(saved) == 1 and saved[0].startswith("compile-") and os.listdir(tmp_path / "node1") == saved
    # Second actor on another node: its own caches are empty, the shared one is not.
    warm = run_actor(tiny_model, shared, tmp_path / "node2", tmp_path / "inductor2", VDR_PRECOMPILE="0")
    assert warm["loaded_from"] == os.path.join(str(shared), saved[0])
    assert warm["fxgraph_hits"] > 0 and warm["fxgraph_misses"] == 0
    # where each first batch's compilation went (the actor's log line): Dynamo traces in both,
    # the backend is the part the cache shortens
    for run in (cold, warm):
        t = run["compile_times"]
        assert set(t) >= {"compile", "trace", "backend"} and 0 < t["trace"] <= t["compile"] <= run["first_batch_s"]
    # (the warm backend's seconds are not compared with the cold one's: on a loaded 2-core
    # machine they came out 17.59 against 17.21 s once, 2026-12-05; the hits and misses above
    # are what the cache does)
    # The same compiled code: the same embeddings, bit for bit.
    for a, b in zip(cold["embedding"], warm["embedding"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_damaged_cache_means_a_cold_compile_not_a_failure(tmp_path, monkeypatch):
    from pipeline.embed import compile_cache

    monkeypatch.setenv(compile_cache.LOCAL_ENV, str(tmp_path / "node"))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "compile-x.bin").write_bytes(b"not a cache")
    assert compile_cache.load("compile-x.bin", str(tmp_path / "shared")) is None
    assert compile_cache.load("compile-missing.bin", str(tmp_path / "shared")) is None


def test_damaged_precompiled_blocks_mean_compiling_again_not_a_failure(tiny_model, tmp_path, monkeypatch):
    """A precompiled-blocks file that is not one (damaged, another torch's) is skipped with a
    warning: the blocks compile as on a new node, and the embeddings are unchanged."""
    import torch._dynamo

    from pipeline.embed import compile_cache
    from pipeline.embed import model as M

    monkeypatch.setenv(compile_cache.LOCAL_ENV, str(tmp_path / "node"))
    (tmp_path / "node").mkdir()
    torch._dynamo.reset()
    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    key = "compile-x.bin"
    (tmp_path / "node" / compile_cache.precompiled_key(key)).write_bytes(b"not precompiled blocks")
    assert compile_cache.load_precompiled(key, lm.precompiled) is None
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (224, 168, 3), dtype=np.uint8) for _ in range(2)]
    reference = M.embed_pages(M.load_model(tiny_model, device="cpu"), images)
    for a, b in zip(M.embed_pages(lm, images), reference):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [(pf.loaded, pf.compiled) for pf in lm.precompiled] == [(0, 1), (0, 1)]
    # what it compiled is saved over the damaged file, and loads in a fresh model
    assert compile_cache.save_precompiled(key, lm.precompiled) > 0
    again = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    assert compile_cache.load_precompiled(key, again.precompiled) == str(tmp_path / "node" / "precompiled-x.bin")
    for a, b in zip(M.embed_pages(again, images), reference):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [(pf.loaded, pf.compiled) for pf in again.precompiled] == [(1, 0), (1, 0)]
    torch._dynamo.reset()


def test_a_backend_that_cannot_be_saved_falls_back_to_torch_compile(tiny_model):
    """Ahead-of-time compilation needs a backend whose output can be serialized; with any other
    (or a torch without it) each block type falls back to torch.compile, with the same pages."""
    import torch._dynamo

    from pipeline.embed import model as M

    torch._dynamo.reset()

    def backend(gm, example_inputs):  # a plain callable: torch cannot serialize what it returns
        return gm.forward

    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend=backend)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (224, 168, 3), dtype=np.uint8) for _ in range(2)]
    reference = M.embed_pages(M.load_model(tiny_model, device="cpu"), images)
    for a, b in zip(M.embed_pages(lm, images), reference):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert all(pf.fallback is not None and pf.variants == [] for pf in lm.precompiled)
    assert all("Serializable" in pf.fallback_reason or "serializ" in pf.fallback_reason.lower()
               for pf in lm.precompiled), [pf.fallback_reason for pf in lm.precompiled]
    torch._dynamo.reset()


def test_the_same_model_in_another_folder_has_the_same_cache_key(tiny_model, tmp_path):
    """A checkpoint copied elsewhere (a fetched s3:// model, another job's temporary folder)
    compiles to the same code, so it must find the artefacts the first copy saved; a model
    with another architecture must not."""
    import shutil

    from transformers import AutoConfig

    from pipeline.embed.compile_cache import cache_key

    copy = tmp_path / "copy-of-model"
    shutil.copytree(tiny_model, copy)
    a = AutoConfig.from_pretrained(tiny_model).to_dict()
    b = AutoConfig.from_pretrained(str(copy)).to_dict()
    assert a.get("_name_or_path") != b.get("_name_or_path")  # the configs do name their folders
    assert cache_key(a, "float32", "cpu") == cache_key(b, "float32", "cpu")
    other = json.loads(json.dumps(b))
    other["vlm_config"]["text_config"]["num_hidden_layers"] += 1
    assert cache_key(other, "float32", "cpu") != cache_key(a, "float32", "cpu")
    assert cache_key(a, "bfloat16", "cpu") != cache_key(a, "float32", "cpu")


def test_another_attention_implementation_has_another_cache_key(tiny_model, tmp_path, monkeypatch):
    """config.to_dict() leaves the attention implementation out, yet sdpa and eager compile to
    other code: with one key, runs that differ in --attn-implementation would load each other's
    artefacts for nothing (a cold compile, logged as a warm one) and overwrite them."""
    from pipeline.embed.stages import PageEmbedder

    monkeypatch.setenv("VDR_COMPILE_CACHE", str(tmp_path / "local"))
    keys = {attn: PageEmbedder(tiny_model, device="cpu", compile_model=True, attn_implementation=attn).compile_cache[0]
            for attn in ("sdpa", "eager")}
    assert keys["sdpa"] != keys["eager"]


def test_too_many_variants_fall_back_to_torch_compile(tiny_model, monkeypatch):
    """Inputs that keep missing every compiled variant would otherwise cost a compilation per
    batch: past the limit the block type runs through torch.compile, with the same pages."""
    import torch._dynamo

    from pipeline.embed import model as M
    from pipeline.embed import precompile

    torch._dynamo.reset()
    monkeypatch.setattr(precompile.PrecompiledForward, "MAX_VARIANTS", 1)
    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    reference = M.load_model(tiny_model, device="cpu")
    rng = np.random.default_rng(2)
    two = [rng.integers(0, 255, (224, 168, 3), dtype=np.uint8) for _ in range(2)]
    one = [rng.integers(0, 255, (168, 224, 3), dtype=np.uint8)]  # a batch of one: its own variant
    for images in (two, one, two):
        for a, b in zip(M.embed_pages(lm, images), M.embed_pages(reference, images)):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert all(len(pf.variants) == 1 and pf.fallback is not None and "variants" in pf.fallback_reason
               for pf in lm.precompiled), [(len(pf.variants), pf.fallback_reason) for pf in lm.precompiled]
    torch._dynamo.reset()


def _embed_job(corpus, out, model, shared):
    from jobs import embed_corpus

    assert embed_corpus.main(["--input", corpus, "--output", out, "--model", model, "--max-visual-tokens", "64",
                              "--batch-size", "4", "--compile", "on", "--compile-cache", str(shared)]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    import pyarrow.parquet as pq

    pages = pq.read_table(os.path.join(out, "pages")).sort_by("page_id")
    return summary, pages


def test_a_job_on_a_new_node_loads_the_blocks_an_earlier_job_precompiled(ray_session, ray_cluster, tiny_model,
                                                                        sample_corpus, tmp_path, capsys):
    """Under Ray, as users run it: a job with --compile on --compile-cache compiles the blocks in
    its model actor and saves them; a later job on a node with nothing of its own (the node's
    caches emptied) loads them from --compile-cache, compiles nothing, and writes the same
    embeddings. The summary says, per actor, how its compiled model was come by."""
    import shutil

    shared = tmp_path / "shared-cache"
    for cache in (ray_cluster["compile_cache"], ray_cluster["inductor_cache"]):
        shutil.rmtree(cache, ignore_errors=True)
    cold, cold_pages = _embed_job(sample_corpus, str(tmp_path / "out1"), tiny_model, shared)
    (actor,) = cold["this_run"]["actors"]
    assert actor["compile"]["mode"] == "precompiled"
    assert actor["compile"]["precompiled_from"] is None and actor["compile"]["variants_compiled"] >= 1
    assert "precompiled blocks compiled here" in capsys.readouterr().err
    assert sorted(name.split("-")[0] for name in os.listdir(shared)) == ["compile", "precompiled"]
    for cache in (ray_cluster["compile_cache"], ray_cluster["inductor_cache"]):
        shutil.rmtree(cache, ignore_errors=True)  # a new node
    warm, warm_pages = _embed_job(sample_corpus, str(tmp_path / "out2"), tiny_model, shared)
    (w,) = warm["this_run"]["actors"]
    assert w["compile"]["precompiled_from"] is not None and w["compile"]["precompiled_from"].startswith(str(shared))
    assert w["compile"]["variants_compiled"] == 0 and w["compile"]["variants_loaded"] >= 1
    assert w["compile"]["compile_s"].get("backend", 0) == 0
    assert w["first_batch_s"] < actor["first_batch_s"] / 3
    assert "precompiled blocks loaded" in capsys.readouterr().err
    assert warm_pages.column("page_id").to_pylist() == cold_pages.column("page_id").to_pylist()
    for a, b in zip(cold_pages.column("embedding").to_pylist(), warm_pages.column("embedding").to_pylist()):
        # the same compiled code; pages may share a batch with other pages this time (float32 on CPU)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=2e-3)


def test_the_final_line_says_how_each_actor_came_by_its_compiled_model():
    from pipeline.embed.flow import first_batches

    loaded = {"mode": "precompiled", "precompiled_from": "s3://b/cache/precompiled-x.bin", "variants_loaded": 2,
              "variants_compiled": 0}
    compiled = {"mode": "precompiled", "precompiled_from": None, "variants_loaded": 0, "variants_compiled": 2}
    assert first_batches([]) == ""
    assert first_batches([{"first_batch_s": 1.24, "model_load_s": 3.0, "compile": loaded}]) == \
        ", first batch 1.2 s (precompiled blocks loaded)"
    assert first_batches([{"first_batch_s": 14.8, "model_load_s": 3.0, "compile": compiled},
                          {"first_batch_s": 0.4, "model_load_s": 0, "compile": compiled}]) == \
        (", first batches of 2 actors 0.4 s (kept actor, model loaded and compiled before), "
         "14.8 s (precompiled blocks compiled here)")
    many = [{"first_batch_s": float(i), "model_load_s": 1.0, "compile": {"mode": "off"}} for i in range(1, 6)]
    assert first_batches(many) == \
        ", first batches of 5 actors: slowest 5.0 s (not compiled), fastest 1.0 s (not compiled)"
    # precompiling fell back (a torch without aot_compile; past the variant limit)
    all_back = {"mode": "precompiled, with fallbacks", "precompiled_from": None, "variants_loaded": 0,
                "variants_compiled": 0, "compile_cache_from": None,
                "fallbacks": {"vision_block": "no aot_compile", "text_layer": "no aot_compile"}}
    assert first_batches([{"first_batch_s": 9.0, "model_load_s": 2.0, "compile": all_back}]) == \
        ", first batch 9.0 s (torch.compile, cache cold; precompiling fell back (vision_block: no aot_compile; " \
        "text_layer: no aot_compile))"
    part_back = {**loaded, "mode": "precompiled, with fallbacks", "compile_cache_from": "/c/compile-x.bin",
                 "fallbacks": {"text_layer": "more than 8 variants"}}
    assert first_batches([{"first_batch_s": 3.0, "model_load_s": 2.0, "compile": part_back}]) == \
        ", first batch 3.0 s (precompiled blocks loaded, 1 block type(s) fell back to torch.compile, cache warm)"
    kept = {**compiled, "kept_actor": True}
    assert "kept actor" in first_batches([{"first_batch_s": 0.3, "model_load_s": 0.0, "compile": kept}])
    plain = {"mode": "torch.compile", "compile_cache_from": "/tmp/vdr-compile-cache/compile-x.bin"}
    assert "torch.compile, cache warm" in first_batches([{"first_batch_s": 5.0, "model_load_s": 2.0, "compile": plain}])



def test_the_final_line_names_rows_a_rerun_retries_only_when_there_are_some():
    from pipeline.config import EmbedConfig
    from pipeline.embed.flow import final_line

    cfg = EmbedConfig(input="in", output="out")
    run = {"pages": 8, "error_rows_final": 2, "error_rows_retryable": 0, "seconds": 12.34, "actors": []}
    summary = {"documents_processed": 5, "documents_already_done": 1, "this_run": run}
    line = final_line(cfg, summary)
    assert line == "[embed_corpus] done: 5 documents processed (1 already done), 8 pages, 2 error rows, 12.3s -> out"
    line = final_line(cfg, {**summary, "this_run": {**run, "error_rows_retryable": 3}})
    assert "2 error rows and 3 for storage that did not answer (a rerun tries them again), 12.3s" in line


def test_a_gpu_job_without_compile_cache_is_told_how_new_nodes_would_load_the_compiled_model():
    from pipeline.config import EmbedConfig
    from pipeline.embed.flow import compile_cache_hint

    hint = compile_cache_hint(EmbedConfig(input="in", output="out"), "cuda")
    assert hint is not None and "--compile-cache s3://" in hint and "RESULTS.md" in hint and "FlashAttention" in hint
    sdpa = compile_cache_hint(EmbedConfig(input="in", output="out", vision_attention="sdpa"), "cuda")
    assert sdpa is not None and "FlashAttention" not in sdpa
    # not where nothing is compiled, where the cache is given, or on CPUs (auto compiles on GPUs only)
    assert compile_cache_hint(EmbedConfig(input="in", output="out", compile="off"), "cuda") is None
    assert compile_cache_hint(EmbedConfig(input="in", output="out", compile_cache="s3://b/cc/"), "cuda") is None
    assert compile_cache_hint(EmbedConfig(input="in", output="out"), "cpu") is None


def test_a_node_keeps_what_it_loaded_from_the_shared_cache_without_replacing_its_own(tmp_path, monkeypatch):
    from pipeline.embed import compile_cache as cc

    monkeypatch.setenv(cc.LOCAL_ENV, str(tmp_path / "node"))
    cc._keep_on_node("precompiled-k.bin", b"from the shared cache")
    assert (tmp_path / "node" / "precompiled-k.bin").read_bytes() == b"from the shared cache"
    cc._keep_on_node("precompiled-k.bin", b"another copy")  # the node's own is kept
    assert (tmp_path / "node" / "precompiled-k.bin").read_bytes() == b"from the shared cache"
    # a node cache that cannot be written costs only the copy, with a warning
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv(cc.LOCAL_ENV, str(tmp_path / "file" / "node"))
    cc._keep_on_node("precompiled-k.bin", b"x")
    assert sorted(os.listdir(tmp_path)) == ["file", "node"]


SHAPES = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from pipeline.embed import compile_cache as cc

key, shared, sizes = sys.argv[1], sys.argv[2], sys.argv[3]
def f(x):
    return (x.sin() * 2 + 1).relu().sum(-1)
def g(x):
    return x.softmax(-1)
static, dynamic = torch.compile(f, dynamic=False), torch.compile(g, dynamic=True)
loaded = cc.load(key, shared)
# a page size, then another (a new graph, saved again as the actor does); a dynamic graph whose
# small and large sizes are two entries under one key
steps = [(static, (4, 8)), (dynamic, (2, 3)), (static, (5, 9)), (dynamic, (2, 5000))]
for fn, shape in steps if sizes == "all" else steps[:2]:
    fn(torch.ones(shape))
    cc.save(key, shared)
print(json.dumps({"loaded": loaded, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def held(path) -> set:
    """The artefacts in a cache file, every part of it: (kind, (key, content))."""
    from torch.compiler._cache import CacheArtifactManager, _deserialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    CacheArtifactManager._ensure_cache_artifacts_registered()
    parts = AppendingByteSerializer.to_list(path.read_bytes(), deserialize_fn=_deserialize_single_cache)
    return {(kind, (a.key, a.content)) for kind, artifacts in parts for a in artifacts}


def test_a_cache_saved_after_each_new_page_size_loads_every_graph_and_never_shrinks(tmp_path):
    """torch's own loader keeps only the last part of each kind of a file saved twice by one
    process (the graphs of the first page size were lost), and a process that looked up fewer
    graphs than the file held replaced it with its own, smaller one (the twenty-eighth session's
    GPU jobs: the node's file went to 2,724 bytes)."""
    shared, key = tmp_path / "shared", "compile-shapes.bin"

    def run(node, sizes="all"):
        env = dict(os.environ, PYTHONPATH=ROOT, VDR_COMPILE_CACHE=str(tmp_path / node),
                   TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{node}"))
        proc = subprocess.run([sys.executable, "-c", SHAPES, key, str(shared), sizes], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    cold = run("node1")
    assert cold["loaded"] is None and cold["misses"] >= 4 and cold["hits"] == 0
    full = held(shared / key)
    assert held(tmp_path / "node1" / key) == full
    assert sum(kind == "inductor" for kind, _ in full) == cold["misses"]
    warm = run("node2")  # another node: every graph comes from the shared cache
    assert warm["loaded"] == str(shared / key) and (warm["hits"], warm["misses"]) == (cold["misses"], 0)
    assert held(shared / key) == full and held(tmp_path / "node2" / key) == full
    few = run("node3", "first")  # a node that sees fewer page sizes leaves the cache whole
    assert few["misses"] == 0 and held(shared / key) == full and held(tmp_path / "node3" / key) == full


def record(*artifacts) -> bytes:
    """A cache file of Inductor artefacts (key, content), as torch saves one."""
    import torch
    from torch.compiler._cache import CacheArtifactManager

    CacheArtifactManager._ensure_cache_artifacts_registered()  # as a compile does
    with CacheArtifactManager.with_fresh_cache():
        for key, content in artifacts:
            CacheArtifactManager.record_artifact("inductor", key, content)
        return torch.compiler.save_cache_artifacts()[0]


def test_a_save_adds_to_what_a_location_holds_and_leaves_one_it_cannot_read(tmp_path, monkeypatch):
    """Another node's artefacts, written since this process loaded, stay in the file; a file
    that cannot be read now (an outage) is not overwritten; access denied is a missing key."""
    from torch.compiler._cache import CacheArtifactManager

    from pipeline.embed import compile_cache as cc

    monkeypatch.setenv(cc.LOCAL_ENV, str(tmp_path / "node"))
    monkeypatch.setattr(cc, "_loaded", {})
    theirs, mine = ("k1", b"graph of another node"), ("k2", b"graph of this process")
    (tmp_path / "compile-k.bin").write_bytes(record(theirs, ("k1", b"another entry under the same key")))
    CacheArtifactManager._ensure_cache_artifacts_registered()
    with CacheArtifactManager.with_fresh_cache():
        CacheArtifactManager.record_artifact("inductor", *mine)
        assert cc.save("compile-k.bin", str(tmp_path)) > 0
    assert held(tmp_path / "compile-k.bin") == {("inductor", n) for n in (theirs, mine, ("k1", b"another entry under the same key"))}
    assert held(tmp_path / "node" / "compile-k.bin") == {("inductor", mine)}

    before = (tmp_path / "compile-k.bin").read_bytes()
    read_bytes = cc.storage.read_bytes

    def failing(error):  # reading the shared file raises pyarrow's S3 error text; the node's file reads
        def read(uri, endpoint_url=None):
            if uri.startswith(str(tmp_path / "compile-k.bin")):
                raise OSError(f"When reading information for key 'cc/compile-k.bin': AWS Error {error}")
            return read_bytes(uri, endpoint_url)
        return read

    monkeypatch.setattr(cc.storage, "read_bytes", failing("NETWORK_CONNECTION"))
    with CacheArtifactManager.with_fresh_cache():
        CacheArtifactManager.record_artifact("inductor", "k3", b"a later graph")
        assert cc.save("compile-k.bin", str(tmp_path)) > 0
    assert (tmp_path / "compile-k.bin").read_bytes() == before
    assert ("inductor", ("k3", b"a later graph")) in held(tmp_path / "node" / "compile-k.bin")

    # S3 without s3:ListBucket answers a missing key with access denied: that is written
    (tmp_path / "compile-k.bin").unlink()
    monkeypatch.setattr(cc.storage, "read_bytes", failing("ACCESS_DENIED during HeadObject"))
    with CacheArtifactManager.with_fresh_cache():
        CacheArtifactManager.record_artifact("inductor", "k4", b"the next graph")
        assert cc.save("compile-k.bin", str(tmp_path)) > 0
    assert held(tmp_path / "compile-k.bin") == {("inductor", ("k4", b"the next graph"))}


HEURISTIC = r"""
import json, sys, types
import sympy
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V
from pipeline.embed import compile_cache as cc, inductor_heuristics as ih

class Features:  # what the heuristic reads of a reduction kernel
    def __init__(self, n, hint):
        self.reduction_numel, self.hint = sympy.Integer(n), hint
    def get_reduction_hint(self):
        return self.hint

def decisions():
    with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):
        return [V.choices.should_use_persistent_reduction(Features(n, h), False)
                for n, h in ((1024, ReductionHint.INNER), (1280, ReductionHint.INNER),
                             (1536, ReductionHint.INNER), (4096, ReductionHint.INNER), (1280, ReductionHint.OUTER))]

key = lambda: cc.cache_key({"a": 1}, "bfloat16", "cpu", "sdpa", precompiled=True)
out = {"default": decisions(), "key_default": key()}
def in_new_thread():  # the actor compiles its blocks in the threads that call it
    import threading
    box = []
    def run():
        ih.apply_in_this_thread()  # what launch_embeddings does before every forward
        box.append(decisions())
    t = threading.Thread(target=run)
    t.start(); t.join()
    return box[0]

def inductor_keys():  # what Inductor's FX graph cache keys record of the choices, or that it is off
    from torch._inductor import config
    if "inductor_choices_class" in getattr(config, "_cache_config_factory_keys", ()):
        return str(config.save_config_portable().get("inductor_choices_class"))
    return f"fx_graph_cache={config.fx_graph_cache}"

from concurrent.futures import ThreadPoolExecutor
worker = ThreadPoolExecutor(1)  # one thread that lives through install and uninstall, as Ray's do

def in_worker():
    def run():
        ih.apply_in_this_thread()
        return decisions(), inductor_keys()
    return worker.submit(run).result()

out["inductor_default"] = inductor_keys()
out["worker_before"] = in_worker()
out["installed"] = ih.install_persistent_norms()
out.update(wider=decisions(), wider_thread=in_new_thread(), key_wider=key(), tag=ih.tag(),
           inductor_wider=inductor_keys(), worker_wider=in_worker())
ih.uninstall()
out.update(after=decisions(), after_thread=in_new_thread(), key_after=key(), inductor_after=inductor_keys(),
           worker_after=in_worker())
print(json.dumps(out))
"""


def test_persistent_norms_widen_only_inner_reductions_and_key_the_cache_apart():
    """Persistent norms (on by default; VDR_PERSISTENT_NORMS=0 turns them off): rows of 1,280 and 1,536 values (the vision
    LayerNorms, the text RMSNorms) become persistent reductions, 4,096 and outer ones do not;
    in every thread, not only the one that installed it (the actor compiles in its callers'
    threads); compiled artefacts get another cache key, ours and Inductor's FX graph cache's;
    uninstalling restores Inductor's choices."""
    proc = subprocess.run([sys.executable, "-c", HEURISTIC], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default"] == [True, False, False, False, False]
    assert out["installed"] and out["wider"] == [True, True, True, False, False]
    assert out["wider_thread"] == out["wider"], "a thread started after install must compile wider too"
    assert out["tag"] and out["key_wider"] != out["key_default"]
    # Inductor's own FX graph cache must not hand default kernels to the experiment or back
    assert out["inductor_wider"] != out["inductor_default"]
    assert out["after"] == out["default"] and out["after_thread"] == out["default"]
    assert out["key_after"] == out["key_default"] and out["inductor_after"] == out["inductor_default"]
    # a thread that compiled wide goes back to Inductor's choices and cache key after uninstalling
    assert out["worker_before"] == [out["default"], out["inductor_default"]]
    assert out["worker_wider"] == [out["wider"], out["inductor_wider"]]
    assert out["worker_after"] == [out["default"], out["inductor_default"]]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("on", True), ("0", False), ("false", False),
                                       ("OFF", False), ("no", False)])
def test_persistent_norms_are_on_unless_turned_off(monkeypatch, value, on):
    from pipeline.embed import inductor_heuristics as ih

    if value is None:
        monkeypatch.delenv(ih.PERSISTENT_NORMS_ENV, raising=False)
    else:
        monkeypatch.setenv(ih.PERSISTENT_NORMS_ENV, value)
    assert ih.persistent_norms_requested() is on


def test_a_persistent_norms_value_of_another_spelling_is_refused(monkeypatch):
    from pipeline.embed import inductor_heuristics as ih

    monkeypatch.setenv(ih.PERSISTENT_NORMS_ENV, "maybe")
    with pytest.raises(ValueError, match="VDR_PERSISTENT_NORMS='maybe': use 1 or 0"):
        ih.persistent_norms_requested()
    # the other switches read the same way (pipeline.config.env_flag): misspelt, refused
    from pipeline.config import env_flag

    monkeypatch.setenv("VDR_LINEAR_PATCH_EMBED", "of")
    with pytest.raises(ValueError, match="VDR_LINEAR_PATCH_EMBED='of'"):
        env_flag("VDR_LINEAR_PATCH_EMBED", True)
    monkeypatch.setenv("VDR_PRECOMPILE", "")
    assert env_flag("VDR_PRECOMPILE", True) is True
    # and before the model's weights are fetched or loaded (this path does not exist)
    from pipeline.embed import model as M

    with pytest.raises(ValueError, match="VDR_LINEAR_PATCH_EMBED='of'"):
        M.load_model("/nonexistent/model", device="cpu", compile_model=True)


def test_a_mistyped_attention_split_is_refused_at_import():
    proc = subprocess.run([sys.executable, "-c", "import pipeline.embed.model"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, VDR_IMAGE_ATTENTION_SPLIT="pow-2"), timeout=120)
    assert proc.returncode != 0 and "VDR_IMAGE_ATTENTION_SPLIT='pow-2'" in proc.stderr


def test_the_shared_cache_on_s3_is_created_then_added_to(s3, tmp_path, monkeypatch):
    """--compile-cache s3://... (moto's server): the first save creates the object (a missing key
    is not a read error), a later process's save adds its artefacts to it, and a load reads them all."""
    from torch.compiler._cache import CacheArtifactManager

    from pipeline.embed import compile_cache as cc

    shared = f"s3://{s3.make_bucket()}/vdr-compile-cache/"
    monkeypatch.setenv(cc.LOCAL_ENV, str(tmp_path / "node"))
    monkeypatch.setattr(cc, "_loaded", {})
    CacheArtifactManager._ensure_cache_artifacts_registered()
    for artefact in (("k1", b"first node's graph"), ("k2", b"second node's graph")):
        with CacheArtifactManager.with_fresh_cache():
            CacheArtifactManager.record_artifact("inductor", *artefact)
            assert cc.save("compile-k.bin", shared, s3.endpoint_url) > 0
    data = cc.storage.read_bytes(shared + "compile-k.bin", s3.endpoint_url)
    (tmp_path / "read.bin").write_bytes(data)
    assert held(tmp_path / "read.bin") == {("inductor", ("k1", b"first node's graph")),
                                            ("inductor", ("k2", b"second node's graph"))}
