"""pipeline.score.fp8: the FP8 error bound holds, fp8-exact-topk returns the exact path's
top-k bit for bit (ids and scores) on random, planted, tied and near-tied data; the
scoring job refuses corpora that mix embedding precisions."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import score_queries
from pipeline import schema
from pipeline.config import ScoreConfig
from pipeline.devtools.synthetic import corpus_metadata, random_pages, write_corpus
from pipeline.score import fp8
from pipeline.score.corpus import CorpusError, ShardSpec, check_compatibility, corpus_precision, open_corpus
from pipeline.score.packing import pack_pages, pad_queries
from pipeline.score.maxsim import maxsim_reference, maxsim_scores, topk_desc
from pipeline.score.scorer import ShardScorer


def _unit(rng, n):
    x = rng.standard_normal((n, 128))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _planted(rng, n_pages, n_queries, lq=12, topic_size=10):
    """Unit-vector pages in topics of ``topic_size`` (noisy copies of a topic's vectors plus
    random ones); a query is noisy copies of one topic's vectors. The topic's pages stand
    out, as relevant pages do, so the FP8 bound leaves the other pages out."""
    n_topics = max(1, n_pages // topic_size)
    bases = [_unit(rng, 16).astype(np.float64) for _ in range(n_topics)]

    def noisy(rows, sigma):
        x = rows + sigma * rng.standard_normal(rows.shape) / np.sqrt(128)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    pages = []
    for i in range(n_pages):
        n = int(rng.integers(8, 40))
        topical = noisy(bases[i % n_topics][rng.integers(16, size=n // 2)], 0.5)
        pages.append(np.concatenate([topical, _unit(rng, n - n // 2)]).astype(np.float16))
    queries = [noisy(bases[int(rng.integers(n_topics))][rng.integers(16, size=lq)], 0.3).astype(np.float16)
               for _ in range(n_queries)]
    return pages, queries


def _exact_and_fp8(pages, queries, k, **kw):
    P = pack_pages(pages)
    Q, _ = pad_queries(queries)
    ev, ei = topk_desc(maxsim_scores(Q, P), k)
    v, i, stats = fp8.fp8_topk(Q, fp8.Fp8Pages.from_packed(P), k, maxsim_scores, **kw)
    return (ev, ei), (v, i), stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_for_every_pair(seed):
    rng = np.random.default_rng(seed)
    pages = [p[3] for p in random_pages(40, rng, max_len=30)]
    pages[3] = pages[3] * np.float16(1e-3)  # tiny values: e4m3 subnormals relative to the scale
    pages[4] = np.zeros((5, 128), np.float16)  # all-zero page
    pages[5] = (pages[5] * 300).astype(np.float16)  # large values
    pages[6][:, :3] = 40  # one large coordinate per vector
    queries = [(rng.standard_normal((int(rng.integers(1, 20)), 128)) / 8).astype(np.float16) for _ in range(7)]
    P, (Q, _) = pack_pages(pages), pad_queries(queries)
    shard = fp8.Fp8Pages.from_packed(P)
    qq = fp8.quantize_rows(Q.reshape(-1, 128))
    approx, u = fp8.candidate_scores(Q, qq, shard)
    bound = fp8.score_bounds(qq, Q.shape[0], Q.shape[1], shard, u)
    exact = maxsim_scores(Q, P).double()
    assert ((exact - approx.double()).abs() <= bound).all()
    # and against the float64 definition, independently of pipeline.score
    ref = torch.tensor([[maxsim_reference(q, p) for p in pages] for q in queries], dtype=torch.float64)
    assert ((ref - approx.double()).abs() <= bound).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_exact_top_k_and_rescores_few_pages(seed):
    rng = np.random.default_rng(seed)
    pages, queries = _planted(rng, 120, 9)
    k = int(rng.integers(1, 8))
    (ev, ei), (v, i), stats = _exact_and_fp8(pages, queries, k, group=int(rng.integers(1, 5)))
    assert torch.equal(i, ei) and torch.equal(v, ev)  # same ids, same float32 scores
    assert (stats["candidates"] >= k).all() and stats["candidates"].max() < 120
    assert stats["rescored_pairs"] < 9 * 120  # the subset path ran, not only the full fallback
    # the oracle agrees on the ranking
    ref = np.array([[maxsim_reference(q, p) for p in pages] for q in queries])
    for qi in range(len(queries)):
        assert i[qi].tolist() == sorted(range(len(pages)), key=lambda j: (-ref[qi, j], j))[:k]


def test_random_data_falls_back_to_the_whole_shard_and_stays_exact():
    rng = np.random.default_rng(7)
    pages = [_unit(rng, int(rng.integers(5, 30))) for _ in range(60)]
    queries = [_unit(rng, 10) for _ in range(5)]
    (ev, ei), (v, i), stats = _exact_and_fp8(pages, queries, 5)
    assert torch.equal(i, ei) and torch.equal(v, ev)
    assert stats["candidates"].max() > 30  # random unit vectors: scores closer than the bound


def test_near_ties_below_fp8_resolution_need_the_rescoring():
    # Page 1 is page 0 with one coordinate nudged by one float16 step toward the query: FP8
    # cannot see the difference (equal candidate scores, so the candidate pass alone ranks
    # page 0 first by the tie rule), but its exact score is higher.
    rng = np.random.default_rng(3)
    base = _unit(rng, 6)
    q = base[:3].copy()
    row = torch.from_numpy(base[:1])
    for c in np.argsort(-np.abs(base[0]))[1:]:  # not the largest coordinate: the scale stays
        nudged = base.copy()
        nudged[0, c] = np.nextafter(base[0, c], np.float16(np.sign(base[0, c]) * 2), dtype=np.float16)
        if torch.equal(fp8.quantize_rows(torch.from_numpy(nudged[:1])).dequantized(),
                       fp8.quantize_rows(row).dequantized()):
            break
    assert not np.array_equal(nudged, base)
    pages = [base, nudged] + [_unit(rng, 6) for _ in range(8)]
    P, (Q, _) = pack_pages(pages), pad_queries([q])
    shard = fp8.Fp8Pages.from_packed(P)
    approx, _ = fp8.candidate_scores(Q, fp8.quantize_rows(Q.reshape(-1, 128)), shard)
    assert approx[0, 0] == approx[0, 1]
    assert topk_desc(approx, 1)[1].item() == 0  # the candidate pass alone: wrong page
    (ev, ei), (v, i), stats = _exact_and_fp8(pages, [q], 1)
    assert ei.item() == 1 and torch.equal(i, ei) and torch.equal(v, ev)
    assert maxsim_reference(q, nudged) > maxsim_reference(q, base)


def test_exact_ties_go_to_the_lower_page_index():
    rng = np.random.default_rng(5)
    pages, queries = _planted(rng, 30, 4)
    pages = pages + [pages[0], pages[7], pages[0]]  # duplicates under other page ids
    queries = queries + [pages[0][:5]]
    (ev, ei), (v, i), _ = _exact_and_fp8(pages, queries, 6)
    assert torch.equal(i, ei) and torch.equal(v, ev)
    assert i[-1, :3].tolist() == [0, 30, 32]


def test_k_beyond_the_shard_and_tiny_shards():
    rng = np.random.default_rng(9)
    for n_pages in (1, 2, 5):
        pages = [_unit(rng, int(rng.integers(1, 4))) for _ in range(n_pages)]
        queries = [_unit(rng, 3), _unit(rng, 1)]
        (ev, ei), (v, i), stats = _exact_and_fp8(pages, queries, 10)
        assert i.shape == (2, n_pages) and torch.equal(i, ei) and torch.equal(v, ev)
        assert (stats["candidates"] == n_pages).all()


def test_select_candidates_by_hand():
    approx = torch.tensor([[10.0, 9.0, 8.0, 5.0, 9.5]])
    bound = torch.full((1, 5), 0.6, dtype=torch.float64)
    # lower bounds 9.4 8.4 7.4 4.4 8.9; k=2 -> threshold 8.9; upper 10.6 9.6 8.6 5.6 10.1
    assert fp8.select_candidates(approx, bound, 2).tolist() == [[True, True, False, False, True]]
    assert fp8.select_candidates(approx, bound, 9).all()


def _one_shard(tmp_path, page_vecs, queries, pages=None, n_files=1):
    """The pages written as a corpus (one page per doc unless ``pages`` names them), the whole
    corpus as one shard, and the queries as the flow sends them: (corpus, spec, flat, lengths)."""
    pages = pages or [(f"d{i}", 1, schema.page_id(f"d{i}", 1), v) for i, v in enumerate(page_vecs)]
    corpus = write_corpus(tmp_path / "emb", pages, n_files=n_files)
    c = open_corpus(corpus)
    spec = ShardSpec(0, tuple((f.path, 0, f.num_rows) for f in c.files), len(pages), sum(len(v) for v in page_vecs))
    return corpus, spec, np.concatenate(queries), np.array([len(q) for q in queries])


def test_shard_scorer_fp8_equals_exact(tmp_path):
    rng = np.random.default_rng(11)
    page_vecs, queries = _planted(rng, 50, 6)
    pages = [(f"d{i // 3}", i % 3 + 1, schema.page_id(f"d{i // 3}", i % 3 + 1), v) for i, v in enumerate(page_vecs)]
    pages.insert(7, ("empty", 1, "empty#1", np.zeros((0, 128), np.float16)))  # dropped by both paths
    corpus, spec, flat, lengths = _one_shard(tmp_path, page_vecs, queries, pages=pages, n_files=2)
    exact_scorer = ShardScorer(corpus, None, flat, lengths, 4, device="cpu")
    exact, s0 = exact_scorer.score(spec)
    fp8_scorer = ShardScorer(corpus, None, flat, lengths, 4, device="cpu", precision="fp8-exact-topk",
                             query_batch_size=4)
    got, s1 = fp8_scorer.score(spec)
    # the warm-up ran each scorer's own paths before the first shard (fp8: its kernels too)
    assert exact_scorer.warmed_up == ["exact"] and fp8_scorer.warmed_up == ["exact", "fp8-exact-topk"]
    assert got.equals(exact)
    assert s0["precision"] == "exact" and s1["precision"] == "fp8-exact-topk" and s1["dropped_empty_pages"] == 1
    assert len(s1["fp8_candidates_per_query"]) == 6 and s1["fp8_rescored_pairs"] < 6 * 50
    assert min(s1["fp8_candidates_per_query"]) >= 4


def test_shard_scorer_warms_up_while_the_first_shard_loads(tmp_path):
    """The scoring path's first use runs on a made-up shard while the first real one loads;
    only the first shard's stats carry it, and it changes no result."""
    rng = np.random.default_rng(12)
    page_vecs, queries = _planted(rng, 30, 5)
    corpus, spec, flat, lengths = _one_shard(tmp_path, page_vecs, queries)
    scorer = ShardScorer(corpus, None, flat, lengths, 3, device="cpu")
    first, s0 = scorer.score(spec)
    again, s1 = scorer.score(spec)
    assert s0["warm_up_s"] > 0 and s0["warm_up_wait_s"] >= 0
    assert "warm_up_s" not in s1 and s1["warm_up_wait_s"] == 0
    assert first.equals(again)
    scores = np.array([[(q.astype(np.float64) @ p.astype(np.float64).T).max(axis=1).sum() for p in page_vecs]
                       for q in queries])  # float64 MaxSim oracle (no ties among random pages)
    top = first.to_pydict()
    for qi in range(len(queries)):
        got = [pid for q, pid in zip(top["query_index"], top["page_id"]) if q == qi]
        want = [f"d{j}#1" for j in np.argsort(-scores[qi], kind="stable")[:3]]
        assert got == want


