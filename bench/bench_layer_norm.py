"""Benchmark of fusedgpt.ops.layer_norm (LayerNorm fused with the residual add of a pre-LN block) against
PyTorch, on the shapes of GPT-style models: 1 and 16 tokens (decode) and 16384 tokens (prefill) x
hidden 768 (GPT-2 small), 1600 (GPT-2 XL), 2048 and 4096; fp16 and bf16.

Providers:
  fusedgpt-cuda     fusedgpt.ops.layer_norm(..., backend="cuda")   (skipped without the extension)
  fusedgpt-triton   fusedgpt.ops.layer_norm(..., backend="triton")
  torch-eager       s = x + residual; torch.nn.functional.layer_norm(s, ...)  (two kernels)
  torch-compile     torch.compile(fusedgpt.ops.layer_norm_reference, fullgraph=True), default mode
  empty-kernel      an empty Triton kernel under CUDA-graph replay: the latency floor (1 and 16 tokens)

--headline (issue 15; what bench/gpu_run.py runs): add+LayerNorm 16384 x 4096 with residual only, providers
fusedgpt-cuda, fusedgpt-triton, fusedgpt-torch (the composite PyTorch backend, what torch-eager times) and
torch-compile; gpu_run.py compares its GB/s with the device-copy bandwidth measured in the same run.

Effective bytes: with residual, read x, residual, weight, bias and write y and s; without, read x,
weight, bias and write y. GB/s = bytes / do_bench median time. us_graph (1 and 16 tokens) = latency per
call under CUDA-graph replay. Results: bench/results/<device>.csv (family "layer_norm") and a PNG.

    python bench/bench_layer_norm.py [--quick | --headline] [--dtypes fp16,bf16] [--out-dir bench/results]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import timing  # noqa: E402
from fusedgpt.ops import layer_norm, layer_norm_reference  # noqa: E402

FAMILY = "layer_norm"
PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", "torch-eager", "torch-compile", common.EMPTY_KERNEL_PROVIDER)
HEADLINE_PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", common.TORCH_BACKEND_PROVIDER, "torch-compile")
TOKEN_COUNTS = (1, 16, 16384)
HIDDEN_SIZES = (768, 1600, 2048, 4096)
NO_RESIDUAL_TOKENS = 16384  # the plain LayerNorm (first block / final norm) is reported at prefill size
SMALL_TOKENS = 16  # cases up to this many tokens also get CUDA-graph latencies
EPS = 1e-5
DEVICE = "cuda"


def benchmark_cases(quick: bool) -> list[dict]:
    """(tokens, hidden, residual) per case: every token count with residual, then no residual at 16384."""
    tokens_list, hidden_list = ((1, 16384), (1600,)) if quick else (TOKEN_COUNTS, HIDDEN_SIZES)
    cases = [{"tokens": tokens, "hidden": hidden, "residual": True}
             for tokens in tokens_list for hidden in hidden_list]
    cases += [{"tokens": NO_RESIDUAL_TOKENS, "hidden": hidden, "residual": False} for hidden in hidden_list]
    return cases


def headline_cases() -> list[dict]:
    """Issue 15's headline: add+LayerNorm at 16k tokens x 4096."""
    return [{"tokens": 16384, "hidden": 4096, "residual": True}]


def effective_bytes(tokens: int, hidden: int, residual: bool, element_size: int) -> int:
    activation = tokens * hidden * element_size
    parameters = 2 * hidden * element_size  # weight and bias
    return (4 if residual else 2) * activation + parameters


def torch_eager(x, residual, weight, bias):
    """The strongest plain PyTorch: one add, then the native LayerNorm kernel."""
    if residual is None:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, EPS)
    summed = x + residual
    return torch.nn.functional.layer_norm(summed, (x.shape[-1],), weight, bias, EPS), summed


def provider_function(provider: str):
    """(x, residual or None, weight, bias) -> y, or (y, s) with a residual."""
    if provider in common.BACKEND_PROVIDERS:
        backend = common.BACKEND_PROVIDERS[provider]
        return lambda x, residual, weight, bias: layer_norm(x, weight, bias, EPS, residual, backend=backend)
    if provider == "torch-eager":
        return torch_eager
    if provider == "torch-compile":
        compiled = common.compile_fresh(layer_norm_reference)
        return lambda x, residual, weight, bias: compiled(x, weight, bias, EPS, residual)
    raise ValueError(provider)


def describe_case(case: dict) -> str:
    return f"tokens={case['tokens']} hidden={case['hidden']} residual={case['residual']}"


def run_case(case: dict, dtype: torch.dtype, providers: list[str], unavailable: dict[str, str]) -> list[dict]:
    tokens, hidden, has_residual = case["tokens"], case["hidden"], case["residual"]
    label = f"{tokens}x{hidden} {'res' if has_residual else 'nores'}"
    fields = {"tokens": tokens, "hidden": hidden, "residual": int(has_residual)}
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    residual = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE) if has_residual else None
    weight = 1.0 + 0.1 * torch.randn(hidden, dtype=dtype, device=DEVICE)
    bias = 0.1 * torch.randn(hidden, dtype=dtype, device=DEVICE)
    expected = layer_norm_reference(x, weight, bias, EPS, residual)
    expected = expected if has_residual else (expected,)

    activations = [x] + ([residual] if has_residual else [])
    copies = timing.rotation_copy_count(sum(t.numel() * t.element_size() for t in activations))
    input_sets = timing.rotated_copies(activations, copies)  # [(x_i, residual_i)] or [(x_i,)]
    del x, residual, activations

    def inputs(index: int):
        chosen = input_sets[index % len(input_sets)]
        return chosen[0], (chosen[1] if has_residual else None)

    with_graph = tokens <= SMALL_TOKENS
    element_size = torch.finfo(dtype).bits // 8
    rows = []
    for provider, function, fields in common.providers_to_time(
            rows, family=FAMILY, case=label, dtype=dtype, providers=providers, unavailable=unavailable,
            fields=fields, make_function=provider_function, with_graph=with_graph):

        def step(index: int, function=function):
            x_i, residual_i = inputs(index)
            return function(x_i, residual_i, weight, bias)

        def verify(step=step) -> str:
            outputs = step(0)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            checks = [common.check_close(actual, wanted) for actual, wanted in zip(outputs, expected)]
            if len(outputs) != len(expected):
                checks.append(f"MISMATCH {len(outputs)} outputs, expected {len(expected)}")
            bad = [check for check in checks if check != "ok"]
            return "ok" if not bad else "; ".join(bad)

        rows.append(common.measure(family=FAMILY, case=label, provider=provider, dtype=dtype, fields=fields,
                                   bytes_moved=effective_bytes(tokens, hidden, has_residual, element_size),
                                   step=step, with_graph=with_graph, verify=verify))
    del input_sets
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    common.add_headline_option(parser, "add+LayerNorm 16384x4096")
    args = parser.parse_args(argv)
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_providers(args, PROVIDERS, HEADLINE_PROVIDERS)
    cases = headline_cases() if args.headline else benchmark_cases(args.quick)
    common.run_benchmark(FAMILY, args, dtypes, providers, cases, describe_case, run_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
