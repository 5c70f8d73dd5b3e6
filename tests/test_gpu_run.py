"""Tests of bench/gpu_run.py and bench/run_gpu.sh on the CPU: the one GPU call must not die on a bug in
its runner, and its plan must fit. `--plan` lists every phase in priority order within 540 s; a run with
fake processes and a fake clock (phases that pass, fail, overrun and ignore SIGINT) keeps the later
phases, the partial output and rows, the slack passed on, and the exit status right; real processes are
stopped at their deadline with their whole process group, output kept; the proposed backend order from a
fake CSV (ties, missing providers, error and MISMATCH rows); the report's tables; every bench script's
headline selection is exactly the issue's list; `bash -n` and `--dry-run` of run_gpu.sh; at most 8
files in $OUT."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
RUN_GPU_SH = BENCH_DIR / "run_gpu.sh"
FAKE_DEVICE = "NVIDIA H200"
STEM = "nvidia-h200"
BENCH_PHASES = ("attention", "decode_attention", "layer_norm", "bias_act", "generate")


@pytest.fixture(scope="module")
def bench():
    """bench/ modules imported the way the scripts import each other (bench/ on sys.path)."""
    inserted = str(BENCH_DIR) not in sys.path
    if inserted:
        sys.path.insert(0, str(BENCH_DIR))
    names = ("gpu_run", "results", "common", "bench_attention", "bench_decode_attention", "bench_layer_norm",
             "bench_bias_act", "bench_generate")
    yield types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    if inserted and str(BENCH_DIR) in sys.path:
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture
def gpu_run(bench):
    return bench.gpu_run


@pytest.fixture
def results(bench, monkeypatch):
    monkeypatch.setattr(bench.results, "device_name", lambda: FAKE_DEVICE)
    return bench.results


def shell(*args, env=None, timeout=120):
    return subprocess.run(["bash", str(RUN_GPU_SH), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def plan_rows(text: str) -> list[tuple[str, float, float, str]]:
    """(phase, budget, ends by, kind) per phase line of --plan's table."""
    return [(name, float(budget), float(end), kind) for name, budget, end, kind in
            re.findall(r"^\s*\d+\s+(\S+)\s+(\d+)\s+(\d+)\s+(check|bench)\s", text, re.M)]


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------

