#!/usr/bin/env bash
# The one script run on the GPU machine, from the repository root: build and install fusedgpt (CUDA
# extension for sm_90), `fusedgpt info`, the GPU tests, compute-sanitizer memcheck and racecheck over
# every op (bench/sanitize_ops.py), then the op benchmarks (bench/bench_<family>.py). Everything worth
# keeping lands in $OUT (default ./gpu_out), kept to at most 5 files (6 while a sanitizer run is in
# flight) because at most 8 come back from the machine:
#   build.log        pip install output
#   pytest_gpu.log   pytest -m gpu -q
#   logs.txt         fusedgpt info, sanitizer reports, benchmark output, the final summary
#   <device>.csv     bench/results/<device>.csv (every family)
#   <device>_plots.tar   the families' plots, bench/results/<device>_<family>.png (triton.testing's
#                    perf_report; `tar -xf` to view them): one file, however many families ran
# Only PNGs written by this run are brought back (none left from an earlier run).
# Exits with pytest's status (5 means no GPU test was collected); sanitizer and benchmark failures are
# reported in the summary. Optional environment:
#   BENCH_FAMILIES   default "layer_norm bias_act kv_append attention decode_attention"; also "generate"
#                    (bench_generate.py, issue 5) and "patching" (bench_patching.py, issue 6), each
#                    best in a call of its own (several minutes per model)
#   BENCH_ARGS       passed to every benchmark script, e.g. "--quick" (each script's smoke run, well
#                    under a minute of GPU time), "--dtypes bf16", "--merge" (keep the family's earlier
#                    CSV rows other than those measured again)
#   BENCH_ONLY=1     skip pytest and compute-sanitizer (install, fusedgpt info, benchmarks only)
#   SANITIZER_TIMEOUT_S  default 600 per tool
# Run time: one command on the GPU machine gets 10 minutes. The memory-bound families and the two
# attention families with --quick fit after the tests; a full bench_attention.py (26 cases x 2 dtypes,
# a flex-attention compile and a Triton autotune per case) needs a call of its own, e.g.
#   BENCH_ONLY=1 BENCH_FAMILIES=attention BENCH_ARGS="--dtypes bf16" bench/run_gpu.sh
# (and --merge with --dtypes fp16 in the next call, carrying that CSV along). The CSV and the plots' tar
# are written into $OUT after each benchmark script, so a run cut short still returns what it measured.
set -uo pipefail

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
LOG="$OUT/logs.txt"
: > "$LOG"
PYTHON="$(command -v python || command -v python3)"
BENCH_ARGS="${BENCH_ARGS:-}"
FAMILIES="${BENCH_FAMILIES:-layer_norm bias_act kv_append attention decode_attention}"
BENCH_ONLY="${BENCH_ONLY:-0}"

section() { printf '\n===== %s =====\n' "$*" | tee -a "$LOG"; }
STATUS_LINES=""
record() { STATUS_LINES="${STATUS_LINES}$(printf '%-28s %s' "$1" "$2")"$'\n'; }

section "install (FUSEDGPT_CUDA_ARCHS=9.0, MAX_JOBS=16)"
# setup.py needs setuptools >= 77 (pyproject.toml's SPDX license). The GPU machine cannot download one: carry a
# wheel made here with `pip download "setuptools>=77" --no-deps -d .whl` (run's carry: [".whl"]).
if ! "$PYTHON" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  echo "setuptools $("$PYTHON" -c 'import setuptools; print(setuptools.__version__)' 2>&1) is older than 77; installing it from .whl" | tee -a "$LOG"
  "$PYTHON" -m pip install -q --no-index --find-links .whl "setuptools>=77" 2>&1 | tee -a "$LOG"
fi
FUSEDGPT_CUDA_ARCHS=9.0 MAX_JOBS=16 "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
BUILD_STATUS=$?
grep -E "fusedgpt setup:" "$OUT/build.log" | tee -a "$LOG"
if [ "$BUILD_STATUS" -ne 0 ]; then
  echo "pip install FAILED ($BUILD_STATUS); last lines of build.log:" | tee -a "$LOG"
  tail -n 30 "$OUT/build.log" | tee -a "$LOG"
