"""Tests of the benchmark scripts (bench/) on the CPU, so that the one scarce GPU run does not die on a
Python bug: the FLOP and byte counts behind TFLOP/s and GB/s against brute-force counts from explicit
masks and tensors; the case grids; the rows a measurement makes from triton.testing's timings; the
results CSV (one row format, merged family by family, rewritten after every case) and its plot; the model
configs against the published sizes; each script's --help and command-line errors; and each op script's
main() end to end on tiny CPU cases, with the GPU timing faked (the Triton kernels run under
TRITON_INTERPRET=1, set by conftest.py), --headline included. bench/gpu_run.py (run_gpu.sh) has
tests/test_gpu_run.py. bench/ is not a package: its modules are imported from their
directory, as `python bench/<script>.py` does."""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
SCRIPTS = ("bench_layer_norm", "bench_bias_act", "bench_kv_append", "bench_attention", "bench_decode_attention",
           "bench_generate", "bench_patching", "bench_train", "sanitize_ops")
OP_FAMILIES = ("layer_norm", "bias_act", "kv_append", "attention", "decode_attention")
FAKE_DEVICE = "NVIDIA H100 80GB HBM3"
SLUG = "nvidia-h100-80gb-hbm3"
FAKE_MS = 0.5  # what the fake do_bench returns
FAKE_US_GRAPH = 2.0  # what the fake graph replay returns
# triton.testing.perf_report draws with matplotlib and tabulates with pandas: without them a run writes
# its CSV and a note instead of the PNG.
CAN_PLOT = all(importlib.util.find_spec(name) is not None for name in ("matplotlib", "pandas"))


@pytest.fixture(scope="module")
def bench():
    """The bench modules, imported the way the scripts import each other (bench/ on sys.path)."""
    inserted = str(BENCH_DIR) not in sys.path
    if inserted:
        sys.path.insert(0, str(BENCH_DIR))
    names = ("common", "results", "timing", "models") + SCRIPTS
    modules = types.SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    assert not torch.cuda.is_initialized() or torch.cuda.is_available(), "importing bench/ touched CUDA"
    yield modules
    if inserted and str(BENCH_DIR) in sys.path:
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture
def results(bench, monkeypatch):
    """bench/results.py with the device name faked (it names the results files and stamps every row)."""
    monkeypatch.setattr(bench.results, "device_name", lambda: FAKE_DEVICE)
    return bench.results


@pytest.fixture
def cpu_run(bench, results, monkeypatch):
    """What a script's main() needs from a GPU, replaced for a CPU run: the scripts' DEVICE, require_gpu /
    print_environment, do_bench (the call run twice, FAKE_MS returned), graph replay (the call run three
    times, FAKE_US_GRAPH returned), torch.compile (the function itself), the empty kernel, L2 size and the
    rotation target (small, so a few rotated copies are made)."""
    from fusedgpt.ops._backend import triton_interpreter_enabled

    if not triton_interpreter_enabled():  # only on a GPU machine: conftest.py sets it without a GPU
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    calls = {"graph": 0, "compile": 0}

    def fake_graph_us(function):
        calls["graph"] += 1
        for _ in range(3):
            function()
        return FAKE_US_GRAPH

    def fake_compile_fresh(function):
        calls["compile"] += 1
        return function

    common, timing = bench.common, bench.timing
    monkeypatch.setattr(common, "require_gpu", lambda: None)
    monkeypatch.setattr(common, "print_environment", lambda family: None)
    monkeypatch.setattr(common, "compile_fresh", fake_compile_fresh)
    monkeypatch.setattr(timing, "time_ms", lambda function: (function(), function(), FAKE_MS)[-1])
    monkeypatch.setattr(timing, "graph_us", fake_graph_us)
    monkeypatch.setattr(timing, "empty_kernel_step", lambda: (lambda index: None))
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda: 8 * 1024)
    monkeypatch.setattr(timing, "MIN_ROTATION_BYTES", 48 * 1024)
    for name in OP_FAMILIES:
        monkeypatch.setattr(getattr(bench, f"bench_{name}"), "DEVICE", "cpu")
    return calls


