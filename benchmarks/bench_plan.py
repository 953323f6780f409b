"""Driver-side planning of the corpus job at millions of documents: seconds and peak RSS.

Question: does ``plan_documents`` (listing vs done-set) fit the driver at 1M documents
(target: at most 2 GB peak RSS and 3 minutes)? Compares the Arrow planner of this tree
("after") with the Python-object planner of commit 70b6f7e ("before", optional).
Caveat on "before": only the names its plan.py imports ``from pipeline.storage import``
(``list_documents``, ``join_uri``, ...) come from 70b6f7e's storage.py; its calls through
``storage.`` (``storage.read_columns`` for the done-set) and ``schema`` / ``config`` use this
tree's code. And the job no longer runs ``plan_documents`` in the driver (since 9b57e73: the
driver reads the done-set and the top-level folder names; plan tasks list and plan a folder
each), so "after" is an upper bound for today's driver, not its cost.

Setup (skipped when already there): N one-byte ``.pdf`` files in nested folders
(``dNNN/sNNNNN/docNNNNNNN.pdf``, 1000 per folder) and an output folder whose
``pages/`` and ``errors/`` id-column Parquet files cover half of them: of that half, 80%
complete (2 of 2 pages), 10% partial (page 1 of 2: resumed), 10% a document-level error.
Each measurement runs in a fresh subprocess so its peak RSS (VmHWM) is its own.

    .venv/bin/python benchmarks/bench_plan.py --n 100000 --root /tmp/bench_plan [--before]

Prints one JSON line per mode, then one summary line.

``--s3``: the same measurement against an S3 listing. This process starts moto's
``ThreadedMotoServer`` on 127.0.0.1 (fake credentials in the environment), puts the N
one-byte keys into bucket ``bench-plan-in-N`` (prefix ``in/``) and the same done-set
Parquet files into ``bench-plan-out-N`` (prefix ``out/``), then times the real
``plan_documents`` with ``s3://`` input/output and ``endpoint_url`` = the moto server,
again in a fresh subprocess (the server's memory and CPU stay in this process).
Population (not measured) goes straight into moto's in-process backend by default
(``--populate backend``: ~17k keys/s, no HTTP), or through boto3 ``put_object`` from 32
threads (``--populate http``: ~120 keys/s here). Also timed, in another fresh subprocess: a bare boto3
``list_objects_v2`` paginator (1000 keys a page) over the same prefix, and the CPU
seconds the moto server itself spent while each child ran: moto scans and sorts every key
of the bucket for each 1000-key page, so its listing cost grows as N^2 / 1000.

    .venv/bin/python benchmarks/bench_plan.py --s3 --n 10000 --root /tmp/bench_plan
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


def peak_rss_mb() -> float:
    """This process's peak RSS (MB): VmHWM, which starts afresh at exec. ru_maxrss does not
    on Linux: a child keeps the RSS of the parent it was forked from (here the moto
    server of --s3, hundreds of MB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, input_dir: str, output_dir: str, workdir: str, endpoint_url: str | None = None) -> dict:
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

    base_rss = peak_rss_mb()
    phases: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[name] = round(time.perf_counter() - t, 2)
            phases[name + "_peak_rss_mb"] = round(peak_rss_mb())
            return out
        return wrapper

    setattr(plan, list_name, timed("listing_s", getattr(plan, list_name)))
    plan.load_progress = timed("done_set_s", plan.load_progress)
    cfg = EmbedConfig(input=input_dir, output=output_dir, endpoint_url=endpoint_url)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
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
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    phases["driver_cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2)
    return {"mode": mode + ("-s3" if endpoint_url else ""), **phases, "plan_total_s": round(total, 2),
            "peak_rss_mb": round(peak_rss_mb()),
            "rss_after_imports_mb": round(base_rss), "documents_to_do": n_todo, **stats}


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-not-for-logs",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def bare_listing(bucket: str, prefix: str, endpoint_url: str) -> dict:
    """Run in a fresh process: boto3's list_objects_v2 paginator alone, 1000 keys a page."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    t0 = time.perf_counter()
    keys = pages = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                  PaginationConfig={"PageSize": 1000}):
        pages += 1
        keys += len(page.get("Contents", []))
    return {"mode": "boto3-list_objects_v2", "listing_s": round(time.perf_counter() - t0, 2),
            "keys": keys, "pages": pages, "peak_rss_mb": round(peak_rss_mb())}


def start_moto() -> tuple[object, str]:
    import socket

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def populate_s3(endpoint_url: str, n: int, in_bucket: str, out_bucket: str, output_dir: str,
                how: str = "backend") -> dict:
    """N one-byte keys under s3://in_bucket/in/ and the done-set Parquet files of
    output_dir (:func:`make_output`) under s3://out_bucket/out/. ``backend``: straight
    into the moto backend of this process (the server's); ``http``: boto3 put_object
    from 32 threads."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=in_bucket)
    client.create_bucket(Bucket=out_bucket)
    t0 = time.perf_counter()
    if how == "backend":
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        for i in range(n):
            backend.put_object(in_bucket, "in/" + doc_id(i), b"x", disable_notification=True)
    else:
        def put(start: int) -> None:
            for i in range(start, min(n, start + PER_FOLDER)):
                client.put_object(Bucket=in_bucket, Key="in/" + doc_id(i), Body=b"x")

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(0, n, PER_FOLDER)))
    keys_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    make_output(output_dir, n)
    files = 0
    for sub in ("pages", "errors"):
        for name in sorted(os.listdir(os.path.join(output_dir, sub))):
            client.upload_file(os.path.join(output_dir, sub, name), out_bucket, f"out/{sub}/{name}")
            files += 1
    check = client.list_objects_v2(Bucket=in_bucket, Prefix="in/" + doc_id(n - 1))
    assert check.get("KeyCount") == 1, check
    return {"populate": how, "populate_keys_s": round(keys_s, 1),
            "populate_keys_per_s": round(n / keys_s) if keys_s else None,
            "populate_done_set_s": round(time.perf_counter() - t1, 1), "done_set_files": files}