fi
record "build" "exit $BUILD_STATUS"

section "fusedgpt info"
"$PYTHON" -m fusedgpt info 2>&1 | tee -a "$LOG"
INFO_STATUS=${PIPESTATUS[0]}
record "fusedgpt info" "exit $INFO_STATUS"

section "pytest -m gpu -q"
if [ "$BENCH_ONLY" = "1" ]; then
  echo "skipped (BENCH_ONLY=1)" | tee -a "$LOG"
  PYTEST_STATUS=0
  record "pytest -m gpu" "skipped (BENCH_ONLY=1)"
else
  "$PYTHON" -m pytest -m gpu -q > "$OUT/pytest_gpu.log" 2>&1
  PYTEST_STATUS=$?
  tail -n 15 "$OUT/pytest_gpu.log" | tee -a "$LOG"
  record "pytest -m gpu" "exit $PYTEST_STATUS"
fi

section "compute-sanitizer"
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                 "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done
if [ "$BENCH_ONLY" = "1" ]; then
  echo "skipped (BENCH_ONLY=1)" | tee -a "$LOG"
  record "memcheck" "skipped (BENCH_ONLY=1)"
  record "racecheck" "skipped (BENCH_ONLY=1)"
elif [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): skipped" | tee -a "$LOG"
  record "memcheck" "skipped (no compute-sanitizer)"
  record "racecheck" "skipped (no compute-sanitizer)"
else
  for tool in memcheck racecheck; do
    echo "--- $tool ($SANITIZER, at ${SECONDS}s)" | tee -a "$LOG"
    # Only device-side errors should count: PyTorch and Triton probe the driver in ways that return
    # (handled) API errors. If this sanitizer does not know --report-api-errors (the script never ran),
    # run again without it.
    for api_errors_flag in "--report-api-errors no" ""; do
      # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
      # shellcheck disable=SC2086  # an empty flag must vanish
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZER_TIMEOUT_S:-600}" "$SANITIZER" --tool "$tool" \
        --error-exitcode 86 $api_errors_flag "$PYTHON" bench/sanitize_ops.py --backends cuda,triton \
        > "$OUT/sanitizer.tmp" 2>&1
      status=$?
      cat "$OUT/sanitizer.tmp" >> "$LOG"
      script_line="$(grep -E "^(OK|FAILED)" "$OUT/sanitizer.tmp" | head -n 3 | tr '\n' ' ')"
      if [ -n "$script_line" ] || [ "$status" -eq 124 ]; then break; fi
      echo "($tool with '$api_errors_flag': the script did not run, exit $status)" | tee -a "$LOG"
    done
    summary_line="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.tmp" | tail -n 1)"
    rm -f "$OUT/sanitizer.tmp"
    echo "$tool: exit $status; ${summary_line:-no summary line}; script: ${script_line:-no output}" | tee -a "$LOG"
    record "$tool" "exit $status; ${summary_line:-no summary}; ${script_line:-no script output}"
  done
fi

section "benchmarks ${BENCH_ARGS}"
SLUG="$("$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); import results; print(results.device_slug())' 2>>"$LOG")"
SLUG="${SLUG:-unknown-device}"
CSV="bench/results/${SLUG}.csv"
# PNGs newer than this stamp were written by this run; older ones (committed, or from an earlier run) stay.
STAMP="$(mktemp)"
DONE_FAMILIES=""
copy_plots() {
  # Every family's PNG written by this run, in one tar (at most 8 files come back from the machine).
  local family png plots=()
  for family in $DONE_FAMILIES; do
    png="${SLUG}_${family}.png"
    if [ -f "bench/results/$png" ] && [ "bench/results/$png" -nt "$STAMP" ]; then plots+=("$png"); fi
  done
  if [ "${#plots[@]}" -gt 0 ]; then
    tar -cf "$OUT/${SLUG}_plots.tar" -C bench/results "${plots[@]}" >> "$LOG" 2>&1 \
      || echo "tar of the plots ${plots[*]} failed" | tee -a "$LOG"
  fi
}
for family in $FAMILIES; do
  echo "--- bench_${family}.py (at ${SECONDS}s)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # BENCH_ARGS holds several flags on purpose
  "$PYTHON" "bench/bench_${family}.py" $BENCH_ARGS >> "$LOG" 2>&1
  status=$?
  echo "bench_${family}.py: exit $status (at ${SECONDS}s)" | tee -a "$LOG"
  record "bench_${family}" "exit $status"
  # Copied after every script, so a run cut short still brings back what it measured.
  DONE_FAMILIES="$DONE_FAMILIES $family"
  if [ -f "$CSV" ]; then cp "$CSV" "$OUT/"; fi
  copy_plots
