"""The compile helpers (pipeline.embed.compile_helper; on by default on a GPU, VDR_COMPILE_HELPER=1
here on the CPU): on a node with no precompiled blocks, helper processes (one for both block types by
default; one per block type with VDR_COMPILE_HELPER_PROCESSES=2) compile the block types on a one-block random-weights model,
for the actor's first batch's page shapes, while the actor loads its weights and runs its first
batches eagerly; the actor loads each helper's blocks as they come, and the last helper saves them
all for the node's next actor, also when the actor has gone first. A helper that fails or times out
means compiling its blocks here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One actor process: "cold" sends a batch right after construction (the helper waits for it),
# waits for the helper process to exit, sends the same batch again; "short" sends one batch and
# ends (a job shorter than the helper); "warm" (a node cache a helper filled) sends it once.
# Everything the tests look at comes back as one JSON line.
ACTOR = r"""
import json, os, sys, time
import numpy as np
import pyarrow as pa
from pipeline.embed import compile_cache as cc, counters
from pipeline.embed.stages import PageEmbedder, PIXELS, STREAM_SCHEMA

mode, model = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
shapes = [(224, 168), (168, 224)]  # two page sizes in one batch: the helper compiled one size only
images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
cols = {f.name: [None] * 2 for f in STREAM_SCHEMA}
cols.update(doc_id=["a.pdf", "b.pdf"], page_number=[1, 1], source_uri=["a.pdf", "b.pdf"], doc_pages=[1, 1],
            height=[s[0] for s in shapes], width=[s[1] for s in shapes])
cols[PIXELS] = [im.tobytes() for im in images]
batch = pa.table(cols, schema=STREAM_SCHEMA)

emb = PageEmbedder(model, device="cpu", compile_model=True)
h = emb.helper
res = {"key": cc.precompiled_key(emb.compile_cache[0]), "precompiled_from": emb.precompiled_from,
       "helper_state_at_init": h.state, "helper_exited_at_init": all(p.poll() is not None for p in h.procs),
       "helpers": len(h.procs), "deferred_at_init": [pf.defer is not None and pf.defer() for pf in emb.lm.precompiled],
       "helper_dir": h.dir, "batches": []}

def one_batch():
    out = emb(batch)
    res["batches"].append({
        "state": emb.compile_state(), "column_state": out.column(counters.COMPILE)[0].as_py(),
        "helper": h.summary(emb.lm.precompiled), "helper_state": h.state,
        "pf": {pf.name: {"loaded": pf.loaded, "compiled": pf.compiled, "eager_calls": pf.eager_calls,
                         "variants": len(pf.variants), "fallback": pf.fallback_reason} for pf in emb.lm.precompiled},
        "embedding": [np.asarray(v, np.float32).tolist() for v in out.column("embedding").to_pylist()]})
    return out

outs = [one_batch()]
if mode == "cold":
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in h.procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    res["helper_exit"] = [p.poll() for p in h.procs]
    outs.append(one_batch())
    table = pa.concat_tables(outs)
    res["records"] = counters.actor_records(table, pa.array([True] * table.num_rows))
