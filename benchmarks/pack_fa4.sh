#!/usr/bin/env bash
# FlashAttention 4 (the CuTe-DSL kernels of flash-attn-4, which run head size 80 unpadded on
# Hopper: round_up(80, 16) = 80) and its dependencies, as two bundles for the GPU machine (no
# network there). Its compiler library alone (_cutlass_ir, 193 MB) is 49.5 MB compressed, and with
# the rest over the 64 MiB one device call carries, so it travels in two calls on one warm
# machine: call 1 carries .device/fa4a.tar.xz and unpacks it to /tmp/fa4site, call 2 carries
# .device/fa4b.tar.xz (the rest) and unpacks it beside it (benchmarks/fa4_unpack.sh).
# Usage (repository root): bash benchmarks/pack_fa4.sh
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
FA4=4.0.0b40 DSL=4.8.1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$work/w" \
  "flash-attn-4==$FA4" "nvidia-cutlass-dsl==$DSL" "nvidia-cutlass-dsl-libs-base==$DSL" \
  "nvidia-cutlass-dsl-libs-core==$DSL" "nvidia-cutlass-dsl-libs-cu13==$DSL" \
  "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5"
# (tvm_ffi loads libtvm_ffi_testing.so at import: kept. The bundles of 2026-12-06 lacked it and
# carried it beside them as .device/fa4fix.tar.xz, unpacked into /tmp/fa4site)
# the device has einops, cuda-bindings, protobuf and typing-extensions already (KINDS.md)
mkdir -p "$work/site"
for w in "$work"/w/*.whl; do (cd "$work/site" && python3 -m zipfile -e "$w" .); done
rm -rf "$work/site/tvm_ffi/3rdparty" "$work/site/tvm_ffi/include"
find "$work/site" -path '*nvidia_cutlass_dsl/cu13/lib/stubs' -prune -exec rm -rf {} +
find "$work/site" -name '__pycache__' -prune -exec rm -rf {} +
ir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs
mkdir -p "$work/a/$ir" .device
mv "$work/site/$ir"/_cutlass_ir.cu13.*.so "$work/a/$ir/"
tar cf - -C "$work/a" . | xz -T1 -9e --lzma2=preset=9e,dict=192MiB > .device/fa4a.tar.xz
tar cf - -C "$work/site" . | xz -T0 -9e > .device/fa4b.tar.xz
ls -la .device/fa4a.tar.xz .device/fa4b.tar.xz
