"""Driver-side planning of the corpus job at millions of documents: seconds and peak RSS.

Question: does ``plan_documents`` (listing vs done-set) fit the driver at 1M documents
(target: at most 2 GB peak RSS and 3 minutes)? Compares the Arrow planner of this tree
("after") with the Python-object planner of commit 70b6f7e ("before", optional).

Setup (skipped when already there): N one-byte ``.pdf`` files in nested folders
(``dNNN/sNNNNN/docNNNNNNN.pdf``, 1000 per folder) and an output folder whose
``pages/`` and ``errors/`` id-column Parquet files cover half of them: of that half, 80%
complete (2 of 2 pages), 10% partial (page 1 of 2: resumed), 10% a document-level error.
Each measurement runs in a fresh subprocess so ``ru_maxrss`` is its own peak.

    .venv/bin/python benchmarks/bench_plan.py --n 100000 --root /tmp/bench_plan [--before]

Prints one JSON line per mode, then one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The last commit with the Python-object planner (pipeline/storage.py + pipeline/embed/plan.py).
BEFORE_REV = "70b6f7e"
PER_FOLDER = 1000


def doc_id(i: int) -> str:
    return f"d{i // PER_FOLDER // 100:03d}/s{i // PER_FOLDER:05d}/doc{i:07d}.pdf"


def make_input(folder: str, n: int) -> None:
    marker = os.path.join(folder, f".complete-{n}")
    if os.path.exists(marker):
        return
    for i in range(n):
        path = os.path.join(folder, doc_id(i))
        if i % PER_FOLDER == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)
    open(marker, "w").close()  # hidden name: not listed


def make_output(folder: str, n: int, rows_per_file: int = 200_000) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = os.path.join(folder, f".complete-{n}")
    if os.path.exists(marker):
        return
    os.makedirs(os.path.join(folder, "pages"), exist_ok=True)
    os.makedirs(os.path.join(folder, "errors"), exist_ok=True)
    done = np.arange(0, n, 2)  # every other document has output
    kind = np.arange(len(done)) % 10  # 0-7 complete, 8 partial, 9 document error
    complete, partial, failed = done[kind < 8], done[kind == 8], done[kind == 9]
    page_docs = np.concatenate([complete, complete, partial])
    page_nums = np.concatenate([np.ones(len(complete)), np.full(len(complete), 2), np.ones(len(partial))])
    order = np.argsort(page_docs, kind="stable")
    page_docs, page_nums = page_docs[order], page_nums[order].astype(np.int32)
    for k, start in enumerate(range(0, len(page_docs), rows_per_file)):
        sl = slice(start, start + rows_per_file)
        pq.write_table(pa.table({
            "doc_id": pa.array([doc_id(int(i)) for i in page_docs[sl]], pa.string()),
            "page_number": pa.array(page_nums[sl], pa.int32()),
            "doc_pages": pa.array(np.full(len(page_docs[sl]), 2, np.int32), pa.int32()),
        }), os.path.join(folder, "pages", f"part-{k:05d}.parquet"))
    pq.write_table(pa.table({
        "doc_id": pa.array([doc_id(int(i)) for i in failed], pa.string()),
        "page_number": pa.nulls(len(failed), pa.int32()),
        "doc_pages": pa.nulls(len(failed), pa.int32()),
        "error_type": pa.array(["CorruptDocument"] * len(failed), pa.string()),
    }), os.path.join(folder, "errors", "part-00000.parquet"))
    open(marker, "w").close()


def old_modules(workdir: str):
    """The planner and listing of an older commit, importable as plan_old / storage_old."""
    os.makedirs(workdir, exist_ok=True)
    storage_src = subprocess.check_output(["git", "show", f"{BEFORE_REV}:pipeline/storage.py"], cwd=ROOT, text=True)
    plan_src = subprocess.check_output(["git", "show", f"{BEFORE_REV}:pipeline/embed/plan.py"], cwd=ROOT, text=True)
    plan_src = plan_src.replace("from pipeline.storage import", "from storage_old import")
    with open(os.path.join(workdir, "storage_old.py"), "w") as f:
        f.write(storage_src)
    with open(os.path.join(workdir, "plan_old.py"), "w") as f:
        f.write(plan_src)


def measure(mode: str, input_dir: str, output_dir: str, workdir: str) -> dict:
    """Run in a fresh process: one real plan_documents call, its phases timed."""
    sys.path.insert(0, ROOT)
    if mode == "before":
        sys.path.insert(0, workdir)
        import plan_old as plan

        list_name = "list_documents"
    else:
        from pipeline.embed import plan

        list_name = "list_documents_table"
    from pipeline.config import EmbedConfig

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    phases: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[name] = round(time.perf_counter() - t, 2)
            phases[name + "_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            return out
        return wrapper

    setattr(plan, list_name, timed("listing_s", getattr(plan, list_name)))
    plan.load_progress = timed("done_set_s", plan.load_progress)
    cfg = EmbedConfig(input=input_dir, output=output_dir)
    t0 = time.perf_counter()
    todo, stats = plan.plan_documents(cfg)
    total = time.perf_counter() - t0
    n_todo = len(todo)
    if mode == "after":  # what flow.run then does with it (without Ray): the block slices
        import math

        n_blocks = max(1, min(20_000, math.ceil(n_todo / cfg.docs_per_render_task)))
        step = math.ceil(n_todo / n_blocks) if n_todo else 1
        blocks = [todo.slice(i, step) for i in range(0, n_todo, step)]
        phases["input_blocks"] = len(blocks)
    return {"mode": mode, **phases, "plan_total_s": round(total, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_imports_mb": round(base_rss), "documents_to_do": n_todo, **stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--root", default="/tmp/bench_plan", help="where the synthetic input/output go")
    ap.add_argument("--input", help="an existing input folder (default ROOT/in-N)")
    ap.add_argument("--before", action="store_true", help=f"also time the planner of commit {BEFORE_REV}")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    input_dir = args.input or os.path.join(args.root, f"in-{args.n}")
    output_dir = os.path.join(args.root, f"out-{args.n}")
    workdir = os.path.join(args.root, "old")
    if args._child:
        print(json.dumps(measure(args._child, input_dir, output_dir, workdir)), flush=True)
        return
    t = time.perf_counter()
    make_input(input_dir, args.n)
    make_output(output_dir, args.n)
    setup_s = round(time.perf_counter() - t, 1)
    results = {}
    modes = (["before"] if args.before else []) + ["after"]
    if args.before:
        old_modules(workdir)
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--n", str(args.n), "--root", args.root,
               "--input", input_dir, "--_child", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        results[mode] = json.loads(out)
    print(json.dumps({"bench": "plan", "documents": args.n, "setup_s": setup_s, "cpus": os.cpu_count(),
                      **{f"{m}_{k}": results[m][k] for m in modes for k in ("plan_total_s", "peak_rss_mb")}}))


if __name__ == "__main__":
    main()