res["helper_dir_exists"] = os.path.exists(h.dir)
res["cache_files"] = sorted(os.listdir(cc.local_dir())) if os.path.isdir(cc.local_dir()) else []
print(json.dumps(res))
"""


def _run_actor(mode, model, base, processes="2"):
    env = {k: v for k, v in os.environ.items()
           if k not in ("VDR_COMPILE_HELPER_TIMEOUT_S", "VDR_PRECOMPILE", "VDR_COMPILE_CACHE")}
    env["VDR_COMPILE_HELPER_PROCESSES"] = processes
    base.mkdir(exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    env.update(PYTHONPATH=ROOT, VDR_COMPILE_HELPER="1", VDR_COMPILE_CACHE=str(base / "node-cache"),
               TORCHINDUCTOR_CACHE_DIR=str(base / "inductor"), TMPDIR=str(base / "tmp"))
    proc = subprocess.run([sys.executable, "-c", ACTOR, mode, model], check=False, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def actors(tiny_model, tmp_path_factory):
    """A cold actor on a new node (its one helper compiles both block types: the default); on
    another node a short job's actor (its two helpers, VDR_COMPILE_HELPER_PROCESSES=2, finish after
    it) and a second actor."""
    base = tmp_path_factory.mktemp("compile-helper")
    cold, cold_err = _run_actor("cold", tiny_model, base / "a", processes="1")
    # another node: an actor whose job ends after one batch, before its helper has compiled (a plain
    # process: under Ray the worker's child processes end with it)
    short, _ = _run_actor("short", tiny_model, base / "b")
    node_b = base / "b" / "node-cache"
    deadline = time.monotonic() + 300
    while short["key"] not in (os.listdir(node_b) if node_b.is_dir() else []) and time.monotonic() < deadline:
        time.sleep(0.2)
    while os.path.exists(short["helper_dir"]) and time.monotonic() < deadline:  # it cleans up after itself
        time.sleep(0.2)
    short["helper_dir_exists_after"] = os.path.exists(short["helper_dir"])
    warm, warm_err = _run_actor("warm", tiny_model, base / "b")
    return {"cold": cold, "cold_err": cold_err, "short": short, "warm": warm, "warm_err": warm_err, "base": base}


def test_a_cold_actor_runs_eagerly_until_its_helper_has_compiled_then_loads_its_blocks(actors):
    cold = actors["cold"]
    assert cold["precompiled_from"] is None and cold["helper_state_at_init"] == "running"
    assert not cold["helper_exited_at_init"] and cold["helpers"] == 1
    assert cold["deferred_at_init"] == [True, True]
    first, second = cold["batches"]
    # first batch: sent while the helper runs; each block type ran eagerly, nothing compiled here
    assert first["helper_state"] == "running"
    assert set(first["pf"]) == {"vision_block", "text_layer"}
    for name, pf in first["pf"].items():
        assert pf["eager_calls"] > 0 and pf["variants"] == 0 and pf["compiled"] == 0 and pf["loaded"] == 0, name
        assert pf["fallback"] is None, name
    assert first["state"]["variants_compiled"] == 0 and first["state"]["variants_loaded"] == 0
    assert first["state"]["provisional"] is True
    assert first["state"]["compile_helper"]["state"] == "running"
    assert first["state"]["compile_helper"]["eager_batches"] == 1
    assert json.loads(first["column_state"]) == {**first["state"], "compile_s": json.loads(
        first["column_state"])["compile_s"]}
    assert "compile helper running" in actors["cold_err"]  # the actor's first-batch line
    # the helper exited by itself (its blocks written), and the next batch loaded them
    assert cold["helper_exit"] == [0]
    assert second["helper_state"] == "loaded"
    for name, pf in second["pf"].items():
        assert pf["loaded"] >= 1 and pf["compiled"] == 0, (name, pf)
        assert pf["eager_calls"] == first["pf"][name]["eager_calls"], name  # not one eager call more
    helper = second["state"]["compile_helper"]
    assert helper["state"] == "loaded" and helper["variants"] >= 2 and helper["ready_s"] > 0
    assert helper["eager_batches"] == 1
    # one helper for both block types: one part, no per-part list
    assert "parts" not in helper
    assert second["state"]["variants_loaded"] >= 2 and second["state"]["variants_compiled"] == 0
    assert second["state"]["precompiled_from"] is None  # not from a cache: from the helper
    assert "provisional" not in second["state"]
    assert "provisional" not in json.loads(second["column_state"])
    # the job's record of the actor keeps the final state, not the first batch's provisional one
    (record,) = cold["records"]
    assert record["pages"] == 4 and record["compile"] == second["column_state"]
    # eager (first batch) and compiled (second) float32 math, stored as float16: close
    assert len(first["embedding"]) == len(second["embedding"]) == 2
    for a, b in zip(first["embedding"], second["embedding"]):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.shape[0] > 0
        assert np.abs(a - b).max() < 1e-3
    # saved under the real model's key for the next actor on this node (by the helper: both block
    # types together; the actor saved none: it compiled none); the folder gone
    assert cold["key"].startswith("precompiled-") and cold["key"] in cold["cache_files"]
    from pipeline.embed import precompile

    with open(actors["base"] / "a" / "node-cache" / cold["key"], "rb") as f:
        assert precompile.names(f.read()) == {"vision_block", "text_layer"}
    assert not cold["helper_dir_exists"]


def test_the_final_line_tells_of_the_helper(actors):
    from pipeline.embed.flow import first_batches

    state = actors["cold"]["batches"][1]["state"]
    loaded = state["compile_helper"]["loaded_s"]
    assert loaded >= state["compile_helper"]["ready_s"] > 0
    assert first_batches([{"first_batch_s": 0.4, "model_load_s": 2.0, "compile": state}]) == \
        f", first batch 0.4 s (blocks from a compile helper, loaded {loaded:.1f} s after the actor started, " \
        "1 batch run eagerly before)"


def test_a_job_shorter_than_the_helper_still_leaves_the_node_warm(actors):
    short = actors["short"]
    (batch,) = short["batches"]
    assert batch["helper_state"] == "running" and batch["state"]["provisional"] is True
    assert all(pf["eager_calls"] > 0 and pf["compiled"] == 0 for pf in batch["pf"].values()), batch["pf"]
    # the actor had gone; its helper compiled, saved the blocks in the node's cache, removed its folder
    # (the last of its two helpers saved both parts: the second actor below loads both, compiles none)
    assert short["key"] in os.listdir(actors["base"] / "b" / "node-cache") and short["helpers"] == 2
    assert not short["helper_dir_exists_after"]


def test_a_second_actor_on_the_node_loads_the_blocks_and_stops_its_helper(actors):
    cold, warm = actors["cold"], actors["warm"]
    assert warm["key"] == cold["key"] == actors["short"]["key"]
    assert warm["precompiled_from"] == os.path.join(str(actors["base"] / "b" / "node-cache"), cold["key"])
    assert warm["helper_state_at_init"].startswith("stopped"), warm["helper_state_at_init"]
    assert warm["helper_exited_at_init"]  # killed, not left compiling
    assert warm["deferred_at_init"] == [False, False]
    assert not warm["helper_dir_exists"]
    (batch,) = warm["batches"]
    for name, pf in batch["pf"].items():
        assert pf["loaded"] >= 1 and pf["compiled"] == 0 and pf["eager_calls"] == 0, (name, pf)
    assert batch["state"]["compile_helper"]["state"].startswith("stopped")
    assert batch["state"]["compile_helper"]["eager_batches"] == 0
    assert "provisional" not in batch["state"]
    # the same compiled code as the first node's actor's second batch (its helper compiled for the
    # same pages): the same embeddings
    for a, b in zip(cold["batches"][1]["embedding"], batch["embedding"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from pipeline.embed.flow import first_batches

    assert first_batches([{"first_batch_s": 0.2, "model_load_s": 2.0, "compile": batch["state"]}]) == \
        ", first batch 0.2 s (precompiled blocks loaded)"


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (224, 168, 3), dtype=np.uint8) for _ in range(2)]


def test_blocks_run_eagerly_while_deferred_and_compile_once_not(tiny_model):
    """PrecompiledForward.defer: while it says True, a call that no compiled variant accepts runs
    the block eagerly (the plain module's output); else it compiles; a variant that accepts the
    call runs whatever defer says."""
    import torch._dynamo

    from pipeline.embed import model as M

    torch._dynamo.reset()
    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    images = _images()
    reference = M.embed_pages(M.load_model(tiny_model, device="cpu"), images)
    asked = []

    def defer_now():
        asked.append(1)
        return True

    for pf in lm.precompiled:
        pf.defer = defer_now
    for a, b in zip(M.embed_pages(lm, images), reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    blocks = {pf.name: pf.eager_calls for pf in lm.precompiled}
    assert set(blocks) == {"vision_block", "text_layer"} and all(n >= 1 for n in blocks.values()), blocks
    assert [(pf.compiled, pf.variants, pf.fallback) for pf in lm.precompiled] == [(0, [], None)] * 2
    assert len(asked) == sum(blocks.values())
    for pf in lm.precompiled:
        pf.defer = lambda: False
    for a, b in zip(M.embed_pages(lm, images), reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert [(pf.compiled, len(pf.variants), pf.fallback) for pf in lm.precompiled] == [(1, 1, None)] * 2
    assert {pf.name: pf.eager_calls for pf in lm.precompiled} == blocks
    # deferring again: the compiled variants accept these calls, so they run (defer not asked)
    asked.clear()
    for pf in lm.precompiled:
        pf.defer = defer_now
    M.embed_pages(lm, images)
    assert asked == [] and {pf.name: pf.eager_calls for pf in lm.precompiled} == blocks
    assert [pf.compiled for pf in lm.precompiled] == [1, 1]
    torch._dynamo.reset()


FAIL = [sys.executable, "-c", "import sys; print('starting'); print('boom'); sys.exit(3)"]


@pytest.fixture
def new_helper(tiny_model):
    """new_helper(command) -> a CompileHelper running ``command``; each is stopped (killed, its
    folder removed) after the test, whatever the test asserted."""
    from pipeline.embed.compile_helper import CompileHelper

    made = []

    def make(command, parts=2):
        made.append(CompileHelper(tiny_model, "cpu", command=command, parts=parts))
        return made[-1]

    yield make
    for helper in made:
        helper.stop()


def test_a_failed_helper_means_compiling_here(tiny_model, new_helper, monkeypatch):
    import torch._dynamo

    from pipeline.embed import model as M

    monkeypatch.delenv("VDR_COMPILE_HELPER_TIMEOUT_S", raising=False)
    torch._dynamo.reset()
    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    helper = new_helper(FAIL)
    for i, pf in enumerate(lm.precompiled):
        pf.defer = helper.defer_hook(i)
    assert helper.pending() and [pf.defer() for pf in lm.precompiled] == [True, True]
    for proc in helper.procs:
        proc.wait(timeout=60)
    assert helper.collect(lm.precompiled) == 0
    assert helper.state.startswith("failed (exit 3)") and "boom" in helper.state, helper.state
    assert not helper.pending() and helper.variants == 0 and helper.ready_s is None
    assert helper.collect(lm.precompiled) is None  # decided once
    images = _images(1)
    reference = M.embed_pages(M.load_model(tiny_model, device="cpu"), images)
    for a, b in zip(M.embed_pages(lm, images), reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert all(pf.compiled >= 1 and pf.eager_calls == 0 and pf.loaded == 0 for pf in lm.precompiled), \
        [(pf.name, pf.compiled, pf.eager_calls) for pf in lm.precompiled]
    summary = helper.summary(lm.precompiled)
    assert summary["state"] == helper.state and summary["eager_calls"] == {"vision_block": 0, "text_layer": 0}
    helper.stop()
    assert helper.state.startswith("failed (exit 3)") and not os.path.exists(helper.dir)
    torch._dynamo.reset()


def test_a_helper_whose_blocks_do_not_load_or_that_writes_none_failed(new_helper, monkeypatch):
    from pipeline.embed import compile_helper

    monkeypatch.delenv("VDR_COMPILE_HELPER_TIMEOUT_S", raising=False)
    quiet = [sys.executable, "-c", "pass"]
    none = new_helper(quiet, parts=1)
    none.procs[0].wait(timeout=60)
    assert none.collect([]) == 0 and none.state == "failed (exit 0): no output" and not none.pending()
    none.stop()
    junk = new_helper(quiet, parts=1)
    junk.procs[0].wait(timeout=60)
    with open(os.path.join(junk.dir, compile_helper.result_name(0)), "wb") as f:
        f.write(b"not precompiled blocks")
    assert junk.collect([]) == 0 and junk.state.startswith("failed: its blocks could not be loaded"), junk.state
    assert not junk.pending()
    junk.stop()
    assert not os.path.exists(junk.dir)


def test_one_helper_loaded_and_the_other_failed_means_compiling_only_its_blocks_here(tiny_model, new_helper,
                                                                                     monkeypatch):
    """Two helpers: the first writes its blocks, the second ends without any. The first's block
    type then runs its loaded variant; the second's is no longer deferred (compiled here)."""
    import torch._dynamo

    from pipeline.embed import compile_helper, precompile
    from pipeline.embed import model as M

    monkeypatch.delenv("VDR_COMPILE_HELPER_TIMEOUT_S", raising=False)
    torch._dynamo.reset()
    # the first block type's compiled variant, as helper 0 would write it
    donor = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    images = _images(2)
    M.embed_pages(donor, images)
    blob = precompile.dumps(donor.precompiled[:1])
    torch._dynamo.reset()
    lm = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    helper = new_helper([sys.executable, "-c", "print('nothing to write')"])
    for i, pf in enumerate(lm.precompiled):
        pf.defer = helper.defer_hook(i)
    for proc in helper.procs:
        proc.wait(timeout=60)
    with open(os.path.join(helper.dir, compile_helper.result_name(0)), "wb") as f:
        f.write(blob)
    assert helper.collect(lm.precompiled) == 1
    assert helper.part_states[0] == "loaded" and helper.part_states[1].startswith("failed (exit 0)")
    assert helper.state == "partly failed: failed (exit 0): nothing to write", helper.state
    assert [pf.defer() for pf in lm.precompiled] == [False, False] and not helper.pending()
    summary = helper.summary(lm.precompiled)
    assert [p["blocks"] for p in summary["parts"]] == [[lm.precompiled[0].name], []]
    assert summary["variants"] == 1 and summary["ready_s"] is not None and not os.path.exists(helper.dir)
    M.embed_pages(lm, images)
    assert [(pf.loaded, pf.compiled, pf.eager_calls) for pf in lm.precompiled] == [(1, 0, 0), (0, 1, 0)]
    from pipeline.embed.flow import first_batches

    state = {"mode": "precompiled", "variants_loaded": 1, "variants_compiled": 1,
             "compile_helper": summary}
    assert first_batches([{"first_batch_s": 1.0, "model_load_s": 2.0, "compile": state}]) == (
        ", first batch 1.0 s (precompiled blocks compiled here, some loaded (compile helper partly failed: "
        "failed (exit 0): nothing to write))")
    torch._dynamo.reset()


def _batch(images):
    import pyarrow as pa

    from pipeline.embed.stages import PIXELS, STREAM_SCHEMA

    n = len(images)
    cols = {f.name: [None] * n for f in STREAM_SCHEMA}
    cols.update(doc_id=[f"{i}.pdf" for i in range(n)], page_number=[1] * n, source_uri=[f"{i}.pdf" for i in range(n)],
                doc_pages=[1] * n, height=[im.shape[0] for im in images], width=[im.shape[1] for im in images])
    cols[PIXELS] = [im.tobytes() for im in images]
    return pa.table(cols, schema=STREAM_SCHEMA)


def test_blocks_left_to_the_actor_by_a_failed_helper_are_saved_with_the_other_helpers(tiny_model, tmp_path,
                                                                                        monkeypatch):
    """Helper 0 (the vision block) fails, helper 1 (the text layer) writes its blocks a batch later.
    The actor compiles the vision block and saves it; once it loads the text layer's blocks it saves
    both (no helper does: none found every part written), so the node's next actor compiles none."""
    import torch._dynamo

    from pipeline.embed import compile_cache as cc
    from pipeline.embed import compile_helper, precompile
    from pipeline.embed import model as M
    from pipeline.embed.stages import PageEmbedder

    monkeypatch.setenv("VDR_COMPILE_CACHE", str(tmp_path / "node-cache"))
    monkeypatch.setenv("VDR_COMPILE_HELPER", "0")
    monkeypatch.delenv("VDR_COMPILE_HELPER_TIMEOUT_S", raising=False)
    images = _images(3)
    torch._dynamo.reset()
    donor = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager")
    M.embed_pages(donor, images)
    text_blob = precompile.dumps([pf for pf in donor.precompiled if pf.name == "text_layer"])
    torch._dynamo.reset()
    emb = PageEmbedder(tiny_model, device="cpu", compile_model=True)
    assert emb.helper is None and emb.precompiled_from is None
    helper = emb.helper = compile_helper.CompileHelper(tiny_model, "cpu", parts=2, command=[
        sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for i, pf in enumerate(emb.lm.precompiled):
            pf.defer = helper.defer_hook(i)
        helper.procs[0].kill()
        helper.procs[0].wait(timeout=30)
        emb(_batch(images))
        assert helper.part_states[0].startswith("failed") and helper.part_states[1] == "running"
        pfs = {pf.name: pf for pf in emb.lm.precompiled}
        assert (pfs["vision_block"].compiled, pfs["text_layer"].compiled) == (1, 0)
        assert pfs["text_layer"].eager_calls > 0
        key = cc.precompiled_key(emb.compile_cache[0])
        with open(tmp_path / "node-cache" / key, "rb") as f:
            assert precompile.names(f.read()) == {"vision_block"}  # what it had, saved
        with open(os.path.join(helper.dir, compile_helper.result_name(1)), "wb") as f:
            f.write(text_blob)
        emb(_batch(images))
        assert helper.state.startswith("partly failed: failed"), helper.state
        assert pfs["text_layer"].loaded == 1 and pfs["text_layer"].compiled == 0
        with open(tmp_path / "node-cache" / key, "rb") as f:
            assert precompile.names(f.read()) == {"vision_block", "text_layer"}  # saved again, whole
    finally:
        helper.stop()
    torch._dynamo.reset()
    nxt = M.load_model(tiny_model, device="cpu", compile_model=True)
    assert cc.load_precompiled(emb.compile_cache[0], nxt.precompiled) is not None
    M.embed_pages(nxt, images)
    assert [(pf.loaded, pf.compiled) for pf in nxt.precompiled] == [(1, 0), (1, 0)]
    torch._dynamo.reset()


def test_a_helper_out_of_time_leaves_the_other_helpers_blocks(tmp_path):
    folder = tmp_path / "helpers"
    folder.mkdir()
    (folder / "precompiled.0.bin").write_bytes(b"the other helper's blocks, not yet loaded")
    code = ("import os, threading, time; from pipeline.embed.compile_helper import _watch_parent; "
            f"_watch_parent(os.getppid(), threading.Event(), {str(folder)!r}, time.monotonic() - 1)")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5 and "out of time" in proc.stdout
    assert (folder / "precompiled.0.bin").exists()


def test_a_helper_past_its_time_is_killed(new_helper, monkeypatch):
    monkeypatch.setenv("VDR_COMPILE_HELPER_TIMEOUT_S", "1")
    helper = new_helper([sys.executable, "-c", "import time; time.sleep(120)"])
    assert helper.timeout_s == 1.0
    assert helper.collect([]) is None and helper.pending()  # still within its time
    time.sleep(1.3)
    t = time.monotonic()
    assert helper.collect([]) == 0
    assert time.monotonic() - t < 10
    assert helper.state.startswith("timed out"), helper.state
    assert all(p.poll() is not None and p.returncode != 0 for p in helper.procs)  # killed, both
    assert not helper.pending() and not os.path.exists(helper.dir)
    assert helper.collect([]) is None


def test_who_starts_a_helper(monkeypatch):
    from pipeline.embed.compile_helper import ENV, PROCESSES_ENV, TIMEOUT_ENV, processes, timeout_s, wanted

    monkeypatch.delenv("VDR_PRECOMPILE", raising=False)
    monkeypatch.delenv(ENV, raising=False)
    # by default on a GPU (its blocks ran as fast as the actor's own on an H200), not on a CPU
    # (the helpers would take the cores the actor's batches need)
    assert wanted("cpu", True, None) is False and wanted("cpu", True, True) is False
    assert wanted("cuda", True, None) is True and wanted("cuda:0", True, True) is True
    assert wanted("cuda", False, None) is False and wanted("cuda", True, False) is False
    monkeypatch.setenv(ENV, "1")
    assert wanted("cuda", True, None) is True and wanted("cuda:0", True, True) is True
    assert wanted("cpu", True, None) is True and wanted("cpu", True, True) is True
    # nothing to compile ahead of time: no helper
    assert wanted("cpu", False, None) is False and wanted("cuda", False, None) is False
    assert wanted("cpu", True, False) is False and wanted("cuda", True, False) is False
    monkeypatch.setenv("VDR_PRECOMPILE", "0")
    assert wanted("cuda", True, None) is False and wanted("cpu", True, None) is False
    assert wanted("cuda", True, True) is True  # precompiled asked for outright
    monkeypatch.delenv("VDR_PRECOMPILE")
    monkeypatch.setenv(ENV, "0")
    assert wanted("cuda", True, None) is False and wanted("cuda:0", True, True) is False
    monkeypatch.setenv(ENV, "ON ")
    assert wanted("cuda", True, None) is True
    monkeypatch.setenv(ENV, "auto")
    with pytest.raises(ValueError, match="VDR_COMPILE_HELPER='auto'"):
        wanted("cuda", True, None)
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match="VDR_COMPILE_HELPER"):
        wanted("cpu", False, None)  # refused whatever the rest says
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_s() == 180.0
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_s() == 2.5
    for bad in ("abc", "0", "-3", ""):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            timeout_s()
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert processes() == 1  # one helper for both block types
    monkeypatch.setenv(PROCESSES_ENV, " 2 ")
    assert processes() == 2
    for bad in ("3", "0", "two"):
        monkeypatch.setenv(PROCESSES_ENV, bad)
        with pytest.raises(ValueError, match=PROCESSES_ENV):
            processes()


def test_folders_of_helpers_killed_with_their_actor_are_swept(tmp_path, monkeypatch):
    import tempfile

    from pipeline.embed import compile_helper

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old, new, other = (tmp_path / "vdr-compile-helper-old"), (tmp_path / "vdr-compile-helper-new"), tmp_path / "x"
    for d in (old, new, other):
        d.mkdir()
        (d / "batch.json").write_text("{}")
    an_hour_ago = time.time() - 3600
    for d in (old, other):
        os.utime(d, (an_hour_ago, an_hour_ago))
    compile_helper._sweep_stale(360)
    assert not old.exists() and new.exists() and other.exists()


def test_no_helper_on_a_gpu_without_room_for_it():
    from pipeline.embed.compile_helper import MIN_FREE_BYTES, room_for_helper

    assert room_for_helper(None)  # unknown (no NVML, MIG): as asked
    assert room_for_helper(MIN_FREE_BYTES) and room_for_helper(80 << 30)
    assert not room_for_helper(MIN_FREE_BYTES - 1) and not room_for_helper(4 << 30)
    from pipeline.embed.compile_helper import EXTRA_HELPER_BYTES, helpers_with_room

    assert helpers_with_room(None, 2) == 2 and helpers_with_room(80 << 30, 2) == 2
    assert helpers_with_room(MIN_FREE_BYTES + EXTRA_HELPER_BYTES, 2) == 2
    assert helpers_with_room(MIN_FREE_BYTES + EXTRA_HELPER_BYTES - 1, 2) == 1  # room for one only
    assert helpers_with_room(MIN_FREE_BYTES, 1) == 1 and helpers_with_room(MIN_FREE_BYTES - 1, 2) == 0


def test_a_provisional_compile_state_gives_way_to_the_final_one():
    from pipeline.embed.counters import final_state, merge_records

    provisional = json.dumps({"mode": "precompiled", "variants_compiled": 0,
                              "compile_helper": {"state": "running"}, "provisional": True})
    final = json.dumps({"mode": "precompiled", "variants_loaded": 2, "compile_helper": {"state": "loaded"}})
    other = json.dumps({"mode": "precompiled", "variants_compiled": 2})
    assert final_state(provisional, final) == final and final_state(final, provisional) == final
    assert final_state(None, provisional) == provisional and final_state(provisional, None) == provisional
    assert final_state(final, other) == final  # the first final one
    assert final_state(provisional, provisional.replace("running", "x")) == provisional
    records = [{"actor": "n:1", "pages": 2, "busy_s": 1.0, "first_batch_at": 1.0, "last_batch_end_at": 2.0,
                "model_load_s": 3.0, "first_batch": [1.0, 1.0, 2.0], "compile": state}
               for state in (provisional, final)]
    assert merge_records({}, records)["n:1"]["compile"] == final
    assert merge_records({}, records[::-1])["n:1"]["compile"] == final


def test_the_final_line_for_a_helper_that_loaded_or_failed():
    from pipeline.embed.flow import first_batches

    def line(c):
        return first_batches([{"first_batch_s": 2.0, "model_load_s": 3.0, "compile": c}])

    loaded = {"mode": "precompiled", "precompiled_from": None, "variants_loaded": 2, "variants_compiled": 0,
              "compile_helper": {"state": "loaded", "ready_s": 18.74, "loaded_s": 19.32, "variants": 2,
                                 "eager_batches": 3}}
    assert line(loaded) == (", first batch 2.0 s (blocks from a compile helper, loaded 19.3 s after the actor "
                            "started, 3 batches run eagerly before)")
    none_eager = {**loaded, "compile_helper": {**loaded["compile_helper"], "eager_batches": 0}}
    assert line(none_eager) == ", first batch 2.0 s (blocks from a compile helper, loaded 19.3 s after the actor started)"
    failed = {"mode": "precompiled", "precompiled_from": None, "variants_loaded": 0, "variants_compiled": 2,
              "compile_helper": {"state": "failed (exit 3): boom", "ready_s": None, "eager_batches": 1}}
    assert line(failed) == \
        ", first batch 2.0 s (precompiled blocks compiled here (compile helper failed (exit 3): boom))"
    timed_out = {**failed, "compile_helper": {"state": "timed out after 600 s"}}
    assert line(timed_out) == \
        ", first batch 2.0 s (precompiled blocks compiled here (compile helper timed out after 600 s))"
    # the job ended with one helper's blocks loaded, the other's helper still compiling
    halfway = {**loaded, "variants_loaded": 1, "compile_helper": {"state": "running", "eager_batches": 5}}
    assert line(halfway) == (", first batch 2.0 s (some blocks from a compile helper, the others run eagerly: "
                             "their helper had not finished)")
    # loaded, yet some variants compiled here (calls the helper's blocks did not fit)
    partly = {**loaded, "variants_compiled": 1}
    assert line(partly) == ", first batch 2.0 s (precompiled blocks compiled here, some loaded)"


def test_a_submitted_job_with_the_helper_keeps_every_document(ray_cluster, submit_job, tiny_model, sample_corpus,
                                                                tmp_path):
    """As users turn it on: `ray job submit` with VDR_COMPILE_HELPER=1 in the runtime env, on a
    node with no compiled blocks. The actor starts its helper inside Ray (its worker's code and
    environment), the job ends with every document as page rows or error rows, and the summary
    says where the helper stood (a job this short usually ends before it has compiled: Ray then
    ends it with the actor)."""
    import shutil

    import pyarrow.parquet as pq

    for cache in (ray_cluster["compile_cache"], ray_cluster["inductor_cache"]):
        shutil.rmtree(cache, ignore_errors=True)  # a new node
    out = tmp_path / "submitted"
    proc = submit_job(["jobs.embed_corpus", "--input", sample_corpus, "--output", str(out), "--model", tiny_model,
                       "--max-visual-tokens", "64", "--batch-size", "4", "--compile", "on"],
                      env_vars={"VDR_COMPILE_HELPER": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    run = summary["this_run"]
    (actor,) = run["actors"]
    helper = actor["compile"]["compile_helper"]
    assert helper["state"] in ("running", "loaded"), helper  # started in the Ray actor, not failed
    assert helper["eager_batches"] >= 1
    pages = pq.read_table(out / "pages")
    assert pages.num_rows == run["pages"] > 0 and all(n > 0 for n in pages.column("n_vectors").to_pylist())
    docs = {os.path.basename(d) for d in pages.column("doc_id").to_pylist()}
    errors = pq.read_table(out / "errors") if (out / "errors").exists() else None
    if errors is not None:
        docs |= {os.path.basename(d) for d in errors.column("doc_id").to_pylist()}
    files = {name for _, _, names in os.walk(sample_corpus) for name in names}
    assert docs == files, (docs, files)
    assert "compile helper" in proc.stdout + proc.stderr
