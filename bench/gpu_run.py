"""The one run on the GPU machine (issue 15): build, correctness, compute-sanitizer, the headline benchmarks
and generation, each phase under a time budget, in one call of at most 9 minutes (RUN_LIMIT_S = 540 s).

Why a runner with budgets: a session gets 15 minutes of GPU time in all, machine start included, and one
call must bring back, in priority order, as much of the above as fits; a phase that runs long must cost
only itself. bench/run_gpu.sh execs this file; `bench/run_gpu.sh --plan` prints the phases, budgets,
commands and the total without running anything (no GPU needed).

Phases (`plan()`), in priority order, one after another: build (sm_90 only, all cores; a fallback install
without the CUDA extension only if it fails, so the Triton and torch rows still come), `fusedgpt info`, the
correctness group (pytest -m gpu on tests/ops and on the rest, and compute-sanitizer memcheck and racecheck
over bench/sanitize_ops.py, four processes at once: none of them is timed), the device-copy bandwidth, the
headline benchmarks (`--headline` of bench_attention / bench_decode_attention / bench_layer_norm /
bench_bias_act), GPT-2 124M and OPT-1.3B generation against transformers (bench_generate.py --headline),
and plots for any family whose script was stopped before drawing its own.

Time. Phase i must end by the start + the sum of the budgets of phases 1..i: time a phase leaves unused
passes to the later ones, and a phase that runs long never eats into a later phase's own budget. GRACE_S
before its deadline a phase's processes (each step in a process group of its own) get SIGINT, so pytest
prints what failed so far, and at the deadline SIGKILL; the phase is marked "overran" and the next phase
runs. Partial results stay: every step's output goes to its log as it is printed (PYTHONUNBUFFERED=1), the
op benchmarks rewrite the results CSV after every case (common.write_rows_so_far) and bench_generate.py
after every provider, and the CSV and the plots' tar are copied to $OUT after every phase.

$OUT (default ./gpu_out; at most 8 files come back from the machine, this writes 7):
    logs.txt                  progress, `fusedgpt info`, the benchmarks' output, the key lines of the other
                              logs, and the report: phase table, per-family tables, proposed backend order
    build.log                 the setuptools step and pip install -v
    pytest_gpu.log            both pytest runs (-v, so a stopped run still names what passed and failed)
    sanitizer.log             memcheck and racecheck
    <device>.csv              the results CSV of this run (every family measured, the device copy included)
    <device>_plots.tar        the families' PNGs (`tar -xf` to view them)
    <device>_backend_order.json  the proposed backend order per family (`propose_backend_order`)
Exit status: 0 when every phase passed; 1 when a check (build, pytest, compute-sanitizer) failed or overran;
2 when the checks passed but a benchmark phase failed or overran (its finished rows are in the CSV).

The budgets are estimates, not measurements (no GPU run has happened): revise them from the phase table
of the first run's logs.txt. The runner itself imports no torch; `--measure-copy` and `--plot-missing`
are the two phases it runs as its own subprocesses.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = REPO_ROOT / "build" / "gpu_run"  # the bench scripts' --out-dir: CSV and PNGs, then copied to $OUT
RUN_LIMIT_S = 540  # one call of at most 9 minutes (the tool's limit is 10)
GRACE_S = 5  # SIGINT this long before a phase's deadline, SIGKILL at it
REPORT_MARGIN_S = 5  # the in-process report after the last phase: CSV reading, tables, JSON, tar
POLL_S = 0.5
COPY_FAMILY = "device_copy"
COPY_BYTES = 4 << 30  # 4 GiB copied into another 4 GiB buffer: 8.6 GB moved, far past the 60 MB L2
OP_FAMILIES = ("attention", "decode_attention", "layer_norm", "bias_act", "kv_append")
BACKEND_PROVIDERS = {"fusedgpt-cuda": "cuda", "fusedgpt-triton": "triton", "fusedgpt-torch": "torch"}  # as common.py
# A tie in the proposed order keeps today's automatic order (fusedgpt.ops._backend.DEFAULT_ORDER), then torch.
TIE_ORDER = ("triton", "cuda", "torch")
PYTEST_WORKERS = {"ops": 6, "models": 4}  # pytest-xdist workers, 10 of the 16 cores (the sanitizers take 2)
GENERATE_REPEATS = 2  # bench_generate.py's timed calls per provider (its default is 3)

# Budgets in seconds: ESTIMATES, not measurements, to be revised after the first GPU run.
#   build: measured alone on the (shared) 2-core CPU machine, sm_90 only, the extension's flags:
#     attention.cu 18.6 s, decode_attention.cu 17.4 s, ops.cpp 6.1 s, attention_hdim128_bf16.cu 1.0 s;
#     14 sources in parallel on 16 cores, so about the slowest one, plus pip and the link (estimated).
#   correctness: 297 tests marked gpu (256 in tests/ops, each parametrised over small shapes; 41 in the
#     rest, among them six transformers static-cache generations that torch.compile) on 6 + 4 xdist
#     workers, Triton JIT for every kernel variant; both sanitizers meanwhile (under the sanitizer: torch
#     import, Triton JIT, three small op families).
#   attention: 6 cases x 2 dtypes x 4-5 providers; four flex-attention compiles (window cases) and the
#     Triton autotuner (4 configurations per head dim, mask and dtype; compiles mostly cached by pytest).
#   decode_attention: 4 cases x 2 dtypes x 6 providers, memory-bound, plus CUDA-graph latencies at B = 1.
#   layer_norm / bias_act: 1 case x 2 dtypes x 4 providers, two torch.compile each.
#   generate: two models, 3 providers, b1 p128 n128, 2 repeats (transformers at batch 1 is launch-bound:
#     a few seconds per generate call of OPT-1.3B; 3 calls of 128 tokens and 3 of 1 per provider).
#   plots: only when a script was stopped before drawing its PNG: torch + matplotlib import and one plot.
BUDGETS_S = {"build": 75, "build-fallback": 20, "info": 10, "correctness": 150, "device-copy": 15,
             "attention": 105, "decode_attention": 35, "layer_norm": 25, "bias_act": 25, "generate": 60,
             "plots": 10}


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a phase. `log`: the $OUT file its output is appended to; `skip`: when non-empty, it is
    not run, and why; `key_lines`: a regular expression for the lines of its output copied into logs.txt
    (when it has a log of its own) and the last of which is its note in the phase table."""

    name: str
    argv: tuple[str, ...]
    log: str
    env: dict = dataclasses.field(default_factory=dict)
    skip: str = ""
    key_lines: str = ""
    note: str = ""  # shown by --plan


