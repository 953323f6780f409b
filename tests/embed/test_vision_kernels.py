"""--vision-attention: which kernel computes the vision attention, and the switch from SDPA to
FlashAttention 4 once an actor has loaded it (pipeline.embed.vision_kernels). FA4 itself needs a
Hopper GPU (measured in benchmarks/RESULTS.md); here the switch runs a CPU kernel of the same
contract through the same seam, in the real tiny model."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest

from pipeline.embed import model as M, vision_kernels as V


def _loop_attention(calls):
    """vdr::image_attention's contract, per image in float64: (patches, heads, dim) -> (patches, heads*dim)."""
    import torch
    import torch.nn.functional as F

    def attend(q, k, v, lengths, cu_seqlens, scale):
        calls.append(q.shape[0])
        out, start = [], 0
        for n in M._image_lengths(lengths, cu_seqlens, q.shape[0]):
            qs, ks, vs = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
            out.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1).reshape(n, -1))
            start += n
        return torch.cat(out).to(q.dtype)
    return attend


@pytest.fixture(autouse=True)
def no_switches(monkeypatch):
    """The tests set the environment switches they mean; a developer's own exports do not leak in."""
    monkeypatch.delenv("VDR_VISION_ATTENTION", raising=False)


@pytest.fixture
def clean_active():
    V.ACTIVE["attend"] = V.ACTIVE["runtime_error"] = None
    yield
    V.ACTIVE["attend"] = V.ACTIVE["runtime_error"] = None


def test_auto_runs_fa4_only_where_installed_on_hopper():
    assert V.decide("auto", "cuda:0", (9, 0), installed=True) == "fa4"
    assert V.decide("auto", "cuda:0", (9, 0), installed=False) == "sdpa"
    assert V.decide("auto", "cuda:0", (8, 0), installed=True) == "sdpa"  # not measured there
    assert V.decide("auto", "cpu", None, installed=True) == "sdpa"
    assert V.decide("sdpa", "cuda:0", (9, 0), installed=True) == "sdpa"
    assert V.decide("fa4", "cuda:0", (9, 0), installed=True) == "fa4"


@pytest.mark.parametrize("device,capability,installed,says", [
    ("cpu", None, True, "GPUs only"),
    ("cuda:0", (8, 0), True, "compute capability 9.x"),
    ("cuda:0", (9, 0), False, "pip install 'vdr-pipeline[fa4]'"),
])
def test_fa4_where_it_cannot_run_is_refused_with_what_to_change(device, capability, installed, says):
    with pytest.raises(ValueError, match="--vision-attention") as err:
        V.decide("fa4", device, capability, installed)
    assert says in str(err.value)
    with pytest.raises(ValueError, match="auto, sdpa, fa4"):
        V.decide("flash", "cuda:0", (9, 0), installed=True)


def test_the_loaded_kernel_computes_the_vision_attention_of_the_real_model(tiny_model, clean_active):
    """Once ``VisionAttention``'s load has returned a kernel, vdr::image_attention runs it: the
    pages equal SDPA's (same maths, float64 here), and a wrong kernel would change them."""
    lm = M.load_model(tiny_model, device="cpu")
    assert lm.image_attention_op
    images = [np.random.default_rng(s).integers(0, 255, (28 * h, 28 * 4, 3), dtype=np.uint8)
              for s, h in ((1, 6), (2, 4), (3, 6))]
    want = M.embed_pages(lm, images)
    calls: list = []
    va = V.VisionAttention("fa4", started=0.0, load=lambda: _loop_attention(calls))
    assert va.wait(10) and va.state == "fa4" and V.ACTIVE["attend"] is not None
    got = M.embed_pages(lm, images)
    assert calls  # the vision blocks called it
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a.astype(np.float64) - b).max() < 1e-4
    V.ACTIVE["attend"] = lambda *a: _loop_attention([])(*a) * 0
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(M.embed_pages(lm, images), want))


def test_batches_run_on_sdpa_until_the_load_ends_and_the_summary_says_when(clean_active):
    release = threading.Event()

    def load():
        release.wait(10)
        return _loop_attention([])

    va = V.VisionAttention("fa4", started=0.0, load=load)
    assert va.pending and V.ACTIVE["attend"] is None
    va.batch_begins()
    va.batch_begins()
    release.set()
    assert va.wait(10) and not va.pending
    va.batch_begins()  # after the load: not counted
    s = va.summary()
    assert s["requested"] == "fa4" and s["kernel"] == "fa4" and s["sdpa_batches_before"] == 2
    assert s["ready_at"] is not None and s["ready_after_s"] >= 0 and s["load_s"] >= 0 and "error" not in s


