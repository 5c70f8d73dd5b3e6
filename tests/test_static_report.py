"""bench/static_report.py: the occupancy arithmetic, the parsing of ptxas and of the SASS, the matching of
nvcc's and the host compiler's names for one instantiation, what the Triton recorder compiles for a
launcher, the CI check, and the committed report itself (bench/results/static-sm_90.csv).

The whole report runs in CI (.ci/run); these tests check its parts on inputs whose answer is known."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import static_report  # noqa: E402

SM90 = static_report.ARCHS["sm_90"]
SM80 = static_report.ARCHS["sm_80"]
COMMITTED = ROOT / "bench" / "results" / "static-sm_90.csv"


@pytest.mark.parametrize("arch, threads, registers, shared, expected", [
    (SM90, 128, 128, 18432, 4),  # registers: 4 warps x 4096 = 16384 of 65536
    (SM90, 128, 166, 35840, 3),  # 166 registers are allocated as 168: 4 x 5376 = 21504 per block
    (SM90, 256, 32, 100 * 1024, 2),  # shared memory: 228 KB / (100 KB + the 1 KB reserve)
    (SM80, 256, 32, 100 * 1024, 1),  # 164 KB on sm_80
    (SM90, 32, 16, 0, 32),  # the per-SM block limit
    (SM90, 1024, 32, 0, 2),  # 64 warps per SM
    (SM90, 128, 255, 0, 2),
])
def test_occupancy(arch, threads, registers, shared, expected):
    assert static_report.ctas_per_sm(arch, threads, registers, shared) == expected


def test_bound_is_the_larger_of_compute_and_memory_time():
    assert static_report.bound_us(SM90, 788e12, 0) == pytest.approx(1e6)
    assert static_report.bound_us(SM90, 1, 4.3e12) == pytest.approx(1e6)
    assert static_report.bound_us(SM90, 788e6, 4.3e3) == pytest.approx(1.0)


PTXAS = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN8fusedgpt9attention20attention_fwd_kernelI6__halfLi128EEEvNS0_6ParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN8fusedgpt9attention20attention_fwd_kernelI6__halfLi128EEEvNS0_6ParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 166 registers, used 1 barriers, 35840 bytes smem
ptxas info    : Compile time = 91.888 ms
ptxas info    : Compiling entry function '_Z7spillerPf' for 'sm_90'
ptxas info    : Function properties for _Z7spillerPf
    112 bytes stack frame, 216 bytes spill stores, 432 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 112 bytes cumulative stack size, 132 bytes smem
ptxas info    : Compiling entry function '_Z5plainv' for 'sm_90'
ptxas info    : Function properties for _Z5plainv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers
"""


def test_ptxas_output_is_read_per_entry():
    found = static_report.parse_ptxas(PTXAS)
    assert found["_ZN8fusedgpt9attention20attention_fwd_kernelI6__halfLi128EEEvNS0_6ParamsE"] == {
        "registers": 166, "spill_bytes": 0, "stack": 0, "shared_bytes": 35840}
    assert found["_Z7spillerPf"] == {"registers": 64, "spill_bytes": 648, "stack": 112, "shared_bytes": 132}
    assert found["_Z5plainv"] == {"registers": 4, "spill_bytes": 0, "stack": 0, "shared_bytes": 0}


def test_nvcc_and_host_compiler_names_of_one_instantiation_meet():
    """The emulator's kernels are compiled by g++, the real ones by nvcc: one instantiation must get one key
    (nvcc's anonymous namespace carries a per-file hash, the host compiler's does not)."""
    nvcc_symbol = ("_ZN8fusedgpt51_GLOBAL__N__d5b5299f_13_layer_norm_cu_36d6462f_352321layer_norm_fwd_kernelI"
                   "N3c104HalfELi8ELi2EEEvPKT_S6_S6_S6_PS4_S7_illf")
    gxx_symbol = "_ZN8fusedgpt12_GLOBAL__N_121layer_norm_fwd_kernelIN3c104HalfELi8ELi2EEEvPKT_S6_S6_S6_PS4_S7_illf"
    keys = [static_report.kernel_key(name) for name in static_report.demangle([nvcc_symbol, gxx_symbol])]
    assert keys == ["fusedgpt::layer_norm_fwd_kernel<c10::Half, 8, 2>"] * 2
    assert static_report.short_name(keys[0]) == "layer_norm_fwd_kernel<c10::Half, 8, 2>"
    assert static_report.kernel_key("void f<(fusedgpt::Activation)0>(float const*, int (*)(int))") == \
        "f<(fusedgpt::Activation)0>"


def _row(**fields):
    base = {"backend": "cuda", "family": "attention", "kernel": "k<__half, 64>", "case": "c", "dtype": "fp16",
            "config": "threads=128", "reachable": "yes", "spill_bytes": "0", "error": ""}
    return {**base, **fields}