@pytest.fixture(scope="module", autouse=True)
def help_runs():
    """`python bench/<script>.py --help` for every script (one process each), started with this module and
    collected by test_help_exits_zero at the end, so the interpreter start-ups overlap with the tests."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    processes = {script: subprocess.Popen([sys.executable, str(BENCH_DIR / f"{script}.py"), "--help"], cwd=REPO_ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for script in SCRIPTS}
    outcomes = {}

    def outcome(script):
        if script not in outcomes:
            stdout, stderr = processes[script].communicate(timeout=120)
            outcomes[script] = (processes[script].returncode, stdout, stderr)
        return outcomes[script]

    yield outcome
    for process in processes.values():  # a test run cut short must not leave them behind
        if process.poll() is None:
            process.kill()
            process.communicate()


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def by_provider(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["case"], row["provider"]): row for row in rows}


def fake_row(family, case, provider, dtype="fp16", **values):
    return {"family": family, "case": case, "provider": provider, "dtype": dtype, **values}


def assert_plot(path: Path) -> None:
    """The PNG is there where perf_report can draw, and absent (a note instead) where it cannot."""
    if CAN_PLOT:
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not path.exists()


# ----------------------------------------------------------------------------------------------------
# Command lines: argument errors need no GPU, and come before any GPU work
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["bench_layer_norm", "bench_bias_act", "bench_kv_append", "bench_attention",
                                    "bench_decode_attention", "bench_generate"])
def test_main_argument_errors_before_gpu(bench, script):
    main = getattr(bench, script).main
    with pytest.raises(SystemExit, match="--dtypes"):
        main(["--dtypes", "fp32"])
    with pytest.raises(SystemExit, match="--providers"):
        main(["--providers", "no-such-provider"])
    if script in ("bench_attention", "bench_decode_attention", "bench_generate"):
        with pytest.raises(SystemExit, match="--cases: no case label matches"):
            main(["--cases", "no such case"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):  # valid arguments: the first GPU need stops it
            main(["--no-plot"])


def test_script_specific_argument_errors(bench, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="--activations"):
        bench.bench_bias_act.main(["--activations", "gelu_tanh,swish"])
    for argv, option in ((["--repeats", "0"], "--repeats"), (["--models", "gpt2-124m,gpt5"], "--models")):
        with pytest.raises(SystemExit, match=option):
            bench.bench_generate.main(argv)
    assert bench.bench_generate.parse_models(" OPT-125M, gpt2-124m,opt-125m", quick=False) == ["opt-125m", "gpt2-124m"]
    for argv, option in ((["--models", "gpt5"], "--models"), (["--modes", "decode"], "--modes")):
        monkeypatch.setattr(sys, "argv", ["bench_patching.py"] + argv)
        with pytest.raises(SystemExit, match=option):
            bench.bench_patching.main()
    with pytest.raises(SystemExit):
        bench.sanitize_ops.main(["--backends", "cuda,torch"])
    assert "--backends" in capsys.readouterr().err


def test_parsing(bench):
    common = bench.common
    assert common.parse_dtypes(" BF16 , half,float16,fp16,") == [torch.bfloat16, torch.float16]
    with pytest.raises(SystemExit, match="unknown dtype 'int8'"):
        common.parse_dtypes("fp16,int8")
    known = ("fusedgpt-cuda", "fusedgpt-triton", "torch-eager")
    # the script's order, not the command line's; duplicates and blanks dropped; none is an error
    assert common.parse_choices(" torch-eager,fusedgpt-cuda ,torch-eager,", known) == ["fusedgpt-cuda", "torch-eager"]
    with pytest.raises(SystemExit, match="--providers: no name"):
        common.parse_choices(" , ", known)
    cases = [{"name": "B1 L1024"}, {"name": "B16 L2048"}, {"name": "B1 L8192 w256"}]
    assert common.select_cases(cases, "^B1 ", lambda case: case["name"]) == [cases[0], cases[2]]
    args = common.argument_parser("x", dtypes="fp16").parse_args(["--out-dir", "somewhere"])
    assert args.dtypes == "fp16" and args.out_dir == Path("somewhere") and not args.merge
    assert common.argument_parser("x").parse_args([]).out_dir == BENCH_DIR / "results"


# ----------------------------------------------------------------------------------------------------
# Attention FLOPs: 4 * D per visible (query, key) pair, against an explicit mask
# ----------------------------------------------------------------------------------------------------

def explicit_visible_mask(q_len: int, kv_len: int, window: int | None, kv_start: list[int] | None = None):
    """(B or 1, Sq, Sk) booleans, written out pair by pair: query i sits at key position Sk - Sq + i and
    sees key j iff j <= that position, j > position - window, and j >= kv_start[b]."""
    starts = kv_start if kv_start is not None else [0]
    mask = [[[start <= j <= kv_len - q_len + i and (window is None or j > kv_len - q_len + i - window)
              for j in range(kv_len)] for i in range(q_len)] for start in starts]
    return torch.tensor(mask, dtype=torch.bool).reshape(len(starts), q_len, kv_len)


@pytest.mark.parametrize(("seq_len", "window"), [(1, None), (1, 1), (2, None), (7, None), (7, 1), (7, 3), (7, 7),
                                                 (7, 8), (13, 5), (33, 16), (40, 39), (40, 40), (64, 256), (257, 256)])
def test_attention_flops_are_four_d_per_visible_pair(bench, seq_len, window):
    from fusedgpt.ops.attention import visible_keys

    attention = bench.bench_attention
    visible = int(explicit_visible_mask(seq_len, seq_len, window).sum())
    assert attention.visible_pairs(seq_len, window) == visible
    spec = visible_keys(seq_len, seq_len, causal=True, window=window, kv_start=None, device="cpu")
    assert int(spec.sum()) == visible  # the kernels' specification counts the same pairs
    # QK^T: 2 * D FLOPs per visible (query, key) pair; PV: the same again.
    assert attention.attention_flops(3, 5, 80, seq_len, window) == 3 * 5 * (2 * 80 * visible + 2 * 80 * visible)
    # CONVENTIONS.md: causal = half the dense FLOPs (plus the diagonal)
    assert attention.attention_flops(1, 1, 64, 4096, None) == (4 * 64 * 4096 * 4096 + 4 * 64 * 4096) // 2


def test_explicit_mask_matches_the_spec_for_sq_lt_sk_and_padding():
    """The brute-force mask the counts rest on is the kernels' specification also where the attention
    benchmark does not go (bottom-right aligned Sq < Sk, kv_start padding)."""
    from fusedgpt.ops.attention import visible_keys

    for q_len, kv_len, window, starts in ((3, 11, None, [0, 4]), (5, 9, 3, [2, 0, 7]), (1, 6, 2, [5])):
        spec = visible_keys(q_len, kv_len, causal=True, window=window,
                            kv_start=torch.tensor(starts), device="cpu")  # (B, 1, Sq, Sk)
        assert torch.equal(spec[:, 0], explicit_visible_mask(q_len, kv_len, window, starts))


def test_attention_cases_and_labels(bench):
    attention = bench.bench_attention
    cases = attention.benchmark_cases(quick=False)
    assert len(cases) == 26  # the header's "26 cases"
    assert all(case["batch"] * case["seq_len"] == attention.TOKENS_PER_BATCH for case in cases)
    labels = [attention.case_label(case) for case in cases]
    assert len(set(labels)) == len(labels), "case labels must be unique: --merge keys rows on them"
    assert "B4 S4096 H16 D128 w256 s1" in labels  # the --cases example in --help
    windowed = [case for case in cases if case["window"] is not None]
    assert len(windowed) == 8 and all(case["scale"] == 1.0 and case["window"] == 256 for case in windowed)
    assert [case["window"] for case in attention.benchmark_cases(quick=True)] == [None, 256]
    assert [attention.mask_name(window, provider) for window, provider in (
        (None, "sdpa-flash"), (256, "sdpa-cudnn"), (256, "flex-attention"), (256, "fusedgpt-triton"))] == [
        "causal", "causal (no window)", "causal+window256", "causal+window256"]


# ----------------------------------------------------------------------------------------------------
# Bytes: decode attention's keys read against an explicit mask; the memory-bound ops' tensors
# ----------------------------------------------------------------------------------------------------

def decode_keys_read_brute_force(cache_len: int, window: int | None, appending: bool) -> int:
    """Cached keys the single new query sees: with the append, the sequence is the L cached keys plus the
    new token and the query sits at position L; without it, the query is the last cached position L - 1."""
    mask = explicit_visible_mask(1, cache_len + (1 if appending else 0), window)[0, 0]  # (Sk,)
    return int(mask[:cache_len].sum())  # the appended key (if any) is not read from the cache


@pytest.mark.parametrize("window", [None, 1, 2, 256])
@pytest.mark.parametrize("appending", [False, True])
def test_decode_keys_read_match_the_mask(bench, window, appending):
    for cache_len in (1, 2, 5, 254, 255, 256, 257, 300):
        assert bench.bench_decode_attention.keys_read(cache_len, window, appending) == \
            decode_keys_read_brute_force(cache_len, window, appending), cache_len


@pytest.mark.parametrize(("batch", "heads", "head_dim", "cache_len", "window", "dtype"),
                         [(1, 3, 64, 9, None, torch.float16), (2, 5, 80, 40, 16, torch.bfloat16),
                          (3, 2, 128, 7, 16, torch.float16), (1, 1, 64, 16, 16, torch.float32)])
@pytest.mark.parametrize(("appending", "with_lengths"), [(False, False), (False, True), (True, True)])
def test_decode_bytes_match_the_tensors_touched(bench, batch, heads, head_dim, cache_len, window, dtype, appending,
                                                with_lengths):
    decode = bench.bench_decode_attention
    k_cache = torch.empty(batch, cache_len + decode.CACHE_SLACK, heads, head_dim, dtype=dtype)  # (B, S_max, H, D)
    q = torch.empty(batch, decode.NEW_TOKENS, heads, head_dim, dtype=dtype)  # (B, T, H, D)
    cache_lens = torch.full((batch,), cache_len, dtype=torch.int32)
    expected = 2 * decode_keys_read_brute_force(cache_len, window, appending) * k_cache[:, :1].nbytes  # K and V
    expected += 2 * q.nbytes  # q read, out written
    if appending:
        expected += 4 * q.nbytes  # new k and v read, then written into the caches
    if with_lengths:
        expected += cache_lens.nbytes
    assert decode.decode_bytes(batch, heads, head_dim, cache_len, window, k_cache.element_size(),
                               appending=appending, with_lengths=with_lengths) == expected


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layer_norm_and_bias_act_bytes(bench, residual, dtype):
    from fusedgpt.ops import bias_act_reference, layer_norm_reference

    for tokens, hidden in ((1, 768), (3, 1001), (17, 1600)):
        x = torch.randn(tokens, hidden, dtype=dtype)
        skip = torch.randn(tokens, hidden, dtype=dtype) if residual else None
        weight, bias = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
        outputs = layer_norm_reference(x, weight, bias, 1e-5, skip)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        expected = sum(t.nbytes for t in [x, weight, bias] + ([skip] if residual else []) + list(outputs))
        assert bench.bench_layer_norm.effective_bytes(tokens, hidden, residual, x.element_size()) == expected
        y = bias_act_reference(x, bias, "gelu_tanh")
        assert bench.bench_bias_act.effective_bytes(tokens, hidden, x.element_size()) == x.nbytes + bias.nbytes + y.nbytes


def test_case_grids(bench):
    decode = bench.bench_decode_attention
    cases = decode.benchmark_cases(quick=False)
    assert len(cases) == len(decode.HEAD_SHAPES) * (len(decode.BATCH_CACHE_LENS) + 1)
    labels = [decode.case_label(case) for case in cases]
    assert len(set(labels)) == len(labels) and "B1 L8192 H32 D128 w256" in labels  # the --help example
    assert {decode.case_label(case) for case in decode.benchmark_cases(quick=True)} <= set(labels)
    layer_norm, bias_act, kv_append = bench.bench_layer_norm, bench.bench_bias_act, bench.bench_kv_append
    cases = layer_norm.benchmark_cases(quick=False)
    assert len(cases) == len(layer_norm.TOKEN_COUNTS) * len(layer_norm.HIDDEN_SIZES) + len(layer_norm.HIDDEN_SIZES)
    assert len({layer_norm.describe_case(case) for case in cases}) == len(cases)
    cases = bias_act.benchmark_cases(False, list(bias_act.ACTIVATIONS), False)
    assert len(cases) == 3 * 6 + 2 * 6  # gelu_tanh on every (tokens, width), the others at 16384 tokens only
    assert {case["tokens"] for case in cases if case["activation"] != "gelu_tanh"} == {bias_act.PREFILL_TOKENS}
    assert len({bias_act.describe_case(case) for case in cases}) == len(cases)
    assert len(bias_act.benchmark_cases(False, list(bias_act.ACTIVATIONS), True)) == 3 * 3 * 6
    cases = kv_append.benchmark_cases(quick=False)
    assert len(cases) == 8 and all(kv_append.POSITION + case["new_tokens"] <= kv_append.MAX_LEN for case in cases)


# ----------------------------------------------------------------------------------------------------
# Timing on triton.testing, input rotation, checks, rows
# ----------------------------------------------------------------------------------------------------

def test_measure_times_with_triton_testing(bench, monkeypatch, capsys):
    """measure() gives do_bench and do_bench_cudagraph (faked: no GPU) a call that takes the next rotated
    copy on every call, asks both for the median, and turns their ms into ms, us_graph, GB/s and TFLOP/s;
    a failure is the row's error, and a graph failure keeps the do_bench time."""
    import triton.testing

    modes = []

    def fake(milliseconds, calls):
        def do_bench(function, **kwargs):
            modes.append(kwargs["return_mode"])
            for _ in range(calls):
                function()
            return milliseconds
        return do_bench

    monkeypatch.setattr(triton.testing, "do_bench", fake(0.25, 2))
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", fake(0.0035, 3))
    steps = []
    row = bench.common.measure(family="f", case="c", provider="p", dtype=torch.float16, fields={"tokens": 3},
                               bytes_moved=10**9, flops=2 * 10**12, step=steps.append, with_graph=True,
                               verify=lambda: "ok")
    assert steps == [0, 1, 2, 3, 4] and modes == ["median", "median"]
    assert (row["ms"], row["us_graph"], row["check"], row["tokens"]) == (0.25, pytest.approx(3.5), "ok", 3)
    assert row["gbps"] == pytest.approx(4000.0) and row["tflops"] == pytest.approx(8000.0) and "error" not in row
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda *args, **kwargs: 1 / 0)
    row = bench.common.measure(family="f", case="c", provider="p", dtype=torch.bfloat16, fields={}, bytes_moved=0,
                               step=steps.append, with_graph=True)
    assert row["ms"] == 0.25 and row["error"] == "graph: ZeroDivisionError: division by zero" and "gbps" not in row
    assert "ERROR f c bf16 p: graph:" in capsys.readouterr().out


