"""pipeline.score.actor: the scoring job's actor front imports no torch, answers the memory
question and reads its first shard while the real scorer is still being built (torch's
import and CUDA's start, seconds on a GPU node), with the same results as the scorer."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np

from pipeline import schema
from pipeline.cluster import available_host_bytes, visible_gpu_free_bytes
from pipeline.devtools.synthetic import write_corpus
from pipeline.score import actor
from pipeline.score.corpus import ShardSpec, open_corpus
from pipeline.score.scorer import ShardScorer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_driver_and_actor_modules_import_no_torch():
    """Ray imports the actor's module in the actor's process before its constructor runs,
    and the driver imports the flow: neither may pull in torch (seconds of the job's start)."""
    code = ("import sys\nimport pipeline.score.actor, pipeline.score.flow, jobs.score_queries\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


class _SlowStart(actor.ScorerFront):
    """The front with a scorer that takes until ``release`` is set to build (as torch's
    import does on a GPU node)."""

    def __init__(self, *args, release: threading.Event, **kwargs):
        self.release = release
        super().__init__(*args, **kwargs)

    def _build(self, *args):
        self.release.wait(60)
        super()._build(*args)


def _corpus(tmp_path):
    rng = np.random.default_rng(5)
    pages = []
    for i in range(40):
        v = rng.standard_normal((int(rng.integers(3, 20)), 128))
        pages.append((f"d{i // 4}", i % 4 + 1, schema.page_id(f"d{i // 4}", i % 4 + 1),
                      (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)))
    uri = write_corpus(tmp_path / "emb", pages, n_files=3)
    c = open_corpus(uri)
    spec = ShardSpec(0, tuple((f.path, 0, f.num_rows) for f in c.files), 40, sum(len(p[3]) for p in pages))
    q = [(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
         for x in (rng.standard_normal((5, 128)) for _ in range(6))]
    return uri, spec, np.concatenate(q), np.array([len(x) for x in q])


def test_first_shard_is_read_while_the_scorer_starts(tmp_path):
    uri, spec, qflat, qlen = _corpus(tmp_path)
    want, _ = ShardScorer(uri, None, qflat, qlen, 3, device="cpu").score(spec)

    release = threading.Event()
    front = _SlowStart(uri, None, qflat, qlen, 3, device="cpu", release=release)
    assert front.memory_bytes() > 0  # answered without the scorer (host memory on CPU)
    result = {}
    call = threading.Thread(target=lambda: result.update(out=front.score(spec)))
    call.start()
    deadline = time.monotonic() + 30
    while front._reader is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # the shard's Parquet rows are read and decoded while the scorer still is not built
    first = front._reader.submit(lambda: None)
    first.result(timeout=30)  # the reader is free again: the first shard's load has finished
    assert not front._built.is_set() and "out" not in result
    time.sleep(0.2)
    release.set()
    call.join(60)
    got, stats = result["out"]
    assert got.equals(want)
    assert stats["read_during_start"] and not stats["prefetched"]
    assert stats["start_wait_s"] >= 0.2 and stats["scorer_start_s"] >= 0.2
    assert stats["wait_s"] < stats["start_wait_s"]  # the load was done before the scorer was
    again, stats2 = front.score(spec)
    assert again.equals(want) and not stats2["read_during_start"] and "scorer_start_s" not in stats2


def test_a_scorer_that_cannot_start_fails_the_call_with_its_reason(tmp_path):
    """Asked for a GPU where CUDA cannot start (this CPU machine): the call fails and says why."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    uri, spec, qflat, qlen = _corpus(tmp_path)
    front = actor.ScorerFront(uri, None, qflat, qlen, 3, device="cuda")
    with pytest.raises(RuntimeError, match="the shard scorer could not start"):
        front.score(spec)
    with pytest.raises(RuntimeError, match="the shard scorer could not start"):
        front.memory_bytes()  # no NVML here: the scorer's own answer, which failed


def test_gpu_memory_without_torch():
    """NVML answers for the visible GPUs, less a context's reserve; nothing visible or a MIG
    slice (not mapped here) leaves the answer to torch."""
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "MIG-1234"}) is None
    free = visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "0"})
    assert free is None or free >= 0  # None on this CPU machine (no driver)
    assert available_host_bytes() > 0


def _fake_nvml(gpus):
    """A pynvml stand-in: ``gpus`` = [(uuid, name, total, free, mig_enabled)] in NVML's (PCI) order."""
    import types

    def mig_mode(h):
        if gpus[h][4] is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return [int(gpus[h][4]), int(gpus[h][4])]

    return types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: range(len(gpus))[i],
        nvmlDeviceGetHandleByUUID=lambda u: [g[0] for g in gpus].index(u),
        nvmlDeviceGetName=lambda h: gpus[h][1],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=gpus[h][2], free=gpus[h][3]),
        nvmlDeviceGetMigMode=mig_mode)


def test_gpu_memory_through_nvml_only_where_it_names_this_process_gpu(monkeypatch):
    """An index in CUDA_VISIBLE_DEVICES is CUDA's (fastest first by default), NVML's is PCI
    order: the same GPU only on a node of one model, so a mixed node answers None (torch's
    figure) unless CUDA_DEVICE_ORDER=PCI_BUS_ID; a GPU in MIG mode gives the process one slice,
    not its free memory: None too."""
    from pipeline import cluster

    GiB = 1 << 30
    reserve = cluster.NVML_CONTEXT_RESERVE_BYTES
    same = [("GPU-a", "NVIDIA H200", 141 * GiB, 100 * GiB, None), ("GPU-b", "NVIDIA H200", 141 * GiB, 60 * GiB, False)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(same))
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "1"}) == 60 * GiB - reserve
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "0,1"}) == 60 * GiB - reserve
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "GPU-a"}) == 100 * GiB - reserve
    assert visible_gpu_free_bytes({}) == 60 * GiB - reserve

    mixed = [("GPU-a", "NVIDIA A100-SXM4-40GB", 40 * GiB, 39 * GiB, False),
             ("GPU-b", "NVIDIA H200", 141 * GiB, 100 * GiB, None)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(mixed))
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "1"}) is None  # CUDA's 1 may be the A100
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) == 100 * GiB - reserve
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "GPU-b"}) == 100 * GiB - reserve  # a UUID names one GPU
    assert visible_gpu_free_bytes({}) == 39 * GiB - reserve  # all of them: the smallest

    mig = [("GPU-a", "NVIDIA H200", 141 * GiB, 140 * GiB, True)]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(mig))
    assert visible_gpu_free_bytes({"CUDA_VISIBLE_DEVICES": "0"}) is None
    assert visible_gpu_free_bytes({}) is None