def test_a_failed_load_leaves_sdpa_and_says_why(clean_active, caplog):
    def load():
        raise ImportError("libcuda.so.1: cannot open shared object file")

    va = V.VisionAttention("fa4", started=0.0, load=load)
    assert va.wait(10)
    assert V.ACTIVE["attend"] is None
    s = va.summary()
    assert s["kernel"] == "failed" and "libcuda" in s["error"]
    assert "stays on SDPA" in caplog.text


def test_an_actor_on_cpu_runs_sdpa_and_reports_it(tiny_model, clean_active):
    from pipeline.embed.stages import PageEmbedder

    emb = PageEmbedder(tiny_model, device="cpu")
    assert emb.vision.summary() == {"requested": "auto", "kernel": "sdpa"}
    assert emb.compile_state()["vision_attention"] == {"requested": "auto", "kernel": "sdpa"}
    # before any load: a model that does not exist is never reached
    with pytest.raises(ValueError, match="GPUs only"):
        PageEmbedder("/nonexistent/model", device="cpu", vision_attention="fa4")
    with pytest.raises(ValueError, match="auto, sdpa, fa4"):
        PageEmbedder("/nonexistent/model", device="cpu", vision_attention="flash")


def _as_on_hopper_with_fa4(monkeypatch):
    """The decision's inputs as on an H100 with flash-attn-4 installed (this machine has neither)."""
    import pipeline.cluster

    monkeypatch.setattr(V, "_capability", lambda device: (9, 0) if device.startswith("cuda") else None)
    monkeypatch.setattr(V, "fa4_installed", lambda: True)
    monkeypatch.setattr(pipeline.cluster, "actor_device", lambda device: ("cuda:0", None))


def test_an_actor_refuses_fa4_before_its_weights_where_the_settings_rule_it_out(monkeypatch):
    from pipeline.embed.stages import PageEmbedder

    _as_on_hopper_with_fa4(monkeypatch)
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        PageEmbedder("/nonexistent/model", device="cuda", dtype="float32", vision_attention="fa4")
    with pytest.raises(ValueError, match="batched vision attention"):
        PageEmbedder("/nonexistent/model", device="cuda", attn_implementation="flash_attention_2",
                     vision_attention="fa4")
    with pytest.raises(OSError):  # nothing rules it out: the load is reached (and fails: no such model)
        PageEmbedder("/nonexistent/model", device="cuda", vision_attention="fa4")


def test_start_decides_on_the_models_torch_dtype(tiny_model, clean_active, monkeypatch):
    """start() is given the model's torch dtype: FA4 for bf16/fp16 (its load begun), SDPA for
    float32 under auto, a refusal under fa4."""
    import torch
    from transformers import AutoConfig

    _as_on_hopper_with_fa4(monkeypatch)
    config = AutoConfig.from_pretrained(tiny_model)
    release = threading.Event()
    for dtype in (torch.bfloat16, torch.float16):
        va = V.start("auto", "cuda:0", config, 0.0, load=lambda: (release.wait(10), _loop_attention([]))[1], dtype=dtype)
        assert va.kernel == "fa4" and va.summary()["kernel"] == "loading"
        release.set()
        assert va.wait(10) and va.state == "fa4"
        release.clear()
    assert V.start("auto", "cuda:0", config, 0.0, load=lambda: None, dtype=torch.float32).kernel == "sdpa"
    with pytest.raises(ValueError, match="bf16 or fp16"):
        V.start("fa4", "cuda:0", config, 0.0, load=lambda: None, dtype=torch.float32)


def test_fa4_is_refused_where_the_vision_attention_runs_elsewhere():
    """Qwen2.5-VL's windowed attention or flash_attention_2 do not go through vdr::image_attention:
    auto stays on SDPA there, and fa4 says so."""
    assert V.decide("auto", "cuda:0", (9, 0), installed=True, op_in_use=False) == "sdpa"
    with pytest.raises(ValueError, match="batched vision attention"):
        V.decide("fa4", "cuda:0", (9, 0), installed=True, op_in_use=False)


