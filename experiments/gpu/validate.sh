#!/usr/bin/env bash
# The one command to run first on a CUDA machine: every GPU-only check within 10 minutes, one
# results table in --out (default experiments/gpu/results.md), rewritten as each part ends;
# the interpreter: $PYTHON, else python3. Options: experiments/gpu/validate.py --help.
set -euo pipefail
cd "$(dirname "$0")/../.."
unset TRITON_INTERPRET  # the real Triton kernels, not the CPU interpreter the tests use
exec "${PYTHON:-python3}" experiments/gpu/validate.py "$@"
