#!/usr/bin/env bash
# The configuration the tests run on CPU (the tiny random ColQwen2, batch 4, 64 and 768 visual
# tokens: tests/embed/test_embed_job.py, jobs/demo.py), run once on a GPU (issue 11, part 6):
#   1. the tests' embed job (--max-visual-tokens 64 --batch-size 4) with --device cuda, and the same
#      with --device cpu; every page's vectors compared (same pages, same counts, cosine, max abs);
#   2. the demo (README line 1) with --budgets 768,64: embed, score and evaluate, device auto.
# On the device machine, from the repository root, after the Ray bundle (and optionally the
# transformers bundle) are unpacked in /tmp/site and /tmp/tfsite:
#   OUT=/tmp/check bash benchmarks/gpu_test_config_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_test_config_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="/tmp/tfsite:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
W=/tmp/vdr-test-config
rm -rf "$W" && mkdir -p "$W"
# the demo's tiny model and sample corpus, as jobs.demo makes them
"$PY" -c "import sys; from pipeline.devtools.tiny import build_tiny_model; from pipeline.devtools import samples
build_tiny_model(sys.argv[1]); samples.make_sample_corpus(sys.argv[2])" "$W/demo/tiny-colqwen2" "$W/demo/corpus" \
  > "$OUT/build.log" 2>&1
echo "tiny model and corpus built (rc $?)" | tee "$OUT/check.txt"
for dev in cuda cpu; do
  t=$(date +%s)
  timeout 200 "$PY" -m jobs.embed_corpus --input "$W/demo/corpus" --output "$W/out-$dev" --model "$W/demo/tiny-colqwen2" \
    --max-visual-tokens 64 --batch-size 4 --device "$dev" > "$OUT/embed_$dev.log" 2>&1
  echo "embed --device $dev rc=$? in $(( $(date +%s) - t )) s" | tee -a "$OUT/check.txt"
  cp "$W/out-$dev/summary.json" "$OUT/summary_$dev.json" 2>/dev/null
done
"$PY" - "$W" >> "$OUT/check.txt" 2>&1 <<'EOF'
import glob, json, os, sys
import numpy as np
import pyarrow.parquet as pq
from pipeline import schema

def pages(out):
    files = sorted(glob.glob(os.path.join(out, schema.PAGES_DIR, "**", "*.parquet"), recursive=True))
    rows = {}
    for f in files:
        t = pq.read_table(f)
        if schema.EMBEDDING not in t.column_names:
            continue
        for pid, e in zip(t.column(schema.PAGE_ID).to_pylist(), schema.arrow_to_embeddings(t.column(schema.EMBEDDING))):
            rows[pid] = np.asarray(e, dtype=np.float32)
    return rows

w = sys.argv[1]
g, c = pages(os.path.join(w, "out-cuda")), pages(os.path.join(w, "out-cpu"))
res = {"pages_cuda": len(g), "pages_cpu": len(c), "same_pages": sorted(g) == sorted(c)}
common = sorted(set(g) & set(c))
res["same_vector_counts"] = all(g[p].shape == c[p].shape for p in common)
cos, mx = [], 0.0
for p in common:
    if g[p].shape != c[p].shape:
        continue
    a, b = g[p], c[p]
    cos.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))
    mx = max(mx, float(np.abs(a - b).max()))
if cos:
    res.update(cosine_min=round(float(np.min(cos)), 5), cosine_mean=round(float(np.mean(cos)), 5), max_abs_diff=mx)
for dev in ("cuda", "cpu"):
    try:
        s = json.load(open(os.path.join(w, f"out-{dev}", "summary.json")))
        res[f"summary_{dev}"] = {"device": s.get("device"), "documents_processed": s.get("documents_processed"),
                                 **{k: s["this_run"].get(k) for k in ("pages", "error_rows", "seconds")}}
    except OSError as exc:
        res[f"summary_{dev}"] = str(exc)
print(json.dumps(res, indent=1))
EOF
t=$(date +%s)
timeout 300 "$PY" -m jobs.demo --workdir "$W/demo" --budgets 768,64 > "$OUT/demo.log" 2>&1
echo "demo rc=$? in $(( $(date +%s) - t )) s (device auto)" >> "$OUT/check.txt"
cp "$W/demo/embeddings-768/summary.json" "$OUT/summary_demo_768.json" 2>/dev/null
tail -25 "$OUT/demo.log" >> "$OUT/check.txt"
cat "$OUT/check.txt"
