#!/usr/bin/env bash
# The one script run on the GPU machine (issue 15), from any directory: it execs bench/gpu_run.py, which
# holds the phases in priority order (build for sm_90 with all cores, pytest -m gpu, compute-sanitizer
# memcheck and racecheck, the headline benchmarks, generation against transformers), each under a time
# budget, 540 s in all, and writes logs.txt, build.log, pytest_gpu.log, sanitizer.log, <device>.csv,
# <device>_plots.tar and <device>_backend_order.json into $OUT (default ./gpu_out; 7 files: at most 8 come
# back from the machine). Exit status: 0 all passed, 1 a check failed or overran, 2 only a benchmark did.
#   bench/run_gpu.sh                   the whole run
#   bench/run_gpu.sh --plan            the phases, budgets, commands and total; runs nothing (no GPU needed)
#   bench/run_gpu.sh --dry-run         the whole run with every command a stub that exits 0 (no GPU needed)
#   bench/run_gpu.sh --phases build,attention   only these phases (e.g. a second call on a warm machine)
# On the device tool: command "bench/run_gpu.sh", timeout_s 600, carry [".whl"] when the machine's
# setuptools is older than 77 (the build phase then installs setuptools>=77 from the wheel made here with
# `pip download "setuptools>=77" --no-deps -d .whl`). The full case grids (the scripts without --headline)
# need calls of their own, e.g. `bench/run_gpu.sh --phases build && python bench/bench_attention.py
# --dtypes bf16 --out-dir "$OUT"`.
set -euo pipefail
OUT="${OUT:-./gpu_out}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
export OUT
cd "$(dirname "$0")/.."
PYTHON="$(command -v python || command -v python3)"
exec "$PYTHON" bench/gpu_run.py "$@"
