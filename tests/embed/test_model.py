"""The model path equals the training code's semantics (colpali-engine's ColQwen2) for the
same weights: the backbone is given input_ids, so it computes the 3-D M-RoPE positions
itself, then projection, L2 norm and the attention mask, as colpali-engine's forward does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.embed import model as M


@pytest.fixture(scope="module")
def lm(tiny_model):
    return M.load_model(tiny_model, device="cpu")


def colpali_reference(lm, input_ids, attention_mask, pixel_values=None, image_grid_thw=None):
    """colpali-engine ColQwen2.forward: backbone(input_ids, pixel_values, grid) -> proj -> norm -> mask."""
    kwargs = {}
    if pixel_values is not None:
        kwargs = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
    vlm = lm.model.vlm
    # colpali-engine runs transformers' Conv3d patch embedding: take our matmul off for the reference
    pe = (getattr(vlm, "visual", None) or vlm.model.visual).patch_embed
    ours = pe.__dict__.pop("forward", None)
    try:
        with torch.no_grad():
            h = vlm(input_ids=input_ids, attention_mask=attention_mask,
                    mm_token_type_ids=(input_ids == lm.image_token_id).int(), use_cache=False, **kwargs).last_hidden_state
            vlm.rope_deltas = None  # the backbone caches it; keep later calls independent
            e = lm.model.embedding_proj_layer(h)
            e = e / e.norm(dim=-1, keepdim=True)
            e = e * attention_mask.unsqueeze(-1)
    finally:
        if ours is not None:
            pe.forward = ours
    return [e[i][attention_mask[i].bool()].numpy() for i in range(len(e))]


def page_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (28 * 6, 28 * 4, 3), dtype=np.uint8),
            rng.integers(0, 255, (28 * 4, 28 * 4, 3), dtype=np.uint8),
            rng.integers(0, 255, (28 * 6, 28 * 4, 3), dtype=np.uint8)]


def test_page_inputs_equal_the_processor(lm):
    images = page_images()
    ours = M.build_page_inputs(images, lm)
    ref = lm.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
    for i in range(len(images)):
        a = ours["input_ids"][i][ours["attention_mask"][i].bool()]
        b = ref["input_ids"][i][ref["attention_mask"][i].bool()]
        assert torch.equal(a, b)
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() < 1e-6


def test_page_embeddings_equal_training_code(lm):
    images = page_images()
    ours = M.embed_pages(lm, images)
    for img, got in zip(images, ours):
        r = lm.processor(images=[Image.fromarray(img)], return_tensors="pt")
        pv = r["pixel_values"].reshape(-1, r["pixel_values"].shape[-1])
        want = colpali_reference(lm, r["input_ids"], r["attention_mask"], pv, r["image_grid_thw"])[0]
        assert got.shape == want.shape == (r["input_ids"].shape[1], 128)
        assert np.abs(got - want).max() < 1e-5
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_plain_transformers_forward_differs_so_the_check_can_fail(lm):
    """transformers' own forward drops M-RoPE for image tokens (FACTS.md): the reference
    above must tell the two apart, or the equality test proves nothing."""
    img = page_images()[0]
    r = lm.processor(images=[Image.fromarray(img)], return_tensors="pt")
    with torch.no_grad():
        plain = lm.model(**r).embeddings[0].numpy()
    pv = r["pixel_values"].reshape(-1, r["pixel_values"].shape[-1])
    want = colpali_reference(lm, r["input_ids"], r["attention_mask"], pv, r["image_grid_thw"])[0]
    assert np.abs(plain - want).max() > 1e-4


def test_batching_and_padding_do_not_change_page_embeddings(lm):
    images = page_images(3)
    together = M.embed_pages(lm, images)
    alone = [M.embed_pages(lm, [im])[0] for im in images]
    for a, b in zip(together, alone):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_query_embeddings_equal_training_code_and_pinned_prompt(lm):
    texts = ["what is the revenue in 2023?", "é 漢字 🙂 \x00 unknown ⊕ characters", ""]
    ours = M.embed_queries(lm, texts, batch_size=2)
    tok = lm.processor.tokenizer
    for text, got in zip(texts, ours):
        prompt = "Query: " + text + "<|endoftext|>" * 10  # colpali-engine 0.3.x: no trailing newline
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        want = colpali_reference(lm, ids, torch.ones_like(ids))[0]
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_metadata_records_model_prompt_budget_dtype(lm):
    from pipeline import schema

    meta = M.model_metadata(lm, 768)
    assert meta[schema.META_PROMPT] == M.IMAGE_PROMPT.encode()
    assert meta[schema.META_QUERY_PROMPT] == M.QUERY_PROMPT.encode()
    assert meta[schema.META_MAX_VISUAL_TOKENS] == b"768" and meta[schema.META_DTYPE] == b"float32"


def test_defaults_follow_the_device():
    assert M.default_dtype("cpu") == torch.float32 and M.default_dtype("cuda:0") == torch.bfloat16
    assert M.pick_attn_implementation("cpu") == "sdpa"
    with pytest.raises(ValueError, match="--dtype"):
        M.dtype_from_name("int3", "cpu")


def test_load_from_object_store_copies_once(tiny_model, s3, tmp_path, monkeypatch):
    bucket = s3.make_bucket()
    s3.upload_folder(tiny_model, bucket, "models/tiny/")
    monkeypatch.setenv("VDR_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/models/tiny"
    lm2 = M.load_model(uri, device="cpu")
    assert lm2.name == uri
    local = M.fetch_model(uri)
    assert local.startswith(str(tmp_path / "cache"))
    assert M.fetch_model(uri) == local  # cached: the second actor on a node copies nothing
    for name in os.listdir(tiny_model):  # every byte, the weights in many ranged pieces
        if os.path.isfile(os.path.join(tiny_model, name)):
            with open(os.path.join(tiny_model, name), "rb") as a, open(os.path.join(local, name), "rb") as b:
                assert a.read() == b.read(), name


def test_an_interrupted_model_copy_leaves_nothing_and_the_next_copies_again(tiny_model, s3, tmp_path, monkeypatch):
    """A copy that fails half-way (the network, the node) leaves no model folder that a later
    actor would load, and no partial folder; the next fetch copies the model whole."""
    from pipeline import storage

    bucket = s3.make_bucket()
    s3.upload_folder(tiny_model, bucket, "models/tiny/")
    cache = tmp_path / "cache"
    monkeypatch.setenv("VDR_MODEL_CACHE", str(cache))
    monkeypatch.setattr(storage, "REMOTE_PIECE_BYTES", 1 << 16)
    real = storage.download_files

    def cut(fs, files, threads=None, progress=None, cancel=None):
        def fail_half_way(done, total):
            if done > total // 2:
                raise ConnectionResetError("connection reset by peer")
        return real(fs, files, threads=threads, progress=fail_half_way, cancel=cancel)

    monkeypatch.setattr(storage, "download_files", cut)
    uri = f"s3://{bucket}/models/tiny"
    with pytest.raises(ConnectionResetError):
        M.fetch_model(uri)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    # a partial folder of a process killed while copying (no exception ran) goes with the next copy
    key = os.path.basename(M.fetch_model.__globals__["hashlib"].sha1(uri.encode()).hexdigest()[:16])
    (cache / f".partial-{key}-killed" / "sub").mkdir(parents=True)
    (cache / f".partial-{key}-killed" / "model.safetensors").write_bytes(b"half")
    (cache / ".partial-0123456789abcdef-other").mkdir()  # another model's copy in flight: not touched
    monkeypatch.setattr(storage, "download_files", real)
    local = M.fetch_model(uri)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".partial-")) == [
        ".partial-0123456789abcdef-other"]
    with open(os.path.join(tiny_model, "model.safetensors"), "rb") as a, \
            open(os.path.join(local, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_an_object_store_model_is_copied_while_transformers_is_imported(tiny_model, s3, tmp_path, monkeypatch):
    """load_model starts an s3:// model's copy on a thread before it imports transformers (the
    import's 2-5 s overlap the copy); the copy's errors reach the caller; a refused setting is
    refused before anything is copied; hub names and local paths start no thread."""
    import threading

    bucket = s3.make_bucket()
    monkeypatch.setenv("VDR_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--precision"):
        M.load_model(f"s3://{bucket}/models/tiny", device="cpu", precision="fp4")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError, match="no model files under"):
        M.load_model(f"s3://{bucket}/models/none", device="cpu")
    s3.upload_folder(tiny_model, bucket, "models/tiny/")
    threads = []
    real_fetch = M.fetch_model

    def fetch(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_fetch(*args, **kwargs)

    monkeypatch.setattr(M, "fetch_model", fetch)
    lm = M.load_model(f"s3://{bucket}/models/tiny", device="cpu")
    assert threads == ["fetch-model"] and lm.model is not None
    assert M.fetch_model_in_background(tiny_model).result() == tiny_model
    assert threads[1:] == [threading.current_thread().name]
    monkeypatch.setenv("VDR_MODEL_FETCH_THREADS", "0")
    with pytest.raises(ValueError, match="VDR_MODEL_FETCH_THREADS"):
        M.fetch_threads()


def test_the_copy_overlaps_the_import_and_stops_when_the_load_fails(tiny_model, s3, tmp_path, monkeypatch):
    """The copy is running while ``from transformers import ...`` runs (the import waits here
    until the copy has started: started after the import, it never would); a load refused by a
    setting copies nothing; a failed import cancels the copy, which leaves no folder; the
    copy's threads follow VDR_MODEL_FETCH_THREADS."""
    import fcntl
    import sys
    import threading
    import types

    from pipeline import storage

    bucket = s3.make_bucket()
    s3.upload_folder(tiny_model, bucket, "models/tiny/")
    uri = f"s3://{bucket}/models/tiny"
    cache = tmp_path / "cache"
    monkeypatch.setenv("VDR_MODEL_CACHE", str(cache))
    monkeypatch.setenv("VDR_MODEL_FETCH_THREADS", "3")
    started, calls = threading.Event(), []
    real_download = storage.download_files

    def download(fs, files, threads=None, progress=None, cancel=None):
        calls.append(threads)
        started.set()
        return real_download(fs, files, threads=threads, progress=progress, cancel=cancel)

    monkeypatch.setattr(storage, "download_files", download)
    with pytest.raises(ValueError, match="dtype"):
        M.load_model(uri, device="cpu", dtype="bogus")
    assert calls == [] and not cache.exists()
    real_transformers = sys.modules["transformers"]
    seen = []

    class Transformers(types.ModuleType):
        def __getattr__(self, name):
            seen.append(started.wait(10))  # overlap: the copy began before the import finished
            return getattr(real_transformers, name)

    monkeypatch.setitem(sys.modules, "transformers", Transformers("transformers"))
    lm = M.load_model(uri, device="cpu")
    assert seen and all(seen) and calls == [3] and lm.model is not None

    class Broken(types.ModuleType):
        def __getattr__(self, name):
            started.wait(10)
            raise ImportError("transformers is broken here")

    started.clear()
    monkeypatch.setattr(storage, "REMOTE_PIECE_BYTES", 1 << 12)  # many pieces: the cancel has some to stop
    monkeypatch.setenv("VDR_MODEL_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setitem(sys.modules, "transformers", Broken("transformers"))
    with pytest.raises(ImportError, match="broken"):
        M.load_model(uri, device="cpu")
    lock = next((tmp_path / "cache2").glob("*.lock"))
    with open(lock) as f:  # the copy has ended once its lock is free
        fcntl.flock(f, fcntl.LOCK_EX)
    assert [p.name for p in (tmp_path / "cache2").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_model_error_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="build_tiny_model"):
        M.load_model(str(tmp_path / "nope"), device="cpu")


def test_batched_vision_attention_equals_the_per_image_loop(tiny_model, lm):
    """Our one-call attention over equal-size images must be the same maths as
    transformers' per-image loop, for mixed sizes in any order."""
    plain = M.load_model(tiny_model, device="cpu", batched_vision_attention=False)
    images = page_images(5) + page_images(6)[1:2]
    got = M.embed_pages(lm, images)
    want = M.embed_pages(plain, images)
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    assert M._runs([3, 3, 5, 3]) == [(3, 2), (5, 1), (3, 1)]


def test_patch_embedding_as_one_matmul_equals_the_conv3d(tiny_model, lm):
    """The default load runs the vision tower's patch embedding as a matmul over each flattened
    patch (pipeline.embed.model.enable_linear_patch_embed); a load without it keeps
    transformers' Conv3d. Same embeddings (float32 on CPU: summation order only)."""
    conv = M.load_model(tiny_model, device="cpu", linear_patch_embed=False)
    assert lm.linear_patch_embed and not conv.linear_patch_embed
    visual = lm.model.vlm.model.visual if hasattr(lm.model.vlm, "model") else lm.model.vlm.visual
    assert visual.patch_embed.forward.__func__ is M._linear_patch_embed
    images = page_images(8) + page_images(9)[1:2]
    for a, b in zip(M.embed_pages(lm, images), M.embed_pages(conv, images)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    x = torch.randn(10, 3 * 2 * 14 * 14)
    pe = visual.patch_embed
    np.testing.assert_allclose(M._linear_patch_embed(pe, x).detach().numpy(),
                               type(pe).forward(pe, x).detach().numpy(), rtol=0, atol=1e-5)


def test_vision_attention_cut_into_powers_of_two_gives_the_same_embeddings(lm, monkeypatch):
    """IMAGE_ATTENTION_SPLIT = "pow2" (the default since 2026-12-05: fewer distinct SDPA call
    shapes for mixed corpora) only regroups images that never attend to each other: the same
    vectors as one call per run ("runs"), bit for bit here; and the shapes of its calls are the
    powers of two of each run."""
    rng = np.random.default_rng(7)
    sizes = [(28 * 6, 28 * 4)] * 7 + [(28 * 4, 28 * 4)] * 3
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    monkeypatch.setattr(M, "IMAGE_ATTENTION_SPLIT", "runs")
    M.IMAGE_ATTENTION_SHAPES.clear()
    want = M.embed_pages(lm, images)
    assert {c for c, _ in M.IMAGE_ATTENTION_SHAPES} == {7, 3}, "the reference must be one call per run"
    monkeypatch.setattr(M, "IMAGE_ATTENTION_SPLIT", "pow2")
    M.IMAGE_ATTENTION_SHAPES.clear()
    got = M.embed_pages(lm, images)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    patches = {(h // 14) * (w // 14) for h, w in sizes}
    assert M.IMAGE_ATTENTION_SHAPES == {(c, n) for n in patches for c in ((2, 1) if n == 64 else (4, 2, 1))}
    assert M._attention_calls([5] * 7 + [3] * 3, "pow2") == [(5, 4), (5, 2), (5, 1), (3, 2), (3, 1)]
    assert M._attention_calls([5] * 7 + [3] * 3, "runs") == [(5, 7), (3, 3)]
    with pytest.raises(ValueError, match="pow2"):
        M._attention_calls([5], "nope")


@pytest.mark.parametrize("precompiled", [True, False], ids=["precompiled", "torch.compile"])
def test_compiled_blocks_are_not_compiled_again_for_other_page_sizes(tiny_model, lm, precompiled):
    """A mixed corpus gives every batch another mix of page sizes. The compiled blocks must
    serve them all: one graph per kind of block (the text layer also without a mask, for a
    batch of one size), no recompilation per batch, never torch's recompile limit (after
    which it runs the blocks eagerly: what happened until 2026-12-04, 8 graphs in 7 batches).
    Both ways of compiling: ahead of time per block type (the default) and torch.compile per
    block. Dynamo's own graphs (backend "eager"); the embeddings equal the uncompiled model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = M.load_model(tiny_model, device="cpu", compile_model=True, compile_backend="eager",
                            precompiled=precompiled)
    assert len(compiled.precompiled) == (2 if precompiled else 0)

    def graphs() -> int:
        if precompiled:
            assert all(pf.fallback is None for pf in compiled.precompiled), [pf.fallback_reason for pf in compiled.precompiled]
            return sum(pf.compiled for pf in compiled.precompiled)
        assert counters["frames"]["total"] == counters["frames"]["ok"] == counters["stats"]["unique_graphs"]
        return counters["stats"]["unique_graphs"]

    rng = np.random.default_rng(3)
    grids = [(8, 6), (10, 6), (6, 8), (12, 8), (8, 8), (9, 7), (7, 9), (11, 8), (8, 11), (10, 10), (12, 6), (6, 12)]

    def check(images):
        for a, b in zip(M.embed_pages(compiled, images), M.embed_pages(lm, images)):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-5

    for i in range(13):
        check([rng.integers(0, 255, (28 * grids[(i + 5 * j) % 12][0], 28 * grids[(i + 5 * j) % 12][1], 3),
                            dtype=np.uint8) for j in range(2 + i % 3)])
    check([rng.integers(0, 255, (28 * 8, 28 * 6, 3), dtype=np.uint8)] * 3)  # one size: no padding mask
    # a vision block and a text layer (padded rows need no mask: pipeline.embed.model.without_padding_mask)
    assert graphs() == 2, dict(counters["stats"])
    # a batch of one page once more each (torch specializes sizes of 1), then nothing new
    check([rng.integers(0, 255, (28 * 9, 28 * 7, 3), dtype=np.uint8)])
    check([rng.integers(0, 255, (28 * 7, 28 * 9, 3), dtype=np.uint8)])
    assert graphs() <= 4, dict(counters["stats"])
    torch._dynamo.reset()


def test_batched_vision_attention_takes_another_kernel_through_attend(tiny_model):
    """``attend`` (the seam benchmarks use to try other attention kernels) gets each run of
    equal-size images as (images, length, heads, dim) views, and its output is what the
    tower uses: the plain per-image loop written as an ``attend`` gives the same pages, and
    a wrong one changes them."""
    import torch.nn.functional as F

    calls = []

    def attend(q, k, v, scale):
        calls.append(q.shape)
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), scale=scale)
        return o.transpose(1, 2).reshape(q.shape[0] * q.shape[1], -1)

    images = page_images(5) + page_images(6)[1:2]
    plain = M.load_model(tiny_model, device="cpu", batched_vision_attention=False)
    custom = M.load_model(tiny_model, device="cpu", batched_vision_attention=False)
    blocks = custom.model.vlm.model.visual.blocks if hasattr(custom.model.vlm, "model") else custom.model.vlm.visual.blocks
    assert M.enable_batched_vision_attention(custom.model, custom.vision_lengths, attend=attend) == len(blocks)
    want = M.embed_pages(plain, images)
    got = M.embed_pages(custom, images)
    assert calls and all(len(shape) == 4 for shape in calls)
    for a, b in zip(got, want):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    M.enable_batched_vision_attention(custom.model, custom.vision_lengths, attend=lambda q, k, v, s: attend(q, k, v, s) * 0)
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(M.embed_pages(custom, images), want))


def test_colqwen25_checkpoints_load_and_match_training_code(tmp_path):
    """A ColQwen2.5-style checkpoint (Qwen2.5-VL backbone, windowed vision attention)
    loads through the same path and gives the training code's page embeddings."""
    from pipeline.devtools.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path / "tiny25"), family="qwen2_5_vl")
    lm25 = M.load_model(path, device="cpu")
    assert type(lm25.model.vlm).__name__ == "Qwen2_5_VLModel"
    img = page_images(7)[0]
    got = M.embed_pages(lm25, [img])[0]
    r = lm25.processor(images=[Image.fromarray(img)], return_tensors="pt")
    pv = r["pixel_values"].reshape(-1, r["pixel_values"].shape[-1])
    want = colpali_reference(lm25, r["input_ids"], r["attention_mask"], pv, r["image_grid_thw"])[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_model_keys_that_climb_out_of_the_folder_are_refused(s3, tmp_path, monkeypatch):
    """An object key with '..' under a model prefix must not write outside the model cache."""
    bucket = s3.make_bucket()
    c = s3.client()
    c.put_object(Bucket=bucket, Key="models/evil/config.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key="models/evil/../../escaped.txt", Body=b"x")
    c.put_object(Bucket=bucket, Key="models/evil/sub/../../../escaped2.txt", Body=b"x")
    monkeypatch.setenv("VDR_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="point outside the model folder"):
        M.fetch_model(f"s3://{bucket}/models/evil")
    assert not list(tmp_path.rglob("escaped*"))


def test_cached_rope_positions_equal_fresh_ones_for_every_batch_shape(lm):
    lm.rope_cache.clear()
    batches = [page_images(0), page_images(0)[:2], page_images(1), page_images(0)[::-1]]
    for images in batches:
        got = M.build_page_inputs(images, lm)["position_ids"]
        ids, mask = M.build_page_inputs(images, lm)["input_ids"], M.build_page_inputs(images, lm)["attention_mask"]
        fresh = M._rope_index(lm.model.vlm, ids, (ids == lm.image_token_id).int(),
                              M.build_page_inputs(images, lm)["image_grid_thw"], mask)
        assert torch.equal(got, fresh)
    assert 0 < len(lm.rope_cache) < len(batches)  # equal shapes share an entry


def test_float16_output_is_the_float32_output_rounded(lm):
    images = page_images(2)
    f32 = M.embed_pages(lm, images)
    f16 = M.embed_pages(lm, images, out_dtype=torch.float16)
    for a, b in zip(f32, f16):
        assert b.dtype == np.float16 and np.array_equal(a.astype(np.float16), b)


def test_pixel_views_read_arrow_buffers_without_copies():
    import pyarrow as pa

    from pipeline.embed.stages import pixel_views

    rows = [bytes([1, 2, 3]), None, bytes(range(6)), b""]
    col = pa.chunked_array([pa.array(rows[:2], pa.large_binary()), pa.array(rows[2:], pa.large_binary())])
    views = pixel_views(col)
    assert views[1] is None and [bytes(v) for i, v in enumerate(views) if i != 1] == [rows[0], rows[2], rows[3]]
    sliced = pixel_views(pa.array(rows, pa.binary()).slice(2, 2))  # an offset, and 32-bit offsets
    assert [bytes(v) for v in sliced] == [rows[2], b""]
    assert pixel_views(pa.array([], pa.large_binary())) == []


def _stream_batch(images, first):
    import pyarrow as pa

    from pipeline.embed.stages import PIXELS, STREAM_SCHEMA

    n = len(images)
    cols = {f.name: [None] * n for f in STREAM_SCHEMA}
    names = [f"d{first + i}.pdf" for i in range(n)]
    cols.update(doc_id=names, page_number=[1] * n, source_uri=names, doc_pages=[1] * n,
                height=[im.shape[0] for im in images], width=[im.shape[1] for im in images])
    cols[PIXELS] = [im.tobytes() for im in images]
    return pa.table(cols, schema=STREAM_SCHEMA)


def test_two_batches_in_flight_give_the_embeddings_of_one_at_a_time(tiny_model, monkeypatch):
    """--batches-in-flight 2: Ray Data calls the actor from two threads. Their forward passes
    never overlap (the device lock), the next batch is prepared on the host meanwhile, the
    embeddings are bit for bit those of one batch at a time, and each batch's forward time
    is its own (the counters add up to the timer's total)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.embed import counters
    from pipeline.embed.stages import PageEmbedder

    batches = [_stream_batch(page_images(seed)[: 2 + seed % 2], 10 * seed) for seed in range(6)]
    one = PageEmbedder(tiny_model, device="cpu")
    want = [one(b) for b in batches]

    two = PageEmbedder(tiny_model, device="cpu", batches_in_flight=2)
    lock, active, most, prepared_during_forward = threading.Lock(), [0], [0], []
    forward = two.lm.model.forward

    to_device = M.page_inputs_to_device

    def device_section_starts(*args, **kwargs):  # under the device lock, up to the forward's end
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        return to_device(*args, **kwargs)

    def slow_forward(*args, **kwargs):
        try:
            time.sleep(0.05)  # widens the window in which a second batch could start
            return forward(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    prepare = M.prepare_page_inputs

    def watched_prepare(*args, **kwargs):
        prepared_during_forward.append(active[0] > 0)
        return prepare(*args, **kwargs)

    two.lm.model.forward = slow_forward
    monkeypatch.setattr(M, "prepare_page_inputs", watched_prepare)
    monkeypatch.setattr(M, "page_inputs_to_device", device_section_starts)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(two, batches))
    assert most[0] == 1  # one batch's device work at a time
    assert any(prepared_during_forward)  # while the other thread's batch ran
    for a, b in zip(want, got):
        assert a.column("embedding").equals(b.column("embedding"))
        assert a.column("n_vectors").equals(b.column("n_vectors"))
    busy = [sum(t.column(counters.BUSY_S).to_pylist()) for t in got]
    assert all(s >= 0.05 for s in busy)
    assert sum(busy) == pytest.approx(two.timer.busy_s, rel=1e-9)


def test_two_batches_in_flight_is_refused_unless_one_or_two():
    from pipeline.config import EmbedConfig

    with pytest.raises(ValueError, match="--batches-in-flight must be 1 or 2"):
        EmbedConfig(input="in", output="out", batches_in_flight=3)


def test_load_model_reports_where_its_time_went(lm):
    """Each step of the load is timed (the actor prints them with its first batch)."""
    assert list(lm.load_phases) == ["import", "fetch", "from_pretrained", "to_device", "processor", "setup"]
    assert all(v >= 0 for v in lm.load_phases.values()) and lm.load_phases["from_pretrained"] > 0


def test_batches_in_flight_default_is_two_on_gpus_one_on_cpus():
    """The default follows the H200 measurement (GPU busy 99% at 2, 92% at 1); on CPUs both
    threads would share the same cores. An explicit choice always wins."""
    from pipeline.config import EmbedConfig, resolve_batches_in_flight

    assert EmbedConfig(input="in", output="out").batches_in_flight is None
    assert resolve_batches_in_flight(None, "cuda") == 2
    assert resolve_batches_in_flight(None, "cpu") == 1
    assert resolve_batches_in_flight(1, "cuda") == 1
    assert resolve_batches_in_flight(2, "cpu") == 2


def test_a_patch_embedding_of_another_form_keeps_its_conv():
    """Only a Conv3d whose kernel equals its stride (no padding, dilation or groups) is a
    matmul over each patch; any other stays as it is."""
    from types import SimpleNamespace

    def model_with(conv):
        pe = torch.nn.Module()
        pe.proj = conv
        return SimpleNamespace(vlm=SimpleNamespace(visual=SimpleNamespace(patch_embed=pe))), pe

    same, pe = model_with(torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=True))
    assert M.enable_linear_patch_embed(same) and pe.forward.__func__ is M._linear_patch_embed
    x = torch.randn(5, 3 * 2 * 4 * 4)
    np.testing.assert_allclose(pe(x).detach().numpy(),
                               pe.proj(x.view(-1, 3, 2, 4, 4)).view(-1, 8).detach().numpy(), atol=1e-5)
    for conv in (torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(1, 4, 4)),
                 torch.nn.Conv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), padding=1),
                 torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)):
        other, pe = model_with(conv)
        assert not M.enable_linear_patch_embed(other) and "forward" not in vars(pe)


def test_every_forward_brings_its_threads_inductor_settings_in_line(lm, monkeypatch):
    """Torch 2.13 keeps Inductor's config per thread, and an actor's blocks compile in the
    threads that call it (two batches in flight: Ray's threads), not the one that loaded the
    model: each forward applies the process's Inductor settings (VDR_PERSISTENT_NORMS) in its
    own thread first (tests/embed/test_compile_cache.py checks what that applies)."""
    import threading

    from pipeline.embed import inductor_heuristics

    seen = []
    monkeypatch.setattr(inductor_heuristics, "apply_in_this_thread", lambda: seen.append(threading.get_ident()))
    worker = threading.Thread(target=lambda: M.embed_pages(lm, page_images()[:1]))
    worker.start()
    worker.join()
    assert worker.ident in seen
