#!/usr/bin/env bash
# Unpack whichever FA4 bundle this call carries into /tmp/fa4site (benchmarks/pack_fa4.sh), and
# say whether the two halves are both there. Source it: it exports PYTHONPATH when they are.
mkdir -p /tmp/fa4site
for part in a b; do
  if [ -f ".device/fa4$part.tar.xz" ] && [ ! -f "/tmp/fa4site/.unpacked_$part" ]; then
    tar xJf ".device/fa4$part.tar.xz" -C /tmp/fa4site && touch "/tmp/fa4site/.unpacked_$part"
  fi
done
if [ -f /tmp/fa4site/.unpacked_a ] && [ -f /tmp/fa4site/.unpacked_b ]; then
  # the wheel puts cutlass under nvidia_cutlass_dsl/dsl_packages through a .pth, which PYTHONPATH does not read
  export PYTHONPATH="/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-$PWD}"
  echo "fa4 bundle: both halves unpacked"
else
  echo "fa4 bundle: halves present: $(ls -a /tmp/fa4site | grep unpacked_ | tr '\n' ' ')"
fi
