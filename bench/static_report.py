"""Static performance report of every fusedgpt kernel for one GPU architecture, made without a GPU.

Until a GPU measures a kernel, its speed is argued from what the compiler and the CPU emulator show
(CONVENTIONS.md, "Speed without a GPU"). For every benchmark case of bench/bench_<family>.py (all five
families, fp16 and bf16) this writes one row per kernel x configuration that the launcher (or the
autotuner) can choose for that case, for both backends:

  Triton  the real launcher in triton_kernels/ is called on meta tensors of the benchmark's shapes with
          its kernel replaced by a recorder, so the report compiles exactly the arguments, constexprs and
          specialisation (Triton's own specialiser: 16-byte divisibility, ints equal to 1) the launcher
          would send; an autotuned kernel gives one row per configuration its pruning keeps. Each one is
          compiled ahead of time with triton.compile(..., target=GPUTarget("cuda", 90, 32)).
  CUDA    every csrc/**/*.cu is compiled by nvcc for the architecture alone (-cubin, the extension's own
          flags) with -Xptxas -v; the instantiation a case reaches, its block size and the emulator's
          memory counters come from running the real host code and kernels in the SIMT emulator
          (tests/simt, counting flavour) on a scaled-down copy of the case (same dtype, head dim, hidden
          size, window: what the launchers choose by; fewer tokens, heads and batches). Instantiations no
          case reaches are listed with reachable = no.

Columns: backend, family, kernel, case, dtype, head_dim (or hidden size), config, threads, registers,
spill_bytes (spill stores + loads; Triton: the cubin's local memory, which only spills use), shared_bytes
(CUDA: ptxas's static bytes plus the dynamic bytes of the launch the emulator ran; unreached
instantiations: static only),
ctas_per_sm (the occupancy limit from registers, shared memory, threads and the per-SM block limit),
tensor_core (HGMMA in the SASS = wgmma, HMMA = mma.sync, else none), cp_async (LDGSTS; TMA = UTMALDG),
ldmatrix (LDSM), shared_wavefronts_per_request and shared_conflict_ratio (wavefronts / the conflict-free
ideal: 1.0 means no bank conflict), global_sector_efficiency (distinct bytes requested / 32-byte sectors
touched x 32), both from the emulator (CUDA only), and bound_us: the speed-of-light time of the FULL
benchmark shape, max(FLOPs / peak FLOP/s, bytes / peak bytes/s), from the FLOP and byte counts the
benchmark itself reports against the peaks named in the .md. A bound is a bound, not a prediction.

    python bench/static_report.py [--arch sm_90|sm_80] [--out-dir bench/results] [--families a,b]
                                  [--backends triton,cuda] [--check BASELINE_CSV]

--check compares the new report with a committed one and exits 1 on: a spill in a reachable
instantiation, a Triton configuration that does not compile or needs more shared memory than the
architecture gives a block, or a memory counter worse than the baseline's for the same row.
Needs: triton (its ptxas/cuobjdump), nvcc for the CUDA rows, the C++ compiler for the emulator.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import datetime
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))  # the benchmarks' cases, FLOP and byte counts
sys.path.insert(0, str(ROOT / "tests" / "simt"))  # the emulator

import torch  # noqa: E402
import triton  # noqa: E402

import bench_attention  # noqa: E402
import bench_bias_act  # noqa: E402
import bench_decode_attention  # noqa: E402
import bench_kv_append  # noqa: E402
import bench_layer_norm  # noqa: E402

FAMILIES = ("attention", "decode_attention", "kv_append", "layer_norm", "bias_act")
BACKENDS = ("triton", "cuda")
DTYPES = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

COLUMNS = ["backend", "family", "kernel", "case", "dtype", "head_dim", "config", "reachable", "threads",
           "registers", "spill_bytes", "shared_bytes", "ctas_per_sm", "tensor_core", "cp_async", "ldmatrix",
           "shared_wavefronts_per_request", "shared_conflict_ratio", "global_sector_efficiency",
           "flops", "bytes", "bound_us", "error"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """What bounds occupancy on one architecture (CUDA C++ Programming Guide, compute capability tables),
    and the peaks bound_us is computed against (named in the report)."""
    name: str
    capability: int
    registers_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    shared_per_sm: int  # bytes a multiprocessor can give its blocks
    shared_per_block: int  # the most one block may use (opt-in)
    reserved_shared_per_block: int  # the runtime's own share of each block's shared memory
    peak_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    peak_bytes_per_s: float
    peaks_source: str


ARCHS = {
    "sm_90": Arch("sm_90", 90, 65536, 64, 32, 228 * 1024, 227 * 1024, 1024, 788e12, 4.3e12,
                  "H200, measured on the lent machine (/work/.library/device/KINDS.md, 2026-10-28): a bf16 "
                  "8192^3 matrix product at 788 TFLOP/s on random data, a device-to-device copy at 4.3 TB/s"),
    "sm_80": Arch("sm_80", 80, 65536, 64, 32, 164 * 1024, 163 * 1024, 1024, 312e12, 2.039e12,
                  "A100-SXM4-80GB datasheet: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e (not measured here)"),
}


def ctas_per_sm(arch: Arch, threads: int, registers: int, shared_bytes: int) -> int:
    """Resident blocks per multiprocessor: registers are allocated per warp in units of 256 (8 per
    thread), shared memory per block plus the runtime's reserve."""
    warps = math.ceil(threads / 32)
    limits = [arch.max_blocks_per_sm, arch.max_warps_per_sm // warps]
    if registers > 0:
        per_warp = math.ceil(registers * 32 / 256) * 256
        limits.append(arch.registers_per_sm // (per_warp * warps))
    if shared_bytes > 0:
        limits.append(arch.shared_per_sm // (shared_bytes + arch.reserved_shared_per_block))
    return max(0, min(limits))


def bound_us(arch: Arch, flops: int, bytes_moved: int) -> float:
    return 1e6 * max(flops / arch.peak_flops, bytes_moved / arch.peak_bytes_per_s)


# ----------------------------------------------------------------------------------------------------
# The benchmark cases: full shape (for the bound), scaled-down shape (for the emulator), launch on meta
# tensors (for Triton), and the FLOP / byte counts the benchmark reports.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    family: str
    label: str
    dtype: torch.dtype
    size: int  # head dim, or hidden size for the memory-bound ops
    flops: int
    bytes: int
    triton_launch: Callable[[], None]  # calls the Triton launcher on meta tensors
    emulator_code: str  # Python run in the emulator's process: `ops` is torch.ops.fusedgpt_simt


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_cases(dtype):
    from fusedgpt.triton_kernels.attention import attention_bwd, attention_fwd

    for case in bench_attention.benchmark_cases(quick=False):
        batch, seq, heads, dim, window, scale = (case["batch"], case["seq_len"], case["heads"], case["head_dim"],
                                                 case["window"], case["scale"])
        element = torch.tensor([], dtype=dtype).element_size()
        scale_value = scale if scale is not None else dim ** -0.5

        def launch(batch=batch, seq=seq, heads=heads, dim=dim, window=window, scale_value=scale_value):
            q = _meta(batch, seq, heads, dim, dtype=dtype)
            attention_fwd(q, _meta(batch, seq, heads, dim, dtype=dtype), _meta(batch, seq, heads, dim, dtype=dtype),
                          True, window, scale_value, None)

        small_seq = 512 if window is not None else 192  # a window needs keys outside it
        small_window = 256 if window is not None else None
        code = (f"q, k, v = (torch.randn(1, {small_seq}, 2, {dim}, dtype={dtype}) for _ in range(3))\n"
                f"ops.attention(q, k, v, True, {small_window}, {scale_value}, None)\n")
        yield Case("attention", bench_attention.case_label(case), dtype, dim,
                   bench_attention.attention_flops(batch, heads, dim, seq, window),
                   4 * batch * seq * heads * dim * element, launch, code)

        def train(batch=batch, seq=seq, heads=heads, dim=dim, window=window, scale_value=scale_value):
            q, k, v = (_meta(batch, seq, heads, dim, dtype=dtype) for _ in range(3))
            out, lse = attention_fwd(q, k, v, True, window, scale_value, None, store_lse=True)
            attention_bwd(_meta(batch, seq, heads, dim, dtype=dtype), q, k, v, out, lse, True, window, scale_value,
                          None)

        # A training step's attention (Triton only): the forward keeping the log-sum-exp, then the backward,
        # whose five matmuls per tile are 2.5x the forward's FLOPs (FlashAttention-2's count); bytes: q, k,
        # v, out read and written once forward, q, k, v, out, dout read and dq, dk, dv written backward.
        yield Case("attention", bench_attention.case_label(case) + " train", dtype, dim,
                   bench_attention.attention_flops(batch, heads, dim, seq, window) * 7 // 2,
                   12 * batch * seq * heads * dim * element, train, "")


H200_MULTIPROCESSORS = 132  # the lent H200, as PyTorch reported it (/work/.library/device/KINDS.md, 2026-10-28)


def _decode_attention_cases(dtype):
    from fusedgpt.triton_kernels.decode_attention import choose_splits, decode_attention_fwd, key_range

    module = bench_decode_attention
    for case in module.benchmark_cases(quick=False):
        batch, length, heads, dim, window = (case["batch"], case["cache_len"], case["heads"], case["head_dim"],
                                             case["window"])
        tokens, max_len = module.NEW_TOKENS, length + module.CACHE_SLACK
        element = torch.tensor([], dtype=dtype).element_size()

        def launch(batch=batch, heads=heads, dim=dim, window=window, tokens=tokens, max_len=max_len):
            new = lambda: _meta(batch, tokens, heads, dim, dtype=dtype)  # noqa: E731  (B, T, H, D)
            # The split count an H200 would get (one split compiles the variant that writes out directly).
            splits = choose_splits(batch * heads, key_range(max_len, window, tokens), 64, None,
                                   processors=H200_MULTIPROCESSORS)
            decode_attention_fwd(new(), _meta(batch, max_len, heads, dim, dtype=dtype),
                                 _meta(batch, max_len, heads, dim, dtype=dtype),
                                 _meta(batch, dtype=torch.int32), new(), new(), window, dim ** -0.5, None, splits)

        small_len = 300 if window is not None else 96
        code = (f"caches = [torch.randn(1, {small_len + 16}, 2, {dim}, dtype={dtype}) for _ in range(2)]\n"
                f"q, k, v = (torch.randn(1, {tokens}, 2, {dim}, dtype={dtype}) for _ in range(3))\n"
                f"lengths = torch.full((1,), {small_len}, dtype=torch.int32)\n"
                f"ops.decode_attention(q, caches[0], caches[1], lengths, k, v, "
                f"{window if window is not None else None}, {dim ** -0.5}, None, 2)\n")  # 2 splits: the combine runs
        yield Case("decode_attention", module.case_label(case), dtype, dim, 0,
                   module.decode_bytes(batch, heads, dim, length, window, element, appending=True, with_lengths=True),
                   launch, code)


def _kv_append_cases(dtype):
    from fusedgpt.triton_kernels.kv_append import kv_append_fwd

    module = bench_kv_append
    for case in module.benchmark_cases(quick=False):
        batch, tokens, heads, dim = case["batch"], case["new_tokens"], case["heads"], case["head_dim"]
        element = torch.tensor([], dtype=dtype).element_size()

        def launch(batch=batch, tokens=tokens, heads=heads, dim=dim):
            kv_append_fwd(_meta(batch, module.MAX_LEN, heads, dim, dtype=dtype),
                          _meta(batch, module.MAX_LEN, heads, dim, dtype=dtype),
                          _meta(batch, tokens, heads, dim, dtype=dtype), _meta(batch, tokens, heads, dim, dtype=dtype),
                          _meta(batch, dtype=torch.int32))

        code = (f"caches = [torch.randn(1, 64, {heads}, {dim}, dtype={dtype}) for _ in range(2)]\n"
                f"k, v = (torch.randn(1, {tokens}, {heads}, {dim}, dtype={dtype}) for _ in range(2))\n"
                f"ops.kv_append(caches[0], caches[1], k, v, torch.full((1,), 40, dtype=torch.int32))\n")
        yield Case("kv_append", module.describe_case(case), dtype, dim, 0,
                   4 * batch * tokens * heads * dim * element + 4 * batch, launch, code)


def _layer_norm_cases(dtype):
    from fusedgpt.triton_kernels.layer_norm import layer_norm_fwd

    module = bench_layer_norm
    for case in module.benchmark_cases(quick=False):
        tokens, hidden, residual = case["tokens"], case["hidden"], case["residual"]
        element = torch.tensor([], dtype=dtype).element_size()

        def launch(tokens=tokens, hidden=hidden, residual=residual):
            x = _meta(tokens, hidden, dtype=dtype)
            layer_norm_fwd(x, _meta(hidden, dtype=dtype), _meta(hidden, dtype=dtype), module.EPS,
                           _meta(tokens, hidden, dtype=dtype) if residual else None)

        rows = min(tokens, 3)
        make = f"x, r = (torch.randn({rows}, {hidden}, dtype={dtype}) for _ in range(2))\n" \
               f"w, b = (torch.randn({hidden}, dtype={dtype}) for _ in range(2))\n"
        call = f"ops.add_layer_norm(x, r, w, b, {module.EPS})\n" if residual else \
               f"ops.layer_norm(x, w, b, {module.EPS})\n"
        yield Case("layer_norm", module.describe_case(case), dtype, hidden, 0,
                   module.effective_bytes(tokens, hidden, residual, element), launch, make + call)


def _bias_act_cases(dtype):
    from fusedgpt.triton_kernels.bias_act import bias_act_fwd

    module = bench_bias_act
    for case in module.benchmark_cases(quick=False, activations=list(module.ACTIVATIONS), all_activation_shapes=False):
        activation, tokens, width = case["activation"], case["tokens"], case["hidden"]
        element = torch.tensor([], dtype=dtype).element_size()

        def launch(activation=activation, tokens=tokens, width=width):
            bias_act_fwd(_meta(tokens, width, dtype=dtype), _meta(width, dtype=dtype), activation)

        rows = min(tokens, 3)
        code = (f"x = torch.randn({rows}, {width}, dtype={dtype})\n"
                f"ops.bias_act(x, torch.randn({width}, dtype={dtype}), {activation!r})\n")
        yield Case("bias_act", module.describe_case(case), dtype, width, 0,
                   module.effective_bytes(tokens, width, element), launch, code)


CASE_MAKERS = {"attention": _attention_cases, "decode_attention": _decode_attention_cases,
               "kv_append": _kv_append_cases, "layer_norm": _layer_norm_cases, "bias_act": _bias_act_cases}


def benchmark_cases(families) -> list[Case]:
    return [case for family in families for dtype in DTYPES for case in CASE_MAKERS[family](dtype)]


# ----------------------------------------------------------------------------------------------------
# Triton: record what the launcher sends, compile it ahead of time, read the cubin.
# ----------------------------------------------------------------------------------------------------

TRITON_KERNELS = {  # family -> (module, the kernels its launcher calls)
    "attention": ("fusedgpt.triton_kernels.attention",
                  ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")),
    "decode_attention": ("fusedgpt.triton_kernels.decode_attention",
                         ("_decode_attention_split_kernel", "_decode_attention_combine_kernel")),
    "kv_append": ("fusedgpt.triton_kernels.kv_append", ("_kv_append_fwd_kernel",)),
    "layer_norm": ("fusedgpt.triton_kernels.layer_norm", ("_layer_norm_fwd_kernel",)),
    "bias_act": ("fusedgpt.triton_kernels.bias_act", ("_bias_act_fwd_kernel",)),
}


@dataclasses.dataclass(frozen=True)
class TritonCompile:
    """Everything triton.compile needs, in plain picklable values (compiled in worker processes)."""
    module: str
    kernel: str
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    attrs: tuple  # ((index, ((attribute, value), ...)), ...)
    num_warps: int
    num_stages: int
    capability: int

    def config_text(self) -> str:
        blocks = " ".join(f"{name}={value}" for name, value in self.constexprs if name.startswith("BLOCK"))
        return f"{blocks} warps={self.num_warps} stages={self.num_stages}".strip()


class _Recorder:
    """Stands in for a @triton.jit (or autotuned) kernel: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel, self.launches = name, kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _specialise(kernel, args: tuple, kwargs: dict, capability: int) -> list[TritonCompile]:
    """The compile(s) one recorded launch asks for: Triton's own specialiser on each runtime argument (as
    the JIT does at launch), the constexprs, and every configuration an autotuner keeps after pruning."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", capability, 32))
    fn = _jit_function(kernel)
    named = dict(zip(fn.arg_names, args))
    named.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
    if isinstance(kernel, triton.runtime.Autotuner):
        configs = kernel.configs
        if kernel.early_config_prune:  # called as Autotuner.prune_configs calls it
            configs = kernel.early_config_prune(configs, dict(zip(fn.arg_names, args)), **kwargs)
        choices = [(c.kwargs, c.num_warps, c.num_stages) for c in configs]
    else:
        choices = [({}, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))]
    no_specialise = set(getattr(fn, "do_not_specialize", ()) or ())
    no_align = set(getattr(fn, "do_not_specialize_on_alignment", ()) or ())
    compiles = []
    for extra, num_warps, num_stages in choices:
        values = {**named, **extra}
        signature, constexprs, attrs = [], [], []
        for index, param in enumerate(fn.params):
            value = values[param.name] if param.name in values else param.default
            if param.is_constexpr:
                signature.append((param.name, "constexpr"))
                constexprs.append((param.name, value))
                continue
            kind, key = native_specialize_impl(CUDABackend, value, False, index not in no_specialise,
                                               index not in no_align)
            signature.append((param.name, kind))
            if kind == "constexpr":
                constexprs.append((param.name, key))
            elif isinstance(key, str) and key:
                attrs.append((index, tuple(tuple(a) for a in backend.parse_attr(key))))
        compiles.append(TritonCompile(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs),
                                      tuple(attrs), num_warps, num_stages, capability))
    return compiles


