"""Both jobs through the README's plain commands (no resource flags) on a two-node Ray
cluster, compared with a one-node cluster, on one GPU machine.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/two_nodes_one_gpu.py --pages 480 --out two_nodes.json

Cluster A: one raylet with the GPU. Cluster B: two raylets on this host, each with its own
temp dir and ``--num-gpus=1``, sharing GPU 0 (FACTS.md: what a 2-GPU host does with one GPU
per raylet, on a machine that has one). The same corpus (letter-size PNG pages) is embedded
by each with ``python -m jobs.embed_corpus --input ... --output ...`` and scored with
``python -m jobs.score_queries ...``; the script reports, per node, the time from submission
to the node's first finished batch (the actors' own ``[PageEmbedder]`` lines, mapped to
nodes through their parent raylet), the GPU's busy fraction from ``nvidia-smi`` samples,
and whether the outputs equal the one-node run (embeddings and full ranked lists).
A real-size ColQwen2 with random weights is built first (FLOPs do not depend on weights).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0]='ray'; main()"]


def env(address: str | None = None) -> dict:
    e = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "CUDA_VISIBLE_DEVICES": "0"}
    e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")])
    if address:
        e["RAY_ADDRESS"] = address
    return e


def start_cluster(name: str, nodes: int, port: int, cpus: int) -> list[str]:
    dirs = []
    for i in range(nodes):
        d = f"/tmp/{name}{i}"
        shutil.rmtree(d, ignore_errors=True)
        args = ["start", "--num-gpus=1", f"--num-cpus={cpus}", f"--temp-dir={d}", "--disable-usage-stats"]
        if i == 0:
            args += ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false"]
        else:
            args += [f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1"]
        subprocess.run(RAY + args, env=env(), check=True, capture_output=True, text=True, timeout=180)
        dirs.append(d)
    return dirs


def stop_cluster(dirs: list[str]) -> None:
    """Only this cluster's processes: those whose command line names one of its temp dirs."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if any(d in args for d in dirs) and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(3)


class Sampler:
    """nvidia-smi every 200 ms, and which raylet (node) each embedding actor runs under."""

    def __init__(self, dirs: list[str]):
        self.dirs, self.stop, self.actor_node = dirs, threading.Event(), {}
        self.smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                     "--format=csv,noheader,nounits", "-lms", "200"],
                                    stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, int]] = []
        threading.Thread(target=self._smi, daemon=True).start()
        threading.Thread(target=self._ps, daemon=True).start()

    def _smi(self):
        for line in self.smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[1].isdigit():
                self.samples.append((time.time(), int(parts[1])))

    def _ps(self):
        while not self.stop.is_set():
            rows = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
            args = {}
            for r in rows[1:]:
                f = r.split(None, 2)
                if len(f) == 3:
                    args[int(f[0])] = (int(f[1]), f[2])
            for pid, (ppid, a) in args.items():
                if "PageEmbedder" in a and pid not in self.actor_node:
                    parent = args.get(ppid, (0, ""))[1]
                    for i, d in enumerate(self.dirs):
                        if d in parent:
                            self.actor_node[pid] = i
            time.sleep(0.3)

    def close(self):
        self.stop.set()
        self.smi.terminate()


def run_plain(args: list[str], address: str) -> tuple[float, float, str]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *args], env=env(address), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return t0, time.time(), proc.stderr + proc.stdout


def make_corpus(folder: str, n: int) -> None:
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (1275, 1650), "white")
        d = ImageDraw.Draw(img)
        for j in range(40):
            d.text((90, 90 + 36 * j), f"Document {i}, line {j}: quarterly figures, table {j % 7}, note {i * j % 97}",
                   fill="black")
        d.rectangle((90, 1500, 1185, 1600), outline=(20, 40, 180), width=5)
        img.save(os.path.join(folder, f"doc{i:05d}.png"))