def test_the_environment_decides_on_the_driver_where_the_flag_is_not_given(monkeypatch, tmp_path):
    """$VDR_VISION_ATTENTION decides in the job's configuration (so the actors' arguments, and the
    names of kept actors, carry the kernel) where neither the flag nor --config gives one; an
    explicit value wins, auto included; a misspelt value is refused either way, naming the variable."""
    from pipeline.cluster import WORKER_ENV
    from pipeline.config import embed_config

    def cfg(**kw):
        return embed_config({"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "vision_attention": None,
                             **kw})

    assert V.ENV not in WORKER_ENV
    monkeypatch.setenv(V.ENV, "sdpa")
    assert cfg().vision_attention == "sdpa"
    assert cfg().embedder_settings("cuda", 2)["vision_attention"] == "sdpa"
    assert cfg(vision_attention="auto").vision_attention == "auto"
    assert cfg(vision_attention="fa4").vision_attention == "fa4"
    monkeypatch.setenv(V.ENV, "flash")
    for given in (None, "sdpa"):
        with pytest.raises(ValueError, match=r"\$VDR_VISION_ATTENTION must be auto, sdpa or fa4"):
            cfg(vision_attention=given)
    monkeypatch.delenv(V.ENV)
    assert cfg().vision_attention == "auto"
    with pytest.raises(ValueError, match="--vision-attention must be auto, sdpa or fa4"):
        cfg(vision_attention="flash")
    with pytest.raises(ValueError, match="--vision-attention fa4 runs on GPUs"):
        cfg(vision_attention="fa4", device="cpu")


def test_fa4_takes_half_precision_models_only():
    assert V.decide("auto", "cuda:0", (9, 0), installed=True, dtype="float32") == "sdpa"
    assert V.decide("auto", "cuda:0", (9, 0), installed=True, dtype="float16") == "fa4"
    with pytest.raises(ValueError, match="--dtype bfloat16"):
        V.decide("fa4", "cuda:0", (9, 0), installed=True, dtype="float32")


def test_a_call_that_fails_in_the_loaded_kernel_falls_back_to_sdpa_for_good(tiny_model, clean_active, caplog):
    """A failure inside FA4 (a beta package) costs no batch: that call and every later one run on
    SDPA, the pages are SDPA's, and the summary names the error."""
    lm = M.load_model(tiny_model, device="cpu")
    images = [np.random.default_rng(s).integers(0, 255, (28 * 6, 28 * 4, 3), dtype=np.uint8) for s in (1, 2)]
    want = M.embed_pages(lm, images)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("CUDA error: out of memory")

    va = V.VisionAttention("fa4", started=0.0, load=lambda: broken)
    assert va.wait(10) and va.summary()["kernel"] == "fa4"
    got = M.embed_pages(lm, images)
    assert len(calls) == 1 and V.ACTIVE["attend"] is None
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
    s = va.summary()
    assert s["kernel"] == "failed at runtime" and "out of memory" in s["error"]
    assert "runs on SDPA from now on" in caplog.text


def test_the_fa4_wrapper_passes_the_models_layout_and_lengths(tiny_model, clean_active, monkeypatch):
    """fa4_attention's plumbing, with flash_attn.cute's varlen function stood in by a per-image
    attention that reads only what FA4 reads (cu_seqlens as int32, max_seqlen, softmax_scale) and
    returns (out, lse) as FA4 does: the real tiny model's pages equal SDPA's through it, with the
    lengths from the host or, without them, from cu_seqlens."""
    import sys
    import types

    import torch
    import torch.nn.functional as F

    seen = []

    def varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
               softmax_scale=None, **kw):
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        seen.append(max_seqlen_q)
        out = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                                        scale=softmax_scale).transpose(0, 1)
                         for a, b in zip(bounds, bounds[1:])])
        return out, None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = varlen
    pkg = types.ModuleType("flash_attn")
    pkg.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)

    lm = M.load_model(tiny_model, device="cpu")
    images = [np.random.default_rng(s).integers(0, 255, (28 * h, 28 * 4, 3), dtype=np.uint8)
              for s, h in ((1, 6), (2, 4), (3, 6))]
    want = M.embed_pages(lm, images)
    V.ACTIVE["attend"] = V.fa4_attention
    got = M.embed_pages(lm, images)
    assert seen and V.ACTIVE["attend"] is V.fa4_attention  # it ran, and did not fail over to SDPA
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a.astype(np.float64) - b).max() < 1e-4
    # without host lengths (or ones that do not add up): the longest image from cu_seqlens, int64 accepted
    q = torch.randn(10, 2, 4)
    cu = torch.tensor([0, 4, 10])
    out = V.fa4_attention(q, q, q, None, cu, 0.5)
    assert out.shape == (10, 8) and seen[-1] == 6