@dataclasses.dataclass(frozen=True)
class Phase:
    """A budgeted group of steps: one after another, or all at once (`parallel`). kind "check" or "bench"
    decides the exit status a failure gives. `run_when`: (what, needed(results so far, work dir)): the phase
    runs only when needed() is true (its budget passes on otherwise)."""

    name: str
    budget_s: float
    steps: tuple[Step, ...]
    kind: str
    writes: str
    parallel: bool = False
    run_when: tuple[str, Callable[[Sequence["StepResult"], Path], bool]] | None = None


@dataclasses.dataclass
class StepResult:
    phase: str
    step: str
    status: str  # "ok", "failed", "overran", "skipped"
    exit_code: int | None
    seconds: float
    note: str = ""


# ----------------------------------------------------------------------------------------------------
# The phases
# ----------------------------------------------------------------------------------------------------

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def setuptools_step(python: str) -> Step:
    """setup.py needs setuptools >= 77 (pyproject.toml's SPDX license); the GPU machine cannot download one,
    so it comes from a wheel carried in .whl (`pip download "setuptools>=77" --no-deps -d .whl` here, then
    the run's carry: [".whl"]). Skipped when the installed one will do."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = None
    major = re.match(r"\d+", version or "")
    skip = f"setuptools {version} >= 77 already" if major and int(major.group()) >= 77 else ""
    return Step("setuptools>=77", (python, "-m", "pip", "install", "-q", "--no-index", "--find-links", ".whl",
                                   "setuptools>=77"), "build.log", skip=skip)


def find_sanitizer(environ) -> str | None:
    """compute-sanitizer on PATH, else under $CUDA_HOME (default /usr/local/cuda)."""
    cuda_home = environ.get("CUDA_HOME") or "/usr/local/cuda"
    for candidate in (shutil.which("compute-sanitizer", path=environ.get("PATH")),
                      f"{cuda_home}/bin/compute-sanitizer", f"{cuda_home}/compute-sanitizer/compute-sanitizer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def pytest_step(name: str, python: str, targets: Sequence[str], workers: int, xdist: bool) -> Step:
    parallel = ("-n", str(workers)) if xdist and workers > 1 else ()
    return Step(f"pytest {name}", (python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider",
                                   "--durations=15", *parallel, *targets), "pytest_gpu.log",
                key_lines=r"^(FAILED|ERROR) |^=+ .*\b(passed|failed|errors?|skipped|no tests ran)\b.* =+$",
                note="" if xdist else "pytest-xdist is not importable here: one process")


def sanitizer_step(tool: str, python: str, sanitizer: str | None) -> Step:
    # --report-api-errors no: only device-side errors count (PyTorch and Triton probe the driver in ways that
    # return handled API errors). Without the caching allocator every tensor is its own allocation, so
    # memcheck sees an access one element past a tensor's end.
    argv = (sanitizer or "compute-sanitizer", "--tool", tool, "--error-exitcode", "86", "--report-api-errors", "no",
            python, "bench/sanitize_ops.py", "--backends", "cuda,triton")
    return Step(tool, argv, "sanitizer.log", env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
                skip="" if sanitizer else "compute-sanitizer not found (PATH, $CUDA_HOME/bin)",
                key_lines=r"ERROR SUMMARY|RACECHECK SUMMARY|^(OK|FAILED)\b")


def plan(python: str = sys.executable, environ=os.environ, work_dir: Path = WORK_DIR) -> list[Phase]:
    """The phases of a run, in priority order, with their budgets (BUDGETS_S) and commands."""
    jobs = str(cpu_count())
    xdist = importlib.util.find_spec("xdist") is not None
    sanitizer = find_sanitizer(environ)
    out = str(work_dir)

    def bench(script: str, *extra: str) -> Step:
        return Step(script, (python, f"bench/{script}.py", "--headline", "--out-dir", out, *extra), "logs.txt")

    def phase(name: str, steps: Sequence[Step], kind: str, writes: str, **options) -> Phase:
        return Phase(name, BUDGETS_S[name], tuple(steps), kind, writes, **options)

    install = (python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", ".")
    return [
        phase("build", [setuptools_step(python),
                        Step("pip install", install, "build.log", env={"FUSEDGPT_CUDA_ARCHS": "9.0", "MAX_JOBS": jobs},
                             key_lines=r"^fusedgpt setup:")],
              "check", "build.log"),
        phase("build-fallback", [Step("pip install without CUDA", install, "build.log",
                                      env={"FUSEDGPT_SKIP_CUDA_BUILD": "1"}, key_lines=r"^fusedgpt setup:")],
              "check", "build.log", run_when=("build failed or overran", build_failed)),
        phase("info", [Step("fusedgpt info", (python, "-m", "fusedgpt", "info"), "logs.txt")], "check", "logs.txt"),
        phase("correctness", [pytest_step("ops", python, ["tests/ops"], PYTEST_WORKERS["ops"], xdist),
                              pytest_step("models", python, ["tests", "--ignore=tests/ops"], PYTEST_WORKERS["models"],
                                          xdist),
                              sanitizer_step("memcheck", python, sanitizer),
                              sanitizer_step("racecheck", python, sanitizer)],
              "check", "pytest_gpu.log, sanitizer.log", parallel=True),
        phase("device-copy", [Step("copy bandwidth", (python, "bench/gpu_run.py", "--measure-copy", out), "logs.txt")],
              "bench", f"<device>.csv: family {COPY_FAMILY}"),
        phase("attention", [bench("bench_attention")], "bench", "<device>.csv (after every case), PNG"),
        phase("decode_attention", [bench("bench_decode_attention")], "bench", "<device>.csv (after every case), PNG"),
        phase("layer_norm", [bench("bench_layer_norm")], "bench", "<device>.csv (after every case), PNG"),
        phase("bias_act", [bench("bench_bias_act")], "bench", "<device>.csv (after every case), PNG"),
        phase("generate", [bench("bench_generate", "--repeats", str(GENERATE_REPEATS))], "bench",
              "<device>.csv (after every provider), PNG"),
        phase("plots", [Step("plots of stopped families", (python, "bench/gpu_run.py", "--plot-missing", out),
                             "logs.txt")], "bench", "the PNG of a family whose script stopped before drawing it",
              run_when=("a family in the CSV has no PNG", lambda results, work: bool(families_without_plot(work)))),
    ]


def build_failed(results: Sequence[StepResult], work_dir: Path) -> bool:
    return any(result.phase == "build" and result.status in ("failed", "overran") for result in results)


def select_phases(phases: list[Phase], names: str | None) -> list[Phase]:
    if not names:
        return phases
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    known = [phase.name for phase in phases]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise SystemExit(f"--phases: unknown {unknown or names!r}; the phases are {known}")
    return [phase for phase in phases if phase.name in wanted]


def total_budget_s(phases: Sequence[Phase]) -> float:
    return sum(phase.budget_s for phase in phases) + REPORT_MARGIN_S


def format_plan(phases: Sequence[Phase]) -> str:
    lines = [f"bench/run_gpu.sh: {len(phases)} phases in priority order, one after another. Phase i must end by "
             f"the sum of the budgets of phases 1..i (time a phase leaves unused passes on); SIGINT {GRACE_S} s "
             "before that, SIGKILL at it, then the next phase. Budgets are estimates, not measurements.",
             f"{'#':>2}  {'phase':<17} {'budget_s':>8} {'ends_by_s':>9}  {'kind':<5}  writes"]
    end = 0.0
    for number, phase in enumerate(phases, 1):
        end += phase.budget_s
        lines.append(f"{number:>2}  {phase.name:<17} {phase.budget_s:>8.0f} {end:>9.0f}  {phase.kind:<5}  {phase.writes}")
        if phase.run_when:
            lines.append(f"      (only when {phase.run_when[0]})")
        if phase.parallel and len(phase.steps) > 1:
            lines.append("      (its steps run at the same time)")
        for step in phase.steps:
            env = "".join(f"{key}={value} " for key, value in step.env.items())
            command = f"(skipped: {step.skip})" if step.skip else env + shlex.join(step.argv)
            lines.append(f"      {step.name}: {command}  >> {step.log}" + (f"  ({step.note})" if step.note else ""))
    lines.append(f"total: {end:.0f} s of phase budgets + {REPORT_MARGIN_S} s for the report = "
                 f"{end + REPORT_MARGIN_S:.0f} s (limit {RUN_LIMIT_S} s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Running the phases
# ----------------------------------------------------------------------------------------------------

class Process:
    """A step's command in a process group of its own (so that a signal reaches pytest's workers, nvcc and
    compile workers too), stdout and stderr appended to `log_path`."""

    def __init__(self, step: Step, log_path: Path, env: dict):
        self._log = open(log_path, "ab")
        try:
            self._popen = subprocess.Popen(step.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env, start_new_session=True)
        except OSError:
            self._log.close()
            raise

    def poll(self) -> int | None:
        code = self._popen.poll()
        if code is not None and not self._log.closed:
            self.signal(signal.SIGKILL)  # whatever of its group outlived it (workers, daemons)
            self._log.close()
        return code

    def signal(self, number: int) -> None:
        try:
            os.killpg(self._popen.pid, number)
        except (ProcessLookupError, PermissionError):
            pass


class DryRunProcess:
    """--dry-run: writes the command it stands for into the log and exits 0 at once."""

    def __init__(self, step: Step, log_path: Path, env: dict):
        with open(log_path, "a") as handle:
            handle.write(f"dry run: {shlex.join(step.argv)}\n")

    def poll(self) -> int:
        return 0

    def signal(self, number: int) -> None:
        pass


def run_group(phase: Phase, steps: Sequence[Step], deadline: float, *, launch, clock, sleep, work_dir: Path,
              env: dict) -> list[StepResult]:
    """Runs `steps` at once until each exits or `deadline` (SIGINT GRACE_S before it, SIGKILL at it)."""
    results, running = [], []
    for step in steps:
        if step.skip:
            results.append(StepResult(phase.name, step.name, "skipped", None, 0.0, step.skip))
            continue
        started = clock()
        try:
            handle = launch(step, step_log_path(work_dir, phase, step), {**env, **step.env})
        except OSError as error:
            results.append(StepResult(phase.name, step.name, "failed", None, 0.0, f"could not start: {error}"))
            continue
        running.append((step, handle, started))
    # SIGINT GRACE_S before the deadline, but never before half of the time this group has
    interrupt_at = max(deadline - GRACE_S, (clock() + deadline) / 2)
    interrupted = False
    while running:
        for entry in list(running):
            step, handle, started = entry
            code = handle.poll()
            if code is not None:
                status = "overran" if interrupted else "ok" if code == 0 else "failed"
                results.append(StepResult(phase.name, step.name, status, code, clock() - started))
                running.remove(entry)
        if not running:
            break
        now = clock()
        if now >= deadline:
            for step, handle, started in running:
                handle.signal(signal.SIGKILL)
                code = None
                for _ in range(40):  # reaped within a moment of SIGKILL
                    code = handle.poll()
                    if code is not None:
                        break
                    sleep(0.05)
                results.append(StepResult(phase.name, step.name, "overran", code, clock() - started))
            break
        if not interrupted and now >= interrupt_at:
            for _, handle, _ in running:
                handle.signal(signal.SIGINT)
            interrupted = True
        next_event = deadline if interrupted else interrupt_at
        sleep(max(0.01, min(POLL_S, next_event - now)))
    order = [step.name for step in steps]
    return sorted(results, key=lambda result: order.index(result.step))


def step_log_path(work_dir: Path, phase: Phase, step: Step) -> Path:
    return work_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{phase.name}-{step.name}") + ".log")


def run_phases(phases: Sequence[Phase], *, work_dir: Path, out_dir: Path, launch=Process,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
               say: Callable[[str], None] = print, env: dict | None = None) -> list[StepResult]:
    """Every phase in order under its deadline (see the module docstring); after each, its steps' logs are
    appended to their $OUT files (key lines into logs.txt) and the CSV and plots copied to `out_dir`."""
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    start = clock()
    deadline = start
    results: list[StepResult] = []
    for phase in phases:
        deadline += phase.budget_s
        phase_start = clock()
        if phase.run_when and not phase.run_when[1](results, work_dir):
            why = f"not needed: only when {phase.run_when[0]}"
            results += [StepResult(phase.name, step.name, "skipped", None, 0.0, why) for step in phase.steps]
            continue
        say(f"===== {phase.name}: budget {phase.budget_s:.0f} s, {deadline - phase_start:.0f} s allowed "
            f"(at {phase_start - start:.0f} s)")
        groups = [phase.steps] if phase.parallel else [(step,) for step in phase.steps]
        phase_results = []
        for group in groups:
            phase_results += run_group(phase, group, deadline, launch=launch, clock=clock, sleep=sleep,
                                       work_dir=work_dir, env=env)
        for result in phase_results:
            step = next(step for step in phase.steps if step.name == result.step)
            collect_log(phase, step, result, work_dir, out_dir)
            say(f"{phase.name} / {result.step}: {describe(result)}")
        results += phase_results
        sync_outputs(work_dir, out_dir)
    return results


def collect_log(phase: Phase, step: Step, result: StepResult, work_dir: Path, out_dir: Path) -> None:
    """Appends the step's log to its $OUT file under a header; copies its key lines into logs.txt (when the
    log is not logs.txt itself) and makes the last one the step's note."""
    path = step_log_path(work_dir, phase, step)
    text = path.read_text(errors="replace") if path.exists() else ""
    key = [line.strip() for line in text.splitlines() if re.search(step.key_lines, line)] if step.key_lines else []
    if key and not result.note:
        result.note = key[-1][:160]
    with open(out_dir / step.log, "a") as handle:
        handle.write(f"\n===== {phase.name} / {step.name}: {describe(result)} =====\n{text}")
    if key and step.log != "logs.txt":
            with open(out_dir / "logs.txt", "a") as handle:
                handle.write("".join(f"  [{step.name}] {line}\n" for line in key[-40:]))


