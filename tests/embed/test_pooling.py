"""--pool-factor: colpali-engine 0.3.18's hierarchical token pooling, in the actor, recorded
in the metadata, refused when mixed (an embeddings output, a scored corpus) unless allowed."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import schema
from pipeline.embed import plan
from pipeline.embed.pooling import cluster_labels, pool_embeddings
from pipeline.score.corpus import CorpusError, check_compatibility, open_corpus

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "data", "pooling_reference.npz")
CASES = ("random_96", "structured_420", "tiny_model_page")


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        assert str(data["colpali_version"]) == "0.3.18"
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("factor", (2, 3))
@pytest.mark.parametrize("case", CASES)
def test_pooled_vectors_equal_colpali_engine_0_3_18(reference, case, factor):
    """Made by tests/data/make_pooling_reference.py with colpali's own pooler code."""
    x = torch.from_numpy(reference[f"{case}/input"].astype(np.float32))
    np.testing.assert_array_equal(cluster_labels(x, factor), reference[f"{case}/f{factor}/labels"])
    ours = pool_embeddings(x, factor)
    ref = reference[f"{case}/f{factor}/pooled"]
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ours.shape[0] <= len(x) // factor
    # vector by vector, in colpali's cluster order, within float16 rounding (half a step near 1)
    np.testing.assert_allclose(ours.numpy(), ref.astype(np.float32), rtol=0, atol=2.5e-4)
    np.testing.assert_allclose(ours.norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_factor_one_and_single_vectors_are_left_alone_and_bad_factors_refused():
    x = torch.nn.functional.normalize(torch.randn(10, 128), dim=-1)
    assert pool_embeddings(x, 1) is x
    assert pool_embeddings(x[:1], 3) is not None and pool_embeddings(x[:1], 3).shape == (1, 128)
    assert pool_embeddings(x[:2], 3).shape == (1, 128)  # max(n // f, 1) clusters
    with pytest.raises(ValueError, match="pool_factor"):
        pool_embeddings(x, 0)


def test_model_pools_each_page_after_the_forward_and_never_queries(tiny_model):
    from pipeline.embed.model import embed_pages, embed_queries, load_model

    lm = load_model(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    pages = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((112, 168), (224, 140))]
    plain = embed_pages(lm, pages)
    pooled = embed_pages(lm, pages, pool_factor=3)
    for p, q in zip(plain, pooled):
        assert len(q) == len(p) // 3
        np.testing.assert_allclose(q, pool_embeddings(torch.from_numpy(p), 3).numpy(), atol=1e-5)
    assert "pool_factor" not in embed_queries.__code__.co_varnames


def test_an_output_of_another_pool_factor_is_another_setting():
    old = plan.settings_of({schema.META_MODEL: b"m", schema.META_MAX_VISUAL_TOKENS: b"768"})  # before pooling
    assert plan.setting_differences(old, {**old, "pool_factor": "1"}) == []
    assert plan.setting_differences(old, {**old, "pool_factor": "3"}) == [("--pool-factor", "1", "3")]
    assert plan.setting_differences({**old, "pool_factor": "2"}, {**old, "pool_factor": "3"}) == [
        ("--pool-factor", "2", "3")]


def _pages_file(path, pool_factor):
    vectors = [np.eye(128, dtype=np.float16)[:3]]
    table = pa.table({schema.DOC_ID: ["d"], schema.PAGE_NUMBER: pa.array([1], pa.int32()),
                      schema.PAGE_ID: [f"d#{os.path.basename(path)}"],
                      schema.EMBEDDING: schema.embeddings_to_arrow(vectors)})
    meta = {schema.META_MODEL: b"m"}
    if pool_factor is not None:
        meta[schema.META_POOL_FACTOR] = str(pool_factor).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_scoring_refuses_a_corpus_that_mixes_pool_factors_unless_allowed(tmp_path):
    (tmp_path / "pages").mkdir()
    _pages_file(tmp_path / "pages" / "a.parquet", None)  # written before pooling existed: factor 1
    _pages_file(tmp_path / "pages" / "b.parquet", 1)
    corpus = open_corpus(str(tmp_path))
    assert corpus.pool_factors == {1: 2}
    assert check_compatibility(corpus, model="m", query_prompt=None, max_visual_tokens=None, allow_mismatch=False) == []
    _pages_file(tmp_path / "pages" / "c.parquet", 3)
    corpus = open_corpus(str(tmp_path))
    assert corpus.pool_factors == {1: 2, 3: 1}
    with pytest.raises(CorpusError, match=r"2 file\(s\) at pool factor 1, 1 file\(s\) at pool factor 3.*"
                                          r"--allow-model-mismatch"):
        check_compatibility(corpus, model="m", query_prompt=None, max_visual_tokens=None, allow_mismatch=False)
    assert check_compatibility(corpus, model="m", query_prompt=None, max_visual_tokens=None, allow_mismatch=True)


@pytest.mark.slow
def test_embed_job_pools_records_the_factor_and_refuses_another(ray_session, tiny_model, sample_corpus, tmp_path,
                                                               capsys):
    from jobs import embed_corpus

    out = str(tmp_path / "out")
    args = ["--input", sample_corpus, "--output", out, "--model", tiny_model, "--max-visual-tokens", "64",
            "--batch-size", "8"]
    # --precision fp8 rides along (emulated on CPU): one job run checks both settings
    assert embed_corpus.main([*args, "--pool-factor", "3", "--precision", "fp8"]) == 0
    pages = pq.read_table(os.path.join(out, "pages"))
    assert pages.num_rows > 0
    counts = pages.column(schema.N_VECTORS).to_pylist()
    assert counts == [len(v) for v in schema.arrow_to_embeddings(pages.column(schema.EMBEDDING))]
    # a page of the tiny model at 64 visual tokens has at most 64 + 11 prompt tokens: 25 after pooling
    assert 0 < max(counts) <= (64 + 11) // 3
    for name in os.listdir(os.path.join(out, "pages")):
        meta = pq.read_schema(os.path.join(out, "pages", name)).metadata
        assert meta[schema.META_POOL_FACTOR] == b"3" and meta[schema.META_PRECISION] == b"fp8"
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["pool_factor"] == 3 and config["settings"]["pool_factor"] == "3"
    assert config["settings"]["precision"] == "fp8"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["pool_factor"] == 3 and summary["precision"] == "fp8"
    capsys.readouterr()
    assert embed_corpus.main(args) == 2  # unpooled into a pooled output: refused, nothing written
    err = capsys.readouterr().err
    assert "pool factor 3" in err and "--pool-factor 1" in err and "--force-new-config" in err, err
    assert "--precision default" in err, err


def test_pooling_lets_go_of_the_device_before_wards_merge_loop(tiny_model, monkeypatch):
    """Two batches in flight: a batch's device work runs under the actor's device lock. Ward's
    merge loop (scipy, on the host, 3-13 ms a page) must run after the lock is let go, or the
    GPU waits for it; the pooled vectors stay those of pool_embeddings."""
    from pipeline.embed import pooling
    from pipeline.embed.model import TurnLock, embed_pages, load_model

    lm = load_model(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((112, 168), (224, 140), (112, 168))]
    lock = TurnLock()
    held_during_merge = []
    real = pooling.labels_from_distances

    def watched(*args, **kwargs):
        held_during_merge.append(lock._next != lock._serving)  # a ticket taken and not yet served out
        return real(*args, **kwargs)

    monkeypatch.setattr(pooling, "labels_from_distances", watched)
    pooled = embed_pages(lm, pages, pool_factor=3, device_lock=lock, out_dtype=torch.float16)
    assert held_during_merge == [False] * len(pages)
    monkeypatch.setattr(pooling, "labels_from_distances", real)
    plain = embed_pages(lm, pages)
    for p, q in zip(plain, pooled):
        assert q.dtype == np.float16 and len(q) == len(p) // 3
        np.testing.assert_allclose(q.astype(np.float32), pool_embeddings(torch.from_numpy(p), 3).numpy(),
                                   rtol=0, atol=1e-3)  # float16 rounding of values <= 1


def test_pooled_rows_come_back_from_the_flat_copy_row_by_row():
    """The host half of the actor's pooling (PendingEmbeddings) on what the device copies back:
    every row's vectors one after another in the model's dtype (bf16 on GPUs) and the condensed
    distances of the rows with more than one vector; rows of 0 and 1 vectors have none."""
    from pipeline.embed.model import PendingEmbeddings, pooling_distances

    g = torch.Generator().manual_seed(3)
    lengths = [0, 1, 5, 2, 7, 30]
    flat = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1).to(torch.bfloat16)
    pending = PendingEmbeddings(flat, lengths, None, None, None, pool_factor=3,
                                condensed=pooling_distances(flat, lengths), out_dtype=torch.float16)
    rows = pending.result()
    start = 0
    for n, row in zip(lengths, rows):
        want = pool_embeddings(flat[start : start + n].float(), 3).to(torch.float16).numpy()
        start += n
        assert row.dtype == np.float16 and row.shape == (max(n // 3, 1) if n > 1 else n, 128)
        np.testing.assert_array_equal(row, want)


def test_pooling_distances_copied_row_by_row_equal_the_concatenation():
    """The CUDA path writes each row's distances into its slice of one host buffer as they are
    queued (no device-side concatenation); the buffer must hold what the concatenation holds,
    rows of 0 and 1 vectors taking no room, and a buffer of the wrong size is refused."""
    from pipeline.embed.model import condensed_size, pooling_distances

    g = torch.Generator().manual_seed(5)
    lengths = [3, 0, 1, 9, 2, 17]
    flat = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1).to(torch.bfloat16)
    assert condensed_size(lengths) == 3 + 36 + 1 + 136
    out = torch.full((condensed_size(lengths),), float("nan"), dtype=torch.float64)
    assert pooling_distances(flat, lengths, out=out) is out
    torch.testing.assert_close(out, pooling_distances(flat, lengths), rtol=0, atol=0)
    with pytest.raises(ValueError, match="176"):
        pooling_distances(flat, lengths, out=torch.empty(10, dtype=torch.float64))


def test_the_host_half_of_the_pooling_is_timed_by_part():
    """The actor's timer adds the merge loop's and the means' host seconds (benchmarks report
    them per batch: on an H200 the pooled actor's host work was ~0.5 s a batch, not split)."""
    from pipeline.embed.model import ForwardTimer, PendingEmbeddings, pooling_distances

    g = torch.Generator().manual_seed(4)
    lengths = [40, 1, 25]
    flat = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1)
    timer = ForwardTimer("cpu")
    PendingEmbeddings(flat, lengths, None, None, timer, pool_factor=3,
                      condensed=pooling_distances(flat, lengths)).result()
    assert timer.pool_host_s["merge"] > 0 and timer.pool_host_s["means"] > 0
    merge = timer.pool_host_s["merge"]
    PendingEmbeddings(flat, lengths, None, None, timer, pool_factor=3,
                      condensed=pooling_distances(flat, lengths)).result()
    assert timer.pool_host_s["merge"] > merge


