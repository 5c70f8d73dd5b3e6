"""Tests of the benchmark scripts' pure-Python logic (bench/), on the CPU, so that the one scarce GPU run
does not die on a Python bug: every script's --help; the FLOP and byte counts behind TFLOP/s and GB/s
against brute-force counts from explicit masks and tensors; the helpers of bench/common.py (parsing,
rotation, ratios, CSV writing and merging, PNG plots); MODEL_CONFIGS against the published model sizes;
and each op script's main() end to end on tiny CPU cases with the GPU timing replaced by fakes (the
Triton kernels run under TRITON_INTERPRET=1, set by conftest.py). bench/ is not a package: the scripts
are imported from their directory, as `python bench/<script>.py` would."""

from __future__ import annotations

import argparse
import csv
import importlib
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
           "bench_generate", "bench_patching", "sanitize_ops")
OP_FAMILIES = ("layer_norm", "bias_act", "kv_append", "attention", "decode_attention")
FAKE_DEVICE = "NVIDIA H100 80GB HBM3"
FAKE_MS = 0.5  # what the fake do_bench returns
FAKE_US_GRAPH = 2.0  # what the fake graph replay returns
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# Fixtures: the bench modules, and a CPU stand-in for the GPU-only parts of common.py
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    """The bench modules, imported the way the scripts import each other (bench/ on sys.path)."""
    inserted = str(BENCH_DIR) not in sys.path
    if inserted:
        sys.path.insert(0, str(BENCH_DIR))
    modules = types.SimpleNamespace(**{name: importlib.import_module(name) for name in ("common",) + SCRIPTS})
    assert not torch.cuda.is_initialized() or torch.cuda.is_available(), "importing bench/ touched CUDA"
    yield modules
    if inserted and str(BENCH_DIR) in sys.path:
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture
def common(bench, monkeypatch):
    """bench/common.py with the device name faked (it names the results files and stamps every row)."""
    monkeypatch.setattr(bench.common, "device_name", lambda: FAKE_DEVICE)
    return bench.common


@pytest.fixture
def cpu_run(bench, common, monkeypatch):
    """Everything a bench script's main() needs from a GPU, replaced for a CPU run: the scripts' DEVICE,
    require_gpu / print_environment, do_bench (each step called twice, FAKE_MS returned), graph replay
    (each of --graph-calls steps called once, FAKE_US_GRAPH returned), torch.compile (the function itself),
    the empty kernel, L2 size and the rotation target (small, so a few rotated copies are made)."""
    from fusedgpt.ops._backend import triton_interpreter_enabled

    if not triton_interpreter_enabled():  # only on a GPU machine: conftest.py sets it without a GPU
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    calls = {"time_ms": 0, "graph": 0, "compile": 0}

    def fake_time_ms(function):
        calls["time_ms"] += 1
        function()
        function()
        return FAKE_MS

    def fake_graph_us_per_call(step, *, calls_per_graph=common.GRAPH_CALLS_PER_GRAPH, replays=common.GRAPH_REPLAYS):
        calls["graph"] += 1
        for index in range(calls_per_graph):
            step(index)
        return FAKE_US_GRAPH

    def fake_compile_fresh(function):
        calls["compile"] += 1
        return function

    monkeypatch.setattr(common, "require_gpu", lambda: None)
    monkeypatch.setattr(common, "print_environment", lambda family: None)
    monkeypatch.setattr(common, "time_ms", fake_time_ms)
    monkeypatch.setattr(common, "graph_us_per_call", fake_graph_us_per_call)
    monkeypatch.setattr(common, "compile_fresh", fake_compile_fresh)
    monkeypatch.setattr(common, "empty_kernel_step", lambda: (lambda index: None))
    monkeypatch.setattr(common, "l2_cache_bytes", lambda: 8 * 1024)
    monkeypatch.setattr(common, "MIN_ROTATION_BYTES", 48 * 1024)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    for name in ("bench_layer_norm", "bench_bias_act", "bench_kv_append", "bench_attention", "bench_decode_attention"):
        monkeypatch.setattr(getattr(bench, name), "DEVICE", "cpu")
    return calls


