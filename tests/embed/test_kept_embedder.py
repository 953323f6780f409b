"""A kept model actor's counters (``--keep-embedders``) when jobs share it, one after another
or at once: each job's summary must read its own first batch, pages and model load."""

import threading
import time

import numpy as np
import pyarrow as pa

from pipeline.embed import counters, stages


def job_view(outs: list[pa.Table]) -> dict:
    """What the driver folds from one job's batches (write_shard, then merge_records)."""
    merged: dict = {}
    for out in outs:
        counters.merge_records(merged, counters.actor_records(out, pa.array([True] * out.num_rows)))
    (record,) = merged.values()
    return record


def test_interleaved_jobs_keep_their_own_counters(tiny_model, page_rows):
    kept = stages.KeptEmbedder(60.0, model=tiny_model, device="cpu", batches_in_flight=2)
    batch = page_rows(2)
    outs: dict = {"A": [], "B": []}
    for job in ["A", "B", "A", "B", "A"]:  # two jobs' batches interleaved on one actor
        outs[job].append(kept.embed(batch, job, 60.0))
    a, b = job_view(outs["A"]), job_view(outs["B"])
    assert a["pages"] == 6 and b["pages"] == 4
    assert a["model_load_s"] > 0 and b["model_load_s"] == 0  # only the first job paid the load
    # and only the first job's summary says where the actor's start went
    summary = {job: counters.summarize({v["actor"]: v}, 0.0)["actors"][0] for job, v in (("A", a), ("B", b))}
    assert summary["A"]["start"]["load_phases_s"] and "start" not in summary["B"]
    assert "start" not in summary["B"]["compile"] and summary["B"]["compile"]["kept_actor"] is True
    # each job's first batch is its own first call here, also after the other job's calls
    firsts_a = {r for out in outs["A"] for r in out.column(counters.FIRST_BATCH_AT).to_pylist()}
    firsts_b = {r for out in outs["B"] for r in out.column(counters.FIRST_BATCH_AT).to_pylist()}
    assert len(firsts_a) == 1 and len(firsts_b) == 1 and firsts_a.pop() < firsts_b.pop()
    assert a["first_batch"][2] == 2 and b["first_batch"][2] == 2
    assert kept.jobs_served == 2


def test_two_jobs_at_once_on_one_kept_actor(tiny_model, page_rows):
    """Calls of two jobs from several threads at once (a kept actor runs up to 4 calls):
    every page is embedded once per call, and the pages add up per job."""
    kept = stages.KeptEmbedder(60.0, model=tiny_model, device="cpu", batches_in_flight=2)
    batch = page_rows(1)
    want = kept.embed(batch, "warm", 60.0).column("embedding").to_pylist()
    outs: dict = {"A": [], "B": []}
    lock = threading.Lock()

    def run(job):
        for _ in range(3):
            out = kept.embed(batch, job, 60.0)
            with lock:
                outs[job].append(out)

    threads = [threading.Thread(target=run, args=(j,)) for j in ("A", "B", "A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in ("A", "B"):
        view = job_view(outs[job])
        assert view["pages"] == 6 and view["model_load_s"] == 0
        assert all(np.allclose(np.asarray(o.column("embedding").to_pylist()[0], np.float32),
                               np.asarray(want[0], np.float32), atol=1e-3) for o in outs[job])
    assert kept.jobs_served == 3


class _EndingKept(stages.KeptEmbedder):
    """A kept embedder that can end itself (as the Ray actor can), its end recorded."""

    def _can_keep(self):
        return True

    def _end(self):
        self.ended.append(time.monotonic())


def test_two_jobs_at_once_each_keep_alive_counts(tiny_model, page_rows):
    """Job A keeps the actor 1.5 s, job B 0.2 s, their calls interleaved, B's last: the
    actor stays until 1.5 s after A's last call (until 2026-12-04, 0.2 s after B's)."""
    _EndingKept.ended = []
    kept = _EndingKept(1.5, model=tiny_model, device="cpu", batches_in_flight=2)
    batch = page_rows(1)
    kept.ready(1.5, "A")
    kept.embed(batch, "A", 1.5)
    kept.embed(batch, "B", 0.2)
    kept.embed(batch, "A", 1.5)
    a_last = time.monotonic()
    kept.embed(batch, "B", 0.2)
    time.sleep(0.8)
    assert _EndingKept.ended == []
    deadline = time.monotonic() + 10
    while not _EndingKept.ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_EndingKept.ended) == 1 and _EndingKept.ended[0] - a_last >= 1.45