def test_the_summary_lifts_each_actors_kernel_and_puts_its_switch_on_the_jobs_clock():
    import json

    from pipeline.embed import counters

    state = {"mode": "off", "start": {"constructed_at": 105.0, "load_phases": {}},
             "vision_attention": {"requested": "auto", "kernel": "fa4", "ready_after_s": 7.5, "ready_at": 112.5,
                                  "load_s": 1.2, "sdpa_batches_before": 1}}
    actors = {"n:1": {"actor": "n:1", "pages": 8, "busy_s": 1.0, "first_batch_at": 110.0, "last_batch_end_at": 120.0,
                      "model_load_s": 4.0, "first_batch": [1.0, 0.5, 4.0], "compile": json.dumps(state)}}
    (a,) = counters.summarize(actors, job_started_at=100.0)["actors"]
    assert "vision_attention" not in a["compile"]
    assert a["vision_attention"] == {"requested": "auto", "kernel": "fa4", "ready_after_s": 7.5,
                                     "ready_after_job_start_s": 12.5, "load_s": 1.2, "sdpa_batches_before": 1}


def test_a_provisional_state_is_replaced_once_fa4_has_loaded(tiny_model, clean_active):
    """The state written with a batch while FA4 still loads is provisional; a later batch's, once it
    has loaded, is the one the summary keeps (counters.final_state)."""
    import json

    from pipeline.embed import counters
    from pipeline.embed.stages import PageEmbedder

    emb = PageEmbedder(tiny_model, device="cpu")
    release = threading.Event()
    emb.vision = V.VisionAttention("fa4", started=emb.started, load=lambda: (release.wait(10), _loop_attention([]))[1])
    early = json.dumps(emb.compile_state())
    assert '"provisional": true' in early and '"kernel": "loading"' in early
    release.set()
    assert emb.vision.wait(10)
    late = json.dumps(emb.compile_state())
    assert '"provisional": true' not in late
    assert json.loads(counters.final_state(early, late))["vision_attention"]["kernel"] == "fa4"


def test_flash_attention_2_is_picked_only_with_its_compiled_extension(monkeypatch):
    """flash-attn-4 installs a ``flash_attn`` package without FA2: transformers then refuses
    flash_attention_2, so it is picked only where FA2's extension is importable."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in ("flash_attn", "flash_attn.cute") else
                        None if name == "flash_attn_2_cuda" else real(name, *a))
    assert M.pick_attn_implementation("cuda:0") == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn_2_cuda" else None)
    assert M.pick_attn_implementation("cuda:0") == "flash_attention_2"
    assert M.pick_attn_implementation("cpu") == "sdpa"


def test_a_failure_after_the_first_batches_reaches_the_jobs_summary(tiny_model, clean_active):
    """FA4 ran, its state was recorded with a batch, then a later call failed: the next batch's rows
    carry the new state, and the summary keeps it whatever order the files are read in."""
    import json

    from pipeline.embed import counters
    from pipeline.embed.stages import PageEmbedder

    from tests.embed.test_model import _stream_batch, page_images

    emb = PageEmbedder(tiny_model, device="cpu")
    emb.vision = V.VisionAttention("fa4", started=emb.started, load=lambda: _loop_attention([]))
    assert emb.vision.wait(10)
    first = emb(_stream_batch(page_images(1)[:2], 0))
    assert json.loads(first.column(counters.COMPILE)[0].as_py())["vision_attention"]["kernel"] == "fa4"

    def broken(*args):
        raise RuntimeError("an assertion inside the beta kernel")

    V.ACTIVE["attend"] = broken
    second = emb(_stream_batch(page_images(2)[:2], 10))
    state = json.loads(second.column(counters.COMPILE)[0].as_py())["vision_attention"]
    assert state["kernel"] == "failed at runtime" and "beta kernel" in state["error"]
    for order in ((first, second), (second, first)):
        actors: dict = {}
        for t in order:
            counters.merge_records(actors, counters.actor_records(t, pa_true(t.num_rows)))
        (a,) = counters.summarize(actors, job_started_at=emb.started)["actors"]
        assert a["vision_attention"]["kernel"] == "failed at runtime"


def pa_true(n):
    import pyarrow as pa

    return pa.array([True] * n)



def _compiles_into(local, rel, data, seen=None):
    """A load as FA4's: it finds what its disk cache holds (``seen``), compiles into it when the
    kernel is missing (a file written there, as flash_attn.cute's cache does, beside its lock file
    and a hidden temporary), and returns the attention."""
    def load():
        path = os.path.join(local, rel)
        if seen is not None:
            seen.append(open(path, "rb").read() if os.path.exists(path) else None)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            open(path[:-2] + ".lock", "w").close()
            open(os.path.join(os.path.dirname(path), ".x.123.tmp.o"), "w").close()
        return _loop_attention([])
    return load


def _until_settled(va, timeout=10.0):
    """As the actor's summary does: its vision state is final once ``pending`` is False."""
    deadline = time.monotonic() + timeout
    while va.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not va.pending
    return va.summary()