@pytest.fixture(scope="module", autouse=True)
def help_runs():
    """`python bench/<script>.py --help` for every script (one process each), started when this module's
    tests start and collected by test_help_exits_zero at the end, so the interpreter start-ups (mostly
    `import torch`) overlap with the other tests."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    processes = {script: subprocess.Popen([sys.executable, str(BENCH_DIR / f"{script}.py"), "--help"], cwd=REPO_ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for script in SCRIPTS}
    results = {}

    def result(script):
        if script not in results:
            stdout, stderr = processes[script].communicate(timeout=120)
            results[script] = (processes[script].returncode, stdout, stderr)
        return results[script]

    yield result
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


# ----------------------------------------------------------------------------------------------------
# run_gpu.sh: syntax, families, the summary it prints
# ----------------------------------------------------------------------------------------------------

def test_run_gpu_sh_syntax():
    result = subprocess.run(["bash", "-n", str(BENCH_DIR / "run_gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_run_gpu_sh_families_have_scripts(bench):
    """Every family run_gpu.sh runs by default (and the two opt-in ones) has bench/bench_<family>.py whose
    FAMILY is that name: the PNGs it copies back are named <slug>_<FAMILY>.png."""
    text = (BENCH_DIR / "run_gpu.sh").read_text()
    default = re.search(r'FAMILIES="\$\{BENCH_FAMILIES:-([^}]*)\}"', text)
    assert default, "run_gpu.sh: no FAMILIES default found"
    families = default.group(1).split()
    assert sorted(families) == sorted(OP_FAMILIES)
    for family in families + ["generate", "patching"]:
        assert (BENCH_DIR / f"bench_{family}.py").is_file()
        assert getattr(bench, f"bench_{family}").FAMILY == family


def test_run_gpu_sh_summary_script(common, tmp_path):
    """The Python summary embedded in run_gpu.sh runs on a results CSV as write_results_csv writes it
    (several families, TFLOP/s and GB/s, graph latencies, error rows) and prints one table per family."""
    text = (BENCH_DIR / "run_gpu.sh").read_text()
    match = re.search(r"<<'PYTHON_SUMMARY'\n(.*?)\nPYTHON_SUMMARY\n", text, re.S)
    assert match, "run_gpu.sh: the PYTHON_SUMMARY here-document was not found"
    summary = tmp_path / "summary.py"
    summary.write_text(match.group(1))
    rows = [
        fake_row("layer_norm", "1x768 res", "fusedgpt-cuda", ms=0.004, us_graph=2.5, gbps=1.2, check="ok"),
        fake_row("layer_norm", "1x768 res", "fusedgpt-triton", ms=0.003, us_graph=3.0, gbps=1.6, check="ok"),
        fake_row("layer_norm", "1x768 res", "torch-eager", ms=0.009, us_graph=6.0, gbps=0.5, check="ok"),
        fake_row("layer_norm", "1x768 res", "empty-kernel", us_graph=1.9),
        fake_row("layer_norm", "16384x768 nores", "fusedgpt-cuda", error="skipped: the CUDA extension is not available"),
        fake_row("layer_norm", "16384x768 nores", "torch-eager", ms=0.2, gbps=300.0, check="ok"),
        fake_row("attention", "B4 S4096 H16 D128", "fusedgpt-triton", ms=1.0, tflops=300.0, check="ok"),
        fake_row("attention", "B4 S4096 H16 D128", "sdpa-flash", ms=1.5, tflops=200.0, check="MISMATCH max_abs_err=1"),
    ]
    path = common.write_results_csv(rows, "mixed", tmp_path)
    result = subprocess.run([sys.executable, str(summary), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--- layer_norm" in result.stdout and "--- attention" in result.stdout
    assert "TFLOP/s" in result.stdout and "GB/s" in result.stdout
    assert "x_torch-eager" in result.stdout and "us_empty-kernel" in result.stdout
    attention_line = next(line for line in result.stdout.splitlines() if line.startswith("B4 S4096"))
    assert "triton" in attention_line and "1.50" in attention_line and "MISMATCH" in attention_line


def test_run_gpu_sh_summary_covers_generate(common, tmp_path):
    text = (BENCH_DIR / "run_gpu.sh").read_text()
    summary = tmp_path / "summary.py"
    summary.write_text(re.search(r"<<'PYTHON_SUMMARY'\n(.*?)\nPYTHON_SUMMARY\n", text, re.S).group(1))
    rows = [fake_row("generate", "gpt2-124m b1 p128 n256", "fusedgpt", ms=0.3, tokens_per_s=3000.0, gbps=900.0),
            fake_row("generate", "gpt2-124m b1 p128 n256", "hf-eager", ms=9.0, tokens_per_s=100.0, gbps=30.0)]
    path = common.write_results_csv(rows, "generate", tmp_path)
    result = subprocess.run([sys.executable, str(summary), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("gpt2-124m b1"))
    assert "x_fusedgpt" not in result.stdout
    assert line.split()[5] == "fusedgpt" and "30.00" in line  # best provider, then hf-eager ms / fusedgpt ms


# ----------------------------------------------------------------------------------------------------
# Imports and argument errors need no GPU, and come before any GPU work
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["bench_layer_norm", "bench_bias_act", "bench_kv_append", "bench_attention",
                                    "bench_decode_attention", "bench_generate"])
def test_main_argument_errors_before_gpu(bench, script, capsys):
    main = getattr(bench, script).main
    with pytest.raises(SystemExit, match="--dtypes"):
        main(["--dtypes", "fp32"])
    with pytest.raises(SystemExit, match="--providers"):
        main(["--providers", "no-such-provider"])
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit, match="no CUDA GPU"):  # valid arguments: the first GPU need stops it
        main(["--no-plot"])


@pytest.mark.parametrize("script", ["bench_attention", "bench_decode_attention", "bench_generate"])
def test_main_cases_matching_nothing_is_an_error(bench, script):
    with pytest.raises(SystemExit, match="--cases: no case label matches"):
        getattr(bench, script).main(["--cases", "no such case"])


def test_bias_act_unknown_activation_is_an_error(bench):
    with pytest.raises(SystemExit, match="--activations"):
        bench.bench_bias_act.main(["--activations", "gelu_tanh,swish"])


def test_generate_argument_errors(bench):
    generate = bench.bench_generate
    with pytest.raises(SystemExit, match="--repeats"):
        generate.main(["--repeats", "0"])
    with pytest.raises(SystemExit, match="--models"):
        generate.main(["--models", "gpt2-124m,gpt5"])
    assert generate.parse_models(None, quick=False) == list(bench.common.MODEL_CONFIGS)
    assert generate.parse_models(None, quick=True) == list(generate.QUICK_MODELS)
    assert generate.parse_models(" OPT-125M, gpt2-124m,opt-125m", quick=False) == ["opt-125m", "gpt2-124m"]
    for text in ("", ",", "gpt2"):
        with pytest.raises(SystemExit, match="--models"):
            generate.parse_models(text, quick=False)


def test_patching_argument_errors(bench, monkeypatch):
    patching = bench.bench_patching
    for argv, option in ((["--models", "gpt2-124m,gpt5"], "--models"), (["--modes", "decode"], "--modes"),
                         (["--dtypes", "fp8"], "--dtypes")):
        monkeypatch.setattr(sys, "argv", ["bench_patching.py"] + argv)
        with pytest.raises(SystemExit, match=option):
            patching.main()
    assert patching.MODEL_NAMES == tuple(bench.common.MODEL_CONFIGS)
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["bench_patching.py", "--quick"])
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            patching.main()


def test_sanitize_ops_arguments(bench, capsys):
    with pytest.raises(SystemExit):
        bench.sanitize_ops.main(["--backends", "cuda,torch"])
    assert "--backends" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.sanitize_ops.main(["--backends", "triton"]) == 2
        assert "FAILED: no CUDA GPU" in capsys.readouterr().out


def test_sanitize_ops_compare(bench):
    failures = []
    expected = torch.randn(3, 5)
    bench.sanitize_ops.compare(failures, "same", expected.half(), expected)
    assert failures == []
    bench.sanitize_ops.compare(failures, "shape", expected[:2], expected)
    bench.sanitize_ops.compare(failures, "value", expected + 0.5, expected)
    assert len(failures) == 2
    assert failures[0].startswith("shape: shape (2, 5) != (3, 5)")
    assert failures[1].startswith("value: max abs error 0.5")


# ----------------------------------------------------------------------------------------------------
# Attention FLOPs: 4 * D per visible (query, key) pair, against an explicit mask
# ----------------------------------------------------------------------------------------------------

def explicit_visible_mask(q_len: int, kv_len: int, window: int | None, kv_start: list[int] | None = None):
    """(B or 1, Sq, Sk) booleans, written out pair by pair: query i sits at key position Sk - Sq + i and
    sees key j iff j <= that position, j > position - window, and j >= kv_start[b]."""
    starts = kv_start if kv_start is not None else [0]
    mask = []
    for start in starts:
        rows = []
        for i in range(q_len):
            position = kv_len - q_len + i
            rows.append([start <= j <= position and (window is None or j > position - window) for j in range(kv_len)])
        mask.append(rows)
    return torch.tensor(mask, dtype=torch.bool).reshape(len(starts), q_len, kv_len)


SEQ_WINDOW_CASES = [(1, None), (1, 1), (2, None), (7, None), (7, 1), (7, 3), (7, 7), (7, 8), (13, 5), (33, 16),
                    (40, 39), (40, 40), (64, 256), (257, 256)]


@pytest.mark.parametrize(("seq_len", "window"), SEQ_WINDOW_CASES)
def test_attention_visible_pairs_match_the_mask(bench, seq_len, window):
    from fusedgpt.ops.attention import visible_keys

    attention = bench.bench_attention
    brute_force = int(explicit_visible_mask(seq_len, seq_len, window).sum())
    assert attention.visible_pairs(seq_len, window) == brute_force
    spec = visible_keys(seq_len, seq_len, causal=True, window=window, kv_start=None, device="cpu")
    assert int(spec.sum()) == brute_force  # the kernels' specification counts the same pairs


@pytest.mark.parametrize(("batch", "heads", "head_dim", "seq_len", "window"),
                         [(1, 1, 64, 1, None), (3, 5, 80, 13, None), (2, 3, 128, 33, 16), (1, 2, 64, 40, 256),
                          (4, 12, 64, 512, 256)])
def test_attention_flops_are_four_d_per_visible_pair(bench, batch, heads, head_dim, seq_len, window):
    visible = int(explicit_visible_mask(seq_len, seq_len, window).sum()) if seq_len <= 64 else \
        bench.bench_attention.visible_pairs(seq_len, window)
    if seq_len > 64:  # the closed form, summed query by query
        assert visible == sum(min(i + 1, window) for i in range(seq_len))
    # QK^T: 2 * D FLOPs per visible (query, key) pair; PV: the same again.
    expected = batch * heads * (2 * head_dim * visible + 2 * head_dim * visible)
    assert bench.bench_attention.attention_flops(batch, heads, head_dim, seq_len, window) == expected


def test_attention_causal_is_half_the_dense_flops(bench):
    """CONVENTIONS.md: causal = half the FLOPs (plus the diagonal)."""
    seq_len = 4096
    causal = bench.bench_attention.attention_flops(1, 1, 64, seq_len, None)
    dense = 4 * 64 * seq_len * seq_len
    assert causal == (dense + 4 * 64 * seq_len) // 2


def test_explicit_mask_matches_the_spec_for_sq_lt_sk_and_padding():
    """The brute-force mask used above is the kernels' specification in the cases the attention benchmark
    does not time (bottom-right aligned Sq < Sk, kv_start padding), so the counts above rest on it."""
    from fusedgpt.ops.attention import visible_keys

    for q_len, kv_len, window, starts in ((3, 11, None, [0, 4]), (5, 9, 3, [2, 0, 7]), (1, 6, 2, [5]),
                                           (4, 4, None, [1, 3])):
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
    quick = attention.benchmark_cases(quick=True)
    assert [case["window"] for case in quick] == [None, 256]
    assert attention.mask_name(None, "sdpa-flash") == "causal"
    assert attention.mask_name(256, "sdpa-cudnn") == "causal (no window)"
    assert attention.mask_name(256, "flex-attention") == "causal+window256"
    assert attention.mask_name(256, "fusedgpt-triton") == "causal+window256"


# ----------------------------------------------------------------------------------------------------
# Decode attention bytes: keys actually read, against an explicit mask over the cache
# ----------------------------------------------------------------------------------------------------

def decode_keys_read_brute_force(cache_len: int, window: int | None, appending: bool) -> int:
    """Cached keys the single new query sees: with the append, the sequence is the L cached keys plus the
    new token and the query sits at position L; without it, the query is the last cached position L - 1."""
    kv_len = cache_len + (1 if appending else 0)
    mask = explicit_visible_mask(1, kv_len, window)[0, 0]  # (Sk,)
    return int(mask[:cache_len].sum())  # the appended key (if any) is not read from the cache


@pytest.mark.parametrize("cache_len", [1, 2, 5, 254, 255, 256, 257, 300])
@pytest.mark.parametrize("window", [None, 1, 2, 256])
@pytest.mark.parametrize("appending", [False, True])
def test_decode_keys_read_match_the_mask(bench, cache_len, window, appending):
    assert bench.bench_decode_attention.keys_read(cache_len, window, appending) == \
        decode_keys_read_brute_force(cache_len, window, appending)


@pytest.mark.parametrize(("batch", "heads", "head_dim", "cache_len", "window", "dtype"),
                         [(1, 3, 64, 9, None, torch.float16), (2, 5, 80, 40, 16, torch.bfloat16),
                          (3, 2, 128, 7, 16, torch.float16), (1, 1, 64, 16, 16, torch.float32)])
@pytest.mark.parametrize(("appending", "with_lengths"), [(False, False), (False, True), (True, True)])
def test_decode_bytes_match_the_tensors_touched(bench, batch, heads, head_dim, cache_len, window, dtype, appending,
                                                with_lengths):
    decode = bench.bench_decode_attention
    tokens = decode.NEW_TOKENS
    max_len = cache_len + decode.CACHE_SLACK
    k_cache = torch.empty(batch, max_len, heads, head_dim, dtype=dtype)  # (B, S_max, H, D)
    q = torch.empty(batch, tokens, heads, head_dim, dtype=dtype)  # (B, T, H, D)
    cache_lens = torch.full((batch,), cache_len, dtype=torch.int32)
    read_slots = decode_keys_read_brute_force(cache_len, window, appending)
    one_slot = k_cache[:, :1]  # (B, 1, H, D): one position of one cache
    expected = 2 * read_slots * one_slot.nbytes  # K and V
    expected += 2 * q.nbytes  # q read, out written
    if appending:
        expected += 4 * q.nbytes  # new k and v read, then written into the caches
    if with_lengths:
        expected += cache_lens.nbytes
    assert decode.decode_bytes(batch, heads, head_dim, cache_len, window, k_cache.element_size(),
                               appending=appending, with_lengths=with_lengths) == expected


def test_decode_cases_and_labels(bench):
    decode = bench.bench_decode_attention
    cases = decode.benchmark_cases(quick=False)
    assert len(cases) == len(decode.HEAD_SHAPES) * (len(decode.BATCH_CACHE_LENS) + 1)
    labels = [decode.case_label(case) for case in cases]
    assert len(set(labels)) == len(labels)
    assert "B1 L8192 H32 D128 w256" in labels  # the --cases example in --help
    quick_labels = [decode.case_label(case) for case in decode.benchmark_cases(quick=True)]
    assert set(quick_labels) <= set(labels) and len(set(quick_labels)) == len(quick_labels)


# ----------------------------------------------------------------------------------------------------
# Memory-bound families: bytes moved, from the tensors the op reads and writes
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "hidden"), [(1, 768), (3, 1001), (17, 1600)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layer_norm_bytes(bench, tokens, hidden, residual, dtype):
    from fusedgpt.ops import layer_norm_reference

    x = torch.randn(tokens, hidden, dtype=dtype)
    skip = torch.randn(tokens, hidden, dtype=dtype) if residual else None
    weight, bias = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    outputs = layer_norm_reference(x, weight, bias, 1e-5, skip)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    inputs = [x, weight, bias] + ([skip] if residual else [])
    expected = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)
    element_size = torch.finfo(dtype).bits // 8
    assert bench.bench_layer_norm.effective_bytes(tokens, hidden, residual, element_size) == expected


@pytest.mark.parametrize(("tokens", "width"), [(1, 768), (5, 1001), (16, 3072)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_act_bytes(bench, tokens, width, dtype):
    from fusedgpt.ops import bias_act_reference

    x, bias = torch.randn(tokens, width, dtype=dtype), torch.randn(width, dtype=dtype)
    y = bias_act_reference(x, bias, "gelu_tanh")
    assert bench.bench_bias_act.effective_bytes(tokens, width, x.element_size()) == x.nbytes + bias.nbytes + y.nbytes


def test_memory_bound_cases(bench):
    layer_norm, bias_act, kv_append = bench.bench_layer_norm, bench.bench_bias_act, bench.bench_kv_append
    cases = layer_norm.benchmark_cases(quick=False)
    assert len(cases) == len(layer_norm.TOKEN_COUNTS) * len(layer_norm.HIDDEN_SIZES) + len(layer_norm.HIDDEN_SIZES)
    described = [layer_norm.describe_case(case) for case in cases]
    assert len(set(described)) == len(described)
    cases = bias_act.benchmark_cases(False, list(bias_act.ACTIVATIONS), False)
    # gelu_tanh on every (tokens, width), the other activations at 16384 tokens only
    assert len(cases) == 3 * 6 + 2 * 6
    assert {case["tokens"] for case in cases if case["activation"] != "gelu_tanh"} == {bias_act.PREFILL_TOKENS}
    assert len(bias_act.benchmark_cases(False, list(bias_act.ACTIVATIONS), True)) == 3 * 3 * 6
    described = [bias_act.describe_case(case) for case in cases]
    assert len(set(described)) == len(described)
    assert len(kv_append.benchmark_cases(quick=False)) == 8
    for case in kv_append.benchmark_cases(quick=False):
        assert kv_append.POSITION + case["new_tokens"] <= kv_append.MAX_LEN


# ----------------------------------------------------------------------------------------------------
# common.py: parsing and case selection
# ----------------------------------------------------------------------------------------------------

def test_parse_dtypes(common):
    assert common.parse_dtypes("fp16,bf16") == [torch.float16, torch.bfloat16]
    assert common.parse_dtypes(" BF16 , half,float16,fp16,") == [torch.bfloat16, torch.float16]
    for text, message in (("fp32", "unknown dtype 'fp32'"), ("fp16,int8", "unknown dtype 'int8'"),
                          ("", "no dtype given"), (" , ", "no dtype given")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            common.parse_dtypes(text)


def test_parse_choices_and_providers(common):
    known = ("fusedgpt-cuda", "fusedgpt-triton", "torch-eager")
    assert common.parse_choices(None, known, "--x") == list(known)
    assert common.parse_providers(None, known) == list(known)
    # the script's order, not the command line's; duplicates and blanks dropped
    assert common.parse_providers(" torch-eager,fusedgpt-cuda ,torch-eager,", known) == ["fusedgpt-cuda", "torch-eager"]
    with pytest.raises(SystemExit, match=r"--providers: unknown \['sdpa'\]"):
        common.parse_providers("torch-eager,sdpa", known)
    with pytest.raises(SystemExit, match="--modes: unknown"):
        common.parse_choices("Torch-Eager", known, "--modes")  # case matters


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_parse_choices_rejects_an_empty_selection(common, text):
    with pytest.raises(SystemExit, match="--providers"):
        common.parse_providers(text, ("fusedgpt-triton", "torch-eager"))


def test_select_cases(common):
    cases = [{"name": "B1 L1024"}, {"name": "B16 L2048"}, {"name": "B1 L8192 w256"}]
    label = lambda case: case["name"]  # noqa: E731
    assert common.select_cases(cases, None, label) == cases
    assert common.select_cases(cases, "", label) == cases
    assert common.select_cases(cases, "^B1 ", label) == [cases[0], cases[2]]
    assert common.select_cases(cases, "w256$", label) == [cases[2]]
    with pytest.raises(SystemExit, match=r"--cases: no case label matches 'B64'"):
        common.select_cases(cases, "B64", label)
    with pytest.raises(SystemExit):
        common.select_cases([], "B1", label)


def test_argument_parser_defaults(common):
    args = common.argument_parser("x").parse_args([])
    assert args.dtypes == "fp16,bf16" and args.providers is None and args.merge is False and args.no_plot is False
    assert args.graph_calls == common.GRAPH_CALLS_PER_GRAPH and args.out_dir == common.DEFAULT_OUT_DIR
    assert common.DEFAULT_OUT_DIR == BENCH_DIR / "results"
    args = common.argument_parser("x").parse_args(["--out-dir", "somewhere", "--graph-calls", "7", "--merge"])
    assert args.out_dir == Path("somewhere") and args.graph_calls == 7 and args.merge is True


def test_dtype_name(common):
    assert [common.dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == \
        ["fp16", "bf16", "fp32", "float64"]


# ----------------------------------------------------------------------------------------------------
# common.py: device, rotation, checks, errors
# ----------------------------------------------------------------------------------------------------

def test_device_slug(common):
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug("  NVIDIA  A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"
    assert common.device_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia-geforce-rtx-4090-laptop"
    assert common.device_slug("") == "unknown-device"
    assert common.device_slug("!!!") == "unknown-device"
    assert common.device_slug() == "nvidia-h100-80gb-hbm3"  # the fixture's device
    assert common.results_csv_path("out") == Path("out") / "nvidia-h100-80gb-hbm3.csv"


@pytest.mark.parametrize("l2_mib", [50, 60, 126])
@pytest.mark.parametrize("bytes_per_copy", [1, 1000, 3 * 2**20 + 1, 128 * 2**20 - 1, 128 * 2**20, 2**30])
def test_rotation_copy_count(common, monkeypatch, l2_mib, bytes_per_copy):
    monkeypatch.setattr(common, "l2_cache_bytes", lambda: l2_mib * 2**20)
    target = max(128 * 2**20, int(2.5 * l2_mib * 2**20))
    copies = common.rotation_copy_count(bytes_per_copy)
    assert 1 <= copies <= common.MAX_ROTATION_COPIES
    if copies < common.MAX_ROTATION_COPIES:
        assert copies * bytes_per_copy >= target  # one pass exceeds the target
        assert copies == 1 or (copies - 1) * bytes_per_copy < target  # and no copy more than needed
    else:
        assert copies * bytes_per_copy <= target


def test_rotation_copy_count_edges(common, monkeypatch):
    monkeypatch.setattr(common, "l2_cache_bytes", lambda: 50 * 2**20)
    assert common.rotation_copy_count(0) == common.MAX_ROTATION_COPIES
    assert common.rotation_copy_count(1, max_copies=10) == 10
    assert common.rotation_copy_count(2**20) == 128
    monkeypatch.setattr(common, "l2_cache_bytes", lambda: 100 * 2**20)  # 2.5 x L2 = 250 MiB > 128 MiB
    assert common.rotation_copy_count(2**20) == 250


def test_rotated_copies(common):
    x = torch.randn(3, 7, dtype=torch.float16)  # 42 bytes: not a multiple of the alignment
    y = torch.arange(5, dtype=torch.int32)
    copies = common.rotated_copies([x, y], 4)
    assert len(copies) == 4
    for x_i, y_i in copies:
        assert torch.equal(x_i, x) and torch.equal(y_i, y)
        assert x_i.shape == x.shape and x_i.dtype == x.dtype and x_i.is_contiguous()
        assert (x_i.data_ptr() - copies[0][0].data_ptr()) % common.COPY_ALIGNMENT_BYTES == 0
        assert (y_i.data_ptr() - copies[0][1].data_ptr()) % common.COPY_ALIGNMENT_BYTES == 0
    pointers = {t.data_ptr() for copy in copies for t in copy}
    assert len(pointers) == 8, "copies must not alias"
    copies[1][0].fill_(7.0)  # a write into one copy changes no other copy, and not the template
    assert torch.equal(copies[0][0], x) and torch.equal(copies[2][0], x) and not torch.equal(x, copies[1][0])
    assert len(common.rotated_copies([x], 1)) == 1
    with pytest.raises(ValueError, match="contiguous"):
        common.rotated_copies([x.t()], 2)


def test_check_close(common):
    expected = torch.randn(4, 9, dtype=torch.float16)
    assert common.check_close(expected.clone(), expected) == "ok"
    assert common.check_close(expected.float() + 1e-3, expected) == "ok"
    assert common.check_close(expected[:3], expected) == "MISMATCH shape (3, 9) != (4, 9)"
    off = expected.float()  # float32: the 0.5 added is exact
    off[2, 5] += 0.5
    assert common.check_close(off, expected) == "MISMATCH max_abs_err=0.5"
    poisoned = expected.clone()
    poisoned[0, 0] = float("nan")
    assert common.check_close(poisoned, expected).startswith("MISMATCH"), "NaN must not pass"
    # bf16 gets a wider tolerance (6e-2) than fp16 (1e-2)
    base = torch.ones(8, dtype=torch.bfloat16)
    assert common.check_close(base.float() * 1.03, base) == "ok"
    assert common.check_close(base.half().float() * 1.03, base.half()).startswith("MISMATCH")


def test_short_error(common):
    assert common.short_error(ValueError("bad\nthing")) == "ValueError: bad thing"
    long = common.short_error(RuntimeError("x" * 1000))
    assert len(long) == 300 and long.startswith("RuntimeError: xxx") and long.endswith("...")
    exactly = "y" * (300 - len("KeyError: ''"))
    assert not common.short_error(KeyError(exactly)).endswith("...")
    assert common.short_error(KeyError(exactly + "y")).endswith("...")


def test_environment_metadata_and_print_environment(common, monkeypatch, capsys):
    import fusedgpt
    import triton

    meta = common.environment_metadata()
    assert set(meta) == {"device", "torch", "triton", "cuda", "python", "date"} <= set(common.CSV_COLUMNS)
    assert meta["device"] == FAKE_DEVICE and meta["torch"] == torch.__version__ and meta["triton"] == triton.__version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["date"])
    monkeypatch.setattr(common, "l2_cache_bytes", lambda: 50 * 2**20)
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: True)
    monkeypatch.setattr(fusedgpt, "extension_cuda_archs", lambda: ["90"])
    common.print_environment("layer_norm")
    out = capsys.readouterr().out
    assert out.startswith(f"bench layer_norm: {FAKE_DEVICE} (L2 50 MiB)") and "built for 90" in out
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    monkeypatch.setattr(fusedgpt, "extension_unavailable_reason", lambda: "not built")
    common.print_environment("layer_norm")
    assert "NOTE: fusedgpt-cuda is skipped: not built" in capsys.readouterr().out


def test_empty_kernel_and_timing_apis(common):
    """The empty kernel (the latency floor of every graph-timed script) compiles and runs (under the
    interpreter on the CPU), and do_bench takes the arguments time_ms passes."""
    import inspect

    import triton

    from fusedgpt.ops._backend import triton_interpreter_enabled

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert device == "cuda" or triton_interpreter_enabled(), "conftest.py sets TRITON_INTERPRET=1 without a GPU"
    scratch = torch.ones(1, dtype=torch.float32, device=device)
    common._empty_kernel[(1,)](scratch)
    assert scratch.item() == 0.0
    parameters = inspect.signature(triton.testing.do_bench).parameters
    assert {"warmup", "rep", "return_mode"} <= set(parameters)
    assert {"stream"} <= set(inspect.signature(torch.cuda.graph).parameters)


def test_unavailable_providers(common, monkeypatch, capsys):
    import fusedgpt

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    providers = ["fusedgpt-cuda", "fusedgpt-triton", "flash-attn", "sdpa"]
    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    probes = []
    reasons = common.unavailable_providers(providers, cuda_probe=lambda: probes.append(1))
    assert reasons == {"fusedgpt-cuda": common.CUDA_EXTENSION_MISSING,
                       "flash-attn": reasons["flash-attn"]} and reasons["flash-attn"].startswith("not installed: ")
    assert probes == [], "no probe without the extension"

    monkeypatch.setattr(fusedgpt, "extension_available", lambda: True)
    assert common.unavailable_providers(providers[1:2], cuda_probe=lambda: probes.append(1)) == {}
    assert probes == [], "no probe when fusedgpt-cuda is not asked for"
    assert "fusedgpt-cuda" not in common.unavailable_providers(providers, cuda_probe=lambda: probes.append(1))
    assert "fusedgpt-cuda" not in common.unavailable_providers(providers, cuda_probe=None)
    assert probes == [1]

    def failing_probe():
        raise ValueError("head dim 64 was not built\nfor sm_90")

    capsys.readouterr()
    reasons = common.unavailable_providers(providers, cuda_probe=failing_probe, announce=True)
    assert reasons["fusedgpt-cuda"] == "skipped: ValueError: head dim 64 was not built for sm_90"
    printed = capsys.readouterr().out
    assert "NOTE: fusedgpt-cuda: skipped: ValueError" in printed and "NOTE: flash-attn: not installed" in printed
    assert common.unavailable_providers(["torch-eager"], announce=True) == {}


def test_providers_to_time(common, monkeypatch, capsys):
    measured = []

    def fake_measure(**kwargs):
        measured.append(kwargs)
        return {"provider": kwargs["provider"], "us_graph": FAKE_US_GRAPH, "fields": kwargs["fields"]}

    monkeypatch.setattr(common, "measure", fake_measure)
    monkeypatch.setattr(common, "empty_kernel_step", lambda: "empty-step")

    def make_function(provider):
        if provider == "broken":
            raise RuntimeError("cannot\nset up")
        return f"function of {provider}"

    providers = ["a", "unavailable-one", "broken", common.EMPTY_KERNEL_PROVIDER, "b"]
    for with_graph in (False, True):
        rows, yielded = [], []
        for provider, function, fields in common.providers_to_time(
                rows, family="fam", case="c1", dtype=torch.bfloat16, providers=providers,
                unavailable={"unavailable-one": "skipped: reason"}, fields=lambda provider: {"p": provider},
                make_function=make_function, with_graph=with_graph, graph_calls=5):
            yielded.append((provider, function, fields))
            rows.append({"provider": provider, "timed": True})
        assert yielded == [("a", "function of a", {"p": "a"}), ("b", "function of b", {"p": "b"})]
        errors = {row["provider"]: row for row in rows if "error" in row}
        assert errors["unavailable-one"] == {"family": "fam", "case": "c1", "provider": "unavailable-one",
                                             "dtype": "bf16", "p": "unavailable-one", "error": "skipped: reason"}
        assert errors["broken"]["error"] == "RuntimeError: cannot set up"
        order = [row["provider"] for row in rows]
        expected_order = ["a", "unavailable-one", "broken"] + ([common.EMPTY_KERNEL_PROVIDER] if with_graph else []) + ["b"]
        assert order == expected_order
    assert len(measured) == 1  # the empty kernel: measured only with graphs, as a graph-replay floor
    assert measured[0]["step"] == "empty-step" and measured[0]["with_graph"] and measured[0]["graph_calls"] == 5
    assert measured[0]["fields"] == {"p": common.EMPTY_KERNEL_PROVIDER} and measured[0]["bytes_moved"] == 0
    # fields given as a dict serve every provider
    rows = []
    out = list(common.providers_to_time(rows, family="f", case="c", dtype=torch.float16, providers=["x"],
                                        unavailable={}, fields={"k": 1}, make_function=lambda p: p))
    assert out == [("x", "x", {"k": 1})] and rows == []


def test_measure(common, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    steps = []
    monkeypatch.setattr(common, "time_ms", lambda function: (function(), function(), 0.25)[-1])
    monkeypatch.setattr(common, "graph_us_per_call", lambda step, *, calls_per_graph: (step(100), 3.5)[-1])
    row = common.measure(family="f", case="c", provider="p", dtype=torch.float16, fields={"tokens": 3},
                         bytes_moved=10**9, flops=2 * 10**12, step=steps.append, with_graph=True, graph_calls=4,
                         verify=lambda: "ok")
    assert steps == [0, 1, 100], "do_bench steps get consecutive rotation indices"
    assert row["gbps"] == pytest.approx(10**9 / 0.25e-3 / 1e9) and row["gbps"] == pytest.approx(4000.0)
    assert row["tflops"] == pytest.approx(8000.0) and row["flops"] == 2 * 10**12 and row["bytes"] == 10**9
    assert row["ms"] == 0.25 and row["us_graph"] == 3.5 and row["check"] == "ok" and "error" not in row
    assert row["dtype"] == "fp16" and row["tokens"] == 3

    row = common.measure(family="f", case="c", provider="p", dtype=torch.float16, fields={}, bytes_moved=0,
                         step=steps.append, with_graph=False, graph_calls=4)
    assert row["bytes"] is None and "gbps" not in row and "flops" not in row and "tflops" not in row

    def broken_verify():
        raise RuntimeError("kernel\nfailed")

    row = common.measure(family="f", case="c", provider="p", dtype=torch.bfloat16, fields={}, bytes_moved=8,
                         step=steps.append, with_graph=True, graph_calls=4, verify=broken_verify)
    assert row["error"] == "RuntimeError: kernel failed" and "ms" not in row and "us_graph" not in row
    assert "ERROR f c bf16 p" in capsys.readouterr().out

    def broken_graph(step, *, calls_per_graph):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(common, "graph_us_per_call", broken_graph)
    row = common.measure(family="f", case="c", provider="p", dtype=torch.float16, fields={}, bytes_moved=8,
                         step=steps.append, with_graph=True, graph_calls=4)
    assert row["ms"] == 0.25 and row["error"] == "graph: RuntimeError: capture failed"  # the time is kept


# ----------------------------------------------------------------------------------------------------
# common.py: ratios and summaries
# ----------------------------------------------------------------------------------------------------

def test_add_speedups(common):
    rows = [fake_row("f", "c1", "fusedgpt-triton", ms=1.0, us_graph=4.0),
            fake_row("f", "c1", "torch-eager", ms=3.0, us_graph=10.0),
            fake_row("f", "c1", "torch-compile", ms=2.0),
            fake_row("f", "c1", "empty-kernel", us_graph=2.0),
            fake_row("f", "c1", "fusedgpt-cuda", error="skipped"),
            fake_row("f", "c1", "torch-eager", dtype="bf16", ms=30.0),  # another dtype: not a peer of fp16
            fake_row("f", "c2", "fusedgpt-triton", ms=5.0),
            fake_row("g", "c1", "fusedgpt-triton", ms=7.0)]  # another family: not a peer
    common.add_speedups(rows)
    triton = rows[0]
    assert triton["ratio_vs_torch_eager"] == pytest.approx(3.0)
    assert triton["ratio_vs_torch_compile"] == pytest.approx(2.0)
    assert triton["graph_ratio_vs_torch_eager"] == pytest.approx(2.5)
    assert "graph_ratio_vs_torch_compile" not in triton  # compile has no graph latency
    assert rows[1]["ratio_vs_torch_eager"] == pytest.approx(1.0)
    assert rows[1]["ratio_vs_torch_compile"] == pytest.approx(2.0 / 3.0)
    assert not any(key.startswith(("ratio", "graph_ratio")) for key in rows[3]), "the empty kernel gets no ratio"
    assert not any(key.startswith("ratio") for key in rows[4])
    assert [key for key in rows[5] if "ratio" in key] == ["ratio_vs_torch_eager"]  # its own dtype's eager: itself
    assert rows[5]["ratio_vs_torch_eager"] == pytest.approx(1.0)
    assert "ratio_vs_torch_eager" not in rows[6] and "ratio_vs_torch_eager" not in rows[7]
    # every ratio column add_speedups can write is a CSV column
    for peer in common.PEERS:
        assert f"ratio_vs_{peer.replace('-', '_')}" in common.CSV_COLUMNS
        assert f"graph_ratio_vs_{peer.replace('-', '_')}" in common.CSV_COLUMNS
    common.add_speedups([])


def test_best_fusedgpt(common):
    providers = {"fusedgpt-cuda": {"provider": "fusedgpt-cuda", "ms": 2.0, "us_graph": 3.0},
                 "fusedgpt-triton": {"provider": "fusedgpt-triton", "ms": 1.0, "us_graph": 4.0},
                 "torch-eager": {"provider": "torch-eager", "ms": 0.1, "us_graph": 0.1}}
    assert common.best_fusedgpt(providers, "ms")["provider"] == "fusedgpt-triton"
    assert common.best_fusedgpt(providers, "us_graph")["provider"] == "fusedgpt-cuda"
    providers["fusedgpt-triton"]["error"] = "graph: failed"
    assert common.best_fusedgpt(providers, "ms")["provider"] == "fusedgpt-cuda"
    assert common.best_fusedgpt({"torch-eager": providers["torch-eager"]}, "ms") is None
    assert common.best_fusedgpt({}, "ms") is None
    assert common.best_fusedgpt({"fusedgpt-cuda": {"provider": "fusedgpt-cuda", "ms": None}}, "ms") is None


def test_print_table_and_speedups(common, capsys):
    rows = [fake_row("f", "c1", "fusedgpt-cuda", ms=2.0), fake_row("f", "c1", "fusedgpt-triton", ms=1.0),
            fake_row("f", "c1", "torch-eager", ms=4.0, error=None), fake_row("f", "c2", "torch-eager", ms=4.0)]
    common.print_table(rows, [("case", "case", 0), ("ms", "ms", 3), ("error", "error", 0)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["case", "ms", "error"] and set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["c1", "2.000", "-"]
    common.print_speedups(rows, ("torch-eager",))
    out = capsys.readouterr().out
    c1 = next(line for line in out.splitlines() if line.startswith("c1"))
    assert "triton" in c1 and "4.00" in c1
    common.print_speedups([], ("torch-eager",))  # nothing measured: no crash


# ----------------------------------------------------------------------------------------------------
# common.py: results CSV and PNG
# ----------------------------------------------------------------------------------------------------

def test_write_results_csv_columns_and_stamp(common, tmp_path):
    rows = [fake_row("layer_norm", "1x768 res", "fusedgpt-triton", tokens=1, hidden=768, ms=0.0123456789,
                     gbps=None, check="ok", extra_column="kept")]
    path = common.write_results_csv(rows, "layer_norm", tmp_path / "new_dir")
    assert path == tmp_path / "new_dir" / "nvidia-h100-80gb-hbm3.csv"
    columns, written = read_csv(path)
    assert columns[:len(common.CSV_COLUMNS)] == list(common.CSV_COLUMNS)
    assert columns[len(common.CSV_COLUMNS):] == ["extra_column"]  # unknown fields are appended, not lost
    (row,) = written
    assert row["ms"] == "0.0123457" and row["gbps"] == "" and row["extra_column"] == "kept"
    assert row["device"] == FAKE_DEVICE and row["torch"] == torch.__version__ and row["date"].endswith("Z")
    assert not list(path.parent.glob("*.tmp")), "the temporary file is renamed into place"


def test_write_results_csv_replace_and_merge(common, tmp_path):
    first = [fake_row("layer_norm", "a", "p1", ms=1.0), fake_row("layer_norm", "a", "p2", ms=2.0),
             fake_row("layer_norm", "b", "p1", ms=3.0), fake_row("layer_norm", "a", "p1", dtype="bf16", ms=4.0),
             fake_row("bias_act", "a", "p1", ms=5.0)]
    path = common.write_results_csv(first, "layer_norm", tmp_path)
    assert len(read_csv(path)[1]) == 5

    # --merge: only (case, dtype, provider) measured again is replaced; everything else stays
    path = common.write_results_csv([fake_row("layer_norm", "a", "p1", ms=9.0, my_extra="x")], "layer_norm",
                                    tmp_path, merge=True)
    columns, rows = read_csv(path)
    keyed = {(r["family"], r["case"], r["dtype"], r["provider"]): float(r["ms"]) for r in rows}
    assert keyed == {("layer_norm", "a", "fp16", "p2"): 2.0, ("layer_norm", "b", "fp16", "p1"): 3.0,
                     ("layer_norm", "a", "bf16", "p1"): 4.0, ("bias_act", "a", "fp16", "p1"): 5.0,
                     ("layer_norm", "a", "fp16", "p1"): 9.0}
    assert "my_extra" in columns

    # a merge of another family keeps this one
    common.write_results_csv([fake_row("bias_act", "a", "p1", ms=6.0)], "bias_act", tmp_path, merge=True)
    columns, rows = read_csv(path)
    assert len(rows) == 5 and "my_extra" in columns, "columns of earlier rows are kept"

    # without --merge: this family's rows are all replaced, other families' kept
    common.write_results_csv([fake_row("layer_norm", "c", "p3", ms=7.0)], "layer_norm", tmp_path)
    _, rows = read_csv(path)
    keyed = {(r["family"], r["case"], r["provider"]): float(r["ms"]) for r in rows}
    assert keyed == {("bias_act", "a", "p1"): 6.0, ("layer_norm", "c", "p3"): 7.0}


def assert_png(path) -> None:
    assert path is not None and Path(path).is_file()
    assert Path(path).read_bytes()[:8] == PNG_MAGIC


def test_plot_metric(common, tmp_path, capsys):
    rows = [fake_row("bias_act", f"c{i}", provider, dtype=dtype, gbps=float(i + 1) * (2 if provider == "b" else 1))
            for i in range(3) for provider in ("a", "b") for dtype in ("fp16", "bf16")]
    rows.append(fake_row("bias_act", "c9", "a", error="skipped"))  # no value: not plotted
    path = common.plot_gbps(rows, "bias_act", tmp_path)
    assert path == tmp_path / "nvidia-h100-80gb-hbm3_bias_act.png"
    assert_png(path)
    path = common.plot_metric([fake_row("attention", "c", "a", tflops=10.0)], "attention", tmp_path, key="tflops",
                              label="TFLOP/s", log_scale=False)
    assert_png(path)
    assert common.plot_metric([fake_row("x", "c", "a", error="e")], "x", tmp_path) is None
    assert common.plot_metric([], "x", tmp_path) is None
    assert "no GB/s (effective) was measured" in capsys.readouterr().out


def test_family_rows_from_csv(common, tmp_path):
    rows = [fake_row("patching", "m:prefill", "hf-eager", tokens_per_s=100.0),
            fake_row("patching", "m:prefill", "hf-sdpa", error="skipped"),
            fake_row("other", "m:prefill", "hf-eager", tokens_per_s=5.0)]
    path = common.write_results_csv(rows, "patching", tmp_path)
    read = common._family_rows_from_csv(path, "patching", "tokens_per_s")
    assert [(row["provider"], row["tokens_per_s"]) for row in read] == [("hf-eager", 100.0), ("hf-sdpa", None)]
    assert_png(common.plot_metric(read, "patching", tmp_path, key="tokens_per_s", label="tokens/s"))


def test_stack_pngs(common, tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    shapes = [(10, 30, 4), (7, 12, 3), (5, 20)]  # RGBA, RGB, grey
    paths = []
    for index, shape in enumerate(shapes):
        image = np.random.rand(*shape).astype(np.float32)
        if len(shape) == 3 and shape[2] == 4:
            image[..., 3] = 1.0
        path = tmp_path / f"in{index}.png"
        mpimg.imsave(path, image, cmap="gray") if len(shape) == 2 else mpimg.imsave(path, image)
        paths.append(path)
    out = common.stack_pngs(paths + [tmp_path / "missing.png"], tmp_path / "sub" / "stacked.png")
    assert out == tmp_path / "sub" / "stacked.png"
    assert_png(out)
    stacked = mpimg.imread(out)
    assert stacked.shape[:2] == (10 + 7 + 5, 30)
    assert np.allclose(stacked[10:17, 12:], 1.0), "narrower images are padded with opaque white"
    assert common.stack_pngs([tmp_path / "missing.png"], tmp_path / "none.png") is None
    assert common.stack_pngs([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------------------------------
# Model configs: the published sizes
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

    assert set(bench.common.MODEL_CONFIGS) == set(PUBLISHED_SIZES)
    layers, hidden, heads, ffn, vocab, positions, parameters = PUBLISHED_SIZES[name]
    hf_config = bench.common.MODEL_CONFIGS[name]()
    assert hf_config is not bench.common.MODEL_CONFIGS[name](), "each call builds a fresh config"
    gpt_config = fusedgpt.models.convert_config(hf_config)
    assert (gpt_config.num_layers, gpt_config.hidden_size, gpt_config.num_heads) == (layers, hidden, heads)
    assert (gpt_config.ffn_size, gpt_config.vocab_size) == (ffn, vocab)
    assert hf_config.max_position_embeddings == positions
    assert hf_config.tie_word_embeddings is True
    if name.startswith("gpt-neo"):
        assert hf_config.attention_layers == ["global", "local"] * (layers // 2)
        assert gpt_config.attention_windows == [None, 256] * (layers // 2)
        assert gpt_config.attention_scales == [1.0] * layers  # GPT-Neo does not scale its scores
    else:
        assert gpt_config.attention_windows == [None] * layers
    if name.startswith("opt"):
        assert hf_config.do_layer_norm_before is True and hf_config.word_embed_proj_dim == hidden
        assert hf_config.activation_function == "relu"
    else:
        assert hf_config.activation_function == "gelu_new"
    model = meta_model(hf_config)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_end_to_end_cases_fit_every_model(bench):
    """Every prompt + new tokens of bench_generate and bench_patching fits each model's position table
    (GPT-2's 1024 is the tightest: bench_patching's prefill uses all of it)."""
    generate, patching = bench.bench_generate, bench.bench_patching
    for name, factory in bench.common.MODEL_CONFIGS.items():
        positions = factory().max_position_embeddings
        for batch, prompt, new in generate.CASES + generate.QUICK_CASES:
            assert prompt + new <= positions, (name, prompt, new)
        assert patching.PREFILL_TOKENS <= positions
        assert patching.PROMPT_TOKENS + max(patching.NEW_TOKENS, patching.QUICK_NEW_TOKENS) <= positions
    assert set(generate.QUICK_MODELS) <= set(bench.common.MODEL_CONFIGS)


def test_generate_decode_bytes_per_step(bench):
    """bench_generate's bandwidth bound: weights once (tied embedding once, no position table) + the KV
    cache each decode step reads and writes, from an explicit mask per layer."""
    import fusedgpt

    generate = bench.bench_generate
    for name, prompt, new, batch in (("gpt2-124m", 5, 4, 2), ("gpt-neo-125m", 250, 12, 3), ("opt-125m", 1, 2, 1)):
        hf_config = bench.common.MODEL_CONFIGS[name]()
        gpt_config = fusedgpt.models.convert_config(hf_config)
        model = meta_model(hf_config)
        parameters = PUBLISHED_SIZES[name][-1]
        position_table = {"gpt2-124m": 1024 * 768, "gpt-neo-125m": 2048 * 768, "opt-125m": (2048 + 2) * 768}[name]
        result = generate.decode_bytes_per_step(model, gpt_config, batch, prompt, new, 2)
        assert result["params"] == parameters
        assert result["weight_bytes"] == 2 * (parameters - position_table)
        per_slot = 2 * batch * gpt_config.num_heads * gpt_config.head_dim * 2  # K and V, one position
        steps = new - 1  # the first new token comes from the prefill
        total = 0
        for step in range(1, steps + 1):  # step k feeds the token at position prompt + k - 1
            position = prompt + step - 1
            for window in gpt_config.attention_windows:
                visible = int(explicit_visible_mask(1, position + 1, window).sum())  # cached + the new one
                total += per_slot * (visible + 1)  # + the new K, V written
        assert result["kv_bytes_per_step"] == pytest.approx(total / steps)
        assert result["bytes"] == int(result["weight_bytes"] + total / steps)

    # untied: the token embedding is only gathered (not counted), the lm_head is read whole
    hf_config = bench.common.MODEL_CONFIGS["gpt2-124m"]()
    hf_config.tie_word_embeddings = False
    model = meta_model(hf_config)
    result = generate.decode_bytes_per_step(model, fusedgpt.models.convert_config(hf_config), 1, 8, 2, 2)
    assert result["params"] == 124_439_808 + 50257 * 768
    assert result["weight_bytes"] == 2 * (124_439_808 - 1024 * 768)


# ----------------------------------------------------------------------------------------------------
# bench_generate / bench_patching / bench_kv_append: rows and ratios
# ----------------------------------------------------------------------------------------------------

def test_generate_fill_rates(bench):
    row = {"bytes": 4 * 10**9, "bound_tokens_per_s": 1000.0}
    bench.bench_generate.fill_rates(row, {"prefill_s": 0.5, "decode_s": 2.0, "total_s": 2.5}, batch=4, prompt=128,
                                    new=11)
    assert row["prefill_ms"] == pytest.approx(500.0) and row["decode_ms"] == pytest.approx(2000.0)
    assert row["total_ms"] == pytest.approx(2500.0)
    assert row["ms"] == pytest.approx(200.0)  # 10 decode steps
    assert row["tokens_per_s"] == pytest.approx(4 * 10 / 2.0)
    assert row["e2e_tokens_per_s"] == pytest.approx(4 * 11 / 2.5)
    assert row["prefill_tokens_per_s"] == pytest.approx(4 * 128 / 0.5)
    assert row["gbps"] == pytest.approx(4 * 10**9 / 0.2 / 1e9)
    assert row["fraction_of_bound"] == pytest.approx(20.0 / 1000.0)
    plain = {}
    bench.bench_generate.fill_rates(plain, {"prefill_s": 1.0, "decode_s": 1.0, "total_s": 2.0}, 1, 1, 1)
    assert "gbps" not in plain and "fraction_of_bound" not in plain and plain["tokens_per_s"] == 1.0


def test_generate_agreement(bench):
    prompt = [9, 9]
    reference = torch.tensor([prompt + [1, 2, 3, 4], prompt + [5, 6, 7, 8]])
    mine = torch.tensor([prompt + [1, 2, 0, 4], prompt + [5, 6, 7, 8]])
    rows = [{"case": "c", "provider": "fusedgpt", "seq_len": 2}, {"case": "c", "provider": "hf-eager", "seq_len": 2},
            {"case": "c", "provider": "hf-sdpa", "seq_len": 2}, {"case": "d", "provider": "fusedgpt", "seq_len": 2}]
    outputs = {("c", "fusedgpt"): mine, ("c", "hf-eager"): reference, ("c", "hf-sdpa"): reference[:, :5],
               ("d", "fusedgpt"): mine}
    bench.bench_generate.add_agreement(rows, outputs)
    assert rows[0]["agreement_vs_hf_eager"] == pytest.approx(7 / 8)
    assert rows[0]["agreement_prefix_vs_hf_eager"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert "agreement_vs_hf_eager" not in rows[1]  # itself
    assert "agreement_vs_hf_eager" not in rows[2]  # another shape
    assert "agreement_vs_hf_eager" not in rows[3]  # no hf-eager output for that case


def test_generate_ratios_and_plot_rows(bench, common, tmp_path):
    generate = bench.bench_generate
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
    assert fused["ratio_vs_hf_sdpa"] == pytest.approx(5.0)
    assert fused["ratio_vs_hf_static_compiled"] == pytest.approx(2.0)
    assert fused["ratio_vs_hf_best_dynamic"] == pytest.approx(1000.0 / 200.0)
    assert "ratio_vs_hf_best_dynamic" not in rows[4], "transformers' own providers are not ranked against it"
    assert "ratio_vs_hf_eager" not in rows[5]
    assert not any(key.startswith("ratio") for key in rows[0])

    plotted = generate.plot_rows(rows, tmp_path / "unused.csv", merge=False)
    assert [(r["case"], r["provider"]) for r in plotted] == [
        ("m b1", "fusedgpt"), ("m b1", "hf-eager"), ("m b1", "hf-sdpa"), ("m b1", "hf-static-compiled"),
        ("m b16", "hf-eager"), ("m b1", generate.BOUND_PROVIDER), ("m b16", generate.BOUND_PROVIDER)]
    assert plotted[-2]["tokens_per_s"] == 4000.0 and plotted[-1]["tokens_per_s"] == 50.0

    path = common.write_results_csv(rows, "generate", tmp_path)
    merged = generate.plot_rows([], path, merge=True)  # with --merge: every generate row of the CSV
    assert [(r["case"], r["provider"]) for r in merged] == [(r["case"], r["provider"]) for r in plotted]
    assert all(isinstance(r["tokens_per_s"], float) for r in merged)
    args = argparse.Namespace(out_dir=tmp_path, merge=True, no_plot=False)
    generate.finish([fake_row("generate", "m b1", "fusedgpt", ms=0.9, tokens_per_s=1100.0)], args)
    assert_png(tmp_path / "nvidia-h100-80gb-hbm3_generate.png")
    _, written = read_csv(path)
    assert len(written) == len(rows)  # (m b1, fusedgpt) replaced, everything else kept


def test_patching_add_ratios(bench):
    rows = [fake_row("patching", "m:prefill", "hf-eager", ms=10.0), fake_row("patching", "m:prefill", "hf-sdpa", ms=4.0),
            fake_row("patching", "m:prefill", "fusedgpt-triton", ms=2.0),
            fake_row("patching", "m:prefill", "fusedgpt-cuda", error="skipped"),
            fake_row("patching", "neo:prefill", "hf-eager", ms=6.0),
            fake_row("patching", "neo:prefill", "hf-sdpa", error="skipped: GPT-Neo has no sdpa"),
            fake_row("patching", "neo:prefill", "fusedgpt-triton", ms=3.0)]
    bench.bench_patching.add_ratios(rows)
    assert rows[2]["ratio_vs_hf_eager"] == pytest.approx(5.0) and rows[2]["ratio_vs_hf_sdpa"] == pytest.approx(2.0)
    assert rows[2]["ratio_vs_best_hf"] == pytest.approx(2.0)
    assert "ratio_vs_best_hf" not in rows[3]
    assert rows[6]["ratio_vs_best_hf"] == pytest.approx(2.0) and "ratio_vs_hf_sdpa" not in rows[6]


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
    assert "PASS 1.12x (cuda)" in c1 and "PASS 1.25x (triton)" in c1
    c2 = next(line for line in lines if line.startswith("c2"))
    assert c2.split()[2:] == ["n/a", "n/a"]
    rows[2]["ms"] = 0.4
    kv.print_bar(rows[:3])
    assert "FAIL 0.50x (cuda)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Each op script's main() end to end on the CPU (fake timing, real kernels under the interpreter)
# ----------------------------------------------------------------------------------------------------

def run_main(module, argv, tmp_path):
    assert module.main(argv + ["--out-dir", str(tmp_path), "--graph-calls", "3"]) == 0
    path = tmp_path / "nvidia-h100-80gb-hbm3.csv"
    columns, rows = read_csv(path)
    assert columns[:len(module.common.CSV_COLUMNS)] == list(module.common.CSV_COLUMNS)
    return rows


def assert_timed(row, *, graph: bool):
    assert row["error"] == "", row["error"]
    assert row["check"] == "ok", (row["provider"], row["check"])
    assert float(row["ms"]) == FAKE_MS
    assert (float(row["us_graph"]) == FAKE_US_GRAPH) if graph else row["us_graph"] == ""


def test_layer_norm_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_layer_norm
    cases = [{"tokens": 3, "hidden": 1001, "residual": True}, {"tokens": 40, "hidden": 64, "residual": False}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    import fusedgpt

    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    rows = run_main(module, ["--dtypes", "fp16"], tmp_path)
    rows_by = by_provider(rows)
    assert len(rows) == 2 * len(module.PROVIDERS) - 1  # the empty kernel only where graphs are timed
    for case, graph in (("3x1001 res", True), ("40x64 nores", False)):
        for provider in ("fusedgpt-triton", "torch-eager", "torch-compile"):
            row = rows_by[(case, provider)]
            assert_timed(row, graph=graph)
            tokens, hidden = (3, 1001) if graph else (40, 64)
            assert int(row["bytes"]) == module.effective_bytes(tokens, hidden, graph, 2)
            assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / (FAKE_MS * 1e-3) / 1e9, rel=1e-5)
            assert float(row["ratio_vs_torch_eager"]) == pytest.approx(1.0)
        assert rows_by[(case, "fusedgpt-cuda")]["error"] == bench.common.CUDA_EXTENSION_MISSING
    assert rows_by[("3x1001 res", "empty-kernel")]["us_graph"] == f"{FAKE_US_GRAPH:.6g}"
    assert ("40x64 nores", "empty-kernel") not in rows_by
    assert cpu_run["compile"] == 2 and cpu_run["graph"] == 4
    assert_png(tmp_path / "nvidia-h100-80gb-hbm3_layer_norm.png")


def test_bias_act_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_bias_act
    monkeypatch.setattr(module, "benchmark_cases", lambda quick, activations, all_shapes: [
        {"activation": activation, "tokens": 5, "hidden": 1001} for activation in activations])
    rows = run_main(module, ["--dtypes", "fp16", "--providers", "fusedgpt-triton,torch-eager,torch-compile",
                             "--no-plot"], tmp_path)
    assert len(rows) == 3 * 3
    for row in rows:
        assert_timed(row, graph=True)
        assert int(row["bytes"]) == module.effective_bytes(5, 1001, 2)
    assert {row["activation"] for row in rows} == set(module.ACTIVATIONS)
    assert not list(tmp_path.glob("*.png"))


def test_kv_append_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path, capsys):
    module = bench.bench_kv_append
    monkeypatch.setattr(module, "MAX_LEN", 24)
    monkeypatch.setattr(module, "POSITION", 9)
    cases = [{"batch": 2, "new_tokens": 3, "heads": 3, "head_dim": 64}, {"batch": 1, "new_tokens": 1, "heads": 2,
                                                                         "head_dim": 128}]
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
            expected = 2 * one if provider == "torch-copy-k-only" else 4 * one + 4 * case["batch"]
            assert int(row["bytes"]) == expected
        assert float(rows_by[(label, "fusedgpt-triton")]["ratio_vs_torch_copy_k_only"]) == pytest.approx(1.0)
        assert rows_by[(label, "empty-kernel")]["us_graph"] == f"{FAKE_US_GRAPH:.6g}"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_attention
    monkeypatch.setattr(module, "CHECK_QUERIES", 8)  # fewer than the sequence: the slices are checked
    cases = [{"batch": 2, "seq_len": 24, "heads": 2, "head_dim": 64, "window": None, "scale": None},
             {"batch": 1, "seq_len": 40, "heads": 3, "head_dim": 80, "window": 16, "scale": 1.0}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    providers = "fusedgpt-cuda,fusedgpt-triton,sdpa-flash,flex-attention,flash-attn"
    rows = run_main(module, ["--dtypes", "fp16", "--providers", providers], tmp_path)
    rows_by = by_provider(rows)
    for case in cases:
        label = module.case_label(case)
        window = case["window"]
        for provider in ("fusedgpt-triton", "sdpa-flash", "flex-attention"):
            row = rows_by[(label, provider)]
            assert_timed(row, graph=False)
            computed_window = None if provider == "sdpa-flash" else window
            pairs = int(explicit_visible_mask(case["seq_len"], case["seq_len"], computed_window).sum())
            assert int(row["flops"]) == 4 * case["batch"] * case["heads"] * case["head_dim"] * pairs
            assert float(row["tflops"]) == pytest.approx(int(row["flops"]) / (FAKE_MS * 1e-3) / 1e12, rel=1e-5)
            assert row["bytes"] == ""
            assert row["mask"] == module.mask_name(window, provider)
        assert rows_by[(label, "fusedgpt-cuda")]["error"].startswith("skipped: ")  # the probe failed on the CPU
        assert rows_by[(label, "flash-attn")]["error"].startswith("not installed: ")
        assert float(rows_by[(label, "fusedgpt-triton")]["ratio_vs_sdpa_flash"]) == pytest.approx(1.0)
    assert cpu_run["compile"] == 2  # flex-attention: a fresh compile per case
    assert_png(tmp_path / "nvidia-h100-80gb-hbm3_attention.png")


def test_decode_attention_main_on_cpu(bench, cpu_run, monkeypatch, tmp_path):
    module = bench.bench_decode_attention
    cases = [{"batch": 1, "cache_len": 20, "heads": 2, "head_dim": 64, "window": None},
             {"batch": 2, "cache_len": 21, "heads": 3, "head_dim": 64, "window": 8},
             {"batch": 1, "cache_len": 5, "heads": 2, "head_dim": 128, "window": 8}]
    monkeypatch.setattr(module, "benchmark_cases", lambda quick: cases)
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    rows = run_main(module, ["--dtypes", "fp16"], tmp_path)
    rows_by = by_provider(rows)
    for case in cases:
        label = module.case_label(case)
        batch, length, window = case["batch"], case["cache_len"], case["window"]
        graph = batch == 1
        for provider in ("fusedgpt-triton", module.NOAPPEND, "sdpa"):
            row = rows_by[(label, provider)]
            assert_timed(row, graph=graph)
            assert float(row["us"]) == pytest.approx(FAKE_MS * 1000)
            appending = provider in module.APPENDING
            expected = module.decode_bytes(batch, case["heads"], case["head_dim"], length, window, 2,
                                           appending=appending, with_lengths=provider != "sdpa")
            assert int(row["bytes"]) == expected
            assert int(row["max_len"]) == length + module.CACHE_SLACK and int(row["position"]) == length
        assert rows_by[(label, "flash-attn")]["error"].startswith("not installed: ")
        assert rows_by[(label, "fusedgpt-cuda")]["error"].startswith("skipped: ")
        assert ((label, "empty-kernel") in rows_by) == graph
        assert float(rows_by[(label, module.NOAPPEND)]["ratio_vs_sdpa"]) == pytest.approx(1.0)
    assert_png(tmp_path / "nvidia-h100-80gb-hbm3_decode_attention.png")


def test_merge_keeps_the_rows_of_an_earlier_call(bench, cpu_run, monkeypatch, tmp_path):
    """A family split over two calls with --merge (run_gpu.sh's advice for long runs) ends up with both
    calls' rows, and its plot shows them all."""
    module = bench.bench_bias_act
    monkeypatch.setattr(module, "benchmark_cases", lambda quick, activations, all_shapes: [
        {"activation": activations[0], "tokens": 2, "hidden": 64}])
    common_args = ["--dtypes", "fp16", "--providers", "torch-eager"]
    run_main(module, common_args + ["--activations", "relu"], tmp_path)
    rows = run_main(module, common_args + ["--activations", "gelu", "--merge"], tmp_path)
    assert sorted(row["case"] for row in rows) == ["gelu 2x64", "relu 2x64"]
    rows = run_main(module, common_args + ["--activations", "gelu"], tmp_path)  # no --merge: replaced
    assert [row["case"] for row in rows] == ["gelu 2x64"]


# ----------------------------------------------------------------------------------------------------
# bench_generate and bench_patching on tiny models on the CPU
# ----------------------------------------------------------------------------------------------------

def tiny_gpt2_config():
    import transformers

    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=100)


