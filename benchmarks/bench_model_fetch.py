"""A new node's model load from object storage: the copy of an ``s3://`` checkpoint, and
``load_model`` as an actor runs it (fresh process: imports, copy, weights), this checkout
against another (``--old-code``, e.g. a ``git worktree`` of the commit before), alternating.

    python benchmarks/bench_model_fetch.py --old-code /tmp/vdr-old --rounds 3 --out fetch.json

The store is moto's server on 127.0.0.1 (no network here): its figures measure the code
against moto, not against S3 (moto copies the whole object for each ranged GET, so many small
reads cost it far more than S3, and one GET of a whole file less; see RESULTS.md). The model is the real
ColQwen2's widths with ``--text-layers`` and ``--vision-depth`` layers and random bf16
weights (``pipeline.devtools.tiny``): the real checkpoint's files, fewer of its layers.
Each case empties the node's model cache (``VDR_MODEL_CACHE``) first, as on a new node.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOAD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from pipeline.embed.model import load_model
lm = load_model(sys.argv[2], device="cpu", dtype="bfloat16")
print("RESULT " + json.dumps({"load_model_s": round(time.perf_counter() - t0, 3), "phases": lm.load_phases}))
"""

FETCH = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.embed.model import fetch_model
t0 = time.perf_counter()
fetch_model(sys.argv[2])
print("RESULT " + json.dumps({"fetch_s": round(time.perf_counter() - t0, 3)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(folder: str, text_layers: int, vision_depth: int) -> int:
    from pipeline.devtools import tiny

    tiny.REAL_TEXT = {**tiny.REAL_TEXT, "num_hidden_layers": text_layers}
    tiny.REAL_VISION = {**tiny.REAL_VISION, "depth": vision_depth}
    tiny.build_tiny_model(folder, real_size=True)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def run(snippet: str, code: str, uri: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", snippet, code, uri], env=env, capture_output=True, text=True,
                         cwd=code, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{code}: rc {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-code", required=True, help="a checkout to compare with (a git worktree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, VDR_COMPILE_HELPER="0")
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                           "AWS_ENDPOINT_URL")})
    sys.path.insert(0, ROOT)
    from pipeline import storage

    work = tempfile.mkdtemp(prefix="bench-fetch-")
    folder = os.path.join(work, "model")
    size = build(folder, args.text_layers, args.vision_depth)
    fs, root = storage.open_filesystem("s3://models/colqwen2", endpoint)
    fs.create_dir("models")
    t0 = time.perf_counter()
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
            shutil.copyfileobj(src, dst, 64 << 20)
    upload_s = time.perf_counter() - t0
    shutil.rmtree(folder)
    uri = "s3://models/colqwen2"
    codes = {"old": os.path.abspath(args.old_code), "new": ROOT}
    rows = []
    for r in range(args.rounds):
        for label in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for what, snippet in (("fetch", FETCH), ("load_model", LOAD)):
                cache = os.path.join(work, "cache")
                shutil.rmtree(cache, ignore_errors=True)
                res = run(snippet, codes[label], uri, dict(env, VDR_MODEL_CACHE=cache))
                res.update(round=r, code=label, what=what)
                if what == "fetch":
                    res["mb_per_s"] = round(size / 1e6 / res["fetch_s"], 1)
                rows.append(res)
                print(json.dumps(res), flush=True)
    server.stop()
    shutil.rmtree(work, ignore_errors=True)
    result = {"model_bytes": size, "text_layers": args.text_layers, "vision_depth": args.vision_depth,
              "upload_s": round(upload_s, 2), "store": "moto ThreadedMotoServer on 127.0.0.1",
              "old_code": codes["old"], "cpus": os.cpu_count(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