done
rm -f "$STAMP"
if [ ! -f "$CSV" ]; then
  echo "no results CSV found at $CSV" | tee -a "$LOG"
  CSV=""
fi

section "summary"
{
  printf '%s' "$STATUS_LINES"
  if [ -n "$CSV" ]; then
    echo
    "$PYTHON" - "$CSV" <<'PYTHON_SUMMARY'
# One table per family. Per case: the best fusedgpt provider (by do_bench time), its TFLOP/s (attention)
# or GB/s, its speedup over each peer of that family (peer time / fusedgpt time, > 1 = fusedgpt faster),
# and where CUDA-graph latencies exist the best fusedgpt us_graph next to the peers' (and the empty
# kernel's, the floor). The peers are the family's other providers, in the order they appear.
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1], newline="")))
FUSED = ("fusedgpt-cuda", "fusedgpt-triton", "fusedgpt")  # the op families' and bench_generate.py's
FLOOR = "empty-kernel"
def number(row, key):
    try:
        return float(row.get(key) or "")
    except (TypeError, ValueError):
        return None
def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"
families = {}
for row in rows:
    families.setdefault(row["family"], []).append(row)
for family, family_rows in families.items():
    metric, metric_name = next(((key, name) for key, name in (("tflops", "TFLOP/s"), ("gbps", "GB/s"),
                                                              ("tokens_per_s", "tokens/s"))
                                if any(number(r, key) for r in family_rows)), ("gbps", "GB/s"))
    peers = list(dict.fromkeys(r["provider"] for r in family_rows if r["provider"] not in FUSED + (FLOOR,)))
    time_peers = [p for p in peers if any(number(r, "ms") for r in family_rows if r["provider"] == p)]
    graph_peers = [p for p in peers + [FLOOR] if any(number(r, "us_graph") for r in family_rows if r["provider"] == p)]
    has_graph = bool(graph_peers) or any(number(r, "us_graph") for r in family_rows)
    header = (["case", "dtype", "best", metric_name] + [f"x_{p}" for p in time_peers]
              + (["us_best"] + [f"us_{p}" for p in graph_peers] if has_graph else []) + ["check/error"])
    cases = {}
    for row in family_rows:
        cases.setdefault((row["case"], row["dtype"]), {})[row["provider"]] = row
    table = [header]
    for (case, dtype), providers in cases.items():
        fused = [providers[n] for n in FUSED if n in providers and number(providers[n], "ms")]
        best = min(fused, key=lambda r: number(r, "ms")) if fused else None
        graph_fused = [r for r in fused if number(r, "us_graph")]
        best_graph = min(graph_fused, key=lambda r: number(r, "us_graph")) if graph_fused else None
        def ratio(name):
            theirs = number(providers[name], "ms") if name in providers else None
            return theirs / number(best, "ms") if best and theirs else None
        notes = sorted({(r.get("error") or r.get("check") or "")[:40] for r in providers.values()} - {"", "ok"})
        line = [case, dtype, best["provider"].replace("fusedgpt-", "") if best else "none",
                fmt(number(best, metric) if best else None, 1)]
        line += [fmt(ratio(p), 2) for p in time_peers]
        if has_graph:
            line.append(fmt(number(best_graph, "us_graph") if best_graph else None, 2))
            line += [fmt(number(providers[p], "us_graph") if p in providers else None, 2) for p in graph_peers]
        line.append("; ".join(notes) or "ok")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f"--- {family}")
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print()
PYTHON_SUMMARY
  fi
} 2>&1 | tee -a "$LOG"

echo
echo "files in $OUT:"
ls -la "$OUT"
exit "$PYTEST_STATUS"
