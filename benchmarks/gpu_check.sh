#!/usr/bin/env bash
# What only a GPU measures, in one run of about 8 minutes (benchmarks/gpu_check.py says what each
# part measures). Every part runs under its own `timeout`, in order of value, and each
# row is written the moment it is measured to one markdown file named at the start:
#     bash benchmarks/gpu_check.sh --out "$OUT"               # one GPU: about 8 minutes
#     bash benchmarks/gpu_check.sh --cpu-smoke --out /tmp/kit # every part for seconds on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
# the Python that holds torch: $PYTHON, else python3 (the GPU machine's), else python
exec "${PYTHON:-$(command -v python3 || command -v python)}" benchmarks/gpu_check.py "$@"
