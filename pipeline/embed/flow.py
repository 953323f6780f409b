"""The embedding job's Ray wiring: the one place where its Ray Data operators are chained.

list -> skip done (:mod:`~pipeline.embed.plan`) -> render (CPU tasks) -> embed (GPU actor
pool) -> write (CPU tasks), the stages being plain callables of :mod:`~pipeline.embed.stages`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
import warnings
from typing import Iterator

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from pipeline import __version__, schema, storage
from pipeline.cluster import ClusterFitError, choose_device, in_actor, max_gpu_actors, read_capacity, started_here
from pipeline.config import EmbedConfig, resolve_batches_in_flight
from pipeline.embed import counters, plan, preflight as preflight_report
from pipeline.embed.rasterize import RenderSpec
from pipeline.embed.stages import KeptEmbedder, PageEmbedder, render_documents, start_renderer, write_shard
from pipeline.schema import IMAGE_PROMPT, QUERY_PROMPT
from pipeline.storage import join_uri

log = logging.getLogger(__name__)


MAX_INPUT_BLOCKS = 20_000


# A first run on a flat object-store input waits this long for its listing to tell an input
# without a document (no model actor then); a longer listing goes on beside the actors' start.
FIRST_LISTING_WAIT_S = 3.0

# Errors the job reports as a command to change (exit 2, one line): the output is not this job's
# or is held, a setting conflicts with what the output holds, actors that could never be placed
INPUT_ERRORS = (FileNotFoundError, storage.OutputLockedError, storage.StorageAccessError, plan.ConfigMismatchError,
                ClusterFitError, storage.ForeignFileError)


def resolve_resources(cfg: EmbedConfig) -> tuple[float, int, int, str, str]:
    """(GPUs per actor, min actors, max actors, device, why) from the options and the cluster.

    The device is "cuda" when the cluster has GPUs now *or its autoscaler can add them*
    (:func:`pipeline.cluster.read_capacity`): asking Ray for GPU actors is what makes the
    autoscaler start GPU nodes. The most actors default to what the cluster can grow to.
    The pool starts with every GPU present (or, from zero GPU nodes, every GPU the
    autoscaler can add): a pool that starts at one
    actor grows only after its first actor is saturated, and each new actor then spends its
    model load and compilation while the others work (seen on 2 GPUs: the second idle for
    most of a 2,500-page job)."""
    cap = read_capacity()
    device, why = choose_device(cfg.device, cap, cfg.gpus_per_actor, embedded=started_here())
    if device == "cuda":
        per_actor = cfg.gpus_per_actor or 1.0
        present = int(cap.gpus_now // per_actor)
        can_grow = max_gpu_actors(cap, per_actor)
        max_actors = cfg.max_actors or max(cfg.min_actors or 1, present, can_grow or 0, 1)
        start = present or can_grow or 1
        min_actors = cfg.min_actors or max(1, min(start, max_actors))
    else:
        per_actor = 0.0
        max_actors = cfg.max_actors or cfg.min_actors or 1
        min_actors = cfg.min_actors or 1
    why = why if cap.source in why else f"{why} [{cap.source}]"
    return per_actor, min(min_actors, max_actors), max_actors, device, why


@ray.remote(num_cpus=0)
class _PlanCounter:
    """Totals of the plan tasks (documents listed, already done, resumed, to do)."""

    def __init__(self):
        self.totals_ = collections.Counter()
        self.skipped: dict = {}

    def add(self, stats: dict) -> None:
        stats = dict(stats)
        storage.merge_skipped(self.skipped, stats.pop("documents_skipped", {}))
        self.totals_.update(stats)

    def totals(self) -> dict:
        return {**self.totals_, "documents_skipped": self.skipped}


@ray.remote(num_cpus=0.25)
def _list_unit(cfg: EmbedConfig, unit: str, exclude: str | None = None) -> tuple[pa.Table, dict]:
    return plan.list_unit(cfg, unit, exclude)


def _plan_units(batch: pa.Table, cfg: EmbedConfig, done: list, counter,
                listings: dict | None = None, exclude: str | None = None) -> Iterator[pa.Table]:
    """Plan task: list each piece (or take the run's listing of it), match it against the
    done-set, emit its documents to do in blocks of one render task each, and report its counts."""
    progress = ray.get(done[0])
    for unit in batch.column("unit").to_pylist():
        listing = ray.get(listings[unit]) if listings else None
        todo, stats = plan.plan_unit(cfg, unit, progress, listing, exclude)
        ray.get(counter.add.remote({**stats, "documents_to_do": todo.num_rows}))
        for i in range(0, todo.num_rows, cfg.docs_per_render_task):
            yield todo.slice(i, cfg.docs_per_render_task)


KEPT_EMBEDDER_NAMESPACE = "vdr-embedding"
# A kept embedder whose process or node dies is restarted by Ray, and the batch it was running
# is sent again (max_task_retries=-1), as the scoring actors are (pipeline/score/flow.py).
MAX_KEPT_RESTARTS = 4
# Calls a kept embedder runs at once: its front's batches in flight, and ready() beside them.
KEPT_MAX_CONCURRENCY = 4


class KeptPageEmbedder(KeptEmbedder):
    """:class:`pipeline.embed.stages.KeptEmbedder` as a Ray detached actor (``--keep-embedders``)."""

    def _can_keep(self) -> bool:
        return in_actor()

    def _end(self) -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


@ray.remote(num_cpus=0)
class _Turns:
    """Hands each front its kept embedder, in turn."""

    def __init__(self):
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


class EmbedFront:
    """Ray Data's actor of the model stage under ``--keep-embedders``: it holds no model and
    no GPU, and sends each batch to its kept embedder (one front per kept embedder), naming
    this job, so that the job's batches, backpressure and progress stay Ray Data's."""

    def __init__(self, embedders: list, turns, job: str, keep_alive_s: float,
                 respawn: tuple[str, dict, float] | None = None):
        self.index = ray.get(turns.next.remote()) % len(embedders)
        self.embedder = embedders[self.index]
        self.job, self.keep_alive_s, self.respawn = job, keep_alive_s, respawn

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return ray.get(self.embedder.embed.remote(batch, self.job, self.keep_alive_s))
        except ray.exceptions.ActorDiedError:
            # Gone for good: it ended itself just as this call came (its idle time was up), or
            # Ray ran out of restarts. One new one, under the same name, takes the batch again.
            if self.respawn is None:
                raise
            name, kwargs, gpus = self.respawn
            log.warning("kept model actor %s-%d is gone: starting it again", name, self.index)
            self.embedder = spawn_kept_embedder(f"{name}-{self.index}", kwargs, gpus, self.keep_alive_s)
            return ray.get(self.embedder.embed.remote(batch, self.job, self.keep_alive_s))


class _Heartbeat:
    """While a job runs, its kept embedders are asked ``ready`` every ``interval_s``: a job
    whose first pages take longer than the keep-alive to render (a large listing, a busy
    cluster) does not see its model actors end before its first batch."""

    def __init__(self, handles: list, keep_alive_s: float, job: str | None = None):
        self._handles, self._keep_alive_s, self._job = handles, keep_alive_s, job
        self._interval_s = min(10.0, keep_alive_s / 3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kept-embedders-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for h in self._handles:
                h.ready.remote(self._keep_alive_s, self._job)  # not waited for: a restarting actor answers later

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def kept_embedder_name(embedder_kwargs: dict, gpus_per_actor: float) -> str:
    """The name (prefix) of the embedders that ``--keep-embedders`` keeps: the same only for a
    job of the same model, settings the actors are built with, and embedding code (a changed
    pipeline/embed is another name: a kept actor never runs stale code)."""
    code = hashlib.sha1()
    for d in (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        for f in sorted(os.listdir(d)):
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    code.update(f.encode() + fh.read())
    key = json.dumps([sorted(embedder_kwargs.items()), gpus_per_actor, code.hexdigest()], default=str)
    return "vdr-embedder-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def kept_embedders(name: str, n: int, embedder_kwargs: dict, gpus_per_actor: float,
                   keep_alive_s: float, job: str | None = None) -> tuple[list, int]:
    """(handles, how many were already running) of the ``n`` kept embedders ``name``-0...:
    those still alive from an earlier job are taken over (asking one touches its idle timer),
    the others started, detached, without waiting for their model to load."""
    handles, reused = [], 0
    for i in range(n):
        full = f"{name}-{i}"
        try:
            handle = ray.get_actor(full, namespace=KEPT_EMBEDDER_NAMESPACE)
            # this job's keep-alive from now on (the heartbeat pings at a third of it)
            ready, _ = ray.wait([handle.ready.remote(keep_alive_s, job)], timeout=5.0)
            if ready:
                ray.get(ready[0])  # raises when it ended meanwhile: then a new one is started
                reused += 1
            handles.append(handle)  # not ready in 5 s: still loading (another job started it)
            continue
        except (ValueError, ray.exceptions.RayActorError):
            pass
        handles.append(spawn_kept_embedder(full, embedder_kwargs, gpus_per_actor, keep_alive_s))
    return handles, reused


def spawn_kept_embedder(full_name: str, embedder_kwargs: dict, gpus_per_actor: float, keep_alive_s: float):
    """The kept embedder ``full_name``: the running one, or a new one (detached, get_if_exists)."""
    return ray.remote(KeptPageEmbedder).options(
        name=full_name, namespace=KEPT_EMBEDDER_NAMESPACE, lifetime="detached", get_if_exists=True,
        # The model's core is reserved by its front, inside Ray Data's budget: Ray Data does
        # not see actors of its own, and on a small node it would plan tasks on that core
        # (seen on 2 CPUs: the render stage waited for a core the kept actor held).
        num_gpus=gpus_per_actor, num_cpus=0, max_concurrency=KEPT_MAX_CONCURRENCY,
        max_restarts=MAX_KEPT_RESTARTS, max_task_retries=-1,
    ).remote(keep_alive_s, **embedder_kwargs)


def warm_render_worker(render_timeout_s: float) -> str:
    """What a render task does before its first document, done ahead: the Ray worker process
    is started, it imports this module (Ray Data's code with it) and its renderer's zygote is
    started. Returns the worker (host:pid)."""
    return start_renderer(render_timeout_s)


PRESTART_ENV = "PIPELINE_PRESTART_WORKERS"
MAX_PRESTARTED_WORKERS = 32


def prestart_workers(cfg: EmbedConfig, model_cpus: int = 1, model_running: bool = False) -> list:
    """Start the job's CPU workers at its start, before its dataset runs (refs of their
    warm-up tasks, not waited for). Ray starts worker processes per job: without this, each
    job's first plan and render tasks each waited for a new process (Python, Ray, Ray Data,
    the renderer's zygote: seconds apiece on a busy node) one after the other, before the first
    page reached the model (seen on an H200 node: the first batch 8.6-11.9 s into a job whose
    model actor was already running). Idle warmed workers are then reused by the job's tasks.

    Only where the model is already running (``model_running``: kept actors taken over from
    an earlier job); by default none otherwise. A job that starts its model actor waits for
    that actor (imports, weights, compilation: 10 s and more) long after its first pages are
    rendered, and the prestarted processes, all starting at once, delayed it: on an H200 node
    the actor's constructor began 4.2-4.9 s into the job with 14 prestarted workers against
    2.4-3.4 s without (RESULTS.md, tenth session). Then one per CPU free now, less the model
    stage's (``model_cpus``) and one, at most 32: only CPUs free now, so they never ask an
    autoscaler for nodes. ``$PIPELINE_PRESTART_WORKERS`` sets the number for every job (0: off;
    at most the free CPUs)."""
    value = os.environ.get(PRESTART_ENV, "").strip()
    if not value and not model_running:
        return []
    free = int(ray.available_resources().get("CPU", 0))
    try:
        n = min(int(value), free) if value else min(MAX_PRESTARTED_WORKERS, free - model_cpus - 1)
    except ValueError:
        raise ValueError(f"{PRESTART_ENV} must be a number of workers (0: off), got {value!r}") from None
    warm = ray.remote(num_cpus=1, max_retries=0)(warm_render_worker)
    return [warm.options(scheduling_strategy="SPREAD").remote(cfg.render_timeout_s) for _ in range(max(0, n))]


def _prestarted_render_workers(warming: list, render_tasks: set[str]) -> int:
    ready, pending = ray.wait(warming, num_returns=len(warming), timeout=5.0) if warming else ([], [])
    for ref in pending:  # never got a CPU: not left queued after the job
        ray.cancel(ref, force=True)
    warmed = set()
    for ref in ready:
        try:
            warmed.add(ray.get(ref))
        except Exception:  # noqa: BLE001 - a warm-up that failed warmed nothing
            pass
    return len(warmed & {t.rsplit(":", 1)[0] for t in render_tasks})


def _warn_local_paths(cfg: EmbedConfig) -> None:
    """On a cluster of several nodes, a local path must be on a filesystem every node shares."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    local = [f"--{k.replace('_', '-')} {v}" for k, v in (("input", cfg.input), ("output", cfg.output), ("model", cfg.model))
             if v and "://" not in v and os.path.isabs(v)]
    if local and len(nodes) > 1:
        log.warning("%d Ray nodes, and %s %s local: every node must see the same files there (a shared "
                    "filesystem), or use s3:// / gs:// URIs", len(nodes), ", ".join(local),
                    "is" if len(local) == 1 else "are")


