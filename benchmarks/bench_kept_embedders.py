"""The 3,000-page embedding job on a running Ray cluster, with and without ``--keep-embedders``,
each job a fresh ``python -m jobs.embed_corpus`` process, as ``ray job submit`` runs it.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/bench_kept_embedders.py --out kept.json

One Ray head is started (``ray start``) and kept for every job; then, one after another on
the same corpus, each to its own output:

  plain     the job as it is by default (Ray Data's actor pool: worker, imports, model load,
            first compiled batch inside the job)
  kept_1    ``--keep-embedders 600``: the first job starts the kept model actor
  kept_2..  the same command again: the actor of kept_1 serves it (no start-up); with
            ``--prestart-ab``, kept_2, kept_4, ... run with PIPELINE_PRESTART_WORKERS=0 (the job's
            CPU workers not started ahead), kept_3, kept_5, ... with the default

Per job: the wall time of the process (from its start to its exit: the driver's imports,
joining Ray, listing, rendering, embedding, writing, the summary), pages over it, and the
summary's figures (its own seconds, each actor's counters, ``embedders_reused``). The actor
alone is measured apart (``bench_actor.py``) in the same device call. A real-size ColQwen2
with random weights is built first. Whether the last job's embeddings equal the first's is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from pipeline.devtools.local_cluster import free_port  # noqa: E402
from two_nodes_one_gpu import env, pages, start_cluster, stop_cluster  # noqa: E402


def in_turn(option: str, name: str) -> list[str]:
    """The entry of ``option`` ('a,b;c;', entries used in turn) for job ``plain_after_N``,
    split at ','; none for the other jobs."""
    entries = option.split(";") if option else []
    if not entries or not name.startswith("plain_after_"):
        return []
    return [x for x in entries[(int(name.rsplit("_", 1)[1]) - 1) % len(entries)].strip().split(",") if x]


def node_caches() -> dict[str, str]:
    """The node's compile caches that --cold-caches empties, by the names --cold-keep takes."""
    import getpass

    tmp = tempfile.gettempdir()
    return {"job": os.path.join(tmp, "vdr-compile-cache"),
            "inductor": os.path.join(tmp, f"torchinductor_{getpass.getuser()}"),
            "triton": os.path.join(os.path.expanduser("~"), ".triton", "cache")}


def tree_size(path: str) -> dict:
    """Files and bytes under ``path``, and its top-level entries (up to 20): what a cache held."""
    files = size = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size += os.path.getsize(os.path.join(root, n))
                files += 1
            except OSError:
                pass
    top = sorted(os.listdir(path))[:20] if os.path.isdir(path) else []
    return {"files": files, "bytes": size, "top": top}


