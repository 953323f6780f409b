"""How busy each embedding actor was, from the actor's own clocks (no Ray, no torch).

Each ``PageEmbedder`` batch leaves the actor with seven hidden columns (:data:`COLUMNS`): the
actor's name (host:pid), this batch's forward time spread over its rows (CUDA events around the
model's forward pass on a GPU, the host clock on CPU), the wall time of the actor's first batch
start and of this batch's end, the model's load time, the first batch's figures, and how the
actor came by its compiled model. ``write_shard`` folds its rows
into one record per actor, and the driver folds those into the summary's ``actors``: per
actor, pages, forward (GPU-busy) seconds, wall seconds from its first batch start to its
last batch end, the busy fraction, and pages per second of its own wall time. None of these
can exceed what the actor did: the job's rate is never computed from when files land.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

ACTOR = "_actor"
BUSY_S = "_busy_s"
FIRST_BATCH_AT = "_first_batch_at"
BATCH_END_AT = "_batch_end_at"
MODEL_LOAD_S = "_model_load_s"
# The actor's first batch (wall s, forward s, pages): it holds torch.compile's compilation,
# during which the GPU idles inside the timed forward, so the summary also gives the
# figures after it.
FIRST_BATCH = "_first_batch"
# How the actor came by its compiled model (JSON, as of its first batch in this job: off,
# precompiled blocks loaded or compiled here, the compile cache warm or cold; with a compile
# helper still running or FlashAttention 4 still loading, marked provisional and replaced by a
# later batch's: final_state); whether warm starts worked, per actor, in the summary.
COMPILE = "_compile"
COLUMNS = (ACTOR, BUSY_S, FIRST_BATCH_AT, BATCH_END_AT, MODEL_LOAD_S, FIRST_BATCH, COMPILE)
_FIRST_TYPE = pa.list_(pa.float64(), 3)


def counter_columns(n_rows: int, actor: str, busy_s: float, first_batch_at: float, batch_end_at: float,
                    model_load_s: float, first_batch: tuple[float, float, float] | None = None,
                    compile_state: str | None = None) -> dict[str, pa.Array]:
    """The hidden columns of one actor batch of ``n_rows`` rows (busy time split evenly)."""
    share = busy_s / n_rows if n_rows else 0.0
    return {
        ACTOR: pa.array([actor] * n_rows, pa.string()),
        BUSY_S: pa.array([share] * n_rows, pa.float64()),
        FIRST_BATCH_AT: pa.array([first_batch_at] * n_rows, pa.float64()),
        BATCH_END_AT: pa.array([batch_end_at] * n_rows, pa.float64()),
        MODEL_LOAD_S: pa.array([model_load_s] * n_rows, pa.float64()),
        FIRST_BATCH: pa.array([list(first_batch) if first_batch else None] * n_rows, _FIRST_TYPE),
        COMPILE: pa.array([compile_state] * n_rows, pa.string()),
    }


def actor_records(table: pa.Table, is_page: pa.Array | pa.ChunkedArray) -> list[dict]:
    """Rows of one write batch -> one record per actor: pages, busy_s, first_batch_at,
    last_batch_end_at, model_load_s. Empty when the rows carry no counters."""
    if table.num_rows == 0 or ACTOR not in table.column_names:
        return []
    t = pa.table({
        "actor": table[ACTOR], "busy": table[BUSY_S], "first": table[FIRST_BATCH_AT], "end": table[BATCH_END_AT],
        "load": table[MODEL_LOAD_S], "page": pc.cast(is_page, pa.int64()),
    })
    g = t.group_by("actor").aggregate([("page", "sum"), ("busy", "sum"), ("first", "min"), ("end", "max"),
                                        ("load", "max")])
    firsts: dict[str, list] = {}
    if FIRST_BATCH in table.column_names:
        for actor, first in zip(table[ACTOR].to_pylist(), table[FIRST_BATCH].to_pylist()):
            if first is not None:
                firsts.setdefault(actor, first)
    compiled: dict[str, str] = {}
    if COMPILE in table.column_names:
        for actor, state in zip(table[ACTOR].to_pylist(), table[COMPILE].to_pylist()):
            if state is not None:
                compiled[actor] = final_state(compiled.get(actor), state)
    return [{"actor": r["actor"], "pages": int(r["page_sum"] or 0), "busy_s": float(r["busy_sum"] or 0.0),
             "first_batch_at": r["first_min"], "last_batch_end_at": r["end_max"], "model_load_s": r["load_max"],
             "first_batch": firsts.get(r["actor"]), "compile": compiled.get(r["actor"])}
            for r in g.to_pylist() if r["actor"] is not None]


def merge_records(into: dict[str, dict], records: list[dict]) -> dict[str, dict]:
    """Fold per-file records into per-actor totals (keyed by actor)."""
    for r in records:
        a = into.get(r["actor"])
        if a is None:
            into[r["actor"]] = dict(r)
            continue
        a["pages"] += r["pages"]
        a["busy_s"] += r["busy_s"]
        a["first_batch_at"] = min(a["first_batch_at"], r["first_batch_at"])
        a["last_batch_end_at"] = max(a["last_batch_end_at"], r["last_batch_end_at"])
        a["model_load_s"] = max(a["model_load_s"] or 0.0, r["model_load_s"] or 0.0)
        a["first_batch"] = a.get("first_batch") or r.get("first_batch")
        a["compile"] = final_state(a.get("compile"), r.get("compile"))
    return into


def final_state(a: str | None, b: str | None) -> str | None:
    """Of two rows' compile states (JSON) of one actor, the one to report: the first, unless it
    is provisional (written while the actor's compile helper still ran, or FlashAttention 4 still
    loaded) and the other is not, or the other says FA4 failed at runtime (recorded later; files
    come in any order)."""
    if a is None or b is None:
        return b if a is None else a
    if ("failed at runtime" in b) != ("failed at runtime" in a):
        return b if "failed at runtime" in b else a
    if '"provisional": true' in a and '"provisional": true' not in b:
        return b
    return a


def summarize(actors: dict[str, dict], job_started_at: float) -> dict:
    """The summary's view: one entry per actor, in order of first batch, and the totals.

    ``gpu_busy_fraction`` is forward time over the actor's wall time since its first batch
    started; ``pages_per_second`` is pages over that wall time, so the sum over actors is
    what the pool did while it worked, and the whole job's rate (pages over the job's
    seconds, start-up included) is below it."""
    out = []
    for a in sorted(actors.values(), key=lambda a: a["first_batch_at"]):
        wall = max(a["last_batch_end_at"] - a["first_batch_at"], 1e-9)
        out.append({
            "actor": a["actor"],
            "pages": a["pages"],
            "model_load_s": round(a["model_load_s"] or 0.0, 3),
            "first_batch_after_s": round(a["first_batch_at"] - job_started_at, 3),
            "wall_s": round(wall, 6),
            "gpu_busy_s": round(a["busy_s"], 6),
            "gpu_busy_fraction": round(a["busy_s"] / wall, 4),
            "pages_per_second": round(a["pages"] / wall, 3),
        })
        if a.get("compile"):
            compiled = json.loads(a["compile"])
            start = compiled.pop("start", None)
            vision = compiled.pop("vision_attention", None)
            out[-1]["compile"] = compiled
            if vision:  # SDPA, or FlashAttention 4 from when it was loaded (pipeline.embed.vision_kernels)
                ready_at = vision.pop("ready_at", None)
                if ready_at is not None:  # on the job's clock, as first_batch_after_s
                    vision["ready_after_job_start_s"] = round(ready_at - job_started_at, 3)
                out[-1]["vision_attention"] = vision
            if start:
                # Before the GPU's first batch: the actor's constructor began ``started_after_s``
                # into the job (a worker process, on an autoscaling cluster a new node), loaded
                # the model (``model_load_s``, by step), then waited ``load_to_first_batch_s``
                # (compile set-up, the first pages) until its first batch started.
                out[-1]["start"] = {
                    "started_after_s": round(start["constructed_at"] - job_started_at, 3),
                    "load_phases_s": start.get("load_phases") or {},
                    "load_to_first_batch_s": round(
                        a["first_batch_at"] - start["constructed_at"] - (a["model_load_s"] or 0.0), 3),
                }
        first = a.get("first_batch")
        if first:
            f_wall, f_busy, f_pages = first
            rest = wall - f_wall
            out[-1]["first_batch_s"] = round(f_wall, 6)
            if rest > 0 and a["pages"] > f_pages:
                out[-1]["after_first_batch"] = {
                    "gpu_busy_fraction": round((a["busy_s"] - f_busy) / rest, 4),
                    "pages_per_second": round((a["pages"] - f_pages) / rest, 3),
                }
    busy = sum(a["busy_s"] for a in actors.values())
    wall = sum(e["wall_s"] for e in out)
    return {
        "actors": out,
        "gpu_busy_fraction": round(busy / wall, 4) if wall else None,
        "actor_pages_per_second": round(sum(e["pages_per_second"] for e in out), 3) if out else None,
    }