def output_metadata(cfg: EmbedConfig, device: str) -> dict[str, str]:
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return {
        schema.META_MODEL.decode(): cfg.model,
        schema.META_PROMPT.decode(): IMAGE_PROMPT,
        schema.META_QUERY_PROMPT.decode(): QUERY_PROMPT,
        schema.META_MAX_VISUAL_TOKENS.decode(): str(cfg.max_visual_tokens),
        schema.META_DTYPE.decode(): dtype,
        schema.META_VERSION.decode(): __version__,
        schema.META_POOL_FACTOR.decode(): str(cfg.pool_factor),
        schema.META_PRECISION.decode(): cfg.precision,
    }


def _bounded_retries() -> dict:
    return {"max_retries": 3}


@contextlib.contextmanager
def _task_retry_args():
    """Ray 2.60 marks ``map_batches``' ``ray_remote_args_fn`` and ``**ray_remote_args`` as
    deprecated (to be removed in Ray 2.64) and printed both warnings on every job; its named
    parameters have no task ``max_retries`` or ``retry_exceptions``, which the render and write
    stages need (``DataContext.max_map_retries`` covers user exceptions of every map stage, not
    a worker that died). The warnings say nothing a user can act on: silenced here, for these
    calls only; ``pyproject.toml`` pins Ray 2.60."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args(_fn)?` is deprecated", category=DeprecationWarning)
        yield


# A write task that fails on storage is run again by Ray (its files are named by content, so a
# second run writes the same names and bytes); each request inside it is already retried by
# the client library. A storage outage longer than all of that fails the job.
WRITE_TASK_RETRIES = 3


def _storage_settings(cfg: EmbedConfig) -> dict:
    return {"timeout_s": cfg.storage_timeout_s, "attempts": cfg.storage_attempts}


class _Progress:
    def __init__(self, total_docs: int, every_s: float = 10.0):
        self.t0 = time.monotonic()
        self.last = self.t0
        self.every_s = every_s
        self.total_docs = total_docs
        self.pages = self.errors = self.vectors = self.retryable = 0
        self.by_type: collections.Counter = collections.Counter()
        self.files: list[str] = []
        self.actors: dict[str, dict] = {}  # per-actor counters (pipeline.embed.counters)
        self.render_tasks: set[str] = set()  # host:pid:call of each render task

    def add(self, row: dict) -> None:
        self.pages += row["pages"]
        self.errors += row["error_rows"]
        self.vectors += row["vectors"]
        self.by_type.update(json.loads(row["errors_by_type"]))
        self.retryable += row.get("retryable_error_rows") or 0
        self.files.extend(json.loads(row["files"]))
        counters.merge_records(self.actors, json.loads(row["actors"]))
        self.render_tasks.update(json.loads(row.get("render_tasks") or "[]"))
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.pages / (now - self.t0)
            busy = counters.summarize(self.actors, 0.0)["gpu_busy_fraction"]
            print(f"[embed_corpus] {self.pages} pages written ({rate:.1f} pages/s since start), {self.errors} error "
                  f"rows, {len(self.files)} files, {len(self.actors)} actor(s) working"
                  + (f", busy {100 * busy:.0f}% of their time in the model" if busy is not None else ""),
                  file=sys.stderr, flush=True)


PREFLIGHT_TIMEOUT_S = 5.0
PREFLIGHT_ATTEMPTS = 2


def preflight(cfg: EmbedConfig) -> None:
    """What can be checked in seconds, before Ray starts and before any rendering: the model,
    then the storage: the input can be listed and the output written (short timeouts, few
    attempts). A dead or wrong endpoint raises :class:`storage.StorageUnavailableError`
    naming the URI and the endpoint; a missing input, FileNotFoundError; an output that holds
    vectors of other settings (without ``--force-new-config``), :class:`plan.ConfigMismatchError`."""
    storage.configure(cfg.storage_timeout_s, cfg.storage_attempts)
    log.info("model %s", plan.check_model(cfg.model, cfg.endpoint_url))
    # gs://: credentials found and the bucket answered, or StorageAccessError in seconds.
    seen = storage.check_access(cfg.input, cfg.output, cfg.endpoint_url,
                                timeout_s=PREFLIGHT_TIMEOUT_S, attempts=PREFLIGHT_ATTEMPTS)
    log.info("storage: --input %s lists (%d entries at its top), --output %s is writable", cfg.input,
             seen["input_entries"], cfg.output)
    if not cfg.force_new_config and not cfg.preflight:
        # Vectors of other settings in the output: refused now, not after Ray has started (the
        # dtype only where --dtype is given: "auto" depends on the device; the run checks again).
        metadata = output_metadata(cfg, "cpu")
        if cfg.dtype == "auto":
            metadata.pop(schema.META_DTYPE.decode())
        plan.refuse_other_settings(cfg, metadata)


def _render_spec(cfg: EmbedConfig) -> RenderSpec:
    return RenderSpec(max_visual_tokens=cfg.max_visual_tokens, max_dpi=cfg.max_dpi,
                      max_longest_side_px=cfg.max_longest_side_px, max_image_pixels=cfg.max_image_pixels,
                      max_pages_per_doc=cfg.max_pages_per_doc)


def _render_kwargs(cfg: EmbedConfig, spec: RenderSpec) -> dict:
    return {"spec": spec, "render_timeout_s": cfg.render_timeout_s, "max_file_bytes": cfg.max_file_bytes,
            "endpoint_url": cfg.endpoint_url, "pages_per_block": cfg.batch_size,
            "storage_settings": _storage_settings(cfg)}


def refuse_vision_attention(cfg: EmbedConfig, device: str, why: str) -> None:
    """``--vision-attention fa4`` where the model actors run on CPUs: refused (ClusterFitError, exit
    2), before the model or any page (pipeline.embed.vision_kernels refuses the rest in the actor)."""
    if cfg.vision_attention == "fa4" and device != "cuda":
        env = (" ($VDR_VISION_ATTENTION=fa4: unset it or pass --vision-attention sdpa)"
               if os.environ.get("VDR_VISION_ATTENTION", "").strip().lower() == "fa4" else "")
        raise ClusterFitError(f"--vision-attention fa4 runs on GPUs only, and this job's model actors run on {device} "
                              f"({why}). Use --vision-attention auto or sdpa{env}")


def _preflight_progress(cfg: EmbedConfig) -> tuple[pa.Table, str | None]:
    """What OUT already holds, read only, as the run would plan against it (and a note when
    the run would be refused or start a new generation: then it redoes everything)."""
    current = storage.current_generation(cfg.output, cfg.endpoint_url)
    root = schema.generation_root(cfg.output, current)
    recorded, _, where = plan.recorded_settings(root, cfg.endpoint_url)
    try:
        *_, device, why = resolve_resources(cfg)  # the dtype "auto" stands for depends on it
    except ClusterFitError:  # a preview on a machine without the run's GPUs: as the run would have them
        device, why = "cuda", ""
    refuse_vision_attention(cfg, device, why)  # the preview says what the run would refuse
    diffs = plan.setting_differences(recorded, plan.settings_of(output_metadata(cfg, device)))
    if not diffs:
        return plan.load_progress(root, cfg.endpoint_url), None
    what = "; ".join(f"{opt}: {old} -> {new}" for opt, old, new in diffs)
    action = "starts a new generation (--force-new-config)" if cfg.force_new_config else "is refused (exit 2)"
    return (plan.PROGRESS_SCHEMA.empty_table(),
            f"{where} records other settings ({what}): the run {action}; counted as a new generation (all to do)")


def run_preflight(cfg: EmbedConfig) -> dict:
    """``--preflight``: list, plan and render as :func:`run` does, on Ray, with no model and no
    writes but ``OUT/preflight.json``; returns that report (:mod:`pipeline.embed.preflight`)."""
    storage.configure(cfg.storage_timeout_s, cfg.storage_attempts)
    t0 = time.monotonic()
    done, note = _preflight_progress(cfg)
    if cfg.retry_errors and done.num_rows:
        log.warning("--preflight with --retry-errors: documents that ended as error rows are counted as done")
    exclude = plan.output_inside_input(cfg.input, cfg.output)
    units = [u for u in storage.listing_units(cfg.input, cfg.endpoint_url) if u != exclude]
    counter = _PlanCounter.remote()
    tally = preflight_report.Tally()
    listings, changes = None, {}
    if units and done.num_rows:
        # A rerun's preview lists the whole input first, as the run does, to show the sources
        # changed since (the run embeds them again) and deleted (the run removes their rows
        # and writes SourceDeleted rows): the preview showed neither.
        listings = {u: _list_unit.remote(cfg, u, exclude) for u in units}
        docs = pa.concat_tables([ray.get(ref)[0] for ref in listings.values()])
        try:
            previous = storage.read_json(join_uri(schema.generation_root(
                cfg.output, storage.current_generation(cfg.output, cfg.endpoint_url)), schema.CONFIG_FILE),
                cfg.endpoint_url)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            previous = {}
        same_input = str((previous or {}).get("input", cfg.input)).rstrip("/") == cfg.input.rstrip("/")
        found = plan.source_changes(docs, done, cfg.all_files, look_for_deleted=same_input and docs.num_rows > 0)
        changes = {"documents_changed": len(found["changed"]), "documents_deleted": len(found["deleted"]),
                   "changed_examples": found["changed"].slice(0, plan.CHANGE_EXAMPLES).to_pylist(),
                   "deleted_examples": found["deleted"].slice(0, plan.CHANGE_EXAMPLES).to_pylist()}
    if units:
        ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=min(len(units), MAX_INPUT_BLOCKS))
        ds = ds.map_batches(_plan_units, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"cfg": cfg, "done": [ray.put(done)], "counter": counter, "listings": listings,
                                       "exclude": exclude})
        with _task_retry_args():
            ds = ds.map_batches(preflight_report.preflight_documents, batch_size=cfg.docs_per_render_task,
                                batch_format="pyarrow", fn_kwargs=_render_kwargs(cfg, _render_spec(cfg)), num_cpus=1,
                                ray_remote_args_fn=_bounded_retries)
        for row in ds.iter_rows():
            tally.add(row)
    totals = ray.get(counter.totals.remote())
    ray.kill(counter)
    planned = {k: int(totals.get(k, 0)) for k in ("documents_listed", "documents_already_done", "documents_to_do")}
    planned["documents_skipped"] = totals["documents_skipped"]
    report = {**preflight_report.build_report(cfg, planned, tally, time.monotonic() - t0, note), **changes}
    storage.write_json(join_uri(cfg.output, schema.PREFLIGHT_FILE), report, cfg.endpoint_url)
    return report


def final_line(cfg: EmbedConfig, summary: dict) -> str:
    """What the job prints last (to stderr): the preflight's table, or a run's one line."""
    if summary.get("job") == "embed_corpus --preflight":
        return preflight_report.format_report(summary)
    run = summary["this_run"]
    retry = run["error_rows_retryable"]
    retry = (f" and {retry} for storage that did not answer (a rerun tries them again)" if retry else "")
    if summary.get("documents_listed") == 0 and not summary.get("documents_already_done"):
        retry += f" (no document under --input {summary['input']}: see the warning above)"
    changed, deleted = summary.get("documents_changed", 0), summary.get("documents_deleted", 0)
    if changed or deleted:  # written at the run's start, not counted in this run's error rows
        retry += (f"; sources since the last run: {changed} changed (embedded again), {deleted} deleted "
                  f"({schema.SOURCE_DELETED} rows)")
    return (f"[embed_corpus] done: {summary['documents_processed']} documents processed "
            f"({summary['documents_already_done']} already done), {run['pages']} pages, {run['error_rows_final']} "
            f"error rows{retry}, "
            f"{run['seconds']:.1f}s{first_batches(run.get('actors', []))} -> {cfg.output}")


def compile_cache_hint(cfg: EmbedConfig, device: str) -> str | None:
    """The line the job logs where its actors compile on GPUs without ``--compile-cache``: each node
    that is new to the model (an autoscaled one, every node of a cluster made for one job) then
    compiles the blocks itself while its first batches run eagerly. None otherwise."""
    if cfg.compile_cache or device != "cuda" or not cfg.embedder_settings(device, 1)["compile_model"]:
        return None
    fa4 = " (and FlashAttention 4's kernel)" if cfg.vision_attention != "sdpa" else ""
    return (f"no --compile-cache: each GPU node new to this model compiles its blocks{fa4} while its first "
            "batches run eagerly at about half speed; with --compile-cache s3://BUCKET/vdr-compile-cache/ (or "
            "gs://, or a shared path) the nodes after the first load them instead (measured: "
            "benchmarks/RESULTS.md, twenty-eighth session)")


def first_batches(actors: list[dict]) -> str:
    """The model actors' first batches for the final line: how long each took and how the
    actor came by its compiled model (loaded warm, compiled here, fell back to torch.compile,
    a kept actor), e.g. ", first batch 0.7 s (precompiled blocks loaded)"; past 3 actors the
    slowest and the fastest."""
    def how(a: dict) -> str:
        c = a.get("compile") or {}
        if a.get("model_load_s") == 0 or c.get("kept_actor"):  # a kept actor's later job (--keep-embedders)
            return "kept actor, model loaded and compiled before"
        mode = c.get("mode")
        if mode is None or mode == "off":
            return "not compiled"
        plain = "torch.compile, cache " + ("warm" if c.get("compile_cache_from") else "cold")
        if not mode.startswith("precompiled"):
            return plain
        loaded, compiled, fallbacks = c.get("variants_loaded", 0), c.get("variants_compiled", 0), c.get("fallbacks")
        if fallbacks and not loaded and not compiled:  # every block fell back: plain torch.compile
            return f"{plain}; precompiling fell back ({'; '.join(f'{k}: {v}' for k, v in fallbacks.items())})"
        helper = c.get("compile_helper") or {}
        if helper.get("state") == "loaded" and not compiled:
            eager = helper.get("eager_batches", 0)
            text = (f"blocks from a compile helper, loaded {helper.get('loaded_s') or helper.get('ready_s') or 0:.1f} s "
                    "after the actor started"
                    + (f", {eager} batch{'es' if eager != 1 else ''} run eagerly before" if eager else ""))
        elif helper.get("state") == "running" and not loaded and not compiled:  # the job ended first
            text = "blocks run eagerly: the compile helper had not finished"
        elif helper.get("state") == "running" and not compiled:  # one helper's blocks, the other's not yet
            text = "some blocks from a compile helper, the others run eagerly: their helper had not finished"
        else:
            text = ("precompiled blocks loaded" if loaded and not compiled else
                    "precompiled blocks compiled here" + (", some loaded" if loaded else ""))
            if helper.get("state", "").startswith(("failed", "timed out", "partly failed")):
                text += f" (compile helper {helper['state'][:120]})"
        if fallbacks:
            text += f", {len(fallbacks)} block type(s) fell back to {plain}"
        return text

    timed = sorted((a for a in actors if a.get("first_batch_s") is not None), key=lambda a: a["first_batch_s"])
    if not timed:
        return ""
    label = "first batch" if len(timed) == 1 else f"first batches of {len(timed)} actors"
    if len(timed) <= 3:
        return f", {label} " + ", ".join(f"{a['first_batch_s']:.1f} s ({how(a)})" for a in timed)
    return (f", {label}: slowest {timed[-1]['first_batch_s']:.1f} s ({how(timed[-1])}), "
            f"fastest {timed[0]['first_batch_s']:.1f} s ({how(timed[0])})")


def run(cfg: EmbedConfig) -> dict:
    """Run the corpus job on the connected Ray cluster; returns the summary it writes.

    The output folder is locked for the whole run (``OUT/_lock.json``, a lease renewed while
    the job runs): a second run on the same output is refused with the holder's name. Once
    the lock is held, what a crashed run left (``.tmp-*`` files, unfinished multipart
    uploads) is removed."""
    storage.configure(cfg.storage_timeout_s, cfg.storage_attempts)
    lock = storage.acquire_output_lock(cfg.output, cfg.endpoint_url)
    try:
        cleaned = storage.clean_output_leftovers(cfg.output, cfg.endpoint_url)
        with contextlib.ExitStack() as on_exit:  # what the run started in Ray and must end with it
            return _run_locked(cfg, cleaned, on_exit)
    finally:
        lock.release()


def _nothing_to_do(docs: pa.Table, skipped: list[dict], done: pa.Table) -> dict | None:
    """A rerun's whole listing (``docs``; each piece's skipped files) against the done-set:
    None when some document is left to (re)do (the plan tasks then plan and count each
    piece); else the counts the plan tasks would have sent, with nothing to do."""
    todo, stats = plan.plan_table(docs, done)
    if todo.num_rows:
        return None
    merged: dict = {}
    for entry in skipped:
        storage.merge_skipped(merged, entry)
    return {**stats, "documents_skipped": merged, "documents_to_do": 0}


def _stream(cfg: EmbedConfig, units: list, spec: RenderSpec, done: pa.Table, counter, listings: dict | None,
            model_stage: dict, metadata: dict, progress: _Progress, exclude: str | None = None) -> None:
    """The job's Ray Data chain: plan -> render -> the model stage (``model_stage``: the
    arguments of its ``map_batches``) -> write, each written file's row into ``progress``."""
    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=min(len(units), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(
        _plan_units,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"cfg": cfg, "done": [ray.put(done)], "counter": counter, "listings": listings, "exclude": exclude},
        num_cpus=0.25,  # listing is I/O
    )
    # Ray Data packs what a task yields into blocks of up to 128 MB, and a map task takes
    # whole blocks: without this, a plan task's 375 documents reached ONE render task and
    # the job rendered on one core (measured on an H200, 2026-12-03: 22 pages/s, GPU busy
    # 41-48%). Streaming repartition hands each render task its own few documents.
    ds = ds.repartition(target_num_rows_per_block=cfg.docs_per_render_task)
    with _task_retry_args():  # the render and write stages' retries
        ds = ds.map_batches(
            render_documents,
            batch_size=cfg.docs_per_render_task,
            batch_format="pyarrow",
            fn_kwargs={"spec": spec, "render_timeout_s": cfg.render_timeout_s, "max_file_bytes": cfg.max_file_bytes,
                       "endpoint_url": cfg.endpoint_url, "pages_per_block": cfg.batch_size,
                       "storage_settings": _storage_settings(cfg)},
            num_cpus=1,
            # pdfium crashes kill only the renderer child (an error row); a Ray worker that dies
            # anyway is retried a bounded number of times, not forever (Ray's default).
            ray_remote_args_fn=_bounded_retries,
        )
        ds = ds.map_batches(**model_stage)
        ds = ds.map_batches(
            write_shard,
            fn_kwargs={"output": cfg.output, "metadata": metadata,
                       "endpoint_url": cfg.endpoint_url, "storage_settings": _storage_settings(cfg)},
            batch_size=cfg.rows_per_file,
            batch_format="pyarrow",
            max_retries=WRITE_TASK_RETRIES,
            retry_exceptions=[OSError],
            # Mostly I/O: a small CPU share keeps it schedulable beside long-lived actors.
            num_cpus=0.25,
        )
    for row in ds.iter_rows():
        progress.add(row)
    if log.isEnabledFor(logging.DEBUG):  # -v: where each operator spent its time (Ray Data's own stats)
        log.debug("Ray Data stats:\n%s", ds.stats())


