"""The scoring job's Ray wiring: queries embedded once (a GPU task) or read back, the corpus
cut into shards sized to one worker, a pool of :class:`~pipeline.score.actor.ShardScorer`
actors (fronts of :class:`~pipeline.score.scorer.ShardScorer`) that each load a shard once and run every query batch against it, and the per-shard
top-k lists merged into the exact global top-k as shards finish.

Outputs under ``cfg.output``: results.parquet, run.trec, query_embeddings.parquet, summary.json.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import uuid
import time
import warnings

import numpy as np
import pyarrow as pa
import ray

from pipeline import schema, storage
from pipeline.cluster import (ClusterFitError, available_host_bytes, choose_device, ensure_ray, in_actor,
                              max_gpu_actors, read_capacity, started_here)
from pipeline.config import DEFAULT_MODEL, ScoreConfig, normalized_place
from pipeline.score.corpus import (CorpusError, auto_pages_per_shard, cache_uri_of, check_compatibility,
                                   corpus_precision, open_corpus, plan_shards, read_vector_counts)
from pipeline.score.merge import QUERY_INDEX, empty_candidates, merge_topk
from pipeline.score.queries import QueryFileError, query_embeddings_metadata, read_queries, read_query_embeddings
from pipeline.score.actor import ScorerFront, ScoringJob

log = logging.getLogger(__name__)

# What the job prints of the summary (one JSON line).
PRINTED_SUMMARY_KEYS = ("n_queries", "n_pages", "n_shards", "n_results", "pages_scored_per_s", "total_s",
                        "precision", "corpus_dtype")

# Fault tolerance of the shard actors (Ray's own mechanism, no retry loop here): a scorer
# whose process or node dies is restarted by Ray (``max_restarts``; on a new node when its
# node is gone) and the ``score`` call it was running is re-run on the restarted actor
# (``max_task_retries=-1``: retry for as long as the actor can still be restarted). The
# call's ObjectRef resolves once, with the retried result, so each shard is merged exactly
# once. Restarts caused by node preemption (spot, autoscaler drain) do not count against
# ``max_restarts`` in Ray; the bound stops a shard that kills its worker every time (e.g.
# out of memory) from looping forever: then ray.get raises ActorDiedError and the job fails.
MAX_ACTOR_RESTARTS = 4


KEPT_SCORER_NAMESPACE = "vdr-scoring"


class ShardScorer(ScorerFront):
    """The scoring job's Ray actor (same name as the scorer it fronts, in the dashboard and the
    state API): :class:`pipeline.score.actor.ScorerFront` with its Ray hooks."""

    def _granted_gpu(self, device: str | None) -> bool:
        if device is None and in_actor():
            return bool(ray.get_gpu_ids())
        return super()._granted_gpu(device)

    def _was_restarted(self) -> bool:
        if not in_actor():
            return False
        with warnings.catch_warnings():
            # Ray 2.60's property reads its own deprecated ``actor_id``: a RayDeprecationWarning
            # in every scoring actor's log, about Ray's code, not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def _can_keep(self) -> bool:
        return in_actor()

    def _end(self) -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _kept_scorer_name(cfg: ScoreConfig, corpus_uri: str, cache_uri: str | None, gpus_per_actor: float) -> str:
    """The name (prefix) of the scoring actors that ``--keep-scorers`` keeps: the same only for
    a job of the same corpus, endpoint, settings the actors are built with, and scoring code
    (a changed pipeline/score is another name: an actor never runs stale code)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = hashlib.sha1()
    for f in sorted(os.listdir(here)):
        if f.endswith(".py"):
            with open(os.path.join(here, f), "rb") as fh:
                code.update(f.encode() + fh.read())
    key = json.dumps([corpus_uri, cfg.endpoint_url, cache_uri, cfg.backend, cfg.precision, cfg.cpus_per_actor,
                      gpus_per_actor, code.hexdigest()])
    return "vdr-scorer-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def _cluster_defaults(cfg: ScoreConfig) -> tuple[int, float, str]:
    """(actors, GPUs per actor, why): GPU actors when the cluster has GPUs now or its
    autoscaler can add them; as many as the cluster can grow to (capped by the shards later)."""
    cap = read_capacity()
    device, why = choose_device(cfg.device, cap, cfg.gpus_per_actor, embedded=started_here())
    if device == "cuda":
        gpus_per_actor = cfg.gpus_per_actor or 1.0
        n = cfg.num_actors or max(1, max_gpu_actors(cap, gpus_per_actor) or int(cap.gpus_now // gpus_per_actor))
    else:
        gpus_per_actor = 0.0
        n = cfg.num_actors or max(1, min(4, int(cap.cpus_now // max(cfg.cpus_per_actor, 1e-9))))
    return n, gpus_per_actor, f"{device}: " + (why if cap.source in why else f"{why} [{cap.source}]")


# start_wait_s: how long an actor's first call waited for its scorer to be built (torch's import,
# CUDA's start), while that shard was read and decoded; wait_s: how long scoring then waited for
# the load (all of it unless prefetched or read during the start). decode_s holds
# parquet_decode_s (Arrow), host_alloc_wait_s (what was left of allocating the page-locked
# buffer, host_alloc_s, which runs beside the read and decode) and gather_s (pages into it in
# page_id order); a cache read's read_s holds its host_alloc_s
SHARD_PHASES = ("start_wait_s", "read_s", "decode_s", "parquet_decode_s", "host_alloc_s", "host_alloc_wait_s",
                "gather_s", "cache_write_s", "wait_s", "pack_s", "score_s", "total_s")


# Inputs that cannot be scored as given: the job says so in one line and exits 2, as for a
# command mistake (no traceback file): storage that refused or did not answer, a corpus, a
# query file or reused query embeddings that do not fit.
INPUT_ERRORS = (storage.StorageAccessError, CorpusError, QueryFileError, ClusterFitError, storage.ForeignFileError)


def _shard_phases(shard_stats: list[dict]) -> dict:
    """Per-shard seconds from the actors' clocks: summed over shards, and the largest."""
    out: dict = {k: round(sum(s[k] for s in shard_stats), 4) for k in SHARD_PHASES}
    out.update({f"max_{k}": round(max((s[k] for s in shard_stats), default=0.0), 4) for k in SHARD_PHASES})
    out["bytes_read"] = int(sum(s["bytes_read"] for s in shard_stats))
    out["prefetched_shards"] = sum(bool(s["prefetched"]) for s in shard_stats)
    out["read_during_start_shards"] = sum(bool(s.get("read_during_start")) for s in shard_stats)
    starts = [s["scorer_start_s"] for s in shard_stats if s.get("scorer_start_s") is not None]
    out["max_scorer_start_s"] = round(max(starts, default=0.0), 4)
    return out


def _write_outputs(cfg: ScoreConfig, results: pa.Table, query_emb: pa.Table, summary: dict | None) -> None:
    out = cfg.output
    storage.write_parquet(storage.join_uri(out, schema.QUERY_EMBEDDINGS_FILE), query_emb, cfg.endpoint_url)
    storage.write_parquet(storage.join_uri(out, schema.RESULTS_FILE), results, cfg.endpoint_url)
    lines = [
        f"{q} Q0 {schema.trec_id(p)} {r} {np.format_float_positional(np.float32(s), unique=True, trim='-')} {cfg.run_tag}\n"
        for q, p, r, s in zip(
            results.column(schema.QUERY_ID).to_pylist(), results.column(schema.PAGE_ID).to_pylist(),
            results.column(schema.RANK).to_pylist(), results.column(schema.SCORE).to_pylist(),
        )
    ]
    storage.write_bytes_atomic(storage.join_uri(out, schema.RUN_FILE), "".join(lines).encode("utf-8"), cfg.endpoint_url)
    if summary is not None:
        storage.write_json(storage.join_uri(out, schema.SUMMARY_FILE), summary, cfg.endpoint_url)


def _embed_queries_async(model_name: str, texts: list[str], batch_size: int, endpoint_url: str | None,
                         num_gpus: float):
    """Start embedding on a Ray worker (the driver may have no GPU); returns its ObjectRef."""
    def embed(name, texts, batch_size, endpoint_url, device):
        from pipeline.embed.model import embed_queries, load_model

        lm = load_model(name, endpoint_url=endpoint_url, device=device)
        return [np.asarray(v, dtype=np.float16) for v in embed_queries(lm, texts, batch_size=batch_size)]

    task = ray.remote(num_gpus=num_gpus, num_cpus=1, max_retries=0)(embed)
    # no GPU reserved: CPU, even where the node's GPUs are visible (Ray 2.60 no longer hides them)
    return task.remote(model_name, texts, batch_size, endpoint_url, None if num_gpus > 0 else "cpu")


def _host_bytes_per_actor(num_actors: int) -> int:
    """Host memory one actor of this node may fill with shards (available RAM / actors)."""
    return available_host_bytes() // max(1, num_actors)


def _fp8_summary(shard_stats: list[dict], candidates: np.ndarray, pages_scored: int) -> dict:
    """fp8-exact-topk: pages whose FP8 bound reached the top-k threshold (needed), pages
    actually re-scored (the union of a query group's candidates, or whole shards), times."""
    nq = max(1, len(candidates))
    rescored = sum(s.get("fp8_rescored_pairs", 0) for s in shard_stats) / nq
    return {
        "candidate_pages_per_query_mean": float(candidates.mean()) if len(candidates) else 0.0,
        "candidate_pages_per_query_max": int(candidates.max()) if len(candidates) else 0,
        "rescored_pages_per_query_mean": rescored,
        "rescored_fraction": rescored / pages_scored if pages_scored else 0.0,
        **{k: round(sum(s.get(f"fp8_{k}", 0.0) for s in shard_stats), 3)
           for k in ("quantize_s", "candidate_s", "rescore_s")},
    }


# What only an embedding job writes at the top of its --output (the scoring job writes none).
EMBEDDING_OUTPUT_ENTRIES = (schema.PAGES_DIR, "errors", schema.CONFIG_FILE, schema.GENERATION_FILE)


def _refuse_an_embedding_output(cfg: ScoreConfig) -> None:
    """--output must not be an embedding job's output (its summary.json would be replaced, and
    the results' Parquet would be read back as pages) nor lie inside the corpus's pages."""
    held = [name for name in EMBEDDING_OUTPUT_ENTRIES
            if storage.exists(storage.join_uri(cfg.output, name), cfg.endpoint_url)]
    if held:
        raise CorpusError(f"--output {cfg.output} holds an embedding job's {', '.join(held)}: the scoring job's "
                          "summary.json would replace that job's; give the run a folder of its own")
    # an evaluation's folder (jobs.evaluate, jobs.offline_eval): its summary.json would be replaced
    job = storage.summary_job(cfg.output, cfg.endpoint_url)
    if job not in (None, "score_queries"):
        raise CorpusError(f"--output {cfg.output} holds the output of another job ({job}): the scoring job's "
                          "summary.json would replace that job's; give the run a folder of its own")
    pages = normalized_place(storage.corpus_pages_folder(cfg.corpus, cfg.endpoint_url, cfg.generation))
    out = normalized_place(cfg.output)
    if out == pages or out.startswith(pages + "/"):
        raise CorpusError(f"--output {cfg.output} lies inside the corpus's pages folder {pages}: its Parquet "
                          "would be read back as pages; give the run a folder of its own")


def _reading(flag: str, uri: str, endpoint_url: str | None, fn, *args):
    """``fn(*args)``, with storage that refuses or does not answer said as one line naming the
    flag, the URI and the endpoint (:func:`pipeline.storage.read_failure`)."""
    try:
        return fn(*args)
    except OSError as exc:
        said = storage.read_failure(flag, uri, endpoint_url, exc)
        if said is None:
            raise
        # before any work: an input error (exit 2), unavailable storage included
        raise storage.StorageAccessError(str(said)) from exc


def run(cfg: ScoreConfig) -> dict:
    """Score ``cfg.queries`` against ``cfg.corpus`` on the connected (or an embedded) Ray
    cluster; returns the summary it writes.

    ``summary["phases"]``: the driver's wall time cut into consecutive phases (they add up to
    at most ``total_s``); the work that overlaps them (query embedding while the corpus is
    planned, actors starting meanwhile) counts only where the driver waited for it.
    ``summary["shard_phases"]``: per-shard read, decode, pack and score seconds from the
    actors' own clocks, summed over shards (actors run in parallel).
    """
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [t_start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - mark[0], 4)
        mark[0] = now

    # Everything that can be wrong with the inputs fails here, before any heavy work.
    notes: list[str] = []  # the warnings of this run, also in summary.json ("warnings")
    corpus = _reading("--corpus", cfg.corpus, cfg.endpoint_url, open_corpus, cfg.corpus, cfg.endpoint_url,
                      cfg.generation)
    storage.open_filesystem(cfg.output, cfg.endpoint_url)  # gs://: credentials and bucket checked now
    _reading("--output", cfg.output, cfg.endpoint_url, _refuse_an_embedding_output, cfg)
    queries = _reading("--queries", cfg.queries, cfg.endpoint_url, read_queries, cfg.queries, cfg.endpoint_url)
    corpus_model = corpus.metadata.get(schema.META_MODEL.decode())
    model_name = cfg.model or corpus_model or DEFAULT_MODEL
    query_prompt = schema.QUERY_PROMPT
    reused = None
    if cfg.query_embeddings:
        # reused vectors: the model and prompt that made them are checked, as a model of this run's
        # would be (until 2026-12-06 nothing was: another model's vectors scored without a word)
        reused = read_query_embeddings(cfg.query_embeddings, cfg.endpoint_url, queries)
        meta = reused.schema.metadata or {}
        model_name = meta[schema.META_MODEL].decode() if schema.META_MODEL in meta else None
        query_prompt = meta[schema.META_QUERY_PROMPT].decode() if schema.META_QUERY_PROMPT in meta else None
        if model_name is None:
            notes.append(f"--query-embeddings {cfg.query_embeddings} records no model (written before 2026-12-06): "
                         "the corpus's model cannot be checked against it")
            log.warning("%s", notes[-1])
        elif cfg.model and cfg.model != model_name:
            message = (f"--query-embeddings {cfg.query_embeddings} was embedded with model {model_name!r}, "
                       f"this run names --model {cfg.model!r}")
            if not cfg.allow_model_mismatch:
                raise CorpusError(f"{message}; drop one of the two, or pass --allow-model-mismatch")
            notes.append(f"allowed mismatch: {message} (no model is loaded: the reused vectors are scored)")
            log.warning("%s", notes[-1])
    check_compatibility(
        corpus,
        model=model_name,
        query_prompt=query_prompt,
        max_visual_tokens=cfg.max_visual_tokens,
        allow_mismatch=cfg.allow_model_mismatch,
        queries_from=cfg.query_embeddings,
    )
    log.info("corpus %s: %d file(s), %d page rows, model %s; %d queries", cfg.corpus, len(corpus.files),
             corpus.num_rows, corpus_model, queries.num_rows)
    blank = [q for q, t in zip(queries.column(schema.QUERY_ID).to_pylist(), queries.column(schema.TEXT).to_pylist())
             if not t.strip()]
    if blank:  # scored as the prompt alone: every page ranks by how well it matches no question
        notes.append(f"{len(blank)} quer{'y has' if len(blank) == 1 else 'ies have'} an empty text (e.g. "
                     f"{', '.join(blank[:3])}): scored as the query prompt alone")
        log.warning("%s", notes[-1])
    phase("open_inputs")

    ensure_ray(cfg.ray_address)
    num_actors, gpus_per_actor, device_why = _cluster_defaults(cfg)
    log.info("shard actors on %s", device_why)
    phase("cluster_connect")

    # Queries: embed once, store as float16 (the values every score uses, so a rescore from
    # query_embeddings.parquet gives the same numbers). The embedding task runs while the
    # corpus is planned below.
    t_embed0 = time.perf_counter()
    embed_ref, texts = None, []
    if corpus.num_rows == 0:
        notes.append(f"--corpus {cfg.corpus} holds no pages: every query's results are empty")
        log.warning("%s", notes[-1])
    if reused is not None:
        query_emb = reused
        log.info("reusing %d query embeddings from %s (no model loaded)", query_emb.num_rows, cfg.query_embeddings)
    elif corpus.num_rows == 0:  # e.g. every document an error row: no model to load (or fetch from the Hub)
        model_name = None
    else:
        texts = queries.column(schema.TEXT).to_pylist()
        if texts:
            embed_ref = _embed_queries_async(model_name, texts, cfg.embed_batch_size, cfg.endpoint_url,
                                             gpus_per_actor if gpus_per_actor > 0 else 0)
    phase("query_embedding")

    # Actors start now when no embedding task needs the resources they take; their process
    # start overlaps planning. The first one also says how much memory it has: a front that
    # imports no torch (pipeline.score.actor) answers as soon as its process is up, and reads
    # its first shard while its scorer imports torch and starts CUDA.
    actor_options = {"num_cpus": cfg.cpus_per_actor, "num_gpus": gpus_per_actor}
    # An actor that reserved no GPU must not use one: Ray 2.60 no longer hides a node's GPUs from
    # actors that ask for none (CUDA_VISIBLE_DEVICES is left as it is), so "auto" would take one.
    actor_device = None if gpus_per_actor > 0 else "cpu"
    Scorer = ray.remote(ShardScorer)
    cpu_threads = max(1, int(cfg.cpus_per_actor))
    cache_uri = cache_uri_of(cfg.corpus, cfg.endpoint_url) if cfg.cache else None
    actors: list = []
    q_refs: list = []
    created_at: list[float] = []  # time.time() each actor was asked for
    kept_name = _kept_scorer_name(cfg, corpus.uri, cache_uri, gpus_per_actor) if cfg.keep_scorers else None

    def start_actors(n: int) -> None:
        emb_col = query_emb.column(schema.EMBEDDING).combine_chunks()
        q_lengths = np.diff(emb_col.offsets.to_numpy()).astype(np.int64)
        if (q_lengths == 0).any():
            bad = query_emb.column(schema.QUERY_ID).filter(pa.array(q_lengths == 0)).to_pylist()
            raise ValueError(f"queries {bad[:5]} have no vectors; their embeddings are empty")
        q_flat = emb_col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, schema.EMBEDDING_DIM)
        q_refs[:] = [ray.put(q_flat), ray.put(q_lengths), int(q_lengths.sum()),
                     ray.put(ScoringJob(uuid.uuid4().hex, q_flat, q_lengths, cfg.top_k, cfg.query_batch_size,
                                        float(cfg.keep_scorers)))]
        created_at.extend([time.time()] * n)
        for i in range(n):
            # kept scorers: named per corpus, settings and code, detached (they outlive this job),
            # taken over by the next job that asks for the same name
            kept = ({"name": f"{kept_name}-{i}", "namespace": KEPT_SCORER_NAMESPACE, "lifetime": "detached",
                     "get_if_exists": True} if kept_name else {})
            actors.append(Scorer.options(**actor_options, **kept, max_restarts=MAX_ACTOR_RESTARTS,
                                         max_task_retries=-1).remote(
                corpus.uri, cfg.endpoint_url, q_refs[0], q_refs[1], cfg.top_k,
                query_batch_size=cfg.query_batch_size, backend=cfg.backend, cpu_threads=cpu_threads,
                cache_uri=cache_uri, precision=cfg.precision, keep_alive_s=float(cfg.keep_scorers),
                device=actor_device))

    early = embed_ref is None and corpus.num_rows > 0 and queries.num_rows > 0
    if early:
        start_actors(num_actors)
    phase("actor_start")

    # Shards: sized to the worker's device memory and to its share of host memory (a worker
    # holds the shard it scores and the next one it reads, as float16, plus decode buffers).
    counts = read_vector_counts(corpus, cfg.endpoint_url)
    total_vectors = int(sum(int(c.sum()) for c in counts))
    mean_vectors = total_vectors / max(1, corpus.num_rows)
    memory = None
    if cfg.shard_size_pages == "auto":
        phase("planning")
        if actors:
            memory = ray.get(actors[0].memory_bytes.remote())
            phase("actor_start")
        else:
            # Restarted elsewhere if its node goes away: an autoscaler may remove an idle GPU
            # node just as the job starts (seen in CI: "Terminated by autoscaler").
            probe = Scorer.options(**actor_options, max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=-1).remote(
                corpus.uri, cfg.endpoint_url, np.zeros((0, schema.EMBEDDING_DIM), np.float16),
                np.zeros(0, np.int64), cfg.top_k, device=actor_device)
            memory = ray.get(probe.memory_bytes.remote())
            ray.kill(probe)
            phase("actor_start")
        gpu = gpus_per_actor > 0
        # CPU actors compute in float64 (8 bytes) and share the node's RAM with each other.
        per_actor = memory if gpu else memory // max(1, num_actors)
        # 0.3: packing holds the Arrow values, the padded copy and gather indices at once, and
        # a query batch adds its (pages x query vectors) maxima.
        # fp8-exact-topk keeps an FP8 copy beside the exact operands (CPU: its float32 emulation).
        extra = (1.2 if gpu else 5.2) if cfg.precision == "fp8-exact-topk" else 0
        pages_per_shard = auto_pages_per_shard(mean_vectors, per_actor, dtype_bytes=(2 if gpu else 8) + extra,
                                               fraction=0.3)
        if gpu:  # host: this shard and the next in float16, plus the Parquet bytes read (~1x)
            host = _host_bytes_per_actor(num_actors)
            pages_per_shard = min(pages_per_shard, auto_pages_per_shard(
                mean_vectors, host, dtype_bytes=2 * (3 if cfg.prefetch else 2), fraction=0.5))
        pages_per_shard = min(pages_per_shard, max(1, -(-corpus.num_rows // num_actors)))
    else:
        pages_per_shard = cfg.shard_size_pages
    shards = plan_shards(corpus, counts, pages_per_shard) if corpus.num_rows else []
    n_needed = max(1, min(num_actors, len(shards))) if shards else 0
    for a in actors[n_needed:]:
        ray.kill(a)  # more actors than shards
    del actors[n_needed:]
    num_actors = n_needed
    log.info("%d pages (%.0f vectors/page) in %d shard(s) of <= %d pages; %d actor(s), %s GPU each",
             corpus.num_rows, mean_vectors, len(shards), pages_per_shard, num_actors, gpus_per_actor)
    phase("planning")

    if embed_ref is not None:
        vectors = ray.get(embed_ref)
        query_emb = pa.table({
            schema.QUERY_ID: queries.column(schema.QUERY_ID), schema.TEXT: queries.column(schema.TEXT),
            schema.N_VECTORS: pa.array([len(v) for v in vectors], pa.int32()),
            schema.EMBEDDING: schema.embeddings_to_arrow(vectors),
        }, schema=schema.QUERY_EMBEDDINGS_SCHEMA.with_metadata(query_embeddings_metadata(model_name, query_prompt)))
        log.info("embedded %d queries with %s, %.1f s after it started (model load included; beside the corpus "
                 "planning, so the summary's embed_queries_s counts only the wait for it)", len(vectors), model_name,
                 time.perf_counter() - t_embed0)
    elif not cfg.query_embeddings:
        query_emb = schema.QUERY_EMBEDDINGS_SCHEMA.empty_table()
    phase("query_embedding")
    t_embed = phases["query_embedding"]  # the driver's wait for it (it overlaps planning)
    if not q_refs:  # the query check runs even when there is nothing to score
        start_actors(num_actors if shards and queries.num_rows else 0)
    if actors:
        # how long Ray took to give each actor a process (its constructor's start; same node clock
        # when the driver runs on the head node, as ray job submit and local runs do)
        # (an actor kept from an earlier job started before this job asked for it)
        spawned = [t - c for t, c in zip(ray.get([a.ready.remote() for a in actors]), created_at)]
        actor_spawn_s = [round(t, 3) for t in spawned if t >= 0]
        n_reused = sum(t < 0 for t in spawned)
    else:
        actor_spawn_s, n_reused = [], 0
    phase("actor_start")

    # Score: each actor takes the next shard when it is free and is told the one after it
    # (read in the background while it scores); results merge as they arrive.
    t0 = time.perf_counter()
    merged = merge_topk([empty_candidates()], cfg.top_k)
    shard_stats = []
    t_merge = 0.0
    fp8_candidates = np.zeros(queries.num_rows, dtype=np.int64)  # pages within the FP8 bound, per query
    if shards and queries.num_rows:
        pending = collections.deque(shards)
        failed = False
        reserved: dict[int, object] = {}
        inflight: dict = {}

        def submit(i: int, spec, nxt) -> None:
            reserved[i] = nxt
            inflight[actors[i].score.remote(spec, nxt, q_refs[3])] = i

        first = [pending.popleft() for _ in range(min(len(actors), len(pending)))]
        for i, spec in enumerate(first):
            submit(i, spec, pending.popleft() if cfg.prefetch and pending else None)
        pages_done = 0
        try:
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                i = inflight.pop(done[0])
                candidates, stats = ray.get(done[0])
                per_query = stats.pop("fp8_candidates_per_query", None)
                if per_query:
                    fp8_candidates += np.asarray(per_query, dtype=np.int64)
                nxt = reserved.pop(i, None) or (pending.popleft() if pending else None)
                if nxt is not None:
                    submit(i, nxt, pending.popleft() if cfg.prefetch and pending else None)
                tm = time.perf_counter()
                merged = merge_topk([merged.drop_columns([schema.RANK]), candidates], cfg.top_k)
                t_merge += time.perf_counter() - tm
                stats["actor"] = i
                shard_stats.append(stats)
                pages_done += stats["pages"]
                elapsed = time.perf_counter() - t0
                log.info("shard %d/%d done (%d pages, %.1f s on %s%s); %d/%d pages, %.0f pages/s",
                         len(shard_stats), len(shards), stats["pages"], stats["total_s"], stats["device"],
                         ", retried on a restarted actor" if stats["after_actor_restart"] else "",
                         pages_done, corpus.num_rows, pages_done / max(elapsed, 1e-9))
        except ray.exceptions.ActorDiedError as exc:
            failed = True
            raise RuntimeError(
                f"a scoring actor died more than {MAX_ACTOR_RESTARTS} times (not counting node preemptions); "
                f"{len(shard_stats)}/{len(shards)} shards were scored: {exc}") from exc
        except BaseException:
            failed = True
            raise
        finally:
            if failed or not kept_name:
                for a in actors:
                    ray.kill(a)  # no_restart=True: the end of the job is not a failure to recover from
            else:
                log.info("keeping %d scoring actor(s) %s-* for the next job (each ends after %.0f s without a call)",
                         len(actors), kept_name, cfg.keep_scorers)
    t_score = time.perf_counter() - t0
    phase("scoring")
    phases["scoring"] = round(phases["scoring"] - t_merge, 4)
    phases["merge"] = round(t_merge, 4)
    q_lengths_total = q_refs[2] if q_refs else 0

    qids = queries.column(schema.QUERY_ID)
    results = pa.table({
        schema.QUERY_ID: qids.take(merged.column(QUERY_INDEX)),
        schema.RANK: merged.column(schema.RANK),
        schema.PAGE_ID: merged.column(schema.PAGE_ID),
        schema.DOC_ID: merged.column(schema.DOC_ID),
        schema.PAGE_NUMBER: merged.column(schema.PAGE_NUMBER).cast(pa.int32()),
        schema.SCORE: merged.column(schema.SCORE).cast(pa.float32()),
    }, schema=schema.RESULTS_SCHEMA)
    pages_scored = sum(s["pages"] for s in shard_stats)
    if 0 < pages_scored < cfg.top_k:
        notes.append(f"the corpus holds {pages_scored} pages, fewer than --top-k {cfg.top_k}: each query has at "
                     f"most {pages_scored} results")
        log.warning("%s", notes[-1])
    summary = {
        "job": "score_queries",
        "corpus": cfg.corpus, "queries_file": cfg.queries, "output": cfg.output,
        "model": model_name, "corpus_model": corpus_model,  # with --query-embeddings: the one that made them
        # the corpus's pool factor (1 = unpooled); a list when mixed (allowed by --allow-model-mismatch)
        "corpus_pool_factor": (next(iter(corpus.pool_factors)) if len(corpus.pool_factors) == 1
                               else sorted(corpus.pool_factors) or 1),
        "corpus_precision": (next(iter(corpus.precisions)) if len(corpus.precisions) == 1
                             else sorted(corpus.precisions) or "default"),
        "query_embeddings_reused": cfg.query_embeddings,
        "n_queries": queries.num_rows, "n_query_vectors": q_lengths_total,
        "n_pages": pages_scored, "n_pages_dropped_empty": sum(s["dropped_empty_pages"] for s in shard_stats),
        "n_corpus_files": len(corpus.files), "n_vectors": total_vectors,
        "top_k": cfg.top_k, "n_results": results.num_rows,
        "n_shards": len(shards), "shard_size_pages": pages_per_shard, "num_actors": num_actors,
        "gpus_per_actor": gpus_per_actor, "device_reason": device_why, "query_batch_size": cfg.query_batch_size or "auto",
        "backend": cfg.backend, "devices": sorted({s["device"] for s in shard_stats}),
        "precision": cfg.precision, "corpus_dtype": corpus_precision(corpus), "corpus_dtype_files": corpus.dtypes,
        "pages_scored_per_s": pages_scored / t_score if t_score > 0 and pages_scored else 0.0,
        "query_page_pairs_per_s": pages_scored * queries.num_rows / t_score if t_score > 0 else 0.0,
        "embed_queries_s": round(t_embed, 3), "scoring_s": round(t_score, 3),
        "cache": cache_uri, "prefetch": cfg.prefetch,
        "n_shards_after_actor_restart": sum(bool(s.get("after_actor_restart")) for s in shard_stats),
        "max_actor_restarts": MAX_ACTOR_RESTARTS,
        "shards": sorted(shard_stats, key=lambda s: s["shard_id"]),
    }
    if cfg.precision == "fp8-exact-topk":
        summary["fp8"] = _fp8_summary(shard_stats, fp8_candidates, pages_scored)
    phase("merge")  # building the results table: the last of the merge
    _write_outputs(cfg, results, query_emb, None)
    phase("write")
    summary["phases"] = phases
    summary["actor_spawn_s"] = actor_spawn_s
    summary["keep_scorers"] = cfg.keep_scorers
    summary["n_actors_reused"] = n_reused
    summary["shard_phases"] = _shard_phases(shard_stats)
    summary["warnings"] = notes
    summary["total_s"] = round(time.perf_counter() - t_start, 3)
    storage.write_json(storage.join_uri(cfg.output, schema.SUMMARY_FILE), summary, cfg.endpoint_url)
    log.info("phases (s): %s; in the actors: %s", phases, summary["shard_phases"])
    log.info("wrote %d results for %d queries to %s in %.1f s", results.num_rows, queries.num_rows,
             cfg.output, summary["total_s"])
    return summary

