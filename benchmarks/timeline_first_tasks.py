"""When each kind of Ray task first ran in one job, from Ray's task timeline (``ray.timeline``,
written by ``bench_kept_embedders.py --timeline-dir``): seconds from the job process's start.

    python benchmarks/timeline_first_tasks.py DIR/kept_3.timeline.json PROCESS_START_EPOCH_S

Ray keeps a bounded number of task events, so a kind's first event may be missing from a
long job (its first listed event is then later than its real start).
"""

from __future__ import annotations

import json
import sys


def first_tasks(path: str, t0: float) -> list[tuple[float, float, str, str]]:
    first: dict = {}
    for e in json.load(open(path)):
        if e.get("ph") != "X" or not (e["cat"] == "task:execute" or e["cat"].startswith("task::")):
            continue
        ts = e["ts"] / 1e6
        if ts >= t0 - 1 and (e["cat"], e["name"]) not in first:
            first[(e["cat"], e["name"])] = (ts - t0, e["dur"] / 1e6)
    return sorted((v[0], v[1], k[0], k[1]) for k, v in first.items())


if __name__ == "__main__":
    for start, dur, cat, name in first_tasks(sys.argv[1], float(sys.argv[2]))[:40]:
        print(f"{start:7.2f} +{dur:6.2f}  {cat[:22]:22} {name[:70]}")