def test_run_gpu_sh_syntax():
    result = subprocess.run(["bash", "-n", str(RUN_GPU_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(RUN_GPU_SH, os.X_OK)


def test_plan_lists_every_phase_in_order_within_540_s_and_runs_nothing(gpu_run, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = shell("--plan", "--work-dir", str(work), env={"OUT": str(out)})
    assert result.returncode == 0, result.stderr
    phases = gpu_run.plan(work_dir=work)
    rows = plan_rows(result.stdout)
    assert [name for name, *_ in rows] == [phase.name for phase in phases]
    assert [budget for _, budget, _, _ in rows] == [phase.budget_s for phase in phases]
    ends = [end for _, _, end, _ in rows]
    assert ends == [sum(phase.budget_s for phase in phases[:i + 1]) for i in range(len(phases))]
    total = re.search(r"^total: (\d+) s of phase budgets \+ (\d+) s for the report = (\d+) s \(limit 540 s\)$",
                      result.stdout, re.M)
    assert total, result.stdout[-500:]
    assert float(total.group(1)) == ends[-1] and float(total.group(3)) == ends[-1] + gpu_run.REPORT_MARGIN_S
    assert float(total.group(3)) <= 540
    for phase in phases:  # every command (or why it is skipped) is printed
        for step in phase.steps:
            assert (f"(skipped: {step.skip})" if step.skip else shlex.join(step.argv[-3:])) in result.stdout
    assert not out.exists() and not work.exists(), "--plan ran something"


def test_plan_follows_the_issue(gpu_run, tmp_path):
    """Priority order build < correctness < sanitizers < headline rows < generation; sm_90 only with all
    cores; pytest -m gpu over all tests; memcheck and racecheck on sanitize_ops.py; the headline cases are
    each script's own (--headline, no case or dtype options)."""
    environ = {"PATH": os.environ["PATH"], "CUDA_HOME": str(tmp_path)}
    (tmp_path / "bin").mkdir()
    sanitizer = tmp_path / "bin" / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n")
    sanitizer.chmod(0o755)
    phases = gpu_run.plan(python="python", environ=environ, work_dir=tmp_path / "w")
    names = [phase.name for phase in phases]
    assert names.index("build") < names.index("correctness") < names.index("attention") < names.index("generate")
    steps = {step.name: step for phase in phases for step in phase.steps}
    install = steps["pip install"]
    assert install.env == {"FUSEDGPT_CUDA_ARCHS": "9.0", "MAX_JOBS": str(gpu_run.cpu_count())}
    assert install.argv[1:] == ("-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", ".")
    assert steps["pip install without CUDA"].env == {"FUSEDGPT_SKIP_CUDA_BUILD": "1"}
    fallback = next(p for p in phases if p.name == "build-fallback")
    build_result = gpu_run.StepResult("build", "pip install", "failed", 1, 3.0)
    assert not fallback.run_when[1]([], tmp_path) and fallback.run_when[1]([build_result], tmp_path)
    targets = [steps["pytest ops"].argv[-1:], steps["pytest models"].argv[-2:]]
    assert targets == [("tests/ops",), ("tests", "--ignore=tests/ops")]  # every test marked gpu, once
    for name in ("pytest ops", "pytest models"):
        assert steps[name].argv[1:5] == ("-m", "pytest", "-m", "gpu")
    for tool in ("memcheck", "racecheck"):
        step = steps[tool]
        assert not step.skip and step.argv[:3] == (str(sanitizer), "--tool", tool)
        assert step.argv[-4:] == ("python", "bench/sanitize_ops.py", "--backends", "cuda,triton")
        assert step.env == {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    correctness = next(phase for phase in phases if phase.name == "correctness")
    assert correctness.parallel and correctness.kind == "check"
    for name in BENCH_PHASES:
        (step,) = next(phase for phase in phases if phase.name == name).steps
        assert step.argv[1:3] == (f"bench/bench_{name}.py", "--headline")
        assert not {"--dtypes", "--cases", "--providers", "--quick"} & set(step.argv)
    without = {step.name: step for phase in gpu_run.plan(environ={"PATH": "", "CUDA_HOME": str(tmp_path / "x")})
               for step in phase.steps}
    assert "compute-sanitizer not found" in without["memcheck"].skip and without["racecheck"].skip


def test_each_bench_phase_names_its_family(bench, gpu_run):
    """The phase of bench_<name>.py is named after the script's FAMILY, as its rows and PNG are."""
    for name in BENCH_PHASES:
        assert getattr(bench, f"bench_{name}").FAMILY == name
        assert any(phase.name == name for phase in gpu_run.plan())


def test_phases_option(tmp_path):
    result = shell("--plan", "--phases", "generate,build")
    assert result.returncode == 0 and [name for name, *_ in plan_rows(result.stdout)] == ["build", "generate"]
    result = shell("--plan", "--phases", "build,no-such-phase")
    assert result.returncode != 0 and "--phases: unknown ['no-such-phase']" in result.stderr


def test_at_most_8_files_in_out(gpu_run):
    files = gpu_run.out_files(STEM)
    assert len(files) <= 8 and len(set(files)) == len(files)
    assert {"logs.txt", "build.log", f"{STEM}.csv", f"{STEM}_plots.tar", f"{STEM}_backend_order.json"} <= set(files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)


# ----------------------------------------------------------------------------------------------------
# A whole run with fake processes and a fake clock
# ----------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class FakeProcess:
    """Writes its output when launched, runs `seconds` of fake time (forever: None), exits with `code`;
    SIGINT stops it unless it ignores SIGINT, SIGKILL always."""

    def __init__(self, clock, log_path, output, seconds, code, ignores_interrupt):
        self.clock, self.code, self.ignores_interrupt = clock, code, ignores_interrupt
        self.end = None if seconds is None else clock() + seconds
        self.signals = []
        with open(log_path, "a") as handle:
            handle.write(output)

    def poll(self):
        return self.code if self.end is not None and self.clock() >= self.end else None

    def signal(self, number):
        self.signals.append((number, self.clock()))
        if number == signal.SIGKILL or (number == signal.SIGINT and not self.ignores_interrupt):
            if self.end is None or self.end > self.clock():
                self.end, self.code = self.clock(), -number


def write_rows(results, work_dir, family, cases, ms):
    """A bench script's rows of fusedgpt's three backends (as it writes them after each case)."""
    rows = [{"family": family, "case": case, "provider": provider, "dtype": "fp16", "ms": ms[provider], "check": "ok"}
            for case in cases for provider in ms]
    results.write_results_csv(rows, family, work_dir)


def fake_run(gpu_run, results, tmp_path, behaviours):
    """run_phases + report over the real plan with FakeProcess launches; behaviours[step name] = (seconds,
    exit code, ignores SIGINT, callback(work_dir) run at launch), default (1 s, 0)."""
    clock = FakeClock()
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (tmp_path / "bin").mkdir()
    sanitizer = tmp_path / "bin" / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n")
    sanitizer.chmod(0o755)
    phases = gpu_run.plan(python="python", environ={"PATH": "", "CUDA_HOME": str(tmp_path)}, work_dir=work)
    launched, processes = [], {}

    def launch(step, log_path, env):
        seconds, code, ignores, callback = behaviours.get(step.name, (1, 0, False, None))
        launched.append((step.name, clock(), env))
        if callback:
            callback(work)
        processes[step.name] = FakeProcess(clock, log_path, f"{step.name}: partial output\n", seconds, code, ignores)
        return processes[step.name]

    said = []
    start = clock()
    step_results = gpu_run.run_phases(phases, work_dir=work, out_dir=out, launch=launch, clock=clock,
                                      sleep=clock.sleep, say=said.append, env={})
    status = gpu_run.report(step_results, phases, work_dir=work, out_dir=out, elapsed_s=clock() - start,
                            say=said.append)
    return types.SimpleNamespace(clock=clock, start=start, phases=phases, results=step_results, status=status,
                                 launched=launched, processes=processes, out=out, text="\n".join(said))


def test_fake_run_overruns_failures_and_slack(gpu_run, results, tmp_path):
    attention_ms = {"fusedgpt-cuda": 1.0, "fusedgpt-triton": 2.0, "fusedgpt-torch": 3.0}
    copied = []
    behaviours = {
        "pip install": (30, 0, False, None),
        "fusedgpt info": (2, 0, False, None),
        "pytest ops": (100, 0, False, None),
        "pytest models": (40, 1, False, None),  # fails
        "memcheck": (None, 0, True, None),  # hangs and ignores SIGINT: SIGKILL at the deadline
        "racecheck": (60, 0, False, None),
        "copy bandwidth": (3, 0, False, lambda work: results.write_results_csv(
            [{"family": "device_copy", "case": "copy 4GiB", "provider": "torch-copy", "dtype": "fp16", "gbps": 4000.0,
              "ms": 2.0, "check": "ok"}], "device_copy", work)),
        # writes its first case, then runs past its budget; SIGINT stops it
        "bench_attention": (None, 0, False, lambda work: write_rows(results, work, "attention", ["B8 S2048 H12 D64"],
                                                                   attention_ms)),
        # the attention rows are in $OUT as soon as its phase ends (a run cut short still returns them)
        "bench_decode_attention": (20, 0, False, lambda work: copied.append(
            "B8 S2048 H12 D64" in (work.parent / "out" / f"{STEM}.csv").read_text())),
        "bench_generate": (30, 1, False, None),  # fails
    }
    run = fake_run(gpu_run, results, tmp_path, behaviours)
    by_step = {result.step: result for result in run.results}
    assert {name: by_step[name].status for name in by_step} == {
        "setuptools>=77": by_step["setuptools>=77"].status, "pip install": "ok",
        "pip install without CUDA": "skipped", "fusedgpt info": "ok", "pytest ops": "ok", "pytest models": "failed",
        "memcheck": "overran", "racecheck": "ok", "copy bandwidth": "ok", "bench_attention": "overran",
        "bench_decode_attention": "ok", "bench_layer_norm": "ok", "bench_bias_act": "ok", "bench_generate": "failed",
        "plots of stopped families": "ok"}
    assert by_step["pip install without CUDA"].note == "not needed: only when build failed or overran"
    assert by_step["memcheck"].exit_code == -signal.SIGKILL and by_step["bench_attention"].exit_code == -signal.SIGINT
    # every phase after the overruns and failures still ran, in order, with PYTHONUNBUFFERED
    names = [name for name, _, _ in run.launched]
    assert names[-5:] == ["bench_decode_attention", "bench_layer_norm", "bench_bias_act", "bench_generate",
                          "plots of stopped families"]
    assert all(env["PYTHONUNBUFFERED"] == "1" for _, _, env in run.launched)
    assert dict((name, env) for name, _, env in run.launched)["memcheck"]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    # deadlines: start + the budgets so far; SIGINT GRACE_S before, SIGKILL at it
    ends = {}
    total = 0.0
    for phase in run.phases:
        total += phase.budget_s
        ends[phase.name] = run.start + total
    grace = gpu_run.GRACE_S
    memcheck = run.processes["memcheck"].signals
    assert [number for number, _ in memcheck] == [signal.SIGINT, signal.SIGKILL]
    assert memcheck[0][1] == pytest.approx(ends["correctness"] - grace, abs=0.6)
    assert memcheck[1][1] == pytest.approx(ends["correctness"], abs=0.6)
    attention_start = dict((name, at) for name, at, _ in run.launched)["bench_attention"]
    attention = run.processes["bench_attention"].signals
    assert attention[0] == (signal.SIGINT, pytest.approx(ends["attention"] - grace, abs=0.6))
    allowed = ends["attention"] - attention_start
    assert allowed > next(p.budget_s for p in run.phases if p.name == "attention") + 10  # the copy's slack
    assert run.clock() - run.start <= 540
    # partial output and rows kept
    assert copied == [True]
    assert "memcheck: partial output" in (run.out / "sanitizer.log").read_text()
    assert "pytest models: partial output" in (run.out / "pytest_gpu.log").read_text()
    logs = (run.out / "logs.txt").read_text() if (run.out / "logs.txt").exists() else ""
    assert "bench_attention: partial output" in logs
    with open(run.out / f"{STEM}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(row["family"], row["case"]) for row in rows} == {("device_copy", "copy 4GiB"),
                                                               ("attention", "B8 S2048 H12 D64")}
    proposal = json.loads((run.out / f"{STEM}_backend_order.json").read_text())
    assert proposal["families"]["attention"]["order"] == ["cuda", "triton", "torch"]
    assert proposal["copy_gbps"] == pytest.approx(4000.0)
    # the report
    assert run.status == 1  # a check failed (pytest models) and one overran (memcheck)
    budget = gpu_run.BUDGETS_S["attention"]
    assert re.search(rf"^attention\s+bench_attention\s+{budget:.0f}\s+[\d.]+\s+overran, exit -2", run.text, re.M)
    assert "device copy: 4000 GB/s" in run.text and "--- attention" in run.text
    assert len(list(run.out.iterdir())) <= 8


@pytest.mark.parametrize(("failing", "expected"), [(None, 0), ("bench_layer_norm", 2), ("fusedgpt info", 1),
                                                   ("pip install", 1)])
def test_fake_run_exit_status(gpu_run, results, tmp_path, failing, expected):
    behaviours = {failing: (1, 3, False, None)} if failing else {}
    run = fake_run(gpu_run, results, tmp_path, behaviours)
    assert run.status == expected
    fallback = next(result for result in run.results if result.phase == "build-fallback")
    assert (fallback.status == "ok") == (failing == "pip install")  # the install without CUDA, only then
    plots = next(result for result in run.results if result.phase == "plots")
    assert plots.status == "skipped", "no family is without its PNG: nothing to plot"


def test_real_processes_are_stopped_at_their_deadline(gpu_run, tmp_path, monkeypatch):
    """SIGINT reaches the process (its output so far is kept), SIGKILL the one that ignores SIGINT and the
    child it started (the whole process group), and the next phase runs."""
    monkeypatch.setattr(gpu_run, "GRACE_S", 1.0)
    monkeypatch.setattr(gpu_run, "POLL_S", 0.05)
    python = sys.executable
    child_pid = tmp_path / "child.pid"
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                f"open({str(child_pid)!r}, 'w').write(str(child.pid)); print('stubborn: started', flush=True); "
                "time.sleep(60)")
    polite = "import time; print('polite: partial', flush=True); time.sleep(60)"
    Phase, Step = gpu_run.Phase, gpu_run.Step
    phases = [Phase("slow", 3.0, (Step("polite", (python, "-c", polite), "logs.txt"),
                                  Step("stubborn", (python, "-c", stubborn), "sanitizer.log")), "bench", "", parallel=True),
              Phase("next", 20.0, (Step("after", (python, "-c", "print('after ran')"), "logs.txt"),), "bench", "")]
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    started = time.monotonic()
    step_results = gpu_run.run_phases(phases, work_dir=work, out_dir=out, say=lambda text: None)
    elapsed = time.monotonic() - started
    by_step = {result.step: result for result in step_results}
    assert by_step["polite"].status == "overran" and by_step["polite"].exit_code is not None
    assert by_step["stubborn"].status == "overran" and by_step["stubborn"].exit_code == -signal.SIGKILL
    assert by_step["stubborn"].seconds == pytest.approx(3.0, abs=0.5)
    assert by_step["after"].status == "ok"
    assert elapsed < 3.0 + 10
    assert "polite: partial" in (out / "logs.txt").read_text() and "after ran" in (out / "logs.txt").read_text()
    assert "stubborn: started" in (out / "sanitizer.log").read_text()
    pid = int(child_pid.read_text())
    for _ in range(50):
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(") ")[-1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child of the killed step outlived it")


def test_dry_run_of_run_gpu_sh(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = shell("--dry-run", "--work-dir", str(work), env={"OUT": str(out)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "===== summary" in result.stdout and "exit status 0" in result.stdout
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8 and {"logs.txt", "build.log", "pytest_gpu.log"} <= set(files)
    assert "dry run: " in (out / "build.log").read_text() and "no results CSV was written" in result.stdout
    assert "bench/bench_attention.py --headline" in (out / "logs.txt").read_text()


# ----------------------------------------------------------------------------------------------------
# The proposed backend order, the report's tables, the CSV and plots in $OUT
# ----------------------------------------------------------------------------------------------------

def row(family, case, provider, dtype="fp16", **values):
    return {"family": family, "case": case, "provider": provider, "dtype": dtype, **values}


def test_backend_order_from_a_fake_csv(gpu_run, results, tmp_path):
    rows = [
        # layer_norm, fp16: triton wins by the geometric mean (cuda 1x and 3x, triton 2x and 1x)
        row("layer_norm", "c1", "fusedgpt-cuda", ms=1.0, check="ok"),
        row("layer_norm", "c1", "fusedgpt-triton", ms=2.0, check="ok"),
        row("layer_norm", "c1", "fusedgpt-torch", ms=4.0, check="ok"),
        row("layer_norm", "c1", "torch-compile", ms=0.5, check="ok"),  # a peer: not a backend
        row("layer_norm", "c2", "fusedgpt-cuda", ms=3.0, check="ok"),
        row("layer_norm", "c2", "fusedgpt-triton", ms=1.0, check="ok"),
        row("layer_norm", "c2", "fusedgpt-torch", ms=3.0, check="ok"),
        row("layer_norm", "c1", "empty-kernel", us_graph=2.0),
        # bf16: a tie between cuda and triton (today's order decides), torch failed
        row("layer_norm", "c1", "fusedgpt-cuda", "bf16", ms=1.0, check="ok"),
        row("layer_norm", "c1", "fusedgpt-triton", "bf16", ms=1.0, check="ok"),
        row("layer_norm", "c1", "fusedgpt-torch", "bf16", error="RuntimeError: boom"),
        # attention: cuda is fastest but fails its check in one case, so it ranks after the full-coverage ones
        row("attention", "a1", "fusedgpt-cuda", ms=1.0, check="MISMATCH max_abs_err=1"),
        row("attention", "a1", "fusedgpt-triton", ms=2.0, check="ok"),
        row("attention", "a1", "fusedgpt-torch", ms=3.0, check="ok"),
        row("attention", "a2", "fusedgpt-cuda", ms=1.0, check="ok"),
        row("attention", "a2", "fusedgpt-triton", ms=2.0, check="ok"),
        row("attention", "a2", "fusedgpt-torch", ms=2.0, check="ok"),
        row("attention", "a1", "sdpa-flash", ms=0.1, check="ok"),
        # decode: no CUDA extension, torch only measured once
        row("decode_attention", "d1", "fusedgpt-cuda", error="skipped: the CUDA extension is not available"),
        row("decode_attention", "d1", "fusedgpt-triton", ms=0.02, check="ok"),
        row("decode_attention", "d2", "fusedgpt-triton", ms=0.05, check="ok"),
        row("decode_attention", "d2", "fusedgpt-torch", ms=0.04, check="ok"),
        row("generate", "m b1", "fusedgpt", ms=1.0, tokens_per_s=1000.0, check="ok"),  # no backends
    ]
    path = results.write_results_csv(rows, "mixed", tmp_path)
    proposal = gpu_run.propose_backend_order(gpu_run.read_rows(path))
    families = proposal["families"]
    assert set(families) == {"layer_norm", "attention", "decode_attention"}
    assert proposal["not_measured"] == ["bias_act", "kv_append"]

    layer_norm = families["layer_norm"]
    assert layer_norm["by_dtype"]["fp16"]["order"] == ["triton", "cuda", "torch"]
    fp16 = layer_norm["by_dtype"]["fp16"]["backends"]
    assert fp16["cuda"]["geomean_time_vs_fastest"] == pytest.approx(3 ** 0.5, rel=1e-3)
    assert fp16["triton"]["geomean_time_vs_fastest"] == pytest.approx(2 ** 0.5, rel=1e-3)
    assert fp16["torch"]["geomean_time_vs_fastest"] == pytest.approx(12 ** 0.5, rel=1e-3)
    assert layer_norm["by_dtype"]["bf16"]["order"] == ["triton", "cuda"]  # the tie, and torch not valid
    assert layer_norm["by_dtype"]["bf16"]["backends"]["torch"]["not_valid"] == {"c1": "RuntimeError: boom"}
    assert layer_norm["order"] == ["triton", "cuda", "torch"]  # pooled: torch valid in 2 of 3 cases only
    assert layer_norm["backends"]["torch"]["valid_cases"] == 2 and layer_norm["backends"]["torch"]["cases"] == 3
    assert layer_norm["backends"]["cuda"]["geomean_time_vs_fastest"] == pytest.approx(3 ** (1 / 3), rel=1e-3)
    assert layer_norm["fastest_by_case"] == {"c1 fp16": "cuda", "c2 fp16": "triton", "c1 bf16": "triton"}

    attention = families["attention"]
    assert attention["order"] == ["triton", "torch", "cuda"]
    assert attention["backends"]["cuda"]["not_valid"] == {"a1 fp16": "MISMATCH max_abs_err=1"}
    torch_mean = attention["backends"]["torch"]["geomean_time_vs_fastest"]
    assert torch_mean == pytest.approx((1.5 * 2.0) ** 0.5, rel=1e-3)  # a1: 3 / 2 (triton), a2: 2 / 1 (cuda)
    assert attention["fastest_by_case"] == {"a1 fp16": "triton", "a2 fp16": "cuda"}

    decode = families["decode_attention"]
    assert decode["order"] == ["triton", "torch"]  # cuda never valid; torch measured in one case of two
    assert decode["backends"]["cuda"]["valid_cases"] == 0
    assert decode["backends"]["cuda"]["not_valid"]["d1 fp16"].startswith("skipped: the CUDA extension")
    assert decode["backends"]["torch"]["not_valid"] == {"d1 fp16": "not measured"}
    text = gpu_run.format_backend_order(proposal)
    assert "triton 1.41 (2/2) > cuda 1.73 (2/2) > torch 3.46 (2/2)" in text
    assert "not measured in this run: bias_act, kv_append" in text


def test_tie_order_is_todays_automatic_order(gpu_run):
    from fusedgpt.ops import _backend

    assert gpu_run.TIE_ORDER == tuple(_backend.DEFAULT_ORDER) + ("torch",)
    assert set(gpu_run.TIE_ORDER) == set(_backend.BACKENDS)


def test_backend_providers_match_common(bench):
    assert bench.gpu_run.BACKEND_PROVIDERS == bench.common.BACKEND_PROVIDERS


def test_family_tables(gpu_run, results, tmp_path):
    """One table per family from a results CSV (TFLOP/s, GB/s with the fraction of the device copy, tokens/s,
    graph latencies, error rows): the best fusedgpt provider and its speedups over each peer."""
    rows = [
        row("layer_norm", "1x768 res", "fusedgpt-cuda", ms=0.004, us_graph=2.5, gbps=1.2, check="ok"),
        row("layer_norm", "1x768 res", "fusedgpt-triton", ms=0.003, us_graph=3.0, gbps=1.6, check="ok"),
        row("layer_norm", "1x768 res", "torch-eager", ms=0.009, us_graph=6.0, gbps=0.5, check="ok"),
        row("layer_norm", "1x768 res", "empty-kernel", us_graph=1.9),
        row("layer_norm", "16384x4096 res", "fusedgpt-cuda", error="skipped: the CUDA extension is not available"),
        row("layer_norm", "16384x4096 res", "fusedgpt-torch", ms=0.5, gbps=3000.0, check="ok"),
        row("layer_norm", "16384x4096 res", "torch-eager", ms=1.0, gbps=1500.0, check="ok"),
        row("attention", "B4 S4096 H16 D128", "fusedgpt-triton", ms=1.0, tflops=300.0, check="ok"),
        row("attention", "B4 S4096 H16 D128", "sdpa-flash", ms=1.5, tflops=200.0, check="MISMATCH max_abs_err=1"),
        row("generate", "gpt2-124m b1 p128 n128", "fusedgpt", ms=0.3, tokens_per_s=3000.0, gbps=900.0),
        row("generate", "gpt2-124m b1 p128 n128", "hf-eager", ms=9.0, tokens_per_s=100.0, gbps=30.0),
        row("device_copy", "copy 4GiB", "torch-copy", ms=2.0, gbps=4000.0, check="ok"),
    ]
    path = results.write_results_csv(rows, "mixed", tmp_path)
    csv_rows = gpu_run.read_rows(path)
    assert gpu_run.copy_bandwidth(csv_rows) == pytest.approx(4000.0)
    out = gpu_run.family_tables(csv_rows, gpu_run.copy_bandwidth(csv_rows))
    assert all(f"--- {family}" in out for family in ("layer_norm", "attention", "generate"))
    assert "--- device_copy" not in out
    assert "TFLOP/s" in out and "GB/s" in out and "x_torch-eager" in out and "us_empty-kernel" in out
    big = next(line for line in out.splitlines() if line.startswith("16384x4096"))
    assert big.split()[:6] == ["16384x4096", "res", "fp16", "torch", "3000.0", "0.75"]  # of_copy = 3000 / 4000
    assert "2.00" in big and "skipped: the CUDA extension" in big
    attention_line = next(line for line in out.splitlines() if line.startswith("B4 S4096"))
    assert "triton" in attention_line and "1.50" in attention_line and "MISMATCH" in attention_line
    assert "of_copy" not in next(line for line in out.splitlines() if line.startswith("case") and "TFLOP/s" in line)
    generate_line = next(line for line in out.splitlines() if line.startswith("gpt2-124m b1"))
    assert generate_line.split()[5] == "fusedgpt" and "30.00" in generate_line  # hf-eager ms / fusedgpt ms


def test_sync_outputs_and_plot_missing(gpu_run, results, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    gpu_run.sync_outputs(work, out)
    assert not list(out.iterdir()), "nothing measured: nothing to copy"
    results.write_results_csv([row("layer_norm", "c1", "fusedgpt-triton", ms=1.0, gbps=100.0, check="ok")],
                              "layer_norm", work)
    results.write_results_csv([row("attention", "a1", "fusedgpt-triton", ms=1.0, tflops=100.0, check="ok")],
                              "attention", work)
    (work / f"{STEM}_attention.png").write_bytes(b"drawn by its script")
    assert gpu_run.plot_missing(work) == 0
    assert (work / f"{STEM}_attention.png").read_bytes() == b"drawn by its script"
    can_plot = all(importlib.util.find_spec(name) for name in ("matplotlib", "pandas"))
    assert (work / f"{STEM}_layer_norm.png").exists() == bool(can_plot)
    gpu_run.sync_outputs(work, out)
    assert (out / f"{STEM}.csv").read_text() == (work / f"{STEM}.csv").read_text()
    with tarfile.open(out / f"{STEM}_plots.tar") as archive:
        names = sorted(archive.getnames())
    assert names == sorted(path.name for path in work.glob("*.png"))


def test_measure_copy_writes_one_row(bench, gpu_run, results, tmp_path, monkeypatch):
    sizes = []
    monkeypatch.setattr(bench.common, "require_gpu", lambda: None)
    monkeypatch.setattr(bench.bench_generate, "measure_copy_bandwidth", lambda size: sizes.append(size) or 4300.0)
    assert gpu_run.measure_copy(tmp_path) == 0
    (copy_row,) = gpu_run.read_rows(tmp_path / f"{STEM}.csv")
    assert sizes == [gpu_run.COPY_BYTES] and gpu_run.COPY_BYTES >= 2**30
    assert copy_row["family"] == gpu_run.COPY_FAMILY and float(copy_row["gbps"]) == pytest.approx(4300.0)
    assert float(copy_row["ms"]) == pytest.approx(2 * gpu_run.COPY_BYTES / 4300e9 * 1e3, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# The headline cases of every bench script are exactly the issue's list
# ----------------------------------------------------------------------------------------------------

def test_headline_cases_are_the_issues_list(bench):
    fused = ("fusedgpt-cuda", "fusedgpt-triton", "fusedgpt-torch")
    attention = bench.bench_attention
    cases = attention.headline_cases()
    assert {attention.case_label(case): tuple(case["providers"]) for case in cases} == {
        "B8 S2048 H12 D64": fused + ("sdpa-flash", "sdpa-cudnn"),
        "B2 S8192 H12 D64": fused + ("sdpa-flash", "sdpa-cudnn"),
        "B8 S2048 H16 D128": fused + ("sdpa-flash", "sdpa-cudnn"),
        "B2 S8192 H16 D128": fused + ("sdpa-flash", "sdpa-cudnn"),
        "B2 S8192 H16 D128 w256 s1": fused + ("flex-attention",),
        "B2 S8192 H12 D64 w256 s1": fused + ("flex-attention",),
    }
    assert all(case["batch"] * case["seq_len"] == 16384 for case in cases)  # 16k tokens per batch
    assert set(attention.HEADLINE_PROVIDERS) == {p for case in cases for p in case["providers"]}
    full_labels = {attention.case_label(case) for case in attention.benchmark_cases(quick=False)}
    assert {attention.case_label(case) for case in cases} <= full_labels  # the same rows as a full run

    decode = bench.bench_decode_attention
    assert sorted(decode.case_label(case) for case in decode.headline_cases()) == [
        "B1 L8192 H12 D64", "B1 L8192 H16 D128", "B64 L2048 H12 D64", "B64 L2048 H16 D128"]
    assert set(decode.HEADLINE_PROVIDERS) >= set(fused) | {"sdpa"}
    assert "fusedgpt-torch" in decode.APPENDING

    layer_norm, bias_act = bench.bench_layer_norm, bench.bench_bias_act
    assert [layer_norm.describe_case(case) for case in layer_norm.headline_cases()] == [
        "tokens=16384 hidden=4096 residual=True"]
    assert [bias_act.describe_case(case) for case in bias_act.headline_cases()] == ["gelu_tanh tokens=16384 width=8192"]
    for module in (layer_norm, bias_act):
        assert module.HEADLINE_PROVIDERS == fused + ("torch-compile",)

    generate = bench.bench_generate
    assert generate.HEADLINE_MODELS == ("gpt2-124m", "opt-1.3b")
    assert generate.HEADLINE_CASES == ((1, 128, 128),)
    assert generate.HEADLINE_PROVIDERS == ("fusedgpt", "hf-eager", "hf-sdpa")  # hf-sdpa: transformers' default
    assert generate.parse_models(None, quick=False, headline=True) == list(generate.HEADLINE_MODELS)

    for name in ("bench_attention", "bench_decode_attention", "bench_layer_norm", "bench_bias_act"):
        module = getattr(bench, name)
        parser = bench.common.argument_parser("x")
        bench.common.add_headline_option(parser, "x")
        args = parser.parse_args(["--headline"])
        assert args.dtypes == "fp16,bf16"  # both dtypes
        assert bench.common.parse_providers(args, module.PROVIDERS, module.HEADLINE_PROVIDERS) == list(
            module.HEADLINE_PROVIDERS)
        args = parser.parse_args([])
        assert bench.common.parse_providers(args, module.PROVIDERS, module.HEADLINE_PROVIDERS) == list(module.PROVIDERS)
