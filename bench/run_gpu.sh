#!/usr/bin/env bash
# The one script run on the GPU machine, from the repository root: build and install fusedgpt (CUDA
# extension for sm_90), `fusedgpt info`, the GPU tests, compute-sanitizer memcheck and racecheck over
# every op (bench/sanitize_ops.py), then the three op benchmarks. Everything worth keeping lands in
# $OUT (default ./gpu_out), kept to 7 files because only a few come back from the machine:
#   build.log        pip install output
#   pytest_gpu.log   pytest -m gpu -q
#   logs.txt         fusedgpt info, sanitizer reports, benchmark output, the final summary
#   <device>.csv     bench/results/<device>.csv (all three families)
#   <device>_<family>.png  one GB/s plot per family (3 files)
# Exits with pytest's status (5 means no GPU test was collected); sanitizer and benchmark failures are
# reported in the summary. Optional environment: BENCH_ARGS (e.g. "--quick", passed to every benchmark
# script), BENCH_FAMILIES (default "layer_norm bias_act kv_append"), SANITIZER_TIMEOUT_S (default 600
# per tool). The CSV and PNGs are copied into $OUT after each benchmark script, so a run cut short
# still returns what it measured.
set -uo pipefail

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.." || exit 1
LOG="$OUT/logs.txt"
: > "$LOG"
PYTHON="$(command -v python || command -v python3)"
BENCH_ARGS="${BENCH_ARGS:-}"
FAMILIES="${BENCH_FAMILIES:-layer_norm bias_act kv_append}"

section() { printf '\n===== %s =====\n' "$*" | tee -a "$LOG"; }
STATUS_LINES=""
record() { STATUS_LINES="${STATUS_LINES}$(printf '%-28s %s' "$1" "$2")"$'\n'; }

section "install (FUSEDGPT_CUDA_ARCHS=9.0, MAX_JOBS=16)"
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
"$PYTHON" -m pytest -m gpu -q > "$OUT/pytest_gpu.log" 2>&1
PYTEST_STATUS=$?
tail -n 15 "$OUT/pytest_gpu.log" | tee -a "$LOG"
record "pytest -m gpu" "exit $PYTEST_STATUS"

section "compute-sanitizer"
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                 "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
  if [ -z "$SANITIZER" ] && [ -x "$candidate" ]; then SANITIZER="$candidate"; fi
done
if [ -z "$SANITIZER" ]; then
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
SLUG="$("$PYTHON" -c 'import sys; sys.path.insert(0, "bench"); import common; print(common.device_slug())' 2>>"$LOG")"
CSV="bench/results/${SLUG:-unknown-device}.csv"
for family in $FAMILIES; do
  echo "--- bench_${family}.py (at ${SECONDS}s)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # BENCH_ARGS holds several flags on purpose
  "$PYTHON" "bench/bench_${family}.py" $BENCH_ARGS >> "$LOG" 2>&1
  status=$?
  echo "bench_${family}.py: exit $status (at ${SECONDS}s)" | tee -a "$LOG"
  record "bench_${family}" "exit $status"
  # Copied after every script, so a run cut short still brings back what it measured.
  if [ -f "$CSV" ]; then cp "$CSV" "$OUT/"; fi
  if [ -f "bench/results/${SLUG}_${family}.png" ]; then cp "bench/results/${SLUG}_${family}.png" "$OUT/"; fi
done
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
# Per case: the best fusedgpt provider (by do_bench time) and its GB/s and speedups (peer / fusedgpt time);
# where CUDA-graph latencies exist, the best fusedgpt us_graph next to the peers' and the empty kernel's.
import csv
import sys

rows = list(csv.DictReader(open(sys.argv[1], newline="")))
def number(row, key):
    try:
        return float(row.get(key) or "")
    except ValueError:
        return None
cases = {}
for row in rows:
    cases.setdefault((row["family"], row["case"], row["dtype"]), {})[row["provider"]] = row
header = ["family", "case", "dtype", "best", "GB/s", "x_compile", "x_eager", "x_copy_k",
          "us_best", "us_compile", "us_eager", "us_copy_k", "us_empty", "check/error"]
table = [header]
def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"
for (family, case, dtype), providers in cases.items():
    fused = [providers[name] for name in ("fusedgpt-cuda", "fusedgpt-triton")
             if name in providers and number(providers[name], "ms")]
    best = min(fused, key=lambda row: number(row, "ms")) if fused else None
    graph_fused = [row for row in fused if number(row, "us_graph")]
    best_graph = min(graph_fused, key=lambda row: number(row, "us_graph")) if graph_fused else None
    def peer(name, key):
        return number(providers[name], key) if name in providers else None
    def ratio(name):
        theirs = peer(name, "ms")
        return theirs / number(best, "ms") if best and theirs else None
    notes = sorted({(row.get("error") or row.get("check") or "")[:40] for row in providers.values()} - {"", "ok"})
    table.append([family, case, dtype, best["provider"].replace("fusedgpt-", "") if best else "none",
                  fmt(number(best, "gbps") if best else None, 1), fmt(ratio("torch-compile"), 2),
                  fmt(ratio("torch-eager"), 2), fmt(ratio("torch-copy-k-only"), 2),
                  fmt(number(best_graph, "us_graph") if best_graph else None, 2),
                  fmt(peer("torch-compile", "us_graph"), 2), fmt(peer("torch-eager", "us_graph"), 2),
                  fmt(peer("torch-copy-k-only", "us_graph"), 2), fmt(peer("empty-kernel", "us_graph"), 2),
                  "; ".join(notes) or "ok"])
widths = [max(len(line[i]) for line in table) for i in range(len(header))]
for line in table:
    print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
PYTHON_SUMMARY
  fi
} 2>&1 | tee -a "$LOG"

echo
echo "files in $OUT:"
ls -la "$OUT"
exit "$PYTEST_STATUS"