def pages(folder: str):
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(folder, "pages")).sort_by("page_id")
    emb = t.column("embedding").combine_chunks()
    flat = emb.flatten().flatten().to_numpy(zero_copy_only=False)
    return t.column("page_id").to_pylist(), emb.offsets.to_numpy(), np.asarray(flat)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--pages", type=int, default=480)
    p.add_argument("--out", default="two_nodes.json")
    p.add_argument("--work", default="/tmp/two_nodes")
    p.add_argument("--cpus-per-node", type=int, default=7)
    a = p.parse_args()
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.devtools.tiny import build_tiny_model

    os.makedirs(a.work, exist_ok=True)
    model, corpus = os.path.join(a.work, "model"), os.path.join(a.work, "corpus")
    t0 = time.time()
    if not os.path.exists(os.path.join(model, "config.json")):
        build_tiny_model(model, real_size=True, device="cuda")
    make_corpus(corpus, a.pages)
    queries = os.path.join(a.work, "q.jsonl")
    with open(queries, "w") as f:
        for i in range(50):
            f.write(json.dumps({"query_id": f"q{i}", "text": f"quarterly figures table {i % 7} note {i}"}) + "\n")
    report = {"pages": a.pages, "setup_s": round(time.time() - t0, 1), "runs": {}}

    for name, nodes, port in (("one_node", 1, 6390), ("two_nodes", 2, 6391)):
        dirs = start_cluster(f"r{name[:3]}", nodes, port, a.cpus_per_node)
        address = f"127.0.0.1:{port}"
        out, run = os.path.join(a.work, f"emb_{name}"), os.path.join(a.work, f"run_{name}")
        shutil.rmtree(out, ignore_errors=True)
        sampler = Sampler(dirs)
        try:
            t_sub, t_end, log = run_plain(["jobs.embed_corpus", "--input", corpus, "--output", out, "--model", model],
                                          address)
            s_sub, s_end, slog = run_plain(["jobs.score_queries", "--corpus", out, "--queries", queries,
                                            "--output", run, "--top-k", "10"], address)
        finally:
            sampler.close()
            stop_cluster(dirs)
        summary = json.load(open(os.path.join(out, "summary.json")))
        firsts = {}
        for pid, done_at, since in re.findall(r"\[PageEmbedder\] pid (\d+): .*? done at \S+ UTC \(unix ([\d.]+), ([\d.]+) s after", log):
            node = sampler.actor_node.get(int(pid))
            firsts[f"node{node}" if node is not None else f"pid{pid}"] = round(float(done_at) - t_sub, 1)
        busy = [u for t, u in sampler.samples if t_sub <= t <= t_end]
        first_batch = min(firsts.values()) + t_sub if firsts else t_sub
        after = [u for t, u in sampler.samples if first_batch <= t <= t_end]
        report["runs"][name] = {
            "embed_job_s": round(t_end - t_sub, 1),
            "pages_per_s_whole_job": round(summary["this_run"]["pages"] / (t_end - t_sub), 2),
            "device": summary["device"], "device_reason": summary["device_reason"],
            "actors": summary["this_run"]["embedding_actors"],
            "first_batch_s_after_submission_by_node": firsts,
            "gpu_busy_fraction_whole_job": round(sum(u > 0 for u in busy) / max(1, len(busy)), 3),
            "gpu_util_mean_after_first_batch": round(sum(after) / max(1, len(after)), 1),
            "score_job_s": round(s_end - s_sub, 1),
            "score_device_reason": json.load(open(os.path.join(run, "summary.json"))).get("device_reason"),
        }
        print(json.dumps({name: report["runs"][name]}), flush=True)

    ids1, off1, v1 = pages(os.path.join(a.work, "emb_one_node"))
    ids2, off2, v2 = pages(os.path.join(a.work, "emb_two_nodes"))
    same_layout = ids1 == ids2 and np.array_equal(off1, off2)
    diff = float(np.abs(v1.astype(np.float32) - v2.astype(np.float32)).max()) if same_layout else None
    r1 = pq.read_table(os.path.join(a.work, "run_one_node", "results.parquet")).to_pylist()
    r2 = pq.read_table(os.path.join(a.work, "run_two_nodes", "results.parquet")).to_pylist()
    report["equal"] = {
        "page_ids_and_vector_counts": same_layout,
        "embeddings_bitwise": bool(same_layout and np.array_equal(v1, v2)),
        "embeddings_max_abs_diff": diff,
        "ranked_lists_identical": [(r["query_id"], r["rank"], r["page_id"]) for r in r1]
        == [(r["query_id"], r["rank"], r["page_id"]) for r in r2],
        "scores_identical": [r["score"] for r in r1] == [r["score"] for r in r2],
    }
    report["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True).stdout.strip()
    print(json.dumps(report["equal"]))
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