def run_child(cmd: list[str], env: dict | None = None) -> tuple[dict, float]:
    """A fresh subprocess's JSON line, and the CPU seconds this process (the moto server,
    otherwise idle) spent meanwhile."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    after = resource.getrusage(resource.RUSAGE_SELF)
    return json.loads(out), round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)


def main_s3(args) -> None:
    os.environ.update(S3_ENV)
    in_bucket, out_bucket = f"bench-plan-in-{args.n}", f"bench-plan-out-{args.n}"
    input_uri, output_uri = f"s3://{in_bucket}/in", f"s3://{out_bucket}/out"
    t = time.perf_counter()
    server, endpoint = start_moto()
    try:
        setup = populate_s3(endpoint, args.n, in_bucket, out_bucket, os.path.join(args.root, f"out-{args.n}"),
                            args.populate)
        setup["setup_s"] = round(time.perf_counter() - t, 1)
        env = dict(os.environ)
        env.pop("AWS_ENDPOINT_URL", None)  # the planner gets it as EmbedConfig.endpoint_url
        plan_res, plan_server_cpu = run_child(
            [sys.executable, os.path.abspath(__file__), "--n", str(args.n), "--root", args.root, "--input", input_uri,
             "--_output", output_uri, "--_endpoint", endpoint, "--_child", "after"], env)
        plan_res["moto_server_cpu_s"] = plan_server_cpu
        print(json.dumps(plan_res), flush=True)
        bare, bare_server_cpu = run_child(
            [sys.executable, os.path.abspath(__file__), "--n", str(args.n), "--root", args.root, "--input", in_bucket,
             "--_output", "in/", "--_endpoint", endpoint, "--_child", "bare-list"], env)
        bare["moto_server_cpu_s"] = bare_server_cpu
        print(json.dumps(bare), flush=True)
        server_rss = round(peak_rss_mb())
    finally:
        server.stop()
    print(json.dumps({"bench": "plan-s3", "documents": args.n, **setup, "cpus": os.cpu_count(),
                      "after_plan_total_s": plan_res["plan_total_s"], "after_peak_rss_mb": plan_res["peak_rss_mb"],
                      "after_listing_s": plan_res.get("listing_s"), "after_done_set_s": plan_res.get("done_set_s"),
                      "moto_server_cpu_during_plan_s": plan_server_cpu,
                      "bare_boto3_listing_s": bare["listing_s"], "moto_server_cpu_during_bare_s": bare_server_cpu,
                      "moto_server_process_peak_rss_mb": server_rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--root", default="/tmp/bench_plan", help="where the synthetic input/output go")
    ap.add_argument("--input", help="an existing input folder (default ROOT/in-N)")
    ap.add_argument("--before", action="store_true", help=f"also time the planner of commit {BEFORE_REV}")
    ap.add_argument("--s3", action="store_true", help="list and read the done-set from moto's S3 server on 127.0.0.1")
    ap.add_argument("--populate", choices=("backend", "http"), default="backend",
                    help="--s3: put the keys into moto's in-process backend (fast) or via boto3 put_object")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_output", help=argparse.SUPPRESS)
    ap.add_argument("--_endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child == "bare-list":
        print(json.dumps(bare_listing(args.input, args._output, args._endpoint)), flush=True)
        return
    if args._endpoint:
        print(json.dumps(measure(args._child, args.input, args._output, "", args._endpoint)), flush=True)
        return
    if args.s3:
        if args.before or args.input:
            ap.error("--s3 measures this tree's planner on synthetic keys only (no --before, no --input)")
        main_s3(args)
        return
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
