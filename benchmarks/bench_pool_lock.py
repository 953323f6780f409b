"""--pool-factor inside the actor: how long each batch holds the device lock, pooled and not.

With two batches in flight (the GPU default) an actor's threads queue their device work one
batch at a time under `PageEmbedder.device_lock`; whatever a batch does while it holds the
lock, the other batch cannot start on the device. On a GPU the forward is queued
asynchronously, so work that runs on the host *inside* the lock (a host sync, scipy's Ward
merge loop) is time the GPU waits. This measures, for the same pages:

- lock_held_s per batch: from taking the lock to releasing it;
- under_lock_beside_forward_s per batch: the lock held minus the forward pass (ForwardTimer);
- pages/s of the two threads together.

On a GPU read lock_held_s itself: the forward is only queued under the lock, so the time
held is the host's queueing plus whatever the batch waits for there (the beside-forward figure
does not apply: CUDA events are read after the lock is let go).
On CPU the forward itself runs inside the lock (there is no device queue) and dominates it,
so the figure to read is pooling_under_lock_s_per_batch: factor 3's time under the lock
beside the forward minus factor 1's, i.e. the pooling work that keeps the other batch off
the device. Run at two commits to compare code paths.

    PYTHONPATH=$PWD python benchmarks/bench_pool_lock.py [--batches 8] [--batch-size 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.embed.model import ForwardTimer, TurnLock, embed_pages, load_model  # noqa: E402


class TimedLock(TurnLock):
    """TurnLock that records how long each holder kept it, and how much of that the
    forward pass took (the ForwardTimer's per-thread count)."""

    def __init__(self, timer: ForwardTimer):
        super().__init__()
        self.timer = timer
        self.held: list[float] = []
        self.beside_forward: list[float] = []
        self._since = threading.local()

    def __enter__(self):
        super().__enter__()
        self._since.t, self._since.busy = time.perf_counter(), self.timer.thread_busy_s
        return self

    def __exit__(self, *exc):
        held = time.perf_counter() - self._since.t
        self.held.append(held)
        self.beside_forward.append(held - (self.timer.thread_busy_s - self._since.busy))
        return super().__exit__(*exc)


def run(lm, pages: list, batch_size: int, pool_factor: int) -> dict:
    timer = ForwardTimer(str(lm.device))
    lock = TimedLock(timer)
    batches = [pages[i : i + batch_size] for i in range(0, len(pages), batch_size)]
    todo = list(range(len(batches)))
    guard = threading.Lock()
    results: dict = {}

    def worker():
        while True:
            with guard:
                if not todo:
                    return
                i = todo.pop(0)
            results[i] = embed_pages(lm, batches[i], timer, pool_factor=pool_factor, device_lock=lock)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    vectors = sum(len(v) for i in results for v in results[i])
    return {"pool_factor": pool_factor, "batches": len(batches), "wall_s": round(wall, 3),
            "pages_per_s": round(len(pages) / wall, 2), "vectors": vectors,
            "lock_held_s_per_batch_median": round(statistics.median(lock.held), 4),
            "lock_held_s_per_batch_all": [round(x, 4) for x in lock.held],
            "lock_held_of_wall": round(sum(lock.held) / wall, 3),
            "under_lock_beside_forward_s_per_batch_median": round(statistics.median(lock.beside_forward), 4),
            "under_lock_beside_forward_s_per_batch_all": [round(x, 4) for x in lock.beside_forward]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=8, help="batches per run (default 8)")
    ap.add_argument("--batch-size", type=int, default=8, help="pages per batch (default 8)")
    ap.add_argument("--model", help="a saved ColQwen2 (default: the tiny random one, built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of factor 1 then 3 (default 3)")
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from pipeline.devtools.tiny import build_tiny_model

            model = build_tiny_model(os.path.join(tmp, "tiny"))
        lm = load_model(model, device=args.device)
        rng = np.random.default_rng(0)
        # US-letter pages at the trained budget: 896x672 pixels, 768 visual tokens
        pages = [rng.integers(0, 255, (896, 672, 3), dtype=np.uint8) for _ in range(args.batches * args.batch_size)]
        embed_pages(lm, pages[: args.batch_size], pool_factor=3)  # warm-up
        rounds = []
        for _ in range(args.repeats):
            rounds.append({f"factor_{f}": run(lm, pages, args.batch_size, f) for f in (1, 3)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary = {f: {k: statistics.median(r[f][k] for r in rounds)
                   for k in ("lock_held_s_per_batch_median", "under_lock_beside_forward_s_per_batch_median",
                             "pages_per_s", "lock_held_of_wall")}
               for f in ("factor_1", "factor_3")}
    summary["pooling_under_lock_s_per_batch"] = round(
        summary["factor_3"]["under_lock_beside_forward_s_per_batch_median"]
        - summary["factor_1"]["under_lock_beside_forward_s_per_batch_median"], 4)
    result = {"commit": commit, "device": args.device, "batch_size": args.batch_size, "batches": args.batches,
              "cpus": os.cpu_count(), "summary": summary, "rounds": rounds}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