def _rows(lengths, seed=6):
    from pipeline.embed.model import pooling_distances

    g = torch.Generator().manual_seed(seed)
    flat = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1).to(torch.bfloat16)
    return flat, pooling_distances(flat, lengths).numpy()


def test_ward_merges_in_worker_processes_equal_the_merges_in_this_thread():
    """--pool-factor's merge loops run in worker processes (scipy's linkage holds the GIL, so in
    the actor's threads it stalled the next batch's kernel launches): the labels must be those
    of the same merges run here, row by row, rows of 0 and 1 vectors having none, and the work
    must really run in other processes."""
    from pipeline.embed.pooling import WardMerges

    lengths = [0, 1, 2, 5, 40, 300, 17]
    _, condensed = _rows(lengths)
    merges = WardMerges(2)
    try:
        got = merges.labels(condensed, lengths, 3)
        want = WardMerges(0).labels(condensed, lengths, 3)
        assert [g is None for g in got] == [n <= 1 for n in lengths]
        for g, w in zip(got, want):
            if w is not None:
                np.testing.assert_array_equal(g, w)
        pids = merges.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        merges.close()


def test_a_dead_merge_worker_loses_no_row(caplog):
    """A merge worker killed mid-job (out of memory, a signal): that batch's merges run again in
    the calling thread with the same labels, a warning says so, and the next batch gets new
    workers."""
    import signal
    import time

    from pipeline.embed.pooling import WardMerges

    lengths = [60, 3, 120]
    _, condensed = _rows(lengths, seed=7)
    want = WardMerges(0).labels(condensed, lengths, 2)
    merges = WardMerges(1)
    try:
        merges.labels(condensed, lengths, 2)
        first = merges._pool
        for w in first:
            os.kill(w.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(w.process.is_alive() for w in first) and time.monotonic() < deadline:
            time.sleep(0.05)
        with caplog.at_level("WARNING", logger="pipeline.embed.pooling"):
            got = merges.labels(condensed, lengths, 2)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert "merge workers failed" in caplog.text and "MergeWorkerLost" in caplog.text
        again = merges.labels(condensed, lengths, 2)
        assert merges._pool is not None and merges._pool is not first
        for g, w in zip(again, want):
            np.testing.assert_array_equal(g, w)
    finally:
        merges.close()


def test_pooled_rows_are_the_same_with_merges_in_worker_processes():
    """The actor's host half of the pooling (PendingEmbeddings) gives the same float16 vectors
    whether its merge loops run here or in worker processes."""
    from pipeline.embed.model import PendingEmbeddings, pooling_distances
    from pipeline.embed.pooling import WardMerges

    lengths = [0, 1, 5, 2, 7, 30, 200]
    flat, _ = _rows(lengths, seed=8)
    merges = WardMerges(2)
    try:
        rows = [PendingEmbeddings(flat, lengths, None, None, None, pool_factor=3,
                                  condensed=pooling_distances(flat, lengths), out_dtype=torch.float16,
                                  merges=m).result() for m in (None, merges)]
    finally:
        merges.close()
    for a, b in zip(*rows):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("raw,want", [("", 2), ("0", 0), (" 4 ", 4)])
def test_pool_processes_from_the_environment(monkeypatch, raw, want):
    from pipeline.embed.pooling import WardMerges

    monkeypatch.setenv("VDR_POOL_PROCESSES", raw)
    assert WardMerges.from_env().processes == want


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_a_misspelt_pool_processes_is_refused_before_the_weights_load(monkeypatch, raw):
    from pipeline.embed.stages import PageEmbedder

    monkeypatch.setenv("VDR_POOL_PROCESSES", raw)
    with pytest.raises(ValueError, match="VDR_POOL_PROCESSES|processes must be"):
        PageEmbedder("/nonexistent/model", device="cpu", pool_factor=3)


def test_merge_workers_that_cannot_start_fall_back_and_are_given_up_after_failures_in_a_row(monkeypatch, caplog):
    """Workers that cannot start (a spawn refused, too many open files) lose no row either: the
    batch merges here; after GIVE_UP_AFTER failures in a row the actor stops trying, and a
    success in between starts the count again."""
    from pipeline.embed.pooling import WardMerges

    lengths = [40, 9]
    _, condensed = _rows(lengths, seed=10)
    want = WardMerges(0).labels(condensed, lengths, 3)
    merges = WardMerges(2)
    real = WardMerges._workers
    failing = [True]

    def workers(self):
        if failing[0]:
            raise OSError(24, "Too many open files")
        return real(self)

    monkeypatch.setattr(WardMerges, "_workers", workers)
    try:
        with caplog.at_level("WARNING", logger="pipeline.embed.pooling"):
            for _ in range(WardMerges.GIVE_UP_AFTER - 1):
                for g, w in zip(merges.labels(condensed, lengths, 3), want):
                    np.testing.assert_array_equal(g, w)
            assert merges.processes == 2 and "OSError" in caplog.text
            failing[0] = False
            merges.labels(condensed, lengths, 3)  # a success: the count starts again
            failing[0] = True
            for _ in range(WardMerges.GIVE_UP_AFTER - 1):
                merges.labels(condensed, lengths, 3)
            assert merges.processes == 2
            for g, w in zip(merges.labels(condensed, lengths, 3), want):
                np.testing.assert_array_equal(g, w)
        assert merges.processes == 0 and "every later batch" in caplog.text
    finally:
        merges.close()


def test_an_error_of_the_merge_itself_is_raised_as_it_is():
    """Bad distances (NaN) make scipy refuse them in the worker: that error reaches the caller,
    not a fallback."""
    from pipeline.embed.pooling import WardMerges

    lengths = [12, 30]
    _, condensed = _rows(lengths, seed=11)
    condensed = condensed.copy()
    condensed[3] = np.nan
    merges = WardMerges(1)
    try:
        with pytest.raises(ValueError, match="finite"):
            merges.labels(condensed, lengths, 3)
    finally:
        merges.close()


def test_two_batches_in_flight_share_one_pool_of_merge_workers():
    """Two threads (two batches in flight) call one WardMerges at once: each gets its own rows'
    labels."""
    import threading

    from pipeline.embed.pooling import WardMerges

    batches = [([90, 3, 40], 12), ([25, 60], 13)]
    data = [(lengths, _rows(lengths, seed=seed)[1]) for lengths, seed in batches]
    merges = WardMerges(2)
    got: dict = {}

    def run(i):
        lengths, condensed = data[i]
        got[i] = [merges.labels(condensed, lengths, 2) for _ in range(3)]

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        merges.close()
    for i, (lengths, condensed) in enumerate(data):
        want = WardMerges(0).labels(condensed, lengths, 2)
        for labels in got[i]:
            for g, w in zip(labels, want):
                np.testing.assert_array_equal(g, w)


def test_merge_workers_start_inside_a_ray_actor(ray_session):
    """In a real Ray actor (its ``__main__`` is Ray's default_worker.py, which multiprocessing
    imports in each worker) the merge workers start and answer: the labels come from other
    processes, with no fallback to the actor's thread (which would only show in a warning)."""
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Merger:
        def run(self, condensed, lengths):
            from pipeline.embed.pooling import WardMerges

            merges = WardMerges(2)
            try:
                labels = merges.labels(condensed, lengths, 3)
                pids = merges.worker_pids()
                return labels, os.getpid() not in pids, merges.processes, merges._broken
            finally:
                merges.close()

    from pipeline.embed.pooling import WardMerges

    lengths = [70, 1, 33]
    _, condensed = _rows(lengths, seed=14)
    actor = Merger.remote()
    try:
        labels, elsewhere, processes, broken = ray.get(actor.run.remote(condensed, lengths), timeout=180)
    finally:
        ray.kill(actor)
    assert elsewhere and processes == 2 and broken == 0
    for g, w in zip(labels, WardMerges(0).labels(condensed, lengths, 3)):
        assert (g is None) == (w is None)
        if w is not None:
            np.testing.assert_array_equal(g, w)


def test_an_actor_with_merge_workers_ends_without_tracebacks(ray_session):
    """A pooled actor that ends as Ray Data ends its actors (the last handle dropped) writes
    nothing to its error log: Ray kills an actor's child processes before its Python exits,
    and the merge workers of a ProcessPoolExecutor (until 2026-12-05) left named semaphores
    whose unregistering then relaunched multiprocessing's resource tracker, which printed
    "process died unexpectedly ... Some resources might leak" and five KeyError tracebacks
    at the end of every pooled job."""
    import glob
    import time

    ray = ray_session

    @ray.remote(num_cpus=0)
    class Merger:
        def run(self, condensed, lengths):
            from pipeline.embed.pooling import WardMerges

            self.merges = WardMerges(2)  # kept, as the embedding actor keeps its own
            self.merges.labels(condensed, lengths, 3)
            return os.getpid(), ray.get_runtime_context().get_worker_id()

    lengths = [70, 33]
    _, condensed = _rows(lengths, seed=15)
    actor = Merger.remote()
    pid, worker_id = ray.get(actor.run.remote(condensed, lengths), timeout=180)
    del actor  # a graceful exit, as when Ray Data's pool lets go of its actors
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{pid}"), "the actor did not end"
    logs = ray._private.worker._global_node.get_logs_dir_path()
    err = glob.glob(os.path.join(logs, f"worker-{worker_id}-*.err"))
    assert len(err) == 1, (logs, worker_id)
    text = open(err[0]).read()
    for sign in ("resource_tracker", "Traceback", "KeyError", "leak"):
        assert sign not in text, text[-3000:]


def test_a_batch_that_finds_its_workers_closed_by_another_batch_loses_no_row(monkeypatch, caplog):
    """Two batches in flight: one took the workers just before the other's failure closed them.
    It merges in its own thread instead of failing (a closed pipe raises OSError, not EOF)."""
    from pipeline.embed.pooling import WardMerges

    lengths = [50, 8, 31]
    _, condensed = _rows(lengths, seed=16)
    want = WardMerges(0).labels(condensed, lengths, 3)
    merges = WardMerges(2)
    try:
        merges.labels(condensed, lengths, 3)
        stale = merges._pool
        for w in stale:  # what the other batch's failure does to them
            w.close(wait=False)
        real, handed = WardMerges._workers, []

        def workers(self):
            if not handed:
                handed.append(True)
                return stale
            return real(self)

        monkeypatch.setattr(WardMerges, "_workers", workers)
        with caplog.at_level("WARNING", logger="pipeline.embed.pooling"):
            got = merges.labels(condensed, lengths, 3)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert "merge workers failed" in caplog.text
        for g, w in zip(merges.labels(condensed, lengths, 3), want):  # the pool still works
            np.testing.assert_array_equal(g, w)
    finally:
        merges.close()


def test_a_batch_whose_sender_thread_cannot_start_falls_back_and_the_next_batch_is_right(monkeypatch, caplog):
    """A sender thread that cannot start (a thread limit) after another started: the batch merges
    here, and no answer of it is left in a pipe for the next batch to read as its own (review
    2026-12-05: the next batch returned the previous batch's labels)."""
    import threading

    from pipeline.embed.pooling import WardMerges

    a, b = [300, 280, 5, 4], [6, 7, 300, 280]
    ca, cb = _rows(a, seed=17)[1], _rows(b, seed=18)[1]
    want_a, want_b = WardMerges(0).labels(ca, a, 3), WardMerges(0).labels(cb, b, 3)
    merges = WardMerges(2)
    real, started = threading.Thread.start, []

    def start(self):
        if self.name == "vdr-ward-send":
            started.append(self)
            if len(started) == 2:
                raise RuntimeError("can't start new thread")
        return real(self)

    try:
        merges.labels(ca, a, 3)
        monkeypatch.setattr(threading.Thread, "start", start)
        with caplog.at_level("WARNING", logger="pipeline.embed.pooling"):
            got = merges.labels(ca, a, 3)
        monkeypatch.setattr(threading.Thread, "start", real)
        assert len(started) == 2 and "can't start new thread" in caplog.text
        for g, w in zip(got, want_a):
            np.testing.assert_array_equal(g, w)
        for g, w in zip(merges.labels(cb, b, 3), want_b):
            np.testing.assert_array_equal(g, w)
    finally:
        merges.close()


def test_a_sender_that_fails_does_not_leave_the_batch_waiting():
    """An error in a sender thread (here a length that is no integer) ends the batch's workers,
    so the reader is not left waiting for answers that never come (review 2026-12-05: it hung,
    holding the lock every later batch needs); the caller gets the error the merge in its own
    thread raises."""
    import threading

    from pipeline.embed.pooling import WardMerges

    lengths = [40, 30]
    _, condensed = _rows(lengths, seed=19)
    merges = WardMerges(2)
    outcome: list = []

    def run():
        try:
            merges.labels(condensed, [40, 30.0], 3)
        except Exception as exc:  # noqa: BLE001 - what the caller gets
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    try:
        merges.labels(condensed, lengths, 3)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the batch is still waiting"
        assert len(outcome) == 1 and isinstance(outcome[0], TypeError)
        want = WardMerges(0).labels(condensed, lengths, 3)
        for g, w in zip(merges.labels(condensed, lengths, 3), want):
            np.testing.assert_array_equal(g, w)
    finally:
        if t.is_alive():  # the bug back: free the waiting batch (and this suite) by ending the workers
            for w in merges._pool or []:
                w.process.kill()
        merges.close()