def record_triton_launches(case: Case, capability: int) -> list[tuple[str, TritonCompile]]:
    """(kernel name, compile) for every launch the case's Triton launcher makes."""
    import importlib

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # the autotuners hold interpreter configs then
        raise RuntimeError("static_report: run without TRITON_INTERPRET (it compiles for a GPU, it runs nothing)")

    module_name, names = TRITON_KERNELS[case.family]
    module = importlib.import_module(module_name)
    recorders = {name: _Recorder(name, getattr(module, name)) for name in names}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        case.triton_launch()
    finally:
        for name, recorder in recorders.items():
            setattr(module, name, recorder.kernel)
    return [(name, compile_) for name, recorder in recorders.items()
            for args, kwargs in recorder.launches for compile_ in _specialise(recorder.kernel, args, kwargs, capability)]


def triton_tool(name: str) -> str:
    """ptxas / cuobjdump / nvdisasm as shipped with triton (the CPU machine's toolkit may lack them)."""
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    found = str(shipped) if shipped.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"static_report: {name} not found (neither shipped with triton nor on PATH)")
    return found


_RESOURCE_LINE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: Path) -> dict[str, dict]:
    """Per function: registers, stack, static shared and local bytes (cuobjdump -res-usage)."""
    text = subprocess.run([triton_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return {m.group(1): {"registers": int(m.group(2)), "stack": int(m.group(3)), "static_shared": int(m.group(4)),
                         "local": int(m.group(5))} for m in _RESOURCE_LINE.finditer(text)}


_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass_features(cubin: Path) -> dict[str, dict]:
    """Per function, from its SASS: the tensor-core instruction family, cp.async / TMA, ldmatrix."""
    text = subprocess.run([triton_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    features = {}
    parts = _SASS_FUNCTION.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        opcodes = set(_SASS_OPCODE.findall(body))
        tensor_core = "wgmma" if "HGMMA" in opcodes else ("mma.sync" if "HMMA" in opcodes else "none")
        cp_async = "TMA" if "UTMALDG" in opcodes else ("LDGSTS" if "LDGSTS" in opcodes else "no")
        features[name] = {"tensor_core": tensor_core, "cp_async": cp_async,
                          "ldmatrix": "LDSM" if "LDSM" in opcodes else "no"}
    return features


def compile_triton(job: TritonCompile) -> dict:
    """Runs in a worker process: compiles one configuration, returns its resources (or the error)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.kernel)
    fn = _jit_function(kernel)
    attrs = {(index,): [list(a) for a in values] for index, values in job.attrs}
    try:
        compiled = triton.compile(ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs),
                                  target=GPUTarget("cuda", job.capability, 32),
                                  options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as error:  # a configuration that does not compile is a finding, not a crash
        return {"error": f"does not compile: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        resources = next(iter(cubin_resources(cubin).values()))
        features = next(iter(sass_features(cubin).values()))
    return {"registers": resources["registers"], "spill_bytes": resources["local"],
            "shared_bytes": compiled.metadata.shared + resources["static_shared"],
            "threads": 32 * job.num_warps, **features}


def triton_rows(cases: list[Case], arch: Arch, workers: int) -> list[dict]:
    planned = [(case, name, job) for case in cases for name, job in record_triton_launches(case, arch.capability)]
    unique = sorted(set(job for _, _, job in planned), key=repr)
    print(f"static_report: {len(unique)} Triton compiles for {arch.name} ({len(planned)} rows)", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(unique, pool.map(compile_triton, unique)))
    rows = []
    for case, name, job in planned:
        result = dict(results[job])
        if "error" not in result and result["shared_bytes"] > arch.shared_per_block:
            result["error"] = (f"needs {result['shared_bytes']} bytes of shared memory; a block gets at most "
                               f"{arch.shared_per_block} on {arch.name}")
        if "error" not in result:
            result["ctas_per_sm"] = ctas_per_sm(arch, result["threads"], result["registers"], result["shared_bytes"])
        rows.append(_row(case, arch, backend="triton", kernel=name, config=job.config_text(), reachable="yes",
                         **result))
    return rows


def _row(case: Case, arch: Arch, **fields) -> dict:
    return {"family": case.family, "case": case.label, "dtype": DTYPE_NAMES[case.dtype], "head_dim": case.size,
            "flops": case.flops, "bytes": case.bytes, "bound_us": round(bound_us(arch, case.flops, case.bytes), 3),
            **fields}


# ----------------------------------------------------------------------------------------------------
# CUDA: nvcc -Xptxas -v per source for the architecture alone, and the SASS of each instantiation.
# ----------------------------------------------------------------------------------------------------

def kernel_key(demangled: str) -> str:
    """`void fusedgpt::(anonymous namespace)::k<__half, 8>(args)` -> `fusedgpt::k<__half, 8>`: the same
    key for nvcc's and the host compiler's symbols of one instantiation."""
    text = demangled.strip()
    text = text[5:] if text.startswith("void ") else text
    text = text.replace("(anonymous namespace)::", "")
    depth = 0
    for index in range(len(text) - 1, -1, -1):  # drop the parameter list: the last top-level (...)
        depth += {")": 1, "(": -1}.get(text[index], 0)
        if depth == 0 and text[index] == "(":
            return text[:index].strip()
    return text


def short_name(key: str) -> str:
    """`fusedgpt::attention::attention_fwd_kernel<__half, 64>` -> `attention_fwd_kernel<__half, 64>`."""
    head, bracket, tail = key.partition("<")
    return head.rsplit("::", 1)[-1] + bracket + tail


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@functools.cache
def _setup_module():
    """setup.py, whose helpers and flags can be imported (it runs setup() only as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fusedgpt_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(source: Path, cubin: Path, capability: int) -> list[str]:
    """The extension's own nvcc flags (setup.py, and torch's for every CUDA extension), one architecture,
    device code only."""
    from torch.utils import cpp_extension

    return ["nvcc", "-cubin", f"-gencode=arch=compute_{capability},code=sm_{capability}",
            *cpp_extension.COMMON_NVCC_FLAGS, *_setup_module().NVCC_FLAGS, "-std=c++20", "-Xptxas", "-v",
            "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", f"-I{ROOT / 'csrc'}",
            *[f"-I{path}" for path in cpp_extension.include_paths()], "-o", str(cubin), str(source)]


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per mangled entry: registers, spill stores + loads, stack frame and static shared bytes."""
    functions, current = {}, None
    for line in text.splitlines():
        if (match := _PTXAS_ENTRY.search(line)):
            current = functions.setdefault(match.group(1), {"registers": 0, "spill_bytes": 0, "stack": 0,
                                                             "shared_bytes": 0})
        elif current is not None and (match := _PTXAS_SPILLS.search(line)):
            current["stack"] = int(match.group(1))
            current["spill_bytes"] = int(match.group(2)) + int(match.group(3))
        elif current is not None and (match := _PTXAS_USED.search(line)):
            current["registers"] = int(match.group(1))
            shared = _PTXAS_SHARED.search(line)
            current["shared_bytes"] = int(shared.group(1)) if shared else 0
    return functions


def compile_cuda_source(job: tuple[str, int, str]) -> dict:
    """Runs in a worker: one csrc/ source -> {kernel key: resources and SASS features}."""
    source, capability, scratch = Path(job[0]), job[1], Path(job[2])
    cubin = scratch / (source.relative_to(ROOT / "csrc").as_posix().replace("/", "__") + ".cubin")
    result = subprocess.run(nvcc_command(source, cubin, capability), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{result.stderr[-3000:]}")
    resources = parse_ptxas(result.stdout + result.stderr)
    features = sass_features(cubin)
    names = list(resources)
    return {kernel_key(demangled): {**resources[name], **features.get(name, {}), "source": source.name}
            for name, demangled in zip(names, demangle(names))}


def cuda_instantiations(arch: Arch, workers: int) -> dict[str, dict]:
    if shutil.which("nvcc") is None:
        raise SystemExit("static_report: nvcc not found; the CUDA rows need it (or pass --backends triton)")
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    print(f"static_report: nvcc -Xptxas -v for {arch.name}, {len(sources)} sources", flush=True)
    with tempfile.TemporaryDirectory() as scratch, \
            concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        found = {}
        for per_source in pool.map(compile_cuda_source, [(str(s), arch.capability, scratch) for s in sources]):
            found.update(per_source)
    return found


def cuda_rows(cases: list[Case], arch: Arch, workers: int) -> list[dict]:
    """One row per (case, kernel launched for it in the emulator), then the unreached instantiations."""
    import simt_emulator

    instantiations = cuda_instantiations(arch, workers)
    codes = sorted(set(case.emulator_code for case in cases))
    print(f"static_report: {len(codes)} scaled-down cases in the SIMT emulator (counting memory accesses)",
          flush=True)
    launches = simt_emulator.count_launches(codes)  # {code: [{kernel, threads, counters...}, ...]}
    rows, reached = [], set()
    for case in cases:
        for launch in launches[case.emulator_code]:
            key = kernel_key(launch["kernel"])
            reached.add(key)
            found = instantiations.get(key)
            fields = {"backend": "cuda", "kernel": short_name(key), "config": f"threads={launch['threads']}",
                      "reachable": "yes", "threads": launch["threads"], **_counter_fields(launch),
                      "worst_instructions": _worst_instructions(launch)}
            if found is None:
                fields["error"] = f"no instantiation {key} in nvcc's output for {arch.name}"
            else:
                fields.update({name: found[name] for name in ("registers", "spill_bytes", "tensor_core", "cp_async",
                                                              "ldmatrix")})
                # static (ptxas) + dynamic (the launch's, as the emulator ran it)
                fields["shared_bytes"] = found["shared_bytes"] + launch.get("dynamic_shared_bytes", 0)
                fields["ctas_per_sm"] = ctas_per_sm(arch, launch["threads"], found["registers"], fields["shared_bytes"])
                if fields["shared_bytes"] > arch.shared_per_block:
                    fields["error"] = (f"needs {fields['shared_bytes']} bytes of shared memory; a block gets at "
                                       f"most {arch.shared_per_block} on {arch.name}")
            rows.append(_row(case, arch, **fields))
    for key, found in sorted(instantiations.items()):
        if key in reached:
            continue
        rows.append({"backend": "cuda", "family": _family_of(found["source"]), "kernel": short_name(key),
                     "case": "(no benchmark case)", "reachable": "no",
                     **{name: found[name] for name in ("registers", "spill_bytes", "shared_bytes", "tensor_core",
                                                       "cp_async", "ldmatrix")}})
    return rows


def _worst_instructions(launch: dict, count: int = 3) -> list[str]:
    """The emulator's costliest instructions of a kernel, as lines for the report: where shared memory
    conflicts (wavefronts against the ideal) and where global requests waste sector bytes."""
    lines = []
    for entry in launch.get("worst_shared_instructions", [])[:count]:
        if entry["wavefronts"] > entry["ideal_wavefronts"]:
            lines.append(f"{entry.get('source') or entry['pc_offset']}: shared {'store' if entry['is_store'] else 'load'}"
                         f", {entry['wavefronts'] / entry['ideal_wavefronts']:.2f}x the ideal wavefronts "
                         f"({entry['requests']} requests)")
    for entry in launch.get("worst_global_instructions", [])[:count]:
        efficiency = entry["requested_bytes"] / (32 * entry["sectors"])
        if efficiency < 0.99:
            lines.append(f"{entry.get('source') or entry['pc_offset']}: global {'store' if entry['is_store'] else 'load'}"
                         f", sector efficiency {efficiency:.3f} ({entry['requests']} requests)")
    return lines


def _family_of(source_name: str) -> str:
    return next((family for family in FAMILIES if source_name.startswith(family)), source_name)


def _counter_fields(launch: dict) -> dict:
    """The emulator's ratios (simt_emulator.summarise: one definition of each) as report columns, empty
    where the kernel made no such request."""
    import simt_emulator

    summary = simt_emulator.summarise({"kernel": launch})["kernel"]
    names = ("shared_wavefronts_per_request", "shared_conflict_ratio", "global_sector_efficiency")
    return {name: round(summary[name], 3) for name in names if summary.get(name) is not None}


# ----------------------------------------------------------------------------------------------------
# Output and the CI check
# ----------------------------------------------------------------------------------------------------

def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: row.get(name, "") for name in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


MARKDOWN_COLUMNS = ["backend", "kernel", "case", "dtype", "head_dim", "config", "threads", "registers",
                    "spill_bytes", "shared_bytes", "ctas_per_sm", "tensor_core", "cp_async", "ldmatrix",
                    "shared_wavefronts_per_request", "shared_conflict_ratio", "global_sector_efficiency", "bound_us",
                    "error"]


def write_markdown(rows: list[dict], path: Path, arch: Arch, environment: dict) -> None:
    lines = [f"# Static report for {arch.name}", "",
             "Made on a CPU without a GPU by `python bench/static_report.py"
             + (f" --arch {arch.name}" if arch.name != "sm_90" else "") + "` "
             f"({environment['date']}; torch {environment['torch']}, triton {environment['triton']}, "
             f"{environment['nvcc']}). Nothing here was measured on a GPU.", "",
             "- Resources (registers, spills, shared memory) and the SASS features come from the compilers: "
             "`triton.compile` for the Triton rows, `nvcc -Xptxas -v` and `cuobjdump -sass` for the CUDA rows. "
             "`ctas_per_sm` is the occupancy limit those resources allow.",
             "- `shared_conflict_ratio` (shared-memory wavefronts / the conflict-free ideal; 1.0 = no bank "
             "conflict), `shared_wavefronts_per_request` and `global_sector_efficiency` (bytes requested / "
             "bytes of the 32-byte sectors touched) were counted by the SIMT emulator on a scaled-down copy of "
             "each case (CUDA rows only; Triton kernels cannot run in it).",
             "- `head_dim` is the head dim for the attention families and kv_append, the hidden size (row "
             "width) for layer_norm and bias_act. `config`: the Triton block sizes, warps and pipeline stages; "
             "for CUDA, the block size the launcher chose. `reachable = no`: an instantiation no benchmark case "
             "launches (a spill there does not fail CI).",
             f"- `bound_us` is a speed-of-light BOUND for the full benchmark shape, max(FLOPs / peak, bytes / "
             f"peak bandwidth), not a prediction. Peaks: {arch.peaks_source}.", ""]
    for family in FAMILIES:
        family_rows = [row for row in rows if row.get("family") == family]
        if not family_rows:
            continue
        lines += [f"## {family}", "", "| " + " | ".join(MARKDOWN_COLUMNS) + " |",
                  "|" + "---|" * len(MARKDOWN_COLUMNS)]
        lines += ["| " + " | ".join(str(row.get(name, "")).replace("|", "\\|") for name in MARKDOWN_COLUMNS) + " |"
                  for row in family_rows]
        lines.append("")
    worst = {}
    for row in rows:  # one scaled-down case per instantiation and block size is enough to locate the cost
        if row.get("worst_instructions"):
            worst.setdefault((row["kernel"], row["config"]), row)
    if worst:
        lines += ["## Where the CUDA kernels lose memory efficiency (SIMT emulator)", "",
                  "The instructions with the most shared-memory wavefronts above the ideal and the lowest global "
                  "sector efficiency, in the first benchmark case that launches each instantiation (scaled down).",
                  ""]
        for (kernel, config), row in worst.items():
            lines.append(f"- `{kernel}` ({config}, {row['case']}):")
            lines += [f"  - {line}" for line in row["worst_instructions"]]
        lines.append("")
    path.write_text("\n".join(lines))


def _row_key(row: dict) -> tuple:
    return tuple(str(row.get(name, "")) for name in ("backend", "family", "kernel", "case", "dtype", "config"))


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


COUNTER_TOLERANCE = 0.005  # the counters are exact; this only absorbs the CSV's rounding


def check(rows: list[dict], baseline: list[dict]) -> list[str]:
    """What CI fails on: spills where a launcher can go, Triton configurations that do not compile or do
    not fit, and memory counters worse than the committed baseline for the same row."""
    problems = []
    for row in rows:
        where = f"{row.get('backend')} {row.get('kernel')} [{row.get('case')}, {row.get('dtype')}, {row.get('config')}]"
        if row.get("reachable") == "yes" and (_number(row.get("spill_bytes")) or 0) > 0:
            problems.append(f"{where}: spills {row['spill_bytes']} bytes")
        if row.get("error"):
            problems.append(f"{where}: {row['error']}")
    old = {_row_key(row): row for row in baseline}
    for row in rows:
        before = old.get(_row_key(row))
        if before is None:
            continue
        where = f"{row.get('backend')} {row.get('kernel')} [{row.get('case')}, {row.get('dtype')}]"
        for name, worse in (("shared_conflict_ratio", 1), ("shared_wavefronts_per_request", 1),
                            ("global_sector_efficiency", -1)):
            new_value, old_value = _number(row.get(name)), _number(before.get(name))
            if new_value is not None and old_value is not None and worse * (new_value - old_value) > COUNTER_TOLERANCE:
                problems.append(f"{where}: {name} {old_value} -> {new_value} (worse than the baseline)")
    return problems


def environment() -> dict:
    nvcc = shutil.which("nvcc")
    version = "no nvcc"
    if nvcc:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release ([\d.]+)", text)
        version = f"nvcc {match.group(1)}" if match else "nvcc (version unreadable)"
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "nvcc": version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: all five)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated among triton, cuda")
    parser.add_argument("--check", type=Path, default=None, metavar="BASELINE_CSV",
                        help="exit 1 on a reachable spill, a Triton configuration that does not compile or fit, "
                             "or a memory counter worse than this committed report's")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    families = [name.strip() for name in args.families.split(",") if name.strip()]
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    for name in families:
        if name not in FAMILIES:
            parser.error(f"--families: unknown family {name!r} (known: {', '.join(FAMILIES)})")
    for name in backends:
        if name not in BACKENDS:
            parser.error(f"--backends: unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    arch = ARCHS[args.arch]
    baseline = read_csv(args.check) if args.check is not None else None  # read before it is overwritten
    cases = benchmark_cases(families)
    rows = []
    if "triton" in backends:
        rows += triton_rows(cases, arch, args.workers)
    if "cuda" in backends:
        rows += cuda_rows(cases, arch, args.workers)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / f"static-{arch.name}.csv"
    write_csv(rows, csv_path)
    write_markdown(rows, csv_path.with_suffix(".md"), arch, environment())
    print(f"static_report: {len(rows)} rows -> {csv_path} and {csv_path.with_suffix('.md').name}")
    if baseline is not None:
        problems = check(rows, baseline)
        for problem in problems:
            print(f"static_report: FAIL {problem}")
        if problems:
            return 1
        print(f"static_report: check passed against {args.check} ({len(baseline)} baseline rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