def test_generate_run_model_on_cpu(bench, common, monkeypatch, tmp_path):
    generate = bench.bench_generate
    monkeypatch.setattr(generate, "DEVICE", "cpu")
    monkeypatch.setitem(common.MODEL_CONFIGS, "tiny-gpt2", tiny_gpt2_config)
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # the reference ops: fast on the CPU
    real_timed_calls = generate.timed_calls

    def timed_calls(function, repeats):  # wall clock on a loaded CPU proves nothing: 1 ms per output token
        _, result = real_timed_calls(function, repeats)
        ids = getattr(result, "ids", result)
        return [1e-3 * ids.shape[1]] * repeats, result

    monkeypatch.setattr(generate, "timed_calls", timed_calls)
    batch, prompt, new = 2, 5, 6
    rows = generate.run_model("tiny-gpt2", torch.float32, [(batch, prompt, new)], ["fusedgpt", "hf-eager", "hf-sdpa"],
                              repeats=1, copy_gbps=100.0)
    rows_by = {row["provider"]: row for row in rows}
    assert set(rows_by) == {"fusedgpt", "hf-eager", "hf-sdpa"}
    for provider, row in rows_by.items():
        assert "error" not in row, row.get("error")
        assert row["check"] == "ok" and row["case"] == "tiny-gpt2 b2 p5 n6" and row["dtype"] == "fp32"
        assert row["tokens_per_s"] == pytest.approx(batch * (new - 1) / (row["decode_ms"] / 1e3))
        assert row["bound_tokens_per_s"] == pytest.approx(batch * 100.0 * 1e9 / row["bytes"])
        assert row["heads"] == 4 and row["head_dim"] == 8 and row["layers"] == 2
    assert rows_by["fusedgpt"]["attn"] == "torch"
    assert 0.0 <= rows_by["fusedgpt"]["agreement_vs_hf_eager"] <= 1.0
    assert rows_by["hf-sdpa"]["agreement_vs_hf_eager"] == pytest.approx(1.0)  # same weights, fp32
    generate.finish(rows, argparse.Namespace(out_dir=tmp_path, merge=False, no_plot=False))
    assert_png(tmp_path / "nvidia-h100-80gb-hbm3_generate.png")
    assert len(read_csv(tmp_path / "nvidia-h100-80gb-hbm3.csv")[1]) == 3