def test_check_fails_on_what_ci_guards_and_only_on_that():
    assert static_report.check([_row()], []) == []
    assert "spills 8 bytes" in static_report.check([_row(spill_bytes="8")], [])[0]
    assert static_report.check([_row(spill_bytes="8", reachable="no")], []) == []  # listed, not reachable
    assert "does not compile" in static_report.check([_row(backend="triton", error="does not compile: X")], [])[0]
    baseline = [_row(shared_conflict_ratio="1.0", global_sector_efficiency="0.9")]
    assert static_report.check([_row(shared_conflict_ratio="1.0", global_sector_efficiency="0.95")], baseline) == []
    worse = static_report.check([_row(shared_conflict_ratio="2.5", global_sector_efficiency="0.5")], baseline)
    assert len(worse) == 2 and "shared_conflict_ratio 1.0 -> 2.5" in worse[0] and "global_sector_efficiency" in worse[1]
    assert static_report.check([_row(case="another", shared_conflict_ratio="9")], baseline) == []  # a new row


def _without_interpreter(code: str) -> str:
    """Runs code in a fresh process without TRITON_INTERPRET (conftest sets it here): the report compiles
    for a GPU and would otherwise see the interpreter's single autotune configuration."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=environment, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_recorder_compiles_what_the_launchers_choose():
    out = _without_interpreter("""
        import sys; sys.path.insert(0, "bench")
        import torch, static_report as s
        from fusedgpt.triton_kernels import attention
        cases = s.benchmark_cases(["layer_norm", "attention"])
        ln = next(c for c in cases if c.family == "layer_norm" and c.size == 4096 and c.dtype == torch.bfloat16)
        (name, job), = s.record_triton_launches(ln, 90)
        print(name, job.config_text(), dict(job.signature)["X"], dict(job.constexprs)["BLOCK_C"])
        d128 = next(c for c in cases if c.family == "attention" and c.size == 128)
        configs = sorted(job.config_text() for _, job in s.record_triton_launches(d128, 90))
        expected = sorted(f"BLOCK_D=128 BLOCK_M={c.kwargs['BLOCK_M']} BLOCK_N={c.kwargs['BLOCK_N']} "
                          f"warps={c.num_warps} stages={c.num_stages}"
                          for c in attention._GPU_CONFIGS if c.kwargs["BLOCK_N"] < 128)
        print(configs == expected, len(configs))
    """).split("\n")
    assert out[0] == "_layer_norm_fwd_kernel BLOCK_C=4096 warps=8 stages=3 *bf16 4096"  # 4096 // 512 warps
    assert out[1] == "True 3"  # the D=128 pruning drops BLOCK_N=128


def test_triton_compile_reads_tensor_cores_from_the_sass(tmp_path):
    (tmp_path / "product_kernel.py").write_text(textwrap.dedent("""
        import triton, triton.language as tl

        @triton.jit
        def _product(A, B, C, N: tl.constexpr):
            rows = tl.arange(0, N)
            a = tl.load(A + rows[:, None] * N + rows[None, :])
            b = tl.load(B + rows[:, None] * N + rows[None, :])
            tl.store(C + rows[:, None] * N + rows[None, :], tl.dot(a, b))
    """))
    out = _without_interpreter(f"""
        import sys; sys.path[:0] = ["bench", {str(tmp_path)!r}]
        import static_report as s
        signature = (("A", "*fp16"), ("B", "*fp16"), ("C", "*fp32"), ("N", "constexpr"))
        for capability in (90, 80):
            job = s.TritonCompile("product_kernel", "_product", signature, (("N", 64),), (), 4, 2, capability)
            result = s.compile_triton(job)
            print(capability, result["tensor_core"], result["spill_bytes"], result["registers"] > 0,
                  result["threads"])
    """).strip().split("\n")
    assert out == ["90 wgmma 0 True 128", "80 mma.sync 0 True 128"]


def test_the_committed_report_covers_every_family_and_backend():
    if not COMMITTED.exists():
        pytest.fail(f"{COMMITTED} is missing: run python bench/static_report.py and commit its output")
    with open(COMMITTED, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == static_report.COLUMNS
    for family in static_report.FAMILIES:
        for backend in static_report.BACKENDS:
            assert any(r["family"] == family and r["backend"] == backend and r["reachable"] == "yes" for r in rows), \
                (family, backend)
    reachable_cuda = [r for r in rows if r["backend"] == "cuda" and r["reachable"] == "yes"]
    assert all(r["global_sector_efficiency"] for r in reachable_cuda)  # every kernel touches global memory
    assert all(float(r["bound_us"]) > 0 for r in rows if r["reachable"] == "yes")
    assert static_report.check(rows, rows) == []
    assert COMMITTED.with_suffix(".md").exists()
