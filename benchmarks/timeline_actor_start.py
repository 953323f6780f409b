"""When each job's model actor started, and how many cores rendered meanwhile, from Ray's task
timelines (``bench_kept_embedders.py --timeline-dir DIR``; the timeline of a Ray head holds
the earlier jobs' events too, so only events after each job's process start are counted).

    python benchmarks/timeline_actor_start.py KEPT_JSON TIMELINE_DIR [ACTOR_PAGES_PER_S]

Per job: the PageEmbedder actor's constructor (start and length, seconds from the job
process's start), its first batch call, the whole process, and the render tasks' busy cores
in each second of the first 18.
"""

from __future__ import annotations

import collections
import json
import os
import sys


def job_start_rows(kept_json: str, timeline_dir: str, actor_pps: float | None = None) -> list[dict]:
    runs = json.load(open(kept_json))["runs"]
    rows = []
    for name, r in runs.items():
        path = os.path.join(timeline_dir, f"{name}.timeline.json")
        if r.get("rc") != 0 or not os.path.exists(path):
            continue
        t0 = r["process_started_at"]
        events = [e for e in json.load(open(path)) if e.get("ph") == "X" and e["ts"] / 1e6 >= t0 - 0.5]
        init = [(e["ts"] / 1e6 - t0, e["dur"] / 1e6) for e in events
                if e["cat"].startswith("task::MapWorker(MapBatches(PageEmbedder)).__init__")]
        calls = sorted(e["ts"] / 1e6 - t0 for e in events
                       if e["cat"].startswith("task::MapWorker(MapBatches(PageEmbedder)).submit"))
        busy: collections.Counter = collections.Counter()
        for e in events:
            if e["cat"].startswith("task::MapBatches(render"):
                s, d = e["ts"] / 1e6 - t0, e["dur"] / 1e6
                for b in range(int(s), int(s + d) + 1):
                    busy[b] += max(0.0, min(s + d, b + 1) - max(s, b))
        a = (r.get("actors") or [{}])[0]
        rows.append({
            "job": name, "env": r.get("env", {}), "process_s": r["wall_s_process"],
            "of_actor_alone": round(r["pages_per_s_whole"] / actor_pps, 3) if actor_pps else None,
            "workers_prestarted": r.get("workers_prestarted"),
            "actor_constructor_at_s": round(init[0][0], 2) if init else None,
            "actor_constructor_s": round(init[0][1], 2) if init else None,
            "first_batch_call_at_s": round(calls[0], 2) if calls else None,
            "model_load_s": a.get("model_load_s"), "first_batch_s": a.get("first_batch_s"),
            "render_cores_per_second": [round(busy[b], 1) for b in range(18)],
        })
    return rows


if __name__ == "__main__":
    for row in job_start_rows(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else None):
        print(json.dumps(row))