def describe(result: StepResult, with_time: bool = True) -> str:
    if result.status == "skipped":
        return f"skipped ({result.note})"
    text = f"{result.status}" + (f", exit {result.exit_code}" if result.exit_code is not None else "")
    text += f", {result.seconds:.1f} s" if with_time else ""
    if result.status == "overran":
        text += ", stopped at its deadline (its output so far is kept)"
    return text + (f"; {result.note}" if result.note else "")


# ----------------------------------------------------------------------------------------------------
# Outputs: the CSV and the plots in $OUT
# ----------------------------------------------------------------------------------------------------

def results_csv(work_dir: Path) -> Path | None:
    """The results CSV the bench scripts wrote (named after the device); the newest if several."""
    paths = sorted(work_dir.glob("*.csv"), key=lambda path: path.stat().st_mtime)
    return paths[-1] if paths else None


def device_stem(work_dir: Path) -> str:
    path = results_csv(work_dir)
    return path.stem if path else "unknown-device"


def out_files(stem: str) -> list[str]:
    """Every file a run writes into $OUT (at most 8 come back from the machine)."""
    logs = {step.log for phase in plan() for step in phase.steps}
    return sorted(logs | {f"{stem}.csv", f"{stem}_plots.tar", f"{stem}_backend_order.json"})


