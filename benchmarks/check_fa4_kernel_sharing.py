"""FlashAttention 4's compiled kernels through a shared folder (``--compile-cache``), on a GPU.

Three fresh processes, each with an empty FA4 disk cache of its own, load FA4 as an actor does
(``pipeline.embed.vision_kernels.start``, Qwen2-VL's vision heads: 16 of 80, bf16):
1. with an empty shared folder: it compiles, then writes its kernels there;
2. with that folder: it adds those kernels to its cache before FA4 looks, and compiles none;
3. without a shared folder: it compiles (the baseline of 2).
Prints and writes JSON: each process's FA4 load seconds (import + kernel, `load_s`), its summary's
`kernel_cache`, and the kernel files its cache held afterwards.

Usage (repository root, FA4 installed or its bundle on PYTHONPATH):
    python benchmarks/check_fa4_kernel_sharing.py --out /tmp/fa4_sharing.json
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


def child(local: str, shared: str | None) -> dict:
    from types import SimpleNamespace

    import torch

    from pipeline.embed import compile_cache as cc, vision_kernels as V

    config = SimpleNamespace(vlm_config=SimpleNamespace(vision_config=SimpleNamespace(num_heads=16, embed_dim=1280)))
    t = time.perf_counter()
    va = V.start("fa4", "cuda:0", config, time.time(), cache_dir=local, dtype=torch.bfloat16, shared_uri=shared)
    va.wait(600)
    while va.pending:
        time.sleep(0.05)
    out = va.summary()
    out["until_settled_s"] = round(time.perf_counter() - t, 2)
    out["files"] = cc.kernel_files(local)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="fa4_kernel_sharing.json")
    ap.add_argument("--child", nargs=2, metavar=("LOCAL", "SHARED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], args.child[1] or None)), flush=True)
        return
    work = tempfile.mkdtemp(prefix="fa4share")
    shared = os.path.join(work, "shared")
    res: dict = {"command": " ".join(sys.argv), "runs": {}}
    for name, share in (("1_fills_shared", shared), ("2_reads_shared", shared), ("3_no_shared", "")):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), ROOT])))
        for var in ("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"):
            env.pop(var, None)
        t = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", os.path.join(work, name), share],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        run = json.loads(line[7:]) if line else {"rc": proc.returncode, "stderr": proc.stderr[-3000:]}
        run["process_s"] = round(time.time() - t, 2)
        res["runs"][name] = run
        print(name, json.dumps(run), flush=True)
    res["shared_folder"] = sorted(os.listdir(shared)) if os.path.isdir(shared) else []
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
