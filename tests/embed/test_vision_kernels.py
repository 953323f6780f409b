"""--vision-attention: which kernel computes the vision attention, and the switch from SDPA to
FlashAttention 4 once an actor has loaded it (pipeline.embed.vision_kernels). FA4 itself needs a
Hopper GPU (measured in benchmarks/RESULTS.md); here the switch runs a CPU kernel of the same
contract through the same seam, in the real tiny model."""

from __future__ import annotations

import threading

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


@pytest.fixture
def clean_active():
    V.ACTIVE["attend"] = None
    yield
    V.ACTIVE["attend"] = None


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
    assert s["ready_after_s"] > 0 and s["load_s"] >= 0 and "error" not in s


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
    with pytest.raises(ValueError, match="GPUs only"):
        PageEmbedder(tiny_model, device="cpu", vision_attention="fa4")
    with pytest.raises(ValueError, match="auto, sdpa, fa4"):
        PageEmbedder("/nonexistent/model", device="cpu", vision_attention="flash")  # before any load


def test_fa4_is_refused_where_the_vision_attention_runs_elsewhere():
    """Qwen2.5-VL's windowed attention or flash_attention_2 do not go through vdr::image_attention:
    auto stays on SDPA there, and fa4 says so."""
    assert V.decide("auto", "cuda:0", (9, 0), installed=True, op_in_use=False) == "sdpa"
    with pytest.raises(ValueError, match="batched vision attention"):
        V.decide("fa4", "cuda:0", (9, 0), installed=True, op_in_use=False)


def test_the_environment_decides_where_the_flag_is_left_at_auto(tiny_model, clean_active, monkeypatch):
    """$VDR_VISION_ATTENTION (forwarded to the actors with the job's other switches) replaces
    auto, not a value given on the command line; a wrong value is refused."""
    from transformers import AutoConfig

    from pipeline.cluster import WORKER_ENV

    assert V.ENV in WORKER_ENV
    config = AutoConfig.from_pretrained(tiny_model)
    monkeypatch.setenv(V.ENV, "sdpa")
    assert V.start("auto", "cpu", config, 0.0).summary() == {"requested": "sdpa", "kernel": "sdpa"}
    monkeypatch.setenv(V.ENV, "fa4")
    with pytest.raises(ValueError, match="GPUs only"):
        V.start("auto", "cpu", config, 0.0)
    assert V.start("sdpa", "cpu", config, 0.0).summary()["requested"] == "sdpa"
    monkeypatch.setenv(V.ENV, "flash")
    with pytest.raises(ValueError, match="auto, sdpa, fa4"):
        V.start("auto", "cpu", config, 0.0)