def test_generate_gpt_neo_fallbacks_on_cpu(bench, common, monkeypatch):
    """GPT-Neo has no sdpa in transformers: hf-sdpa is an error row, hf-static-compiled falls back to eager."""
    import transformers

    generate = bench.bench_generate
    monkeypatch.setattr(generate, "DEVICE", "cpu")
    monkeypatch.setitem(common.MODEL_CONFIGS, "tiny-neo", lambda: transformers.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
        max_position_embeddings=64, vocab_size=100, bos_token_id=None, eos_token_id=None))
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


def test_patching_providers_and_modes_on_cpu(bench, common, monkeypatch):
    import transformers

    patching = bench.bench_patching
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # restored after the test: use_provider sets it
    monkeypatch.setattr(common, "time_ms", lambda function: (function(), FAKE_MS)[-1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_gpt2_config(), attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    inputs = {"prefill": torch.randint(1, 100, (2, 9)),
              "prompt": (torch.randint(1, 100, (2, 5)), torch.ones(2, 5, dtype=torch.int64))}
    reference: dict = {}
    results = {}
    with torch.no_grad():
        for provider in ("hf-eager", "hf-sdpa", "fusedgpt-triton"):
            assert patching.use_provider(model, provider) is None
            if provider == "fusedgpt-triton":
                assert os.environ["FUSEDGPT_BACKEND"] == "triton"
                monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")  # keep the run fast: the reference ops
            for mode in ("prefill", "generate", "generate-static"):
                results[(provider, mode)] = patching.measure_mode(model, mode, inputs, 3, 1, reference)
        import fusedgpt

        fusedgpt.unpatch(model)
    assert results[("hf-eager", "prefill")]["check"] is None  # the first provider is the reference
    for provider in ("hf-sdpa", "fusedgpt-triton"):
        assert results[(provider, "prefill")]["check"] == "ok"
    for (provider, mode), result in results.items():
        if mode == "prefill":
            assert result["tokens"] == 18 and result["ms"] == FAKE_MS
            assert result["tokens_per_s"] == pytest.approx(18 / (FAKE_MS * 1e-3))
        else:
            assert result["tokens"] == 2 * 3 and result["new_tokens"] == 3
            assert result["tokens_per_s"] == pytest.approx(6 / (result["ms"] * 1e-3))

    neo = transformers.AutoModelForCausalLM.from_config(transformers.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8,
        max_position_embeddings=64, vocab_size=100), attn_implementation="eager")
    assert "GPT-Neo has no sdpa" in patching.use_provider(neo, "hf-sdpa")
    import fusedgpt

    monkeypatch.setattr(fusedgpt, "extension_available", lambda: False)
    assert patching.use_provider(neo, "fusedgpt-cuda") == common.CUDA_EXTENSION_MISSING


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