def test_precision_option():
    base = dict(corpus="c", queries="q", output="o", top_k=3)
    assert ScoreConfig.from_flags(["--precision", "fp8-exact-topk"], **base).precision == "fp8-exact-topk"
    assert ScoreConfig(**base).precision == "exact"
    with pytest.raises(ValueError, match="--precision must be one of exact, fp8-exact-topk"):
        ScoreConfig(**base, precision="fp8")
    help_text = score_queries.build_parser().format_help()
    assert "--precision" in help_text and "fp8-exact-topk" in help_text


def test_refuses_a_corpus_mixing_precisions(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pages = random_pages(9, rng, max_len=5)
    corpus = write_corpus(tmp_path / "emb", pages[:6], n_files=2)  # float32 (synthetic default)
    bf16 = {**corpus_metadata(), schema.META_DTYPE: b"bfloat16"}
    write_corpus(tmp_path / "other", pages[6:], n_files=1, metadata=bf16)
    os.rename(tmp_path / "other" / "pages" / "part-000.parquet", tmp_path / "emb" / "pages" / "part-009.parquet")
    c = open_corpus(corpus)
    assert c.dtypes == {"float32": 2, "bfloat16": 1} and corpus_precision(c) == ["bfloat16", "float32"]
    with pytest.raises(CorpusError, match=r"mixes embedding precisions \(vdr.dtype: 1 file\(s\) in bfloat16, "
                                          r"2 file\(s\) in float32\).*--allow-model-mismatch"):
        check_compatibility(c, model=None, query_prompt=None, max_visual_tokens=None, allow_mismatch=False)
    assert len(check_compatibility(c, model=None, query_prompt=None, max_visual_tokens=None, allow_mismatch=True)) == 1
    # The job refuses it before starting Ray or reading any embedding.
    qemb = tmp_path / "q.parquet"
    from pipeline.devtools.synthetic import write_query_embeddings, write_queries_jsonl

    write_query_embeddings(qemb, ["a"], [pages[0][3][:2]])
    qfile = write_queries_jsonl(tmp_path / "q.jsonl", ["a"])
    assert score_queries.main(["--corpus", corpus, "--queries", qfile, "--output", str(tmp_path / "out"),
                               "--top-k", "2", "--query-embeddings", str(qemb)]) == 2
    assert "error: " in (err := capsys.readouterr().err) and "mixes embedding precisions" in err, err
    # One precision everywhere: accepted, and named once.
    os.remove(tmp_path / "emb" / "pages" / "part-009.parquet")
    assert corpus_precision(open_corpus(corpus)) == "float32"
    assert pq.read_metadata(tmp_path / "emb" / "pages" / "part-000.parquet").metadata[schema.META_DTYPE] == b"float32"


def test_one_fp8_scale_per_page():
    """The shard's FP8 rows share their page's scale (the largest of its rows' max|x| / 448),
    so the fused kernel scales a page's maximum once; values still never saturate, and the
    measured error of each row is what the bound uses."""
    rng = np.random.default_rng(4)
    pages = [p[3] for p in random_pages(12, rng, max_len=40)]
    pages[2] = (pages[2] * np.linspace(1e-3, 2, len(pages[2]))[:, None]).astype(np.float16)  # rows of very different size
    P = pack_pages(pages)
    shard = fp8.Fp8Pages.from_packed(P)
    for j, page in enumerate(pages):
        rows = slice(int(P.offsets[j]), int(P.offsets[j + 1]))
        want = np.abs(page.astype(np.float32)).max() / fp8.E4M3_MAX
        assert torch.all(shard.q.scales[rows] == shard.page_scale[j])
        assert shard.page_scale[j].item() == pytest.approx(want, rel=1e-6)
        assert shard.q.values[rows].float().abs().max().item() <= fp8.E4M3_MAX
        x = P.vectors[rows].double()
        err = torch.linalg.vector_norm(x - shard.q.dequantized()[rows].double(), dim=1)
        assert (err <= shard.q.err[rows]).all()
    per_row = fp8.quantize_rows(P.vectors)  # without groups: each row its own scale
    rows2 = slice(int(P.offsets[2]), int(P.offsets[3]))
    assert len(set(per_row.scales[rows2].tolist())) > 1


def test_quantize_backends_on_cpu():
    """On CPU the default is the torch path; the Triton kernel is chosen only for CUDA rows
    (its equality with the torch path is tested in Triton's interpreter:
    tests/score/test_triton_configs.py); an unknown backend is refused."""
    x = torch.randn(10, 128, dtype=torch.float16)
    assert fp8.quantize_backend(x) == "torch"
    with pytest.raises(ValueError, match="backend"):
        fp8.quantize_rows(x, backend="cuda")
    a, b = fp8.quantize_rows(x), fp8.quantize_rows(x, backend="torch")
    assert torch.equal(a.values.view(torch.uint8), b.values.view(torch.uint8)) and torch.equal(a.err, b.err)
    P = pack_pages([x[:4].numpy(), x[4:].numpy()])
    s1, s2 = fp8.Fp8Pages.from_packed(P), fp8.Fp8Pages.from_packed(P, backend="torch")
    assert torch.equal(s1.page_err, s2.page_err) and torch.equal(s1.page_scale, s2.page_scale)


def test_shard_scorer_backend_torch_quantizes_without_triton(tmp_path, monkeypatch):
    """--backend torch is the way around a Triton that cannot compile here: the shard's FP8
    quantization must not use the Triton kernel either, even where it would be the default
    (CUDA rows with Triton installed, simulated here)."""
    from pipeline.score import triton_kernel

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton quantization kernel ran with backend='torch'")

    rng = np.random.default_rng(13)
    page_vecs, queries = _planted(rng, 20, 3)
    corpus, spec, flat, lengths = _one_shard(tmp_path, page_vecs, queries)
    exact, _ = ShardScorer(corpus, None, flat, lengths, 3, device="cpu").score(spec)
    monkeypatch.setattr(fp8, "quantize_backend", lambda x: "triton")
    monkeypatch.setattr(triton_kernel, "row_absmax_triton", no_triton)
    monkeypatch.setattr(triton_kernel, "quantize_rows_triton", no_triton)
    got, stats = ShardScorer(corpus, None, flat, lengths, 3, device="cpu", backend="torch",
                             precision="fp8-exact-topk").score(spec)
    assert got.equals(exact) and stats["precision"] == "fp8-exact-topk"


def test_candidate_pass_without_triton_falls_back_to_scaled_mm(monkeypatch):
    """FP8 tensor cores but no Triton (a CUDA node without it): torch's scaled_mm, not a failure;
    no FP8 tensor cores: the emulation."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(fp8, "fp8_supported", lambda d: True)
    monkeypatch.setattr(fp8, "triton_available", lambda: True)
    assert fp8.default_candidate(cuda) == fp8.FP8_CANDIDATE_BACKEND == "fused"
    monkeypatch.setattr(fp8, "triton_available", lambda: False)
    assert fp8.default_candidate(cuda) == "scaled_mm"
    monkeypatch.setattr(fp8, "fp8_supported", lambda d: False)
    assert fp8.default_candidate(torch.device("cpu")) == "emulated"