def _run_locked(cfg: EmbedConfig, cleaned: dict, on_exit: contextlib.ExitStack) -> dict:
    started = time.time()
    t0 = time.monotonic()
    spec = RenderSpec(max_visual_tokens=cfg.max_visual_tokens, max_dpi=cfg.max_dpi,
                      max_longest_side_px=cfg.max_longest_side_px, max_image_pixels=cfg.max_image_pixels,
                      max_pages_per_doc=cfg.max_pages_per_doc)
    gpus_per_actor, min_actors, max_actors, device, why = resolve_resources(cfg)
    refuse_vision_attention(cfg, device, why)
    in_flight = resolve_batches_in_flight(cfg.batches_in_flight, device)
    metadata = output_metadata(cfg, device)
    # Before any work: the output's settings against this run's (refused, or a new generation).
    output_uri = cfg.output
    generation, root, previous = plan.select_generation(cfg, metadata)
    if root != output_uri:
        cleaned = {k: v + storage.clean_output_leftovers(root, cfg.endpoint_url).get(k, 0) for k, v in cleaned.items()}
    cfg = dataclasses.replace(cfg, output=root)  # from here on, OUT is this generation's folder
    if cfg.retry_errors:
        removed = plan.remove_error_rows(cfg.output, cfg.endpoint_url)
        log.info("--retry-errors: removed %d error row(s) (SourceDeleted rows kept); their documents are tried "
                 "again", removed)
    # Rows of documents that storage failed to give us are dropped: they are redone now.
    retryable_rows_dropped = plan.drop_retryable_rows(cfg.output, cfg.endpoint_url)
    finished = plan.finish_retirement(cfg.output, cfg.endpoint_url)
    if finished:
        log.info("completed a shard rewrite an earlier run was stopped in: %d old file(s) removed", finished)
    # Planning streams: the done-set is read here (id columns, Arrow), the listing is cut into
    # pieces (top-level folders) that plan tasks list and match against it, so the first pages
    # reach the model while the rest of a large corpus is still being listed.
    done = plan.load_progress(cfg.output, cfg.endpoint_url)
    exclude = plan.output_inside_input(cfg.input, output_uri)  # OUT inside the input: not listed
    units = [u for u in storage.listing_units(cfg.input, cfg.endpoint_url) if u != exclude]
    embedder_kwargs = cfg.embedder_settings(device, in_flight)
    kept_handles, kept_reused = [], 0
    job_token = uuid.uuid4().hex  # this job, to kept actors: its calls, pings and keep-alive
    kept_kwargs = {**embedder_kwargs, "batches_in_flight": 2}
    kept_name = kept_embedder_name(kept_kwargs, gpus_per_actor) if cfg.keep_embedders else None
    warming: list = []

    def start_kept_embedders() -> None:
        """--keep-embedders: take over or start the kept model actors, so that their model loads
        while the job lists and plans; then the CPU workers started ahead, by default only where
        the model is already running (every kept actor taken over): otherwise its start is what
        the job waits for. A kept embedder may serve calls of two jobs at once: its device work
        is always queued one batch at a time (the lock of --batches-in-flight 2)."""
        nonlocal kept_handles, kept_reused
        if cfg.keep_embedders:
            kept_handles, kept_reused = kept_embedders(kept_name, min_actors, kept_kwargs, gpus_per_actor,
                                                       float(cfg.keep_embedders), job_token)
            log.info("--keep-embedders %g: %d kept model actor(s) %s-*, %d taken over from an earlier job",
                     cfg.keep_embedders, len(kept_handles), kept_name, kept_reused)
            on_exit.callback(_Heartbeat(kept_handles, float(cfg.keep_embedders), job_token).stop)
        warming.extend(prestart_workers(cfg, min_actors,
                                        model_running=bool(kept_handles) and kept_reused >= len(kept_handles)))

    rerun = bool(done.num_rows and units)
    listings = None
    nothing_to_do = None
    if units == [""] and not rerun:
        # A first run on one folder of files (or one file): that listing is one call, started
        # now, so that an input without a document starts no model actor (on an autoscaling
        # cluster, a GPU node for nothing); the plan task takes it. A local folder is listed
        # here; an object-store one by a task, waited for a few seconds only: a large flat
        # bucket's listing still overlaps the model actors' start.
        if "://" not in cfg.input or cfg.input.startswith("file://"):
            first = plan.list_unit(cfg, "", exclude)
            listings = {"": ray.put(first)}
        else:
            listings = {"": _list_unit.remote(cfg, "", exclude)}
            ready, _ = ray.wait(list(listings.values()), timeout=FIRST_LISTING_WAIT_S)
            first = ray.get(ready[0]) if ready else None
        if first is not None and first[0].num_rows == 0:
            nothing_to_do = _nothing_to_do(first[0], [first[1]], done)
    if units and not rerun and nothing_to_do is None:
        start_kept_embedders()
    storage.write_json(join_uri(cfg.output, schema.CONFIG_FILE),
                       {**json.loads(cfg.to_json()), "output": output_uri, "generation": generation,
                        "settings": plan.settings_of(metadata)}, cfg.endpoint_url)
    changes = {"documents_changed": 0, "documents_deleted": 0, "changed_examples": [], "deleted_examples": []}
    if rerun:
        # A rerun: list everything first (plan tasks reuse these listings), so that changed and
        # deleted sources are known, and their rows retired, before anything is written. Any
        # listing failure raises here: nothing is deleted on a partial listing.
        listings = {u: _list_unit.remote(cfg, u, exclude) for u in units}
        listed = [ray.get(ref) for ref in listings.values()]
        parts = [d for d, _ in listed]
        docs = pa.concat_tables(parts) if parts else storage.DOCUMENT_LISTING_SCHEMA.empty_table()
        same_input = previous is None or str(previous.get("input", cfg.input)).rstrip("/") == cfg.input.rstrip("/")
        if not same_input:
            log.warning("%s was embedded from --input %s, this run lists %s: documents missing from this "
                        "listing are not taken as deleted", output_uri, previous.get("input"), cfg.input)
        elif docs.num_rows == 0:
            log.warning("--input %s lists no document: nothing is taken as deleted (an empty listing is more "
                        "often a wrong path or mount than a deleted corpus)", cfg.input)
        changes = plan.reconcile(cfg, docs, done, metadata, look_for_deleted=same_input and docs.num_rows > 0)
        if changes.get("files_rewritten") or changes.get("source_deleted_rows_written"):
            done = plan.load_progress(cfg.output, cfg.endpoint_url)
        # Every listed document complete: no model actor is asked for (on an autoscaling
        # cluster that would add a GPU node and load the model for nothing).
        nothing_to_do = _nothing_to_do(docs, [skipped for _, skipped in listed], done)
        if nothing_to_do is None:
            start_kept_embedders()
    log.info("listing %d piece(s) of %s in plan tasks; %d document(s) already have rows in %s",
             len(units), cfg.input, done.num_rows, cfg.output)
    log.info("model on %s, %d-%d actor(s), %g GPU each: %s", device, min_actors, max_actors, gpus_per_actor, why)
    # not where no model actor starts, or where every one is a kept actor taken over warm
    hint = (None if nothing_to_do is not None or (kept_handles and kept_reused >= len(kept_handles))
            else compile_cache_hint(cfg, device))
    if hint:
        log.info(hint)
    _warn_local_paths(cfg)
    if kept_handles:
        # --keep-embedders: the model runs in the kept actors; Ray Data's pool holds their fronts
        turns = _Turns.remote()
        on_exit.callback(ray.kill, turns)
        model_stage = dict(
            fn=EmbedFront,
            fn_constructor_kwargs={"embedders": kept_handles, "turns": turns, "job": job_token,
                                   "keep_alive_s": float(cfg.keep_embedders),
                                   "respawn": (kept_name, kept_kwargs, gpus_per_actor)},
            compute=ActorPoolStrategy(size=len(kept_handles), max_concurrent_calls_per_actor=in_flight,
                                      enable_true_multi_threading=in_flight > 1),
            # The kept embedder's core (decoding pages, building inputs), counted here in Ray
            # Data's budget, as the PageEmbedder pool's is; the kept embedder reserves the GPU.
            num_cpus=1,
        )
    else:
        model_stage = dict(
            fn=PageEmbedder,
            fn_constructor_kwargs=embedder_kwargs,
            # --batches-in-flight 2: two calls run at once in each actor, on two threads
            # (PageEmbedder queues their device work one at a time).
            compute=ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                                      max_concurrent_calls_per_actor=in_flight,
                                      enable_true_multi_threading=in_flight > 1),
            num_gpus=gpus_per_actor,
            # The model's own CPU work (decoding the page bytes, building inputs) needs a core;
            # asking for it keeps render tasks from crowding the GPU nodes' cores.
            num_cpus=1,
        )
    model_stage.update(batch_size=cfg.batch_size, batch_format="pyarrow", zero_copy_batch=True)
    progress = _Progress(0)
    counter = _PlanCounter.remote()
    if nothing_to_do is not None:
        ray.get(counter.add.remote(nothing_to_do))
        if nothing_to_do.get("documents_listed", 0) == 0:
            skipped = sum(e["count"] for e in nothing_to_do.get("documents_skipped", {}).values())
            log.warning("--input %s holds no document this job reads (%s): nothing embedded, no model actor "
                        "started. Check the path; the job reads %s", cfg.input,
                        f"{skipped} other file(s) skipped" if skipped else "it is empty",
                        "every file (--all-files)" if cfg.all_files else
                        " ".join(storage.DOCUMENT_EXTENSIONS) + " files (--all-files: every file)")
        else:
            log.info("nothing to do: every listed document already has its rows in %s; no model actor started",
                     cfg.output)
    elif units:
        _stream(cfg, units, spec, done, counter, listings, model_stage, metadata, progress, exclude)
    if kept_handles:
        # Kept even when the job failed: another job may be using them; each ends when idle.
        log.info("keeping %d model actor(s) %s-* for the next job (each ends after %.0f s without a call)",
                 len(kept_handles), kept_name, cfg.keep_embedders)
    totals = ray.get(counter.totals.remote())
    ray.kill(counter)  # a driver that runs several jobs (a notebook, tests) keeps no counters
    planned = {k: int(totals.get(k, 0)) for k in ("documents_listed", "documents_already_done",
                                                    "documents_resumed", "documents_to_do")}
    planned["documents_skipped"] = totals["documents_skipped"]
    for reason, entry in planned["documents_skipped"].items():
        log.info("skipped %d %s file(s) of the input, e.g. %s", entry["count"], reason.replace("_", " "),
                 ", ".join(entry["examples"]))
    log.info("%d documents listed, %d already done, %d done in this run", planned["documents_listed"],
             planned["documents_already_done"], planned["documents_to_do"])
    elapsed = time.monotonic() - t0
    summary = {
        "job": "embed_corpus",
        "version": __version__,
        "input": cfg.input,
        "output": output_uri,
        "generation": generation,
        "model": cfg.model,
        "max_visual_tokens": cfg.max_visual_tokens,
        "pool_factor": cfg.pool_factor,
        "precision": cfg.precision,
        "batches_in_flight": in_flight,
        # --keep-embedders: seconds the model actors are kept after the job (0: not kept), and
        # how many of this job's were kept from an earlier one (their start-up skipped)
        "keep_embedders": cfg.keep_embedders,
        "embedders_reused": kept_reused,
        # CPU workers started at the job's start ($PIPELINE_PRESTART_WORKERS), and how many of
        # them then ran render tasks
        "workers_prestarted": len(warming),
        "prestarted_workers_rendered": _prestarted_render_workers(warming, progress.render_tasks),
        "device": device,
        "device_reason": why,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        **{k: v for k, v in planned.items() if k != "documents_to_do"},
        "documents_processed": planned["documents_to_do"],
        **changes,
        "this_run": {
            "pages": progress.pages,
            "vectors": progress.vectors,
            "error_rows": progress.errors,
            "errors_by_type": dict(progress.by_type.most_common()),
            # final: the document's own fault; retryable: storage did not answer, a rerun tries again
            "error_rows_final": progress.errors - progress.retryable,
            "error_rows_retryable": progress.retryable,
            "files_written": len(progress.files),
            "seconds": round(elapsed, 3),
            "pages_per_second": round(progress.pages / elapsed, 3) if elapsed > 0 else None,
            # the model pool's size as Ray Data's autoscaling actor pool was given it
            "embedding_actors": {"min": min_actors, "max": max_actors},
            "render_tasks": len(progress.render_tasks),
            "render_workers": len({t.rsplit(":", 1)[0] for t in progress.render_tasks}),
            **counters.summarize(progress.actors, started),
        },
        "output_totals": plan.output_totals(cfg.output, cfg.endpoint_url),
    }
    summary["cleaned"] = cleaned
    # StorageUnavailable rows of earlier runs, removed at the start: their documents were redone
    summary["retryable_error_rows_redone"] = retryable_rows_dropped
    storage.write_json(join_uri(cfg.output, schema.SUMMARY_FILE), summary, cfg.endpoint_url)
    # Every run's summary is kept too (summary.json is the latest), so runs can be compared over time.
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    storage.write_json(join_uri(cfg.output, schema.SUMMARIES_DIR, f"{stamp}-{os.getpid()}.json"), summary,
                       cfg.endpoint_url)
    return summary