def test_empty_kernel_runs(bench):
    """The latency floor of every graph-timed script compiles and runs (under the interpreter on the CPU)."""
    scratch = torch.ones(1, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    bench.timing._empty_kernel[(1,)](scratch)
    assert scratch.item() == 0.0


@pytest.mark.parametrize("l2_mib", [50, 60, 126])
def test_rotation_copy_count(bench, monkeypatch, l2_mib):
    timing = bench.timing
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda: l2_mib * 2**20)
    target = max(128 * 2**20, int(2.5 * l2_mib * 2**20))
    for bytes_per_copy in (1, 1000, 3 * 2**20 + 1, 128 * 2**20 - 1, 128 * 2**20, 2**30):
        copies = timing.rotation_copy_count(bytes_per_copy)
        assert 1 <= copies <= timing.MAX_ROTATION_COPIES
        if copies < timing.MAX_ROTATION_COPIES:
            assert copies * bytes_per_copy >= target  # one pass exceeds the target
            assert copies == 1 or (copies - 1) * bytes_per_copy < target  # and no copy more than needed
        else:
            assert copies * bytes_per_copy <= target
    assert timing.rotation_copy_count(1, max_copies=10) == 10
    assert timing.rotation_copy_count(2**20) == target // 2**20


def test_rotated_copies(bench):
    timing = bench.timing
    x = torch.randn(3, 7, dtype=torch.float16)  # 42 bytes: not a multiple of the alignment
    y = torch.arange(5, dtype=torch.int32)
    copies = timing.rotated_copies([x, y], 4)
    assert len(copies) == 4
    for x_i, y_i in copies:
        assert torch.equal(x_i, x) and torch.equal(y_i, y) and x_i.is_contiguous()
        assert (x_i.data_ptr() - copies[0][0].data_ptr()) % timing.COPY_ALIGNMENT_BYTES == 0
        assert (y_i.data_ptr() - copies[0][1].data_ptr()) % timing.COPY_ALIGNMENT_BYTES == 0
    assert len({t.data_ptr() for copy in copies for t in copy}) == 8, "copies must not alias"
    copies[1][0].fill_(7.0)  # a write into one copy changes no other copy, and not the template
    assert torch.equal(copies[0][0], x) and torch.equal(copies[2][0], x) and not torch.equal(x, copies[1][0])
    with pytest.raises(ValueError, match="contiguous"):
        timing.rotated_copies([x.t()], 2)


def test_check_close(bench):
    check_close = bench.common.check_close
    expected = torch.randn(4, 9, dtype=torch.float16)
    off = expected.float()  # float32: the 0.5 added is exact
    off[2, 5] += 0.5
    poisoned = expected.clone()
    poisoned[0, 0] = float("nan")
    assert [check_close(actual, expected)[:22] for actual in (expected.float() + 1e-3, expected[:3], off, poisoned)] == [
        "ok", "MISMATCH shape (3, 9) ", "MISMATCH max_abs_err=0", "MISMATCH max_abs_err=n"]
    base = torch.ones(8, dtype=torch.bfloat16)  # bf16 gets a wider tolerance (6e-2) than fp16 (1e-2)
    assert check_close(base.float() * 1.03, base) == "ok" != check_close(base.half().float() * 1.03, base.half())


