"""--precision fp8: FP8 (e4m3) matmuls with row-wise scales in the model's large Linear
layers, recorded as vdr.precision, a setting of its own, refused when mixed by scoring."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema
from pipeline.embed import fp8, plan
from pipeline.score.corpus import CorpusError, check_compatibility, open_corpus


def test_rows_are_quantized_to_fp8_with_their_own_scale():
    x = torch.randn(64, 256, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    x[5] = 0
    q, s = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1) and s.dtype == torch.float32
    back = q.float() * s
    assert torch.all(back[5] == 0) and s[5] == 1
    # each row's largest value maps to 448 (e4m3's max); e4m3 keeps 3 mantissa bits: relative
    # error of a normal value at most 2^-4
    assert torch.allclose(q.float().abs().amax(dim=1)[torch.arange(64) != 5], torch.tensor(448.0))
    big = x.abs() > x.abs().amax(dim=1, keepdim=True) / 64
    rel = ((back.double() - x).abs() / x.abs())[big]
    assert rel.max() <= 2**-4 + 1e-6


def test_fp8_linear_is_the_product_of_the_fp8_values_and_close_to_the_original():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    layer = fp8.Fp8Linear(lin)
    x = torch.randn(3, 7, 128)
    y = layer(x)
    assert y.shape == (3, 7, 96) and y.dtype == torch.float32
    xq, xs = fp8.quantize_rows(x.reshape(-1, 128))
    wq, ws = fp8.quantize_rows(lin.weight.detach())
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T + lin.bias.double()
    torch.testing.assert_close(y.reshape(-1, 96).double(), exact, rtol=1e-5, atol=1e-5)
    ref = lin(x)
    cos = torch.nn.functional.cosine_similarity(y.reshape(-1, 96), ref.reshape(-1, 96), dim=1)
    assert cos.min() > 0.995
    with pytest.raises(ValueError, match="divisible by 16"):
        fp8.Fp8Linear(torch.nn.Linear(100, 96))


def test_the_model_runs_its_large_matmuls_in_fp8_and_keeps_the_embeddings_close(tiny_model):
    from pipeline.embed.model import embed_pages, embed_queries, load_model

    base = load_model(tiny_model, device="cpu")
    n_linear = len(fp8.fp8_targets(base.model))
    lm = load_model(tiny_model, device="cpu", precision="fp8")
    assert lm.precision == "fp8"
    converted = [m for m in lm.model.modules() if isinstance(m, fp8.Fp8Linear)]
    # vision blocks (qkv, proj, fc1, fc2) x 2, merger (2), text layers (q, k, v, o, gate, up, down) x 2
    assert len(converted) == n_linear == 4 * 2 + 2 + 7 * 2
    assert type(lm.model.embedding_proj_layer) is torch.nn.Linear  # the stored 128-d vectors' layer
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((112, 168), (224, 140), (112, 168))]
    ref, got = embed_pages(base, pages), embed_pages(lm, pages)
    cos = np.concatenate([(a * b).sum(axis=1) for a, b in zip(ref, got)])  # unit vectors
    assert [len(v) for v in ref] == [len(v) for v in got]
    assert cos.mean() > 0.99 and cos.min() > 0.95, (cos.mean(), cos.min())
    assert not np.array_equal(ref[0], got[0])  # really another path
    assert len(embed_queries(lm, ["a query"])) == 1
    with pytest.raises(ValueError, match="--precision"):
        load_model(tiny_model, device="cpu", precision="int4")


def test_precision_is_a_setting_and_old_outputs_are_default():
    old = plan.settings_of({schema.META_MODEL: b"m", schema.META_MAX_VISUAL_TOKENS: b"768"})
    assert plan.setting_differences(old, {**old, "precision": "default"}) == []
    assert plan.setting_differences(old, {**old, "precision": "fp8"}) == [("--precision", "default", "fp8")]


def _pages_file(path, precision):
    table = pa.table({schema.DOC_ID: ["d"], schema.PAGE_NUMBER: pa.array([1], pa.int32()),
                      schema.PAGE_ID: [f"d#{os.path.basename(path)}"],
                      schema.EMBEDDING: schema.embeddings_to_arrow([np.eye(128, dtype=np.float16)[:3]])})
    meta = {schema.META_MODEL: b"m"}
    if precision is not None:
        meta[schema.META_PRECISION] = precision.encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_scoring_refuses_a_corpus_that_mixes_precisions_unless_allowed(tmp_path):
    (tmp_path / "pages").mkdir()
    _pages_file(tmp_path / "pages" / "a.parquet", None)  # before --precision existed: default
    _pages_file(tmp_path / "pages" / "b.parquet", "default")
    corpus = open_corpus(str(tmp_path))
    assert corpus.precisions == {"default": 2}
    kwargs = dict(model="m", query_prompt=None, max_visual_tokens=None)
    assert check_compatibility(corpus, **kwargs, allow_mismatch=False) == []
    _pages_file(tmp_path / "pages" / "c.parquet", "fp8")
    corpus = open_corpus(str(tmp_path))
    with pytest.raises(CorpusError, match=r"2 file\(s\) at precision default, 1 file\(s\) at precision fp8.*"
                                          r"--allow-model-mismatch"):
        check_compatibility(corpus, **kwargs, allow_mismatch=False)
    assert check_compatibility(corpus, **kwargs, allow_mismatch=True)