def sync_outputs(work_dir: Path, out_dir: Path) -> None:
    """The results CSV and one tar of the PNGs (however many families ran), copied into `out_dir`."""
    path = results_csv(work_dir)
    if path is None:
        return
    shutil.copyfile(path, out_dir / path.name)
    plots = sorted(work_dir.glob(f"{path.stem}_*.png"))
    if plots:
        with tarfile.open(out_dir / f"{path.stem}_plots.tar", "w") as archive:
            for plot in plots:
                archive.add(plot, arcname=plot.name)


def read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(value) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def metric_of(rows: Sequence[dict]) -> tuple[str, str]:
    """The family's headline metric: TFLOP/s (attention), else GB/s, else tokens/s."""
    for key, name in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("tokens_per_s", "tokens/s")):
        if any(number(row.get(key)) for row in rows):
            return key, name
    return "gbps", "GB/s"


def families_without_plot(work_dir: Path) -> list[str]:
    """The families of the results CSV (the device copy aside) with no PNG next to it."""
    path = results_csv(work_dir)
    families = dict.fromkeys(row["family"] for row in read_rows(path))
    return [family for family in families
            if family != COPY_FAMILY and not (work_dir / f"{path.stem}_{family}.png").exists()]


def plot_missing(work_dir: Path) -> int:
    """--plot-missing: the PNG of every family in families_without_plot (its script was stopped before
    drawing it), from the rows it wrote, with results.plot."""
    import results  # torch and triton: only in this subprocess

    rows = read_rows(results_csv(work_dir))
    for family in families_without_plot(work_dir):
        family_rows = [row for row in rows if row["family"] == family]
        key, label = metric_of(family_rows)
        plot = results.plot(family_rows, family, work_dir, key=key, label=label, log_scale=key != "tflops")
        print(f"plotted {family} from its {len(family_rows)} rows: {plot}")
    return 0


