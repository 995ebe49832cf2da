#!/usr/bin/env bash
# The one prepared GPU check (docs/benchmarks.md, "GPU check"). On a machine with one CUDA GPU:
#
#   bash scripts/gpu_check.sh [--out DIR] [--steps N] [--bench-args '...']
#
# runs the gpu-marked tests, trains configs/tiny.yaml and configs/gpu_swiglu_top2.yaml (bf16) with
# the Triton kernels and with the torch kernels (losses must agree), checks that the MoE layer makes
# no host sync under torch.cuda.set_sync_debug_mode("error"), runs bench/gpu_tier.py and
# bench/e2e_lm.py --device cuda, and writes
# gpu_check.json + gpu_check.md (default bench/results/gpu_check/). About 8 minutes on an H100/H200
# (an estimate from the --smoke run's steps: never run on one yet; docs/benchmarks.md).
#
#   bash scripts/gpu_check.sh --smoke --out /tmp/gpu_check
#
# runs the same steps on the CPU, tiny and short, so the script cannot rot (the test suite does this).
# Exit code: 0 every step passed, 1 a step failed, 2 no GPU without --smoke.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python scripts/gpu_check.py "$@"