def end_kept_actors(address: str) -> float:
    """End the kept model actors (namespace vdr-embedding) and wait until their GPUs are free."""
    import ray

    t = time.time()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "vdr-embedding":
            ray.kill(ray.get_actor(entry["name"], namespace="vdr-embedding"))
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources().get("GPU", 0) and time.time() - t < 60:
        time.sleep(0.5)
    return round(time.time() - t, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_kept_embedders.json")
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--kept-runs", type=int, default=3, help="jobs with --keep-embedders after the plain one")
    ap.add_argument("--keep-s", type=float, default=600)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few pages: checks the wiring")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain job (compare with kept_1)")
    ap.add_argument("--prestart-ab", action="store_true",
                    help="kept runs from the second on alternate PIPELINE_PRESTART_WORKERS=0 (off) and the default")
    ap.add_argument("--plain-after", type=int, default=0,
                    help="plain jobs to run after the kept ones (their kept actors ended first): the plain job "
                         "once more, away from the actor bench that ran before the first")
    ap.add_argument("--plain-envs", default="",
                    help="environment of the --plain-after jobs, in turn: 'A=1,B=2;;A=3' (an empty entry: as "
                         "the benchmark runs); an A/B of start-up settings in one run")
    ap.add_argument("--plain-args", default="",
                    help="extra job arguments of the --plain-after jobs, in turn: '--wait-for-compile;' (entries "
                         "split at ';', arguments at ','; an empty entry: none); use --plain-args=... ")
    ap.add_argument("--cold-caches", action="store_true",
                    help="empty this node's compile caches (the job's, Inductor's, Triton's) before each job: "
                         "every actor compiles cold, as on a new node")
    ap.add_argument("--cold-jobs", default="",
                    help="with --cold-caches: only these --plain-after jobs (1-based, comma-separated) start from "
                         "emptied caches, the others from what the job before left (a warm job right after a "
                         "cold one: '1,3' of four jobs)")
    ap.add_argument("--cold-keep", default="",
                    help="with --cold-caches: caches the emptying leaves alone, per job in turn ('triton', "
                         "'inductor', 'job'; ';' between jobs, ',' between caches): which cache a new node's "
                         "slower start comes from ('triton' keeps ~/.triton/cache)")
    ap.add_argument("--mixed-sizes", action="store_true",
                    help="documents of six page shapes (letter, A4, landscape, 16:9 slides, square, legal) instead "
                         "of letter pages only: batches of mixed page sizes, as real corpora give")
    ap.add_argument("--timeline-dir", help="write Ray's task timeline (chrome trace) after each job here, and "
                    "each job's stderr (run with -v: Ray Data's per-operator stats)")
    args = ap.parse_args()
    unknown = {c for entry in args.cold_keep.split(";") for c in entry.split(",") if c.strip()} - set(node_caches())
    if unknown:
        ap.error(f"--cold-keep names {', '.join(sorted(unknown))}: the caches are {', '.join(node_caches())}")

    from bench_embed import PAGE_SIZES, letter_pdf

    from pipeline.devtools.tiny import build_tiny_model

    work = tempfile.mkdtemp(prefix="bench-kept-")
    model = os.path.join(work, "model")
    t = time.time()
    if args.smoke:
        args.pages, args.tokens, args.batch_size = 16, 64, 4
        build_tiny_model(model)
    else:
        build_tiny_model(model, max_visual_tokens=args.tokens, real_size=True, device="cuda")
    res: dict = {"build_model_s": round(time.time() - t, 1), "commit": os.environ.get("BENCH_COMMIT"),
                 "mixed_sizes": args.mixed_sizes,
                 "pages": args.pages, "tokens": args.tokens, "batch_size": args.batch_size, "runs": {}}
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    sizes = sorted(PAGE_SIZES) if args.mixed_sizes else ["letter"]
    # 8 distinct documents (12 with --mixed-sizes: two of each shape), each file rendered by the job
    docs = [letter_pdf(8, d, sizes[d % len(sizes)]) for d in range(12 if args.mixed_sizes else 8)]
    for d in range(args.pages // 8):
        with open(os.path.join(corpus, f"doc{d:05d}.pdf"), "wb") as f:
            f.write(docs[d % len(docs)])

    port = free_port()
    dirs = start_cluster("vdr-kept", 1, port, os.cpu_count() or 2)
    address = f"127.0.0.1:{port}"
    try:
        names = ([] if args.no_plain else ["plain"]) + [f"kept_{i}" for i in range(1, args.kept_runs + 1)]
        names += [f"plain_after_{i}" for i in range(1, args.plain_after + 1)]
        for name in names:
            if name == "plain_after_1":
                res["kept_actors_ended_s"] = end_kept_actors(address)
            out = os.path.join(work, name)
            cmd = [sys.executable, "-m", "jobs.embed_corpus", "--input", corpus, "--output", out, "--model", model,
                   "--batch-size", str(args.batch_size), "--max-visual-tokens", str(args.tokens)]
            if name.startswith("kept_"):
                cmd += ["--keep-embedders", str(args.keep_s)]
            if args.timeline_dir:
                cmd += ["-v"]
            job_env = env(address)
            if args.prestart_ab and name.startswith("kept_") and int(name[5:]) >= 2 and int(name[5:]) % 2 == 0:
                job_env["PIPELINE_PRESTART_WORKERS"] = "0"
            job_env.update(dict(kv.split("=", 1) for kv in in_turn(args.plain_envs, name)))
            cmd += in_turn(args.plain_args, name)
            cold_only = {f"plain_after_{int(i)}" for i in args.cold_jobs.split(",") if i.strip()}
            if args.cold_caches and (not cold_only or name in cold_only):
                import shutil

                caches = node_caches()
                keep = in_turn(args.cold_keep, name)
                res.setdefault("caches_before", {})[name] = {k: tree_size(d) for k, d in caches.items()}
                for k, d in caches.items():
                    if k not in keep:
                        shutil.rmtree(d, ignore_errors=True)
                res.setdefault("cold_kept", {})[name] = keep
            t0 = time.time()
            proc = subprocess.run(cmd, env=job_env, cwd=ROOT, capture_output=True, text=True)
            wall = time.time() - t0
            if args.cold_caches:
                res.setdefault("caches_after", {})[name] = {k: tree_size(d) for k, d in node_caches().items()}
            if proc.returncode:
                res["runs"][name] = {"rc": proc.returncode, "stderr": proc.stderr[-4000:]}
                print(name, "failed", proc.stderr[-3000:], flush=True)
                continue
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            run = s["this_run"]
            entry = {"rc": 0, "wall_s_process": round(wall, 2), "pages": run["pages"],
                     "pages_per_s_whole": round(run["pages"] / wall, 2), "job_seconds": run["seconds"],
                     "embedders_reused": s.get("embedders_reused"), "actors": run.get("actors"),
                     "env": {k: v for k, v in job_env.items() if k.startswith(("PIPELINE_", "VDR_"))},
                     "args": cmd[cmd.index("--max-visual-tokens") + 2:],
                     "workers_prestarted": s.get("workers_prestarted"),
                     "prestarted_workers_rendered": s.get("prestarted_workers_rendered"),
                     "gpu_busy_fraction": run.get("gpu_busy_fraction"),
                     "actor_pages_per_s": run.get("actor_pages_per_second"),
                     "log_lines": [ln for ln in proc.stderr.splitlines()
                                   if "[PageEmbedder]" in ln or "keep-embedders" in ln or "keeping" in ln][-6:]}
            res["runs"][name] = entry
            if args.timeline_dir:
                import ray

                os.makedirs(args.timeline_dir, exist_ok=True)
                with open(os.path.join(args.timeline_dir, f"{name}.stderr.txt"), "w") as f:
                    f.write(proc.stderr)
                if not ray.is_initialized():
                    ray.init(address=address, log_to_driver=False)
                ray.timeline(filename=os.path.join(args.timeline_dir, f"{name}.timeline.json"))
                entry["job_started_at"] = s.get("started_at")
                entry["process_started_at"] = t0
            print(name, {k: v for k, v in entry.items() if k not in ("actors", "log_lines")}, flush=True)
            with open(args.out, "w") as f:  # after each job: a run cut short keeps what it did
                json.dump(res, f, indent=2)
        import numpy as np

        plain_ids, plain_off, plain_flat = pages(os.path.join(work, names[0]))
        last = [n for n in names if n.startswith("kept_")][-1] if args.kept_runs else names[-1]
        # every later job's embeddings against the first's (one at a time: ~0.6 GB each)
        for other in (names[1:] if args.plain_args else [last]):
            if other == names[0] or res["runs"].get(other, {}).get("rc") != 0:
                continue
            ids, off, flat = pages(os.path.join(work, other))
            same = ids == plain_ids and (off == plain_off).all()
            entry = {"same_pages_and_vector_counts": bool(same)}
            if same:
                diff = np.abs(flat.astype(np.float32) - plain_flat.astype(np.float32)).reshape(-1, 128).max(axis=1)
                entry.update(max_abs_diff=float(diff.max()), vectors_differing=int((diff > 0).sum()),
                             vectors=int(len(diff)))
            res[f"{other}_vs_{names[0]}"] = entry
            del flat
    finally:
        import ray

        ray.shutdown()
        stop_cluster(dirs)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
