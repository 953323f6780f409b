"""Read rate of a page-embedding corpus, layout by layout: bytes on disk and read+decode
rate into one contiguous float16 array, from the page cache (warm) and after evicting the
files from it (``posix_fadvise(DONTNEED)``, no root needed; "evicted" = read from the device).

One synthetic corpus (ColQwen2-shaped: 600-768 vectors x 128 float16 per page, random
values, which compress about as badly as real embeddings) is written several ways:
Parquet with the embedding job's settings and variations of them (compression, dictionary,
row-group and data-page sizes, BYTE_STREAM_SPLIT, non-nullable list items), and a raw
page-major float16 file. Each Parquet layout is read the way the scoring job reads
(``embedding`` column, all files, flattened to ``(n_vectors, 128)``), with pyarrow's
``pre_buffer`` / ``use_threads`` on and off for the job's layout.

The "cache" row is **not** the pipeline's cache reader: it times one file written here with
``ndarray.tofile`` and read back with ``readinto`` in 64 MiB pieces on one thread. The
scoring job's page-major cache is ``_write_cache`` / ``_read_cache`` in
pipeline/score/corpus.py (a ``.f16`` values file plus an index Parquet with size and
checksum, read through ``pipeline.storage.read_ranges_into``); the row is the raw read that
reader is built on, without its index read, checks or threads.

    python benchmarks/bench_read.py --pages 6000 --files 4 --dir /tmp/bench_read \
        --out benchmarks/results/bench_read_cpu_2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import schema  # noqa: E402
from pipeline.devtools.synthetic import pages_table  # noqa: E402

DIM = 128
EMB_LEAF = f"{schema.EMBEDDING}.list.element.list.element"  # the float16 leaf column


def make_pages(n_pages: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(600, 769, n_pages)
    # The values of a numpy draw (standard normal / 11, float16), drawn by torch on every core.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_score_job import pool_vectors

    flat = pool_vectors(int(lengths.sum()), seed)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    pages = [(f"doc-{i // 10:05d}.pdf", i % 10 + 1, schema.page_id(f"doc-{i // 10:05d}.pdf", i % 10 + 1),
              flat[offs[i]:offs[i + 1]]) for i in range(n_pages)]
    return pages, flat, lengths


NON_NULL_TYPE = pa.list_(pa.field("item", pa.list_(pa.field("item", pa.float16(), nullable=False), DIM),
                                  nullable=False))

# name -> pq.write_table keyword arguments (row_group_size in pages)
VARIANTS = {
    "job default (zstd, no dict, rg 32)": dict(compression="zstd", use_dictionary=False, row_group_size=32),
    "zstd + dictionary, rg 32": dict(compression="zstd", use_dictionary=True, row_group_size=32),
    "none, rg 32": dict(compression="none", use_dictionary=False, row_group_size=32),
    "lz4, rg 32": dict(compression="lz4", use_dictionary=False, row_group_size=32),
    "zstd, rg 256": dict(compression="zstd", use_dictionary=False, row_group_size=256),
    "none, rg 256, 8 MiB pages": dict(compression="none", use_dictionary=False, row_group_size=256,
                                      data_page_size=8 << 20),
    "zstd + byte_stream_split, rg 32": dict(compression="zstd", use_dictionary=False, row_group_size=32,
                                            use_byte_stream_split=[EMB_LEAF]),
    "none, rg 32, non-null items": dict(compression="none", use_dictionary=False, row_group_size=32,
                                        non_null=True),
    "zstd, rg 32, non-null items": dict(compression="zstd", use_dictionary=False, row_group_size=32,
                                        non_null=True),
    "zstd + byte_stream_split, rg 32, non-null items": dict(
        compression="zstd", use_dictionary=False, row_group_size=32, use_byte_stream_split=[EMB_LEAF],
        non_null=True),
    "lz4, rg 32, non-null items": dict(compression="lz4", use_dictionary=False, row_group_size=32, non_null=True),
}


def write_variant(folder, table_parts, kwargs) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    kwargs = dict(kwargs)
    non_null = kwargs.pop("non_null", False)
    paths = []
    for i, t in enumerate(table_parts):
        if non_null:
            fields = [pa.field(f.name, NON_NULL_TYPE, nullable=False) if f.name == schema.EMBEDDING else f
                      for f in t.schema]
            t = t.cast(pa.schema(fields, metadata=t.schema.metadata))
        p = os.path.join(folder, f"part-{i:03d}.parquet")
        pq.write_table(t, p, **kwargs)
        paths.append(p)
    return paths


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_parquet_flat(paths, total_vectors, *, pre_buffer=True, use_threads=True) -> np.ndarray:
    out = np.empty((total_vectors, DIM), np.float16)
    row = 0
    for p in paths:
        t = pq.read_table(p, columns=[schema.EMBEDDING], pre_buffer=pre_buffer, use_threads=use_threads)
        for chunk in t.column(0).chunks:
            v = chunk.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, DIM)
            out[row:row + len(v)] = v
            row += len(v)
    assert row == total_vectors
    return out


def read_raw_flat(path, total_vectors) -> np.ndarray:
    out = np.empty((total_vectors, DIM), np.float16)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < len(view):
            n = f.readinto(view[got:got + (64 << 20)])
            if not n:
                raise EOFError(path)
            got += n
    return out


def timed(fn, paths, evicted: bool, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        if evicted:
            evict(paths)
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=6000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/bench_read")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="pyarrow CPU pool size (0: os.cpu_count())")
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    pa.set_cpu_count(args.threads or os.cpu_count() or 1)

    t0 = time.perf_counter()
    pages, flat, lengths = make_pages(args.pages)
    total = int(lengths.sum())
    chunks = np.array_split(np.arange(len(pages)), args.files)
    parts = [pages_table([pages[j] for j in idx]) for idx in chunks]
    print(f"{args.pages} pages, {total} vectors, {flat.nbytes / 1e9:.2f} GB of float16 "
          f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)
    rows = []

    def record(name, paths, fn, note=""):
        nbytes = sum(os.path.getsize(p) for p in paths)
        got = fn()
        assert np.array_equal(got.view(np.uint16), flat.view(np.uint16)), name
        del got
        warm = timed(fn, paths, False, args.reps)
        cold = timed(fn, paths, True, args.reps)
        row = {"layout": name, "bytes_on_disk": nbytes, "disk_vs_raw": round(nbytes / flat.nbytes, 3),
               "warm_s": round(warm, 3), "evicted_s": round(cold, 3),
               "warm_GBps": round(flat.nbytes / warm / 1e9, 3), "evicted_GBps": round(flat.nbytes / cold / 1e9, 3),
               "warm_Mvalues_per_s": round(flat.size / warm / 1e6, 1), "note": note}
        rows.append(row)
        print(json.dumps(row), flush=True)

    only = [s for s in args.only.split(",") if s]
    for i, (name, kwargs) in enumerate(VARIANTS.items()):
        if only and not any(s in name for s in only):
            continue
        folder = os.path.join(args.dir, f"v{i}")
        t0 = time.perf_counter()
        try:
            paths = write_variant(folder, parts, kwargs)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, TypeError) as exc:
            rows.append({"layout": name, "error": str(exc)[:200]})
            print(f"{name}: cannot write: {exc}", flush=True)
            continue
        write_s = time.perf_counter() - t0
        record(name, paths, lambda: read_parquet_flat(paths, total), f"written in {write_s:.1f} s")
        if i == 0:
            for pb, ut in ((False, True), (True, False), (False, False)):
                record(f"{name}, pre_buffer={pb}, use_threads={ut}", paths,
                       lambda pb=pb, ut=ut: read_parquet_flat(paths, total, pre_buffer=pb, use_threads=ut))
            # A raw page-major float16 file: the same values, one file (+ offsets, not timed);
            # not the pipeline's cache reader (see the docstring).
            raw = os.path.join(args.dir, "cache.f16")
            flat.tofile(raw)
            record("page-major raw float16 (cache)", [raw], lambda: read_raw_flat(raw, total))
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    result = {
        "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
        "pyarrow": pa.__version__, "numpy": np.__version__, "pages": args.pages, "files": args.files,
        "vectors": total, "raw_bytes": flat.nbytes, "arrow_threads": pa.cpu_count(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
