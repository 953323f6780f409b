#!/usr/bin/env bash
# The project's pinned transformers and the dependencies whose device versions it may not accept,
# as a bundle for the GPU machine (no network there; its python3 3.12 has transformers 5.17).
# Usage (repository root): bash benchmarks/pack_transformers.sh   -> .device/transformers.tar.xz
# Then: TRANSFORMERS_BUNDLE=.device/transformers.tar.xz bash benchmarks/gpu_embedding_session.sh
set -euo pipefail
TF=$(sed -n 's/.*"transformers==\([0-9.]*\)".*/\1/p' pyproject.toml)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the whole dependency closure of the pinned transformers, as wheels for the device's 3.12 (a
# hand-made list missed huggingface_hub 2.x's httpx2 on 2026-12-06: the guard in
# gpu_embedding_session.sh caught it), less numpy, which the device's torch was built beside
python3 -m pip install -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --target "$work/site" "transformers==$TF" hf_xet
rm -rf "$work/site"/numpy "$work/site"/numpy-*.dist-info "$work/site"/numpy.libs
rm -rf "$work/site/bin"
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
mkdir -p .device
tar cf - -C "$work/site" . | xz -T0 -6 > .device/transformers.tar.xz
ls -la .device/transformers.tar.xz