def measure_copy(work_dir: Path) -> int:
    """--measure-copy: the device-to-device copy bandwidth (COPY_BYTES into another buffer, read + write),
    as one row of family device_copy in the results CSV: the ceiling of the memory-bound rows."""
    import bench_generate  # torch: only in this subprocess
    import common
    import results

    common.require_gpu()
    gbps = bench_generate.measure_copy_bandwidth(COPY_BYTES)
    moved = 2 * COPY_BYTES
    row = {"family": COPY_FAMILY, "case": f"copy {COPY_BYTES >> 30}GiB", "provider": "torch-copy", "dtype": "fp16",
           "bytes": moved, "ms": moved / (gbps * 1e9) * 1e3, "gbps": gbps, "check": "ok"}
    path = results.write_results_csv([row], COPY_FAMILY, work_dir)
    print(f"device copy: {gbps:.0f} GB/s ({moved / 1e9:.1f} GB moved, read + write); wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------
# The report: phase table, per-family tables, proposed backend order
# ----------------------------------------------------------------------------------------------------

def phase_table(results: Sequence[StepResult], phases: Sequence[Phase], elapsed_s: float) -> str:
    lines = [f"{'phase':<17} {'step':<26} {'budget_s':>8} {'used_s':>7}  status"]
    budgets = {phase.name: phase.budget_s for phase in phases}
    shown = set()
    for result in results:
        budget = f"{budgets[result.phase]:.0f}" if result.phase not in shown else ""
        shown.add(result.phase)
        used = f"{result.seconds:.1f}" if result.status != "skipped" else "-"
        lines.append(f"{result.phase:<17} {result.step:<26} {budget:>8} {used:>7}  {describe(result, False)}")
    lines.append(f"total: {elapsed_s:.0f} s used of {total_budget_s(phases):.0f} s planned (limit {RUN_LIMIT_S} s)")
    return "\n".join(lines)


FUSED = tuple(BACKEND_PROVIDERS) + ("fusedgpt",)  # the op families' and bench_generate.py's
FLOOR = "empty-kernel"


def family_tables(rows: Sequence[dict], copy_gbps: float | None = None) -> str:
    """One table per family. Per case and dtype: the best fusedgpt provider (by do_bench time), its
    TFLOP/s, GB/s or tokens/s, with GB/s its fraction of the device copy's bandwidth (of_copy), its speedup
    over each peer (peer time / fusedgpt time, > 1 = fusedgpt faster), and where CUDA-graph latencies exist
    the best fusedgpt us_graph next to the peers' (and the empty kernel's, the floor)."""
    families: dict[str, list[dict]] = {}
    for row in rows:
        if row["family"] != COPY_FAMILY:
            families.setdefault(row["family"], []).append(row)
    out = []
    for family, family_rows in families.items():
        metric, metric_name = metric_of(family_rows)
        peers = list(dict.fromkeys(r["provider"] for r in family_rows if r["provider"] not in FUSED + (FLOOR,)))
        time_peers = [p for p in peers if any(number(r.get("ms")) for r in family_rows if r["provider"] == p)]
        graph_peers = [p for p in peers + [FLOOR]
                       if any(number(r.get("us_graph")) for r in family_rows if r["provider"] == p)]
        has_graph = bool(graph_peers) or any(number(r.get("us_graph")) for r in family_rows)
        with_copy = bool(copy_gbps) and metric == "gbps"
        header = (["case", "dtype", "best", metric_name] + (["of_copy"] if with_copy else [])
                  + [f"x_{p}" for p in time_peers]
                  + (["us_best"] + [f"us_{p}" for p in graph_peers] if has_graph else []) + ["check/error"])
        cases: dict[tuple[str, str], dict[str, dict]] = {}
        for row in family_rows:
            cases.setdefault((row["case"], row["dtype"]), {})[row["provider"]] = row
        table = [header]
        for (case, dtype), providers in cases.items():
            fused = [providers[name] for name in FUSED if name in providers and number(providers[name].get("ms"))]
            best = min(fused, key=lambda r: number(r["ms"])) if fused else None
            graph_fused = [r for r in fused if number(r.get("us_graph"))]
            best_graph = min(graph_fused, key=lambda r: number(r["us_graph"])) if graph_fused else None
            best_value = number(best.get(metric)) if best else None

            def cell(value, digits):
                return "-" if value is None else f"{value:.{digits}f}"

            def ratio(name):
                theirs = number(providers[name].get("ms")) if name in providers else None
                return theirs / number(best["ms"]) if best and theirs else None

            notes = sorted({(r.get("error") or r.get("check") or "")[:40] for r in providers.values()} - {"", "ok"})
            line = [case, dtype, best["provider"].replace("fusedgpt-", "") if best else "none", cell(best_value, 1)]
            if with_copy:
                line.append(cell(best_value / copy_gbps if best_value else None, 2))
            line += [cell(ratio(p), 2) for p in time_peers]
            if has_graph:
                line.append(cell(number(best_graph["us_graph"]) if best_graph else None, 2))
                line += [cell(number(providers[p].get("us_graph")) if p in providers else None, 2) for p in graph_peers]
            line.append("; ".join(notes) or "ok")
            table.append(line)
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        out.append(f"--- {family}")
        out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
        out.append("")
    return "\n".join(out)


def copy_bandwidth(rows: Sequence[dict]) -> float | None:
    values = [number(row.get("gbps")) for row in rows if row["family"] == COPY_FAMILY and not row.get("error")]
    values = [value for value in values if value]
    return values[-1] if values else None


def valid_ms(row: dict) -> float | None:
    """A row's time when it counts for the order: no error, check 'ok', a positive time."""
    if (row.get("error") or "") or (row.get("check") or "") != "ok":
        return None
    ms = number(row.get("ms"))
    return ms if ms and ms > 0 else None


def rank_backends(cases: dict[str, dict[str, dict]]) -> dict:
    """cases: {case label: {backend: row}} -> the backends fastest first, with per backend the geometric
    mean over its valid cases of (its time / the fastest valid backend's time in that case), how many cases
    it was valid in, and why not in the others. More valid cases rank first (a backend that errors or fails
    its check somewhere cannot be proposed ahead of one that serves every case), then the lower mean, then
    TIE_ORDER."""
    backends = [name for name in TIE_ORDER if any(name in by_backend for by_backend in cases.values())]
    ratios = {name: [] for name in backends}
    not_valid = {name: {} for name in backends}
    fastest = {}
    for label, by_backend in cases.items():
        times = {name: valid_ms(row) for name, row in by_backend.items()}
        valid = {name: ms for name, ms in times.items() if ms}
        if valid:
            fastest[label] = min(valid, key=lambda name: (valid[name], TIE_ORDER.index(name)))
        for name in backends:
            if name in valid:
                ratios[name].append(valid[name] / min(valid.values()))
            else:
                row = by_backend.get(name)
                not_valid[name][label] = ((row.get("error") or row.get("check") or "no time") if row
                                          else "not measured")[:120]

    def mean(name):
        return math.exp(sum(math.log(r) for r in ratios[name]) / len(ratios[name]))

    order = sorted((name for name in backends if ratios[name]),
                   key=lambda name: (-len(ratios[name]), mean(name), TIE_ORDER.index(name)))
    summary = {name: {"geomean_time_vs_fastest": round(mean(name), 4) if ratios[name] else None,
                      "valid_cases": len(ratios[name]), "cases": len(cases), "not_valid": not_valid[name]}
               for name in backends}
    return {"order": order, "backends": summary, "fastest_by_case": fastest}


def propose_backend_order(rows: Sequence[dict]) -> dict:
    """Per op family with rows of fusedgpt's backends (fusedgpt-cuda / -triton / -torch): rank_backends over
    all its (case, dtype) rows, and per dtype. A proposal for fusedgpt.ops._backend.MEASURED_ORDER, which
    this does not change."""
    by_family: dict[str, dict[str, dict[str, dict[str, dict]]]] = {}  # family -> dtype -> case -> backend -> row
    for row in rows:
        backend = BACKEND_PROVIDERS.get(row.get("provider", ""))
        if backend is not None:
            by_family.setdefault(row["family"], {}).setdefault(row["dtype"], {}).setdefault(row["case"], {})[backend] = row
    families = {}
    for family, by_dtype in by_family.items():
        pooled = {f"{case} {dtype}": by_backend for dtype, cases in by_dtype.items() for case, by_backend in cases.items()}
        families[family] = {**rank_backends(pooled),
                            "by_dtype": {dtype: {key: value for key, value in rank_backends(cases).items()
                                                 if key != "fastest_by_case"}
                                         for dtype, cases in by_dtype.items()}}
    return {"method": "per family, fastest first: geometric mean over its (case, dtype) rows of time / the "
                      "fastest valid backend's time in that case; only rows without error and with check ok; "
                      "more valid cases rank first; ties keep the order " + " > ".join(TIE_ORDER),
            "families": families, "not_measured": [family for family in OP_FAMILIES if family not in families]}


def format_backend_order(proposal: dict) -> str:
    lines = ["proposed backend order (fastest first; score = geometric mean of time / fastest valid backend, "
             "valid cases / cases; a proposal for MEASURED_ORDER, not applied):"]
    for family, entry in proposal["families"].items():
        def ranked(ranking):
            return " > ".join(f"{name} {ranking['backends'][name]['geomean_time_vs_fastest']:.2f} "
                              f"({ranking['backends'][name]['valid_cases']}/{ranking['backends'][name]['cases']})"
                              for name in ranking["order"]) or "none valid"
        lines.append(f"  {family:<17} {ranked(entry)}")
        for dtype, ranking in entry["by_dtype"].items():
            lines.append(f"  {'':<17}   {dtype}: {ranked(ranking)}")
        for name, summary in entry["backends"].items():
            for label, why in list(summary["not_valid"].items())[:3]:
                lines.append(f"  {'':<17}   not valid: {name} {label}: {why}")
    if proposal["not_measured"]:
        lines.append(f"  not measured in this run: {', '.join(proposal['not_measured'])}")
    return "\n".join(lines)


def exit_status(results: Sequence[StepResult], phases: Sequence[Phase]) -> int:
    kinds = {phase.name: phase.kind for phase in phases}
    bad = [result for result in results if result.status in ("failed", "overran")]
    if any(kinds[result.phase] == "check" for result in bad):
        return 1
    return 2 if bad else 0


def report(results: Sequence[StepResult], phases: Sequence[Phase], *, work_dir: Path, out_dir: Path,
           elapsed_s: float, say: Callable[[str], None] = print) -> int:
    """The end of a run: outputs synced, the phase table, the per-family tables, the proposed backend order
    (also as <device>_backend_order.json), the files in $OUT; returns the exit status."""
    sync_outputs(work_dir, out_dir)
    stem = device_stem(work_dir)
    rows = read_rows(results_csv(work_dir))
    copy_gbps = copy_bandwidth(rows)
    proposal = {"device": rows[0].get("device", "") if rows else "", "copy_gbps": copy_gbps,
                **propose_backend_order(rows)}
    (out_dir / f"{stem}_backend_order.json").write_text(json.dumps(proposal, indent=1) + "\n")
    say("\n===== summary")
    say(phase_table(results, phases, elapsed_s))
    say(f"\ndevice copy: {copy_gbps:.0f} GB/s (read + write)" if copy_gbps else "\ndevice copy: not measured")
    if rows:
        say(family_tables(rows, copy_gbps))
    else:
        say("no results CSV was written")
    say(format_backend_order(proposal))
    files = sorted(path.name for path in out_dir.iterdir())
    say(f"\nfiles in {out_dir} ({len(files)}; at most 8 come back): {', '.join(files)}")
    status = exit_status(results, phases)
    say(f"exit status {status}")
    return status


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the phases, budgets, commands and total; run nothing")
    mode.add_argument("--dry-run", action="store_true",
                      help="the whole run with every command replaced by a stub that exits 0 at once (no GPU)")
    mode.add_argument("--measure-copy", type=Path, metavar="DIR", help="(a phase) the device-copy row into DIR's CSV")
    mode.add_argument("--plot-missing", type=Path, metavar="DIR", help="(a phase) PNGs of DIR's CSV families without one")
    parser.add_argument("--phases", default=None, help="comma-separated phase names to run (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="where the results go (default: $OUT, else ./gpu_out)")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help=f"the bench scripts' --out-dir, emptied first (default: {WORK_DIR.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if args.measure_copy:
        return measure_copy(args.measure_copy)
    if args.plot_missing:
        return plot_missing(args.plot_missing)
    work_dir = args.work_dir.resolve()
    phases = select_phases(plan(work_dir=work_dir), args.phases)
    if args.plan:
        print(format_plan(phases))
        return 0
    out_dir = (args.out or Path(os.environ.get("OUT") or "gpu_out")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in {step.log for phase in phases for step in phase.steps} | {"logs.txt"}:
        (out_dir / name).write_text("")  # this run's logs start empty
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)

    def say(text: str) -> None:
        print(text, flush=True)
        with open(out_dir / "logs.txt", "a") as handle:
            handle.write(text + "\n")

    if total_budget_s(phases) > RUN_LIMIT_S:
        say(f"WARNING: the budgets add up to {total_budget_s(phases):.0f} s, over {RUN_LIMIT_S} s")
    say(f"bench/run_gpu.sh{' --dry-run' if args.dry_run else ''}: {len(phases)} phases, "
        f"{total_budget_s(phases):.0f} s planned; results in {out_dir}")
    start = time.monotonic()
    results = run_phases(phases, work_dir=work_dir, out_dir=out_dir, launch=DryRunProcess if args.dry_run else Process,
                         say=say)
    return report(results, phases, work_dir=work_dir, out_dir=out_dir, elapsed_s=time.monotonic() - start, say=say)


if __name__ == "__main__":
    sys.exit(main())