def test_a_new_node_takes_fa4_kernels_from_the_shared_compile_cache(s3, tiny_model, tmp_path, monkeypatch,
                                                                       clean_active):
    """--compile-cache s3://...: once FA4 runs (published first), the first node's kernels
    (compiled into its disk cache) are mirrored there, in a folder per GPU architecture and FA4
    build, and the actor's vision state stays provisional until they are written; a new node adds
    them to its own cache before FA4 looks, so it compiles nothing and writes nothing; a node's
    older copy of a kernel is kept and does not replace the shared one, one it repaired does; a
    failed load writes nothing. Real S3 (moto's server); FA4 itself is a GPU library, so its load
    is a function that behaves as its disk cache does."""
    from transformers import AutoConfig

    from pipeline.embed import compile_cache as cc

    _as_on_hopper_with_fa4(monkeypatch)
    for var in ("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(V, "_fa4_fingerprint", lambda: "fingerprint1")  # the running FA4's subfolder
    published_at_save = []
    real_save = cc.save_kernel_files

    def save_kernel_files(*args, **kwargs):
        published_at_save.append(V.ACTIVE["attend"] is not None)
        time.sleep(0.3)  # a slow store: the summary must wait for it
        return real_save(*args, **kwargs)

    monkeypatch.setattr(cc, "save_kernel_files", save_kernel_files)
    config = AutoConfig.from_pretrained(tiny_model)
    bucket = s3.make_bucket()
    rel, kernel = "fingerprint1/fwd/k1.o", b"\x7fELF compiled kernel" * 100

    def start_node(name, seen, existing=None, load=None, old=None):
        local = str(tmp_path / name)
        for path, data in ((rel, existing), ("fingerprint0/fwd/old.o", old)):
            if data is not None:
                os.makedirs(os.path.dirname(os.path.join(local, path)), exist_ok=True)
                with open(os.path.join(local, path), "wb") as f:
                    f.write(data)
                os.utime(os.path.join(local, path), (time.time() - 60,) * 2)  # from an earlier run
        va = V.start("auto", "cuda:0", config, 0.0, cache_dir=local, shared_uri=f"s3://{bucket}/cache",
                     endpoint_url=s3.endpoint_url, load=load or _compiles_into(local, rel, kernel, seen))
        assert va.wait(10)
        return local, _until_settled(va)

    def shared_files():
        return {k: s3.client().get_object(Bucket=bucket, Key=k)["Body"].read()
                for k in s3.keys(bucket) if not k.endswith("/")}  # (folder markers)

    seen_a = []
    _, first = start_node("a", seen_a, old=b"another FA4's kernel")
    assert seen_a == [None]  # nothing shared yet: compiled
    (key,) = shared_files()  # not the lock file, the temporary, or another FA4's subfolder
    folder = re.fullmatch(r"(cache/fa4-kernels/sm90-[0-9a-f]{16})/fingerprint1/fwd/k1\.o", key).group(1)
    assert shared_files()[key] == kernel and first["kernel"] == "fa4" and published_at_save == [True]
    assert first["kernel_cache"] == {"folder": f"s3://{bucket}/{folder}", "added": 0, "saved": 1}

    seen_b = []
    local_b, second = start_node("b", seen_b)
    assert seen_b == [kernel]  # there before FA4 looked
    assert second["kernel_cache"]["added"] == 1 and second["kernel_cache"]["saved"] == 0
    assert oct(os.stat(os.path.join(local_b, rel)).st_mode & 0o777) == oct(0o644)
    assert not [f for f in os.listdir(os.path.dirname(os.path.join(local_b, rel))) if f.endswith(".part")]

    seen_c = []
    _, third = start_node("c", seen_c, existing=b"this node's older copy")
    assert seen_c == [b"this node's older copy"] and third["kernel_cache"] == {**third["kernel_cache"], "added": 0,
                                                                               "saved": 0}
    assert shared_files()[key] == kernel  # an older copy does not replace the shared one

    repaired = b"recompiled after FA4 could not load the old entry"

    def repairs():
        with open(os.path.join(str(tmp_path / "d"), rel), "wb") as f:
            f.write(repaired)
        return _loop_attention([])

    _, fourth = start_node("d", [], existing=b"unloadable", load=repairs)
    assert fourth["kernel_cache"]["saved"] == 1 and shared_files()[key] == repaired

    def fails():
        raise RuntimeError("no kernel today")

    _, failed = start_node("e", [], load=fails)
    assert failed["kernel"] == "failed" and len(published_at_save) == 4  # a failed load writes nothing


def test_an_unusable_fa4_cache_or_shared_folder_costs_the_sharing_not_fa4(tiny_model, tmp_path, monkeypatch,
                                                                          clean_active):
    from transformers import AutoConfig

    from pipeline.embed import compile_cache as cc

    _as_on_hopper_with_fa4(monkeypatch)
    for var in ("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    config = AutoConfig.from_pretrained(tiny_model)
    (tmp_path / "a_file").write_text("not a folder")
    va = V.start("auto", "cuda:0", config, 0.0, cache_dir=str(tmp_path / "a_file" / "fa4"),
                 shared_uri=str(tmp_path / "shared"), load=lambda: _loop_attention([]))
    summary = _until_settled(va)
    assert summary["kernel"] == "fa4" and "NotADirectoryError" in summary["kernel_cache"]["error"]

    def unlistable(*args, **kwargs):
        raise PermissionError("no listing for you")

    monkeypatch.setattr(cc.storage, "list_files", unlistable)  # a store that refuses: nothing written blind
    local = tmp_path / "node"
    va = V.start("auto", "cuda:0", config, 0.0, cache_dir=str(local), shared_uri=str(tmp_path / "shared"),
                 load=_compiles_into(str(local), "fp/k.o", b"kernel"))
    summary = _until_settled(va)
    assert summary["kernel"] == "fa4" and summary["kernel_cache"]["saved"] == 0
    assert "could not be listed" in summary["kernel_cache"]["error"] and not (tmp_path / "shared").exists()
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "0")  # FA4 reads no disk: nothing shared
    va = V.start("auto", "cuda:0", config, 0.0, cache_dir=str(tmp_path / "c"),
                 shared_uri=str(tmp_path / "shared"), load=lambda: _loop_attention([]))
    assert "kernel_cache" not in _until_settled(va)


def test_only_kernel_files_of_bounded_size_come_from_the_shared_folder(tmp_path, monkeypatch):
    """The shared folder is read as data: hidden files, other files and oversized kernels are
    skipped (and what is skipped or fails only means compiling, never an error); each file added
    is written whole, and where the filesystem has no hard links it is still added."""
    from pipeline.embed import compile_cache as cc

    shared, local = tmp_path / "shared", tmp_path / "node"
    for name, data in (("fp/.tmp.o", b"data"), ("fp/notes.txt", b"data"), ("fp/big.o", b"x" * 64),
                       ("fp/good.o", b"data"), ("_hidden/h.o", b"data"), ("fp/other.o", b"more")):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).write_bytes(data)
    monkeypatch.setattr(cc, "KERNEL_MAX_BYTES", 16)

    def no_links(src, dst):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(cc.os, "link", no_links)
    listed, added = cc.load_kernel_files(str(shared), str(local))
    assert listed == {"fp/good.o": 4, "fp/other.o": 4} and sorted(added) == ["fp/good.o", "fp/other.o"]
    assert {k: v[0] for k, v in cc.kernel_files(str(local)).items()} == listed
    assert cc.load_kernel_files(str(tmp_path / "missing"), str(local)) == ({}, [])
    assert cc.load_kernel_files(str(shared), str(local))[1] == []  # all there: nothing added again
