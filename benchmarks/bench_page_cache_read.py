"""Ways to read one large file (a checkpoint's weights) into the page cache, from a dropped
page cache and from a warm one: ``read`` (64 MiB ``preadv`` into one buffer), ``sendfile`` to
/dev/null (no copy into the process), and ``posix_fadvise(WILLNEED)``, 3 s, then ``read``.
Needs root for ``echo 3 > /proc/sys/vm/drop_caches``. The figures behind the page-cache
warming tried in the twenty-first session (RESULTS.md).

    python benchmarks/bench_page_cache_read.py --file /tmp/real/model.safetensors --rounds 2 --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def drop() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)


def read(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    buf = memoryview(bytearray(64 << 20))
    off = 0
    try:
        while True:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                return off
            off += n
    finally:
        os.close(fd)


def sendfile(path: str) -> int:
    fd, null = os.open(path, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY)
    try:
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            n = os.sendfile(null, fd, off, min(1 << 30, size - off))
            if n <= 0:
                break
            off += n
        return off
    finally:
        os.close(fd)
        os.close(null)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for r in range(args.rounds):
        for how in ("read", "sendfile"):
            fn = read if how == "read" else sendfile
            drop()
            t0 = time.perf_counter()
            n = fn(args.file)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn(args.file)
            warm = time.perf_counter() - t0
            rows.append({"round": r, "how": how, "bytes": n, "cold_s": round(cold, 3), "warm_s": round(warm, 3)})
            print(json.dumps(rows[-1]), flush=True)
        drop()
        fd = os.open(args.file, os.O_RDONLY)
        t0 = time.perf_counter()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        advise = time.perf_counter() - t0
        os.close(fd)
        time.sleep(3)
        t0 = time.perf_counter()
        n = read(args.file)
        rows.append({"round": r, "how": "fadvise_willneed_3s_then_read", "bytes": n, "fadvise_s": round(advise, 3),
                     "read_after_s": round(time.perf_counter() - t0, 3)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"file": args.file, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
