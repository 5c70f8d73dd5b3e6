"""Benchmark of fusedgpt.ops.bias_act (y = act(x + bias), the MLP's bias + activation in one pass) against
PyTorch: 1 and 16 tokens (decode) and 16384 tokens (prefill) x width 768, 1600, 2048, 3072, 4096, 8192
(3072 and 8192 are the 4x MLP widths of GPT-2 small and of 2048-wide models); fp16 and bf16.
Activations: gelu_tanh (GPT-2 / GPT-Neo) on every shape; gelu (erf) and relu (OPT) at 16384 tokens
(their decode latency is the same launch-bound number), or on every shape with --all-activation-shapes.

Providers:
  fusedgpt-cuda     fusedgpt.ops.bias_act(..., backend="cuda")   (skipped without the extension)
  fusedgpt-triton   fusedgpt.ops.bias_act(..., backend="triton")
  torch-eager       torch.nn.functional.gelu(x + bias, approximate="tanh") / gelu(x + bias) / relu(x + bias)
  torch-compile     torch.compile(fusedgpt.ops.bias_act_reference, fullgraph=True), default mode
  empty-kernel      an empty Triton kernel under CUDA-graph replay: the latency floor (1 and 16 tokens)

--headline (issue 15; what bench/gpu_run.py runs): bias+GELU(tanh) 16384 x 8192 only (--activations does
not apply), providers fusedgpt-cuda, fusedgpt-triton, fusedgpt-torch (the composite PyTorch backend, what
torch-eager times) and torch-compile; gpu_run.py compares its GB/s with the device-copy bandwidth.

Effective bytes: read x and bias, write y. GB/s = bytes / do_bench median time. us_graph (1 and 16
tokens) = latency per call under CUDA-graph replay. Results: bench/results/<device>.csv (family
"bias_act") and a PNG.

    python bench/bench_bias_act.py [--quick | --headline] [--dtypes fp16,bf16] [--activations gelu_tanh,gelu,relu]
                                   [--all-activation-shapes] [--out-dir bench/results]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import timing  # noqa: E402
from fusedgpt.ops import bias_act, bias_act_reference  # noqa: E402

FAMILY = "bias_act"
PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", "torch-eager", "torch-compile", common.EMPTY_KERNEL_PROVIDER)
HEADLINE_PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", common.TORCH_BACKEND_PROVIDER, "torch-compile")
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
FULL_GRID_ACTIVATION = "gelu_tanh"
TOKEN_COUNTS = (1, 16, 16384)
WIDTHS = (768, 1600, 2048, 3072, 4096, 8192)
PREFILL_TOKENS = 16384
SMALL_TOKENS = 16  # cases up to this many tokens also get CUDA-graph latencies
DEVICE = "cuda"


def benchmark_cases(quick: bool, activations: list[str], all_activation_shapes: bool) -> list[dict]:
    """(activation, tokens, width) per case."""
    tokens_list, widths = ((1, PREFILL_TOKENS), (3072,)) if quick else (TOKEN_COUNTS, WIDTHS)
    cases = []
    for activation in activations:
        full_grid = all_activation_shapes or activation == FULL_GRID_ACTIVATION
        for tokens in (tokens_list if full_grid else (PREFILL_TOKENS,)):
            cases += [{"activation": activation, "tokens": tokens, "hidden": width} for width in widths]
    return cases


def headline_cases() -> list[dict]:
    """Issue 15's headline: bias + GELU(tanh) at 16k tokens x 8192 (the MLP width of 2048-wide models)."""
    return [{"activation": "gelu_tanh", "tokens": PREFILL_TOKENS, "hidden": 8192}]


def effective_bytes(tokens: int, width: int, element_size: int) -> int:
    return 2 * tokens * width * element_size + width * element_size  # read x, write y; read bias


def torch_eager_function(activation: str):
    """The strongest plain PyTorch: the add, then the native activation kernel."""
    if activation == "gelu_tanh":
        return lambda x, bias: torch.nn.functional.gelu(x + bias, approximate="tanh")
    if activation == "gelu":
        return lambda x, bias: torch.nn.functional.gelu(x + bias)
    return lambda x, bias: torch.nn.functional.relu(x + bias)


def provider_function(provider: str, activation: str):
    """(x, bias) -> y."""
    if provider in common.BACKEND_PROVIDERS:
        backend = common.BACKEND_PROVIDERS[provider]
        return lambda x, bias: bias_act(x, bias, activation, backend=backend)
    if provider == "torch-eager":
        return torch_eager_function(activation)
    if provider == "torch-compile":
        compiled = common.compile_fresh(bias_act_reference)
        return lambda x, bias: compiled(x, bias, activation)
    raise ValueError(provider)


def describe_case(case: dict) -> str:
    return f"{case['activation']} tokens={case['tokens']} width={case['hidden']}"


def run_case(case: dict, dtype: torch.dtype, providers: list[str], unavailable: dict[str, str]) -> list[dict]:
    activation, tokens, width = case["activation"], case["tokens"], case["hidden"]
    label = f"{activation} {tokens}x{width}"
    fields = {"tokens": tokens, "hidden": width, "activation": activation}
    x = torch.randn(tokens, width, dtype=dtype, device=DEVICE)
    bias = torch.randn(width, dtype=dtype, device=DEVICE)
    expected = bias_act_reference(x, bias, activation)

    copies = timing.rotation_copy_count(x.numel() * x.element_size())
    input_sets = timing.rotated_copies([x], copies)  # [(x_i,)]
    del x

    with_graph = tokens <= SMALL_TOKENS
    element_size = torch.finfo(dtype).bits // 8
    rows = []
    for provider, function, fields in common.providers_to_time(
            rows, family=FAMILY, case=label, dtype=dtype, providers=providers, unavailable=unavailable,
            fields=fields, make_function=lambda provider: provider_function(provider, activation),
            with_graph=with_graph):

        def step(index: int, function=function):
            return function(input_sets[index % len(input_sets)][0], bias)

        def verify(step=step) -> str:
            return common.check_close(step(0), expected)

        rows.append(common.measure(family=FAMILY, case=label, provider=provider, dtype=dtype, fields=fields,
                                   bytes_moved=effective_bytes(tokens, width, element_size), step=step,
                                   with_graph=with_graph, verify=verify))
    del input_sets
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--activations", default=None,
                        help=f"comma-separated activations among {', '.join(ACTIVATIONS)} (default: all)")
    parser.add_argument("--all-activation-shapes", action="store_true",
                        help=f"every activation on every shape (default: {FULL_GRID_ACTIVATION} on every "
                             f"shape, the others at {PREFILL_TOKENS} tokens only)")
    common.add_headline_option(parser, "bias+GELU(tanh) 16384x8192")
    args = parser.parse_args(argv)
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_providers(args, PROVIDERS, HEADLINE_PROVIDERS)
    activations = common.parse_choices(args.activations, ACTIVATIONS, "--activations")
    cases = (headline_cases() if args.headline
             else benchmark_cases(args.quick, activations, args.all_activation_shapes))
    common.run_benchmark(FAMILY, args, dtypes, providers, cases, describe_case, run_case)
    return 0


if __name__ == "__main__":
    sys.exit(main())