def test_add_speedups(bench):
    rows = [fake_row("f", "c1", "fusedgpt-triton", ms=1.0, us_graph=4.0),
            fake_row("f", "c1", "torch-eager", ms=3.0, us_graph=10.0),
            fake_row("f", "c1", "torch-compile", ms=2.0),
            fake_row("f", "c1", "empty-kernel", us_graph=2.0),
            fake_row("f", "c1", "fusedgpt-cuda", error="skipped"),
            fake_row("f", "c1", "torch-eager", dtype="bf16", ms=30.0),  # another dtype: not a peer of fp16
            fake_row("g", "c1", "fusedgpt-triton", ms=7.0)]  # another family: not a peer
    bench.results.add_speedups(rows)
    triton_row = rows[0]
    assert triton_row["ratio_vs_torch_eager"] == pytest.approx(3.0)
    assert triton_row["ratio_vs_torch_compile"] == pytest.approx(2.0)
    assert triton_row["graph_ratio_vs_torch_eager"] == pytest.approx(2.5)
    assert "graph_ratio_vs_torch_compile" not in triton_row  # compile has no graph latency
    assert rows[1]["ratio_vs_torch_compile"] == pytest.approx(2.0 / 3.0)
    assert not any("ratio" in key for row in (rows[3], rows[4]) for key in row), "no ratio: floor, error row"
    assert [key for key in rows[5] if "ratio" in key] == ["ratio_vs_torch_eager"]  # its own dtype's eager: itself
    assert "ratio_vs_torch_eager" not in rows[6]
    for peer in bench.results.PEERS:  # every ratio column add_speedups can write is a CSV column
        assert {f"ratio_vs_{peer.replace('-', '_')}", f"graph_ratio_vs_{peer.replace('-', '_')}"} <= \
            set(bench.results.CSV_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# The results CSV and its plot
# ----------------------------------------------------------------------------------------------------

def test_device_slug(results):
    assert results.device_slug("  NVIDIA  A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"
    assert results.device_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert results.device_slug("!!!") == "unknown-device"
    assert results.results_csv_path("out") == Path("out") / f"{SLUG}.csv"  # the fixture's device


def test_write_results_csv_columns_and_stamp(results, tmp_path):
    import triton

    rows = [fake_row("layer_norm", "1x768 res", "fusedgpt-triton", tokens=1, hidden=768, ms=0.0123456789,
                     gbps=None, check="ok", extra_column="kept")]
    path = results.write_results_csv(rows, "layer_norm", tmp_path / "new_dir")
    assert path == tmp_path / "new_dir" / f"{SLUG}.csv"
    columns, written = read_csv(path)
    assert columns[:len(results.CSV_COLUMNS)] == list(results.CSV_COLUMNS)
    assert columns[len(results.CSV_COLUMNS):] == ["extra_column"]  # unknown fields are appended, not lost
    (row,) = written
    assert row["ms"] == "0.0123457" and row["gbps"] == "" and row["extra_column"] == "kept"
    assert (row["device"], row["torch"], row["triton"]) == (FAKE_DEVICE, torch.__version__, triton.__version__)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["date"])
    assert not list(path.parent.glob("*.tmp")), "the temporary file is renamed into place"


def test_write_results_csv_replace_and_merge(results, tmp_path):
    first = [fake_row("layer_norm", "a", "p1", ms=1.0), fake_row("layer_norm", "a", "p2", ms=2.0),
             fake_row("layer_norm", "b", "p1", ms=3.0), fake_row("layer_norm", "a", "p1", dtype="bf16", ms=4.0),
             fake_row("bias_act", "a", "p1", ms=5.0)]
    path = results.write_results_csv(first, "layer_norm", tmp_path)
    assert len(read_csv(path)[1]) == 5
    # merge: only (case, dtype, provider) measured again is replaced; everything else stays
    results.write_results_csv([fake_row("layer_norm", "a", "p1", ms=9.0, my_extra="x")], "layer_norm", tmp_path,
                              merge=True)
    _, rows = read_csv(path)
    assert {(r["family"], r["case"], r["dtype"], r["provider"]): float(r["ms"]) for r in rows} == {
        ("layer_norm", "a", "fp16", "p2"): 2.0, ("layer_norm", "b", "fp16", "p1"): 3.0,
        ("layer_norm", "a", "bf16", "p1"): 4.0, ("bias_act", "a", "fp16", "p1"): 5.0,
        ("layer_norm", "a", "fp16", "p1"): 9.0}
    # another family, written after it (run_gpu.sh's order), keeps it and the columns of earlier rows
    results.write_results_csv([fake_row("bias_act", "a", "p1", ms=6.0)], "bias_act", tmp_path, merge=True)
    columns, rows = read_csv(path)
    assert len(rows) == 5 and "my_extra" in columns
    assert [r["case"] for r in results.read_family_rows(path, "layer_norm")] == ["a", "b", "a", "a"]
    # without merge: this family's rows are all replaced, other families' kept
    results.write_results_csv([fake_row("layer_norm", "c", "p3", ms=7.0)], "layer_norm", tmp_path)
    _, rows = read_csv(path)
    assert {(r["family"], r["case"], r["provider"]): float(r["ms"]) for r in rows} == {
        ("bias_act", "a", "p1"): 6.0, ("layer_norm", "c", "p3"): 7.0}


def test_plot(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    rows = [fake_row("bias_act", f"c{i}", provider, dtype=dtype, gbps=str(float(i + 1) * (2 if provider == "b" else 1)))
            for i in range(3) for provider in ("a", "b") for dtype in ("fp16", "bf16")]
    rows += [fake_row("bias_act", "c9", "a", gbps=""), fake_row("bias_act", "c3", "c", gbps=4.0)]  # a lone point
    path = results.plot(rows, "bias_act", tmp_path)
    assert path == tmp_path / f"{SLUG}_bias_act.png"
    assert_plot(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "perf_report's own CSV / HTML are not kept"
    assert results.plot([fake_row("x", "c", "a", error="e")], "x", tmp_path) is None
    assert "no GB/s (effective) was measured" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Each op script's main() end to end on the CPU (fake timing, real kernels under the interpreter)
# ----------------------------------------------------------------------------------------------------

def run_main(module, argv, tmp_path):
    assert module.main(argv + ["--out-dir", str(tmp_path)]) == 0
    columns, rows = read_csv(tmp_path / f"{SLUG}.csv")
    expected = importlib.import_module("results").CSV_COLUMNS  # bench/ is on sys.path (the bench fixture)
    assert columns[:len(expected)] == list(expected)
    return rows


def assert_timed(row, *, graph: bool):
    assert row["error"] == "", row["error"]
    assert row["check"] == "ok", (row["provider"], row["check"])
    assert float(row["ms"]) == FAKE_MS
    assert (float(row["us_graph"]) == FAKE_US_GRAPH) if graph else row["us_graph"] == ""


def test_layer_norm_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    import fusedgpt

    module = bench.bench_layer_norm
    cases = [{"tokens": 3, "hidden": 1001, "residual": True}, {"tokens": 40, "hidden": 64, "residual": False}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    rows = run_main(module, ["--dtypes", "fp16"], tmp_path)
    rows_by = by_provider(rows)
    assert len(rows) == 2 * len(module.PROVIDERS) - 1  # the empty kernel only where graphs are timed
    for case, graph, (tokens, hidden) in (("3x1001 res", True, (3, 1001)), ("40x64 nores", False, (40, 64))):
        for provider in ("fusedgpt-triton", "torch-eager", "torch-compile"):
            row = rows_by[(case, provider)]
            assert_timed(row, graph=graph)
            assert int(row["bytes"]) == module.effective_bytes(tokens, hidden, graph, 2)
            assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / (FAKE_MS * 1e-3) / 1e9, rel=1e-5)
            assert float(row["ratio_vs_torch_eager"]) == pytest.approx(1.0)
        assert rows_by[(case, "fusedgpt-cuda")]["error"] == bench.common.CUDA_EXTENSION_MISSING
    assert float(rows_by[("3x1001 res", "empty-kernel")]["us_graph"]) == FAKE_US_GRAPH
    assert ("40x64 nores", "empty-kernel") not in rows_by
    assert cpu_run["compile"] == 2 and cpu_run["graph"] == 4
    assert_plot(tmp_path / f"{SLUG}_layer_norm.png")


def test_bias_act_main_on_cpu_and_merge(bench, cpu_run, monkeypatch, tmp_path):
    """Every activation's rows; then a family split over two calls with --merge (the advice for
    long runs) ends up with both calls' rows, and a call without --merge replaces them."""
    module = bench.bench_bias_act
    monkeypatch.setattr(module, "benchmark_cases", lambda quick, activations, all_shapes: [
        {"activation": activation, "tokens": 5, "hidden": 1001} for activation in activations])
    rows = run_main(module, ["--dtypes", "fp16", "--providers", "fusedgpt-triton,torch-eager,torch-compile",
                             "--no-plot"], tmp_path)
    assert len(rows) == 3 * 3 and {row["activation"] for row in rows} == set(module.ACTIVATIONS)
    for row in rows:
        assert_timed(row, graph=True)
        assert int(row["bytes"]) == module.effective_bytes(5, 1001, 2)
    assert not list(tmp_path.glob("*.png"))
    common_args = ["--dtypes", "fp16", "--providers", "torch-eager", "--no-plot"]
    run_main(module, common_args + ["--activations", "relu"], tmp_path)
    rows = run_main(module, common_args + ["--activations", "gelu", "--merge"], tmp_path)
    assert sorted(row["case"] for row in rows) == ["gelu 5x1001", "relu 5x1001"]
    rows = run_main(module, common_args + ["--activations", "gelu"], tmp_path)
    assert [row["case"] for row in rows] == ["gelu 5x1001"]


def test_kv_append_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path, capsys):
    module = bench.bench_kv_append
    monkeypatch.setattr(module, "MAX_LEN", 24)
    monkeypatch.setattr(module, "POSITION", 9)
    cases = [{"batch": 2, "new_tokens": 3, "heads": 3, "head_dim": 64},
             {"batch": 1, "new_tokens": 1, "heads": 2, "head_dim": 128}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    rows = run_main(module, ["--dtypes", "fp16", "--providers",
                             "fusedgpt-triton,torch-eager,torch-compile,torch-copy-k-only,empty-kernel"], tmp_path)
    assert "Bar: fusedgpt kv_append" in capsys.readouterr().out
    rows_by = by_provider(rows)
    for case in cases:
        label = f"B{case['batch']} T{case['new_tokens']} H{case['heads']} D{case['head_dim']}"
        one = case["batch"] * case["new_tokens"] * case["heads"] * case["head_dim"] * 2  # bytes of k (or v)
        for provider in ("fusedgpt-triton", "torch-eager", "torch-compile", "torch-copy-k-only"):
            row = rows_by[(label, provider)]
            assert_timed(row, graph=True)
            # read k and v and the int32 positions, write k and v; the K-only copy: read and write k
            assert int(row["bytes"]) == (2 * one if provider == "torch-copy-k-only" else 4 * one + 4 * case["batch"])
        assert float(rows_by[(label, "fusedgpt-triton")]["ratio_vs_torch_copy_k_only"]) == pytest.approx(1.0)
        assert float(rows_by[(label, "empty-kernel")]["us_graph"]) == FAKE_US_GRAPH


def test_kv_append_print_bar(bench, capsys):
    kv = bench.bench_kv_append
    rows = [fake_row("kv_append", "c1", "fusedgpt-triton", ms=1.0, us_graph=2.0),
            fake_row("kv_append", "c1", "fusedgpt-cuda", ms=0.8, us_graph=5.0),
            fake_row("kv_append", "c1", kv.COPY_K_ONLY, ms=0.9, us_graph=2.5),
            fake_row("kv_append", "c2", "fusedgpt-triton", ms=1.0),
            fake_row("kv_append", "c2", kv.COPY_K_ONLY, error="failed")]
    kv.print_bar(rows)
    lines = capsys.readouterr().out.splitlines()
    c1 = next(line for line in lines if line.startswith("c1"))
    assert "PASS 1.12x (cuda)" in c1 and "PASS 1.25x (triton)" in c1  # the faster fusedgpt of each timing
    assert next(line for line in lines if line.startswith("c2")).split()[2:] == ["n/a", "n/a"]
    rows[2]["ms"] = 0.4
    kv.print_bar(rows[:3])
    assert "FAIL 0.50x (cuda)" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_attention
    monkeypatch.setattr(module, "CHECK_QUERIES", 8)  # fewer than the sequence: the slices are checked
    cases = [{"batch": 2, "seq_len": 24, "heads": 2, "head_dim": 64, "window": None, "scale": None},
             {"batch": 1, "seq_len": 40, "heads": 3, "head_dim": 80, "window": 16, "scale": 1.0}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    providers = "fusedgpt-cuda,fusedgpt-triton,sdpa-flash,flex-attention,flash-attn"
    rows_by = by_provider(run_main(module, ["--dtypes", "fp16", "--providers", providers], tmp_path))
    for case in cases:
        label = module.case_label(case)
        for provider in ("fusedgpt-triton", "sdpa-flash", "flex-attention"):
            row = rows_by[(label, provider)]
            assert_timed(row, graph=False)
            computed_window = None if provider == "sdpa-flash" else case["window"]
            pairs = int(explicit_visible_mask(case["seq_len"], case["seq_len"], computed_window).sum())
            assert int(row["flops"]) == 4 * case["batch"] * case["heads"] * case["head_dim"] * pairs
            assert float(row["tflops"]) == pytest.approx(int(row["flops"]) / (FAKE_MS * 1e-3) / 1e12, rel=1e-5)
            assert row["bytes"] == "" and row["mask"] == module.mask_name(case["window"], provider)
        assert rows_by[(label, "fusedgpt-cuda")]["error"].startswith("skipped: ")  # the probe failed on the CPU
        assert rows_by[(label, "flash-attn")]["error"].startswith("not installed: ")
        assert float(rows_by[(label, "fusedgpt-triton")]["ratio_vs_sdpa_flash"]) == pytest.approx(1.0)
    assert cpu_run["compile"] == 2  # flex-attention: a fresh compile per case
    assert_plot(tmp_path / f"{SLUG}_attention.png")


def test_decode_attention_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_decode_attention
    cases = [{"batch": 1, "cache_len": 20, "heads": 2, "head_dim": 64, "window": None},
             {"batch": 2, "cache_len": 21, "heads": 3, "head_dim": 64, "window": 8},
             {"batch": 1, "cache_len": 5, "heads": 2, "head_dim": 128, "window": 8}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    rows_by = by_provider(run_main(module, ["--dtypes", "fp16"], tmp_path))
    for case in cases:
        label = module.case_label(case)
        batch, length, window = case["batch"], case["cache_len"], case["window"]
        for provider in ("fusedgpt-triton", module.NOAPPEND, "sdpa"):
            row = rows_by[(label, provider)]
            assert_timed(row, graph=batch == 1)
            assert float(row["us"]) == pytest.approx(FAKE_MS * 1000)
            assert int(row["bytes"]) == module.decode_bytes(batch, case["heads"], case["head_dim"], length, window, 2,
                                                            appending=provider in module.APPENDING,
                                                            with_lengths=provider != "sdpa")
            assert int(row["max_len"]) == length + module.CACHE_SLACK and int(row["position"]) == length
        assert rows_by[(label, "flash-attn")]["error"].startswith("not installed: ")
        assert rows_by[(label, "fusedgpt-cuda")]["error"].startswith("skipped: ")
        assert ((label, "empty-kernel") in rows_by) == (batch == 1)
        assert float(rows_by[(label, module.NOAPPEND)]["ratio_vs_sdpa"]) == pytest.approx(1.0)
    assert_plot(tmp_path / f"{SLUG}_decode_attention.png")


def test_headline_runs_its_cases_and_providers_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    """--headline runs headline_cases() (not the grid) with HEADLINE_PROVIDERS, fusedgpt-torch (the torch
    backend) timed like the others."""
    import fusedgpt

    module = bench.bench_layer_norm
    monkeypatch.setattr(module, "headline_cases", lambda: [{"tokens": 40, "hidden": 1001, "residual": True}])
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: pytest.fail("--headline ran the grid"))
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    rows = run_main(module, ["--headline", "--dtypes", "fp16", "--no-plot"], tmp_path)
    assert [row["provider"] for row in rows] == list(module.HEADLINE_PROVIDERS)
    rows_by = by_provider(rows)
    for provider in ("fusedgpt-triton", "fusedgpt-torch", "torch-compile"):
        assert_timed(rows_by[("40x1001 res", provider)], graph=False)
    assert float(rows_by[("40x1001 res", "fusedgpt-torch")]["ratio_vs_torch_compile"]) == pytest.approx(1.0)
    assert rows_by[("40x1001 res", "fusedgpt-cuda")]["error"] == bench.common.CUDA_EXTENSION_MISSING


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_headline_runs_each_cases_own_peers_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_attention
    monkeypatch.setattr(module, "CHECK_QUERIES", 8)
    cases = [{"batch": 2, "seq_len": 24, "heads": 2, "head_dim": 64, "window": None, "scale": None,
              "providers": ("fusedgpt-triton", "fusedgpt-torch", "sdpa-flash")},
             {"batch": 1, "seq_len": 40, "heads": 2, "head_dim": 64, "window": 16, "scale": 1.0,
              "providers": ("fusedgpt-torch", "flex-attention")}]
    monkeypatch.setattr(module, "headline_cases", lambda: cases)
    rows = run_main(module, ["--headline", "--dtypes", "fp16", "--no-plot"], tmp_path)
    for case in cases:
        label = module.case_label(case)
        case_rows = [row for row in rows if row["case"] == label]
        assert [row["provider"] for row in case_rows] == list(case["providers"])
        for row in case_rows:
            assert_timed(row, graph=False)
            assert row["mask"] == module.mask_name(case["window"], row["provider"])
    assert cpu_run["compile"] == 1  # flex-attention only where its case asks for it


def test_decode_attention_headline_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    """The torch backend appends like the kernels: its bytes count the append, its check the new k."""
    module = bench.bench_decode_attention
    cases = [{"batch": 1, "cache_len": 20, "heads": 2, "head_dim": 64, "window": None},
             {"batch": 3, "cache_len": 9, "heads": 2, "head_dim": 64, "window": None}]
    monkeypatch.setattr(module, "headline_cases", lambda: cases)
    rows = run_main(module, ["--headline", "--dtypes", "fp16", "--no-plot"], tmp_path)
    rows_by = by_provider(rows)
    for case in cases:
        label = module.case_label(case)
        providers = [row["provider"] for row in rows if row["case"] == label]
        assert providers == [p for p in module.HEADLINE_PROVIDERS if p != "empty-kernel" or case["batch"] == 1]
        row = rows_by[(label, "fusedgpt-torch")]
        assert_timed(row, graph=case["batch"] == 1)
        assert int(row["bytes"]) == module.decode_bytes(case["batch"], 2, 64, case["cache_len"], None, 2,
                                                        appending=True, with_lengths=True)


def test_the_csv_is_written_after_every_case(bench, cpu_run, monkeypatch, tmp_path):
    """A run stopped part-way (SIGINT at its time budget raises KeyboardInterrupt) leaves the rows of every
    case it finished in the CSV, ratios included."""
    module = bench.bench_bias_act
    cases = [{"activation": "relu", "tokens": 5, "hidden": 64}, {"activation": "gelu", "tokens": 5, "hidden": 64}]
    monkeypatch.setattr(module, "benchmark_cases", lambda *args: cases)
    real_run_case = module.run_case

    def run_case(case, *args):
        if case["activation"] == "gelu":
            raise KeyboardInterrupt
        return real_run_case(case, *args)

    monkeypatch.setattr(module, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--dtypes", "fp16", "--providers", "fusedgpt-triton,torch-eager", "--out-dir", str(tmp_path)])
    rows = read_csv(tmp_path / f"{SLUG}.csv")[1]
    assert sorted((row["case"], row["provider"]) for row in rows) == [("relu 5x64", "fusedgpt-triton"),
                                                                       ("relu 5x64", "torch-eager")]
    assert all(float(row["ratio_vs_torch_eager"]) == pytest.approx(1.0) for row in rows)
    assert not list(tmp_path.glob("*.png")), "the plot comes at the end only"


# ----------------------------------------------------------------------------------------------------
# End-to-end benchmarks: model sizes, bytes per decode step, rates and ratios, tiny models on the CPU
# ----------------------------------------------------------------------------------------------------

# name -> (layers, hidden, heads, ffn, vocab, positions, parameters of the published checkpoint)
PUBLISHED_SIZES = {
    "gpt2-124m": (12, 768, 12, 3072, 50257, 1024, 124_439_808),
    "opt-125m": (12, 768, 12, 3072, 50272, 2048, 125_239_296),
    "gpt-neo-125m": (12, 768, 12, 3072, 50257, 2048, 125_198_592),
    "opt-1.3b": (24, 2048, 32, 8192, 50272, 2048, 1_315_758_080),
    "gpt-neo-1.3b": (24, 2048, 16, 8192, 50257, 2048, 1_315_575_808),
}


def meta_model(config, dtype=torch.float16):
    import transformers

    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.mark.parametrize("name", list(PUBLISHED_SIZES))
def test_model_configs_have_the_published_sizes(bench, name):
    import fusedgpt

    configs = bench.models.MODEL_CONFIGS
    assert set(configs) == set(PUBLISHED_SIZES)
    layers, hidden, heads, ffn, vocab, positions, parameters = PUBLISHED_SIZES[name]
    hf_config = configs[name]()
    assert hf_config is not configs[name](), "each call builds a fresh config"
    gpt_config = fusedgpt.models.convert_config(hf_config)
    assert (gpt_config.num_layers, gpt_config.hidden_size, gpt_config.num_heads) == (layers, hidden, heads)
    assert (gpt_config.ffn_size, gpt_config.vocab_size, hf_config.max_position_embeddings) == (ffn, vocab, positions)
    assert hf_config.tie_word_embeddings is True
    if name.startswith("gpt-neo"):
        assert gpt_config.attention_windows == [None, 256] * (layers // 2)
        assert gpt_config.attention_scales == [1.0] * layers  # GPT-Neo does not scale its scores
    else:
        assert gpt_config.attention_windows == [None] * layers
    assert hf_config.activation_function == ("relu" if name.startswith("opt") else "gelu_new")
    assert sum(p.numel() for p in meta_model(hf_config).parameters()) == parameters
    # every prompt + new tokens of bench_generate and bench_patching fits the position table
    generate, patching = bench.bench_generate, bench.bench_patching
    assert all(prompt + new <= positions
               for _, prompt, new in generate.CASES + generate.QUICK_CASES + generate.HEADLINE_CASES)
    assert patching.PREFILL_TOKENS <= positions
    assert patching.PROMPT_TOKENS + max(patching.NEW_TOKENS, patching.QUICK_NEW_TOKENS) <= positions


def test_generate_decode_bytes_per_step(bench):
    """bench_generate's bandwidth bound: weights once (tied embedding once, no position table) + the KV
    cache each decode step reads and writes, from an explicit mask per layer."""
    import fusedgpt

    generate, configs = bench.bench_generate, bench.models.MODEL_CONFIGS
    for name, prompt, new, batch in (("gpt2-124m", 5, 4, 2), ("gpt-neo-125m", 250, 12, 3), ("opt-125m", 1, 2, 1)):
        hf_config = configs[name]()
        gpt_config = fusedgpt.models.convert_config(hf_config)
        parameters = PUBLISHED_SIZES[name][-1]
        position_table = {"gpt2-124m": 1024 * 768, "gpt-neo-125m": 2048 * 768, "opt-125m": (2048 + 2) * 768}[name]
        result = generate.decode_bytes_per_step(meta_model(hf_config), gpt_config, batch, prompt, new, 2)
        assert result["params"] == parameters
        assert result["weight_bytes"] == 2 * (parameters - position_table)
        per_slot = 2 * batch * gpt_config.num_heads * gpt_config.head_dim * 2  # K and V, one position
        total = 0
        for step in range(1, new):  # the first new token comes from the prefill; step k feeds position prompt + k - 1
            position = prompt + step - 1
            for window in gpt_config.attention_windows:
                visible = int(explicit_visible_mask(1, position + 1, window).sum())  # cached + the new one
                total += per_slot * (visible + 1)  # + the new K, V written
        assert result["kv_bytes_per_step"] == pytest.approx(total / (new - 1))
        assert result["bytes"] == int(result["weight_bytes"] + total / (new - 1))
    # untied: the token embedding is only gathered (not counted), the lm_head is read whole
    hf_config = configs["gpt2-124m"]()
    hf_config.tie_word_embeddings = False
    result = generate.decode_bytes_per_step(meta_model(hf_config), fusedgpt.models.convert_config(hf_config), 1, 8, 2, 2)
    assert result["params"] == 124_439_808 + 50257 * 768
    assert result["weight_bytes"] == 2 * (124_439_808 - 1024 * 768)


def test_generate_rates_agreement_and_ratios(bench, results, tmp_path):
    generate = bench.bench_generate
    row = {"bytes": 4 * 10**9, "bound_tokens_per_s": 1000.0}
    generate.fill_rates(row, {"prefill_s": 0.5, "decode_s": 2.0, "total_s": 2.5}, batch=4, prompt=128, new=11)
    assert (row["prefill_ms"], row["decode_ms"], row["total_ms"]) == pytest.approx((500.0, 2000.0, 2500.0))
    assert row["ms"] == pytest.approx(200.0)  # 10 decode steps
    assert row["tokens_per_s"] == pytest.approx(4 * 10 / 2.0)
    assert row["e2e_tokens_per_s"] == pytest.approx(4 * 11 / 2.5)
    assert row["prefill_tokens_per_s"] == pytest.approx(4 * 128 / 0.5)
    assert row["gbps"] == pytest.approx(4 * 10**9 / 0.2 / 1e9)
    assert row["fraction_of_bound"] == pytest.approx(20.0 / 1000.0)

    prompt = [9, 9]
    reference = torch.tensor([prompt + [1, 2, 3, 4], prompt + [5, 6, 7, 8]])
    mine = torch.tensor([prompt + [1, 2, 0, 4], prompt + [5, 6, 7, 8]])
    rows = [{"case": "c", "provider": "fusedgpt", "seq_len": 2}, {"case": "c", "provider": "hf-eager", "seq_len": 2},
            {"case": "c", "provider": "hf-sdpa", "seq_len": 2}, {"case": "d", "provider": "fusedgpt", "seq_len": 2}]
    generate.add_agreement(rows, {("c", "fusedgpt"): mine, ("c", "hf-eager"): reference,
                                  ("c", "hf-sdpa"): reference[:, :5], ("d", "fusedgpt"): mine})
    assert rows[0]["agreement_vs_hf_eager"] == pytest.approx(7 / 8)
    assert rows[0]["agreement_prefix_vs_hf_eager"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert not any("agreement_vs_hf_eager" in row for row in rows[1:]), "itself, another shape, no reference"

    rows = [fake_row("generate", "device-copy 1GiB", "torch-copy", gbps=3000.0, ms=0.7),
            fake_row("generate", "m b1", "fusedgpt", ms=1.0, tokens_per_s=1000.0, bound_tokens_per_s=4000.0),
            fake_row("generate", "m b1", "hf-eager", ms=10.0, tokens_per_s=100.0, bound_tokens_per_s=4000.0),
            fake_row("generate", "m b1", "hf-sdpa", ms=5.0, tokens_per_s=200.0, bound_tokens_per_s=4000.0),
            fake_row("generate", "m b1", "hf-static-compiled", ms=2.0, tokens_per_s=500.0, bound_tokens_per_s=4000.0),
            fake_row("generate", "m b16", "fusedgpt", error="out of memory", bound_tokens_per_s=50.0),
            fake_row("generate", "m b16", "hf-eager", ms=4.0, tokens_per_s=4000.0, bound_tokens_per_s=50.0)]
    generate.add_ratios(rows)
    fused = rows[1]
    assert fused["ratio_vs_hf_eager"] == pytest.approx(10.0)  # a tokens/s ratio: ms is per decode step
    assert fused["ratio_vs_hf_sdpa"] == pytest.approx(5.0) and fused["ratio_vs_hf_static_compiled"] == pytest.approx(2.0)
    assert fused["ratio_vs_hf_best_dynamic"] == pytest.approx(1000.0 / 200.0)
    assert "ratio_vs_hf_best_dynamic" not in rows[4], "transformers' own providers are not ranked against it"
    assert "ratio_vs_hf_eager" not in rows[5] and not any(key.startswith("ratio") for key in rows[0])
    path = results.write_results_csv(rows, "generate", tmp_path)
    bounds = [(row["case"], float(row["tokens_per_s"])) for row in generate.plot_rows(path)
              if row["provider"] == generate.BOUND_PROVIDER]
    assert bounds == [("m b1", 4000.0), ("m b16", 50.0)]
    # finish with --merge: (m b1, fusedgpt) replaced, everything else kept
    generate.finish([fake_row("generate", "m b1", "fusedgpt", ms=0.9, tokens_per_s=1100.0)],
                    argparse.Namespace(out_dir=tmp_path, merge=True, no_plot=False))
    assert len(read_csv(path)[1]) == len(rows)
    assert_plot(tmp_path / f"{SLUG}_generate.png")


def test_generate_headline_and_rows_written_after_every_provider(bench, results, monkeypatch, tmp_path):
    """--headline: GPT-2 124M and OPT-1.3B, b1 p128 n128, fusedgpt / hf-eager / hf-sdpa; a run stopped
    during OPT-1.3B's second provider keeps the device copy, GPT-2's rows and OPT's first provider."""
    generate = bench.bench_generate
    monkeypatch.setattr(bench.common, "require_gpu", lambda: None)
    monkeypatch.setattr(bench.common, "print_environment", lambda family: None)
    monkeypatch.setattr(generate, "measure_copy_bandwidth", lambda: 4000.0)
    calls = []

    def run_model(model_name, dtype, cases, providers, repeats, copy_gbps, progress=None):
        calls.append((model_name, list(cases), list(providers), repeats))
        rows = []
        for provider in providers:
            if model_name == "opt-1.3b" and provider == "hf-eager":
                raise KeyboardInterrupt  # the time budget ran out here
            rows.append(fake_row("generate", generate.case_label(model_name, *cases[0]), provider, ms=1.0,
                                 tokens_per_s=100.0, check="ok"))
            progress(rows)
        return rows

    monkeypatch.setattr(generate, "run_model", run_model)
    with pytest.raises(KeyboardInterrupt):
        generate.main(["--headline", "--repeats", "2", "--out-dir", str(tmp_path), "--no-plot"])
    expected = (list(generate.HEADLINE_CASES), list(generate.HEADLINE_PROVIDERS), 2)
    assert calls == [("gpt2-124m", *expected), ("opt-1.3b", *expected)]
    rows = read_csv(tmp_path / f"{SLUG}.csv")[1]
    assert [(row["case"], row["provider"]) for row in rows] == [
        ("device-copy 1GiB", "torch-copy"), ("gpt2-124m b1 p128 n128", "fusedgpt"),
        ("gpt2-124m b1 p128 n128", "hf-eager"), ("gpt2-124m b1 p128 n128", "hf-sdpa"),
        ("opt-1.3b b1 p128 n128", "fusedgpt")]
    assert float(rows[1]["ratio_vs_hf_eager"]) == pytest.approx(1.0)


def test_patching_add_ratios(bench):
    rows = [fake_row("patching", "m:prefill", "hf-eager", ms=10.0), fake_row("patching", "m:prefill", "hf-sdpa", ms=4.0),
            fake_row("patching", "m:prefill", "fusedgpt-triton", ms=2.0),
            fake_row("patching", "m:prefill", "fusedgpt-cuda", error="skipped"),
            fake_row("patching", "neo:prefill", "hf-eager", ms=6.0),
            fake_row("patching", "neo:prefill", "hf-sdpa", error="skipped: GPT-Neo has no sdpa"),
            fake_row("patching", "neo:prefill", "fusedgpt-triton", ms=3.0)]
    bench.bench_patching.add_ratios(rows)
    assert rows[2]["ratio_vs_hf_eager"] == pytest.approx(5.0) and rows[2]["ratio_vs_hf_sdpa"] == pytest.approx(2.0)
    assert rows[2]["ratio_vs_best_hf"] == pytest.approx(2.0) and "ratio_vs_best_hf" not in rows[3]
    assert rows[6]["ratio_vs_best_hf"] == pytest.approx(2.0) and "ratio_vs_hf_sdpa" not in rows[6]


def tiny_gpt2_config():
    import transformers

    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)


def tiny_neo_config():
    import transformers

    return transformers.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                     window_size=8, max_position_embeddings=64, vocab_size=100, bos_token_id=None,
                                     eos_token_id=None)


def test_generate_run_model_on_cpu(bench, results, monkeypatch, tmp_path):
    generate = bench.bench_generate
    monkeypatch.setattr(generate, "DEVICE", "cpu")
    monkeypatch.setitem(bench.models.MODEL_CONFIGS, "tiny-gpt2", tiny_gpt2_config)
    monkeypatch.setitem(bench.models.MODEL_CONFIGS, "tiny-neo", tiny_neo_config)
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # the reference ops: fast on the CPU
    real_timed_calls = generate.timed_calls

    def timed_calls(function, repeats):  # wall clock on a loaded CPU proves nothing: 1 ms per output token
        _, result = real_timed_calls(function, repeats)
        return [1e-3 * getattr(result, "ids", result).shape[1]] * repeats, result

    monkeypatch.setattr(generate, "timed_calls", timed_calls)
    batch, prompt, new = 2, 5, 6
    rows = generate.run_model("tiny-gpt2", torch.float32, [(batch, prompt, new)], ["fusedgpt", "hf-eager", "hf-sdpa"],
                              repeats=1, copy_gbps=100.0)
    rows_by = {row["provider"]: row for row in rows}
    assert set(rows_by) == {"fusedgpt", "hf-eager", "hf-sdpa"}
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["check"] == "ok" and row["case"] == "tiny-gpt2 b2 p5 n6" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] == pytest.approx(batch * (new - 1) / (row["decode_ms"] / 1e3))
        assert row["bound_tokens_per_s"] == pytest.approx(batch * 100.0 * 1e9 / row["bytes"])
        assert (row["heads"], row["head_dim"], row["layers"]) == (4, 8, 2)
    assert rows_by["fusedgpt"]["attn"] == "torch" and 0.0 <= rows_by["fusedgpt"]["agreement_vs_hf_eager"] <= 1.0
    assert rows_by["hf-sdpa"]["agreement_vs_hf_eager"] == pytest.approx(1.0)  # same weights, fp32
    generate.finish(rows, argparse.Namespace(out_dir=tmp_path, merge=False, no_plot=False))
    assert len(read_csv(tmp_path / f"{SLUG}.csv")[1]) == 3
    assert_plot(tmp_path / f"{SLUG}_generate.png")

    # GPT-Neo has no sdpa in transformers: hf-sdpa is an error row, hf-static-compiled falls back to eager
    rows = generate.run_model("tiny-neo", torch.float32, [(1, 10, 4)], ["hf-eager", "hf-sdpa", "hf-static-compiled"],
                              repeats=1, copy_gbps=None)
    rows_by = {row["provider"]: row for row in rows}
    assert rows_by["hf-sdpa"]["error"].startswith("ValueError") and "tokens_per_s" not in rows_by["hf-sdpa"]
    static = rows_by["hf-static-compiled"]
    assert "error" not in static and static["attn"] == "eager" and static["check"] == "ok"
    assert "bound_tokens_per_s" not in static and "fraction_of_bound" not in static  # no copy bandwidth
    # KV bytes: the local layer reads at most its window of 8 (plus the write), the global one everything
    per_slot = 2 * 1 * 4 * 8 * 4
    kv = sum(per_slot * ((10 + k) + 1) + per_slot * (min(10 + k, 8) + 1) for k in (1, 2, 3)) / 3
    assert static["kv_bytes_per_step"] == pytest.approx(kv)


def test_patching_providers_and_modes_on_cpu(bench, monkeypatch):
    import fusedgpt
    import transformers

    patching = bench.bench_patching
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # restored after the test: use_provider sets it
    monkeypatch.setattr(bench.timing, "time_ms", lambda function: (function(), FAKE_MS)[-1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_gpt2_config(), attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    inputs = {"prefill": torch.randint(1, 100, (2, 9)),
              "prompt": (torch.randint(1, 100, (2, 5)), torch.ones(2, 5, dtype=torch.int64))}
    reference: dict = {}
    measured = {}
    with torch.no_grad():
        for provider in ("hf-eager", "hf-sdpa", "fusedgpt-triton"):
            assert patching.use_provider(model, provider) is None
            if provider == "fusedgpt-triton":
                assert os.environ["FUSEDGPT_BACKEND"] == "triton"
                monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # keep the run fast: the reference ops
            for mode in ("prefill", "generate", "generate-static"):
                measured[(provider, mode)] = patching.measure_mode(model, mode, inputs, 3, 1, reference)
        fusedgpt.unpatch(model)
    assert measured[("hf-eager", "prefill")]["check"] is None  # the first provider is the reference
    assert measured[("hf-sdpa", "prefill")]["check"] == "ok" and measured[("fusedgpt-triton", "prefill")]["check"] == "ok"
    for (provider, mode), result in measured.items():
        tokens = 18 if mode == "prefill" else 2 * 3
        assert result["tokens"] == tokens and result["tokens_per_s"] == pytest.approx(tokens / (result["ms"] * 1e-3))
        assert result["ms"] == FAKE_MS if mode == "prefill" else result["new_tokens"] == 3
    neo = transformers.AutoModelForCausalLM.from_config(tiny_neo_config(), attn_implementation="eager")
    assert "GPT-Neo has no sdpa" in patching.use_provider(neo, "hf-sdpa")
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    assert patching.use_provider(neo, "fusedgpt-cuda") == bench.common.CUDA_EXTENSION_MISSING


# ----------------------------------------------------------------------------------------------------
# Every script starts and prints its help without a GPU (processes started with the module, see help_runs)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(help_runs, script):
    returncode, stdout, stderr = help_runs(script)
    assert returncode == 0, f"{script}.py --help exited {returncode}:\n{stderr[-3000:]}"
    assert stdout.startswith("usage:"), stdout[:200]
    expected_options = ("--backends",) if script == "sanitize_ops" else ("--dtypes", "--providers", "--out-dir", "--merge")
    for option in expected_options:
        assert option in stdout, f"{script}.py --help does not mention {option}"


def test_generate_cpu_rows(bench, monkeypatch, tmp_path, capsys):
    """bench_generate.py --cpu: fusedgpt and transformers' eager / sdpa generate on the CPU (issue 14's rows),
    here on the embedded model with one repeat; wall-clock numbers on a loaded CPU prove nothing, so the
    test checks the rows, the tokens and the ratios' arithmetic, not the speed."""
    generate = bench.bench_generate
    monkeypatch.setattr(generate, "CPU_CASE", (1, 6, 5))
    assert generate.main(["--cpu", "--models", "embedded", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.csv")
    with open(path, newline="") as handle:
        rows = {row["provider"]: row for row in csv.DictReader(handle) if row["family"] == "generate"}
    assert set(rows) == {"fusedgpt", "hf-eager", "hf-sdpa"}
    assert all(row["check"] == "ok" and row["case"] == "cpu embedded b1 p6 n5" for row in rows.values())
    fused = rows["fusedgpt"]
    assert float(fused["ratio_vs_hf_eager"]) == pytest.approx(float(rows["hf-eager"]["ms"]) / float(fused["ms"]), rel=1e-4)
    best = min(float(rows["hf-eager"]["ms"]), float(rows["hf-sdpa"]["ms"]))
    assert float(fused["ratio_vs_hf_best_dynamic"]) == pytest.approx(best / float(fused["ms"]), rel=1e-4)
    assert float(fused["target"]) == 1.2
    with pytest.raises(SystemExit, match="unknown"):
        generate.main(["--cpu", "--models", "opt-1.3b"])



def test_train_cpu_rows(bench, monkeypatch, tmp_path):
    """bench_train.py --cpu: one AdamW step of every provider on the embedded model's shape. The check
    column is each provider's first loss against transformers eager's (same weights, same batch), which
    must agree to float32 rounding; the ratios are the ms' quotients; speed itself proves nothing here."""
    train = bench.bench_train
    monkeypatch.setattr(train, "CPU_CASE", (2, 12))
    assert train.main(["--cpu", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.csv")
    with open(path, newline="") as handle:
        rows = {row["provider"]: row for row in csv.DictReader(handle) if row["family"] == "train"}
    assert set(rows) == set(train.PROVIDERS)
    assert all(row["case"] == "embedded b2 s12" and not row.get("error") for row in rows.values())
    assert all(float(row["check"]) < 1e-5 for row in rows.values())
    fused = rows["fusedgpt-patch"]
    assert float(fused["ratio_vs_hf_eager"]) == pytest.approx(float(rows["hf-eager"]["ms"]) / float(fused["ms"]),
                                                               rel=1e-4)
    assert float(fused["tokens_per_s"]) == pytest.approx(2 * 12 / (float(fused["ms"]) / 1e3), rel=1e-4)
    with pytest.raises(SystemExit, match="unknown"):
        train.main(["--models", "opt-66b"])

def test_sanitize_ops_attention_exercises_on_the_cpu(bench, monkeypatch):
    """sanitize_ops.py's attention and decode exercises (what racecheck watches on a GPU), run here on the
    Triton kernels under the interpreter: they pass on correct kernels and report a wrong one."""
    sanitize = bench.sanitize_ops
    monkeypatch.setattr(sanitize, "DEVICE", "cpu")
    failures: list[str] = []
    sanitize.exercise_attention("triton", failures, head_dims=(64,), queries=21)
    sanitize.exercise_decode_attention("triton", failures, head_dims=(64,))
    assert failures == []
    monkeypatch.setattr(sanitize, "attention", lambda q, k, v, **kwargs: torch.zeros_like(q))
    sanitize.exercise_attention("triton", failures, head_dims=(64,), queries=21)
    assert len(failures) == 3 and all("max abs error" in failure for failure in failures)
