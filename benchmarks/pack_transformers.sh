#!/usr/bin/env bash
# The project's pinned transformers and the dependencies whose device versions it may not accept,
# as a bundle for the GPU machine (no network there; its python3 3.12 has transformers 5.17).
# Usage (repository root): bash benchmarks/pack_transformers.sh   -> .device/transformers.tar.xz
# Then: TRANSFORMERS_BUNDLE=.device/transformers.tar.xz bash benchmarks/gpu_embedding_session.sh
set -euo pipefail
TF=$(sed -n 's/.*"transformers==\([0-9.]*\)".*/\1/p' pyproject.toml)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --target "$work/site" "transformers==$TF" "huggingface_hub>=1.31,<3" "tokenizers>=0.23.1,<0.24" \
  "regex>=2025.10.22" typer click shellingham rich markdown-it-py mdurl pygments "hf_xet" httpx httpcore h11 anyio sniffio certifi idna
rm -rf "$work/site/bin"
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
mkdir -p .device
tar cf - -C "$work/site" . | xz -T0 -6 > .device/transformers.tar.xz
ls -la .device/transformers.tar.xz