def test_each_call_scores_its_jobs_queries(tmp_path):
    """The job's queries travel with every call: an actor built with another job's queries (a
    kept scorer, or one Ray restarted and built again from its first job's arguments) scores
    the queries of the job that calls it."""
    uri, spec, qflat, qlen = _corpus(tmp_path)
    rng = np.random.default_rng(9)
    other = [(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
             for x in (rng.standard_normal((4, 128)) for _ in range(3))]
    oflat, olen = np.concatenate(other), np.array([len(x) for x in other])
    want, _ = ShardScorer(uri, None, oflat, olen, 2, device="cpu").score(spec)
    front = actor.ScorerFront(uri, None, qflat, qlen, 3, device="cpu")  # built with the first job's queries
    first, _ = front.score(spec, job=actor.ScoringJob("job-1", qflat, qlen, 3))
    got, stats = front.score(spec, job=actor.ScoringJob("job-2", oflat, olen, 2))
    assert got.equals(want) and not first.equals(got)
    assert stats["actor_reused"] and front.jobs_served == 2


class _Kept(actor.ScorerFront):
    """The front as a kept scorer, with its end recorded instead of Ray's kill."""

    ended: list

    def _can_keep(self):
        return True

    def _end(self):
        self.ended.append(time.monotonic())


def test_a_kept_scorer_ends_when_idle_but_never_during_a_call(tmp_path):
    uri, spec, qflat, qlen = _corpus(tmp_path)
    _Kept.ended = []
    front = _Kept(uri, None, qflat, qlen, 3, device="cpu", keep_alive_s=0.3)
    front._keep.in_call = 1  # a call that runs longer than the keep-alive (a big shard)
    time.sleep(1.0)
    assert _Kept.ended == []
    front._keep.in_call = 0
    deadline = time.monotonic() + 10
    while not _Kept.ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_Kept.ended) == 1


def test_decode_threads_setting(monkeypatch):
    """PIPELINE_SCORER_DECODE_THREADS sets a GPU actor's Arrow threads; a bad value is refused by name."""
    import pyarrow as pa
    import pytest

    from pipeline.score.corpus import set_decode_threads

    before = pa.cpu_count()
    try:
        monkeypatch.setenv("PIPELINE_SCORER_DECODE_THREADS", "3")
        set_decode_threads(None, on_gpu=True)
        assert pa.cpu_count() == 3
        set_decode_threads(2, on_gpu=False)  # a CPU actor: its own --cpus-per-actor
        assert pa.cpu_count() == 2
        monkeypatch.setenv("PIPELINE_SCORER_DECODE_THREADS", "many")
        with pytest.raises(ValueError, match="PIPELINE_SCORER_DECODE_THREADS"):
            set_decode_threads(None, on_gpu=True)
    finally:
        pa.set_cpu_count(before)

