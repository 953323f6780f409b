"""What the pooling's host half costs a thread that launches kernels (``--pool-factor``), by where
Ward's merge loop runs. CPU only: no GPU needed, and none used.

With two batches in flight an actor's two threads take turns: while one waits for its batch and
finishes its pooling on the host, the other queues the next forward, thousands of small
Python-dispatched calls. Host work that holds the GIL slows those launches and the GPU waits
(fifteenth session: 165 loops/s of small torch calls beside scipy's merge loop in the actor's
thread, 441 with it in worker processes, 474 alone; RESULTS.md). This runs the same kind of
loop in one thread while another thread does the host half of a batch of pages once per
``--period`` (the GPU's time per batch), and reports the loop's rate against its rate alone:

- ``alone``: no pooling beside the loop;
- ``scipy_thread``: scipy's ``linkage`` + ``fcluster`` in the thread (``VDR_POOL_PROCESSES=0``);
- ``processes``: the same in worker processes (:class:`pipeline.embed.pooling.WardMerges`, 2);
- ``device_merges``: what is left on the host when the merge loop ran on the GPU
  (:func:`pipeline.embed.pooling.device_labels`: stable sort, cluster names, ``fcluster``).

The device merges are made here from scipy's own linkage matrix (each cluster kept in the slot
of its largest point, as the chain keeps it), so no GPU and no interpreter are needed; the
host's work is the same as for the kernel's merges.

    PYTHONPATH=$PWD python benchmarks/bench_pool_host_gil.py [--pages 32] [--tokens 790] [--seconds 4]
        [--period 0.5] [--rounds 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.embed.pooling import WardMerges, condensed_distances, device_labels  # noqa: E402
from pipeline.embed.ward import labels_from_distances  # noqa: E402


def merges_in_slots(z: np.ndarray, n: int) -> np.ndarray:
    """scipy's linkage matrix as the chain's merges: each cluster named by its slot (its
    largest point), smaller slot first, in sorted order (an order the chain could have made)."""
    slot = np.concatenate([np.arange(n), np.zeros(n - 1, dtype=np.int64)])
    out = z.copy()
    for i, (a, b) in enumerate(z[:, :2].astype(np.int64)):
        sa, sb = slot[a], slot[b]
        out[i, 0], out[i, 1] = min(sa, sb), max(sa, sb)
        slot[n + i] = max(sa, sb)
    return out


def launch_loop(stop: threading.Event, counter: list) -> None:
    """Small torch calls, as a forward's kernel launches are dispatched from Python."""
    x = torch.ones(64)
    while not stop.is_set():
        for _ in range(50):
            x = x * 1.0001 + 0.0001
        counter[0] += 1


def run(mode: str, batch: dict, seconds: float, merges: WardMerges | None, period: float) -> dict:
    """One batch's host half every ``period`` seconds (the GPU's time per batch), the launch
    loop in another thread all along; a host half longer than the period starts the next at once."""
    stop, counter, host = threading.Event(), [0], []
    t = threading.Thread(target=launch_loop, args=(stop, counter))
    start = time.perf_counter()
    t.start()
    tick = start
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        if mode == "alone":
            pass
        elif mode == "scipy_thread":
            [labels_from_distances(c, n, 3) for c, n in zip(batch["condensed"], batch["lengths"])]
        elif mode == "processes":
            merges.labels(batch["flat_condensed"], batch["lengths"], 3)
        else:
            device_labels(batch["made"], batch["flags"], batch["lengths"], 3)
        host.append(time.perf_counter() - t0)
        tick += period
        time.sleep(max(0.0, tick - time.perf_counter()))
    stop.set()
    t.join()
    wall = time.perf_counter() - start
    return {"loops_per_s": round(counter[0] / wall, 1),
            "host_s_per_batch_median": round(statistics.median(host), 4) if mode != "alone" else None,
            "batches": len(host)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=790)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--period", type=float, default=0.5,
                    help="seconds between batches: the GPU's time per batch of 32 (~0.5 s on an H200)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    from scipy.cluster.hierarchy import linkage

    lengths, condensed, made = [], [], []
    for i in range(args.pages):
        n = args.tokens - (i % 7)
        v = torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=-1).to(torch.bfloat16)
        c = condensed_distances(v).numpy()
        lengths.append(n)
        condensed.append(c)
        made.append(merges_in_slots(linkage(c, method="ward"), n))
    batch = {"lengths": lengths, "condensed": condensed, "flat_condensed": np.concatenate(condensed),
             "made": np.concatenate(made), "flags": np.zeros(len(lengths), dtype=np.int32)}
    # the device merges' labels are scipy's
    want = [labels_from_distances(c, n, 3) for c, n in zip(condensed, lengths)]
    got = device_labels(batch["made"], batch["flags"], lengths, 3)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    merges = WardMerges(2)
    merges.labels(batch["flat_condensed"][: lengths[0] * (lengths[0] - 1) // 2], lengths[:1], 3)  # start the workers
    out = {"date": time.strftime("%Y-%m-%d"), "host": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "pages": args.pages, "tokens": args.tokens, "period_s": args.period,
           "seconds": args.seconds, "rounds": []}
    try:
        for _ in range(args.rounds):
            r = {mode: run(mode, batch, args.seconds, merges, args.period)
                 for mode in ("alone", "scipy_thread", "processes", "device_merges")}
            for mode in r:
                r[mode]["of_alone"] = round(r[mode]["loops_per_s"] / r["alone"]["loops_per_s"], 3)
            out["rounds"].append(r)
    finally:
        merges.close()
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
