"""Shared helpers for the bench/bench_<family>.py scripts (CONVENTIONS.md, "Benchmarks (bench/)").

Why one module: every family must be timed, counted and recorded the same way, or its ratios mean
nothing. It holds
  - timing: `time_ms` (triton.testing.do_bench, median; do_bench also zeroes a 256 MB buffer before
    every call, so each timed call starts from a cold L2) and `graph_us_per_call` (N calls captured in
    one CUDA graph, replayed, timed with CUDA events: the launch-bound latency that matters for a
    decode step of 1..16 tokens), plus an empty Triton kernel timed the same way as the floor;
  - input rotation: `rotation_copy_count` / `rotated_copies` allocate enough copies of the inputs
    (>= max(128 MiB, 2.5 x L2)) that cycling through them keeps small inputs out of L2;
  - rows: `measure` (one provider x case, exceptions turned into an error row; GB/s from a byte count
    and, for compute-bound families such as attention, TFLOP/s from a FLOP count), `add_speedups`,
    `print_table`, `print_speedups`;
  - the loops every script shares: `run_benchmark` (seed, dtypes x cases, a failed case set-up printed
    and skipped, then `finish`), `unavailable_providers` (fusedgpt-cuda without the extension or failing
    a probe, flash-attn not installed) and `providers_to_time` (a case's provider loop: the empty kernel,
    unavailable providers and a provider that fails to set up become rows there; it yields the others);
  - results: bench/results/<device-slug>.csv (rows of other families kept, this family's replaced, or
    with --merge only the (case, dtype, provider) rows measured again) and
    bench/results/<device-slug>_<family>.png (grouped bars of GB/s, or of another metric such as
    TFLOP/s); `stack_pngs` joins several families' PNGs into one (bench/run_gpu.sh brings back only a
    few files).

torch.cuda is touched only inside functions, so `python bench/bench_<family>.py --help` works on a
machine without a GPU. Written for torch >= 2.11 with triton >= 3.6.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import triton
import triton.language as tl

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = BENCH_DIR / "results"

FUSEDGPT_PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton")
EMPTY_KERNEL_PROVIDER = "empty-kernel"

# do_bench budgets (ms of warm-up and of timed runs per measurement).
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100
# CUDA-graph latency: calls captured in one graph, and timed replays of that graph (median taken).
GRAPH_CALLS_PER_GRAPH = 100
GRAPH_REPLAYS = 20
GRAPH_WARMUP_CALLS = 3

# Rotation: enough copies that one pass over them exceeds L2 (50 MB on an H100) at least 2.5 times.
MIN_ROTATION_BYTES = 128 * 2**20
MAX_ROTATION_COPIES = 65536
# Each rotated copy starts on a 256-byte boundary, so vectorised kernels and inductor's alignment
# assumptions see the same alignment as a fresh allocation.
COPY_ALIGNMENT_BYTES = 256

# Columns of bench/results/<device>.csv, in order. A family leaves the shape fields it has no use for
# empty. ratio_vs_<peer> = peer ms / this ms (> 1: this provider is faster than the peer, same run);
# graph_ratio_vs_<peer> is the same with the CUDA-graph latencies. PEERS is the union over the families
# (a family fills only the columns of the peers it runs): the memory-bound ops' torch baselines, the
# attention peers (SDPA's backends, FlexAttention, flash-attn) and decode attention's SDPA.
PEERS = ("torch-compile", "torch-eager", "torch-copy-k-only",
         "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex-attention", "flash-attn", "sdpa")
CSV_COLUMNS = (
    ["family", "case", "provider", "dtype",
     "tokens", "hidden", "residual", "activation",
     "batch", "new_tokens", "heads", "head_dim", "max_len", "position",
     "seq_len", "cache_len", "window", "scale", "mask",
     "bytes", "flops", "ms", "us", "us_graph", "gbps", "tflops"]
    + [f"ratio_vs_{peer.replace('-', '_')}" for peer in PEERS]
    + [f"graph_ratio_vs_{peer.replace('-', '_')}" for peer in PEERS]
    + ["check", "error", "device", "torch", "triton", "cuda", "python", "date"]
)

DTYPES_BY_NAME = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def argument_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench script takes; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only (a smoke run)")
    parser.add_argument("--dtypes", default="fp16,bf16",
                        help="comma-separated dtypes among fp16, bf16 (default: fp16,bf16)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"where the CSV and PNG go (default: {DEFAULT_OUT_DIR.relative_to(BENCH_DIR.parent)})")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: all of this script's)")
    parser.add_argument("--graph-calls", type=int, default=GRAPH_CALLS_PER_GRAPH,
                        help=f"calls captured per CUDA graph for us_graph (default: {GRAPH_CALLS_PER_GRAPH})")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--merge", action="store_true",
                        help="keep this family's earlier rows in the CSV, replacing only the (case, dtype, "
                             "provider) rows measured again (to split one family's run over several calls)")
    return parser


def add_cases_option(parser: argparse.ArgumentParser, example_label: str) -> None:
    """--cases REGEX, for a script whose case labels are worth selecting (see `select_cases`)."""
    parser.add_argument("--cases", default=None,
                        help=f"run only the cases whose label (e.g. '{example_label}') matches this "
                             "regular expression (re.search)")


def select_cases(cases: list[dict], pattern: str | None, case_label: Callable[[dict], str]) -> list[dict]:
    """The cases whose case_label(case) matches --cases (all of them without it); none is an error."""
    if not pattern:
        return cases
    cases = [case for case in cases if re.search(pattern, case_label(case))]
    if not cases:
        raise SystemExit(f"--cases: no case label matches {pattern!r}")
    return cases


def parse_dtypes(text: str) -> list[torch.dtype]:
    dtypes = []
    for name in (part.strip().lower() for part in text.split(",")):
        if not name:
            continue
        if name not in DTYPES_BY_NAME:
            raise SystemExit(f"--dtypes: unknown dtype {name!r}; expected fp16 or bf16")
        if DTYPES_BY_NAME[name] not in dtypes:
            dtypes.append(DTYPES_BY_NAME[name])
    if not dtypes:
        raise SystemExit("--dtypes: no dtype given")
    return dtypes


def parse_choices(text: str | None, known: Sequence[str], option: str) -> list[str]:
    """The comma-separated names of `option` to run, in the script's order (all when None); unknown
    names are an error."""
    if text is None:
        return list(known)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    if not wanted:  # (an empty run would still rewrite the family's CSV rows)
        raise SystemExit(f"{option}: no name given; this script has {list(known)}")
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; this script has {list(known)}")
    return [name for name in known if name in wanted]


def parse_providers(text: str | None, known: Sequence[str]) -> list[str]:
    return parse_choices(text, known, "--providers")


# ----------------------------------------------------------------------------------------------------
# Real-size models (random weights) for the end-to-end benchmarks (bench_generate.py, bench_patching.py)
# ----------------------------------------------------------------------------------------------------

def _gpt2_124m():
    import transformers

    return transformers.GPT2Config()  # the defaults are GPT-2 small: 768 wide, 12 layers, 12 heads, 1024 positions


def _opt(hidden: int, layers: int, heads: int):
    import transformers

    return transformers.OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=4 * hidden,
                                  num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=2048,
                                  do_layer_norm_before=True, activation_function="relu")


def _gpt_neo(hidden: int, layers: int, heads: int):
    import transformers

    return transformers.GPTNeoConfig(vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                     attention_types=[[["global", "local"], layers // 2]], window_size=256,
                                     max_position_embeddings=2048, activation_function="gelu_new")


# name -> transformers config factory, with the published sizes (facebook/opt-*, EleutherAI/gpt-neo-*, gpt2).
MODEL_CONFIGS = {
    "gpt2-124m": _gpt2_124m,
    "opt-125m": lambda: _opt(768, 12, 12),
    "gpt-neo-125m": lambda: _gpt_neo(768, 12, 12),
    "opt-1.3b": lambda: _opt(2048, 24, 32),
    "gpt-neo-1.3b": lambda: _gpt_neo(2048, 24, 16),
}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: these benchmarks need one (try --help for the options)")


# ----------------------------------------------------------------------------------------------------
# Device and versions
# ----------------------------------------------------------------------------------------------------

def device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())


def device_slug(name: str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the results file's name)."""
    name = device_name() if name is None else name
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def environment_metadata() -> dict[str, str]:
    """Device and versions, stamped on every row."""
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def l2_cache_bytes() -> int:
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(properties, "L2_cache_size", 0) or 50 * 2**20)


def print_environment(family: str) -> None:
    import fusedgpt

    meta = environment_metadata()
    print(f"bench {family}: {meta['device']} (L2 {l2_cache_bytes() / 2**20:.0f} MiB), torch {meta['torch']} "
          f"(CUDA {meta['cuda']}), triton {meta['triton']}, python {meta['python']}, {meta['date']}")
    if fusedgpt.extension_available():
        print(f"fusedgpt CUDA extension built for {', '.join(fusedgpt.extension_cuda_archs())}")
    else:
        print(f"NOTE: fusedgpt-cuda is skipped: {fusedgpt.extension_unavailable_reason()}")


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def time_ms(function: Callable[[], object]) -> float:
    """Median GPU time of one call in milliseconds (triton.testing.do_bench; L2 cleared before each call)."""
    return float(triton.testing.do_bench(function, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS,
                                         return_mode="median"))


def graph_us_per_call(step: Callable[[int], object], *, calls_per_graph: int = GRAPH_CALLS_PER_GRAPH,
                      replays: int = GRAPH_REPLAYS) -> float:
    """Microseconds per call when `calls_per_graph` calls step(0), step(1), ... are captured in one CUDA
    graph and the graph is replayed: the GPU-side latency of a call once CPU launch cost is gone, which
    is what a graph-captured decode step pays. step(i) should use rotated input copy i.

    The warm-up calls (JIT compilation, autotuning, torch.compile) run on the side stream that the capture
    uses, as CUDA-graph capture requires."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for index in range(GRAPH_WARMUP_CALLS):
            step(index)
    torch.cuda.current_stream().wait_stream(side_stream)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side_stream):
        for index in range(calls_per_graph):
            step(index)
    torch.cuda.synchronize()
    graph.replay()  # the first replay uploads the graph; not timed
    torch.cuda.synchronize()

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    replay_ms = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replay_ms.append(start.elapsed_time(end))
    graph.reset()
    return statistics.median(replay_ms) * 1000.0 / calls_per_graph


@triton.jit
def _empty_kernel(
    SCRATCH,  # [1] float32: the one element this kernel stores, so the launch is not optimised away
):
    tl.store(SCRATCH, 0.0)


def empty_kernel_step() -> Callable[[int], None]:
    """A step for `measure` / `graph_us_per_call` that launches the empty kernel: the floor any one-kernel
    op can reach under graph replay (and under do_bench)."""
    scratch = torch.zeros(1, dtype=torch.float32, device="cuda")

    def step(index: int) -> None:
        _empty_kernel[(1,)](scratch)

    return step


def compile_fresh(function: Callable) -> Callable:
    """torch.compile(function, fullgraph=True, dynamic=False) in the default mode, after clearing dynamo's
    caches: each case gets its own static-shape compile (the strongest compile for that shape) instead of
    a dynamic-shape recompile, and many cases never reach dynamo's recompile limit."""
    import torch._dynamo as dynamo

    dynamo.reset()
    return torch.compile(function, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------------------------------
# Input rotation
# ----------------------------------------------------------------------------------------------------

def rotation_copy_count(bytes_per_copy: int, *, max_copies: int = MAX_ROTATION_COPIES) -> int:
    """How many copies of `bytes_per_copy` bytes of inputs make one pass exceed max(128 MiB, 2.5 x L2)."""
    target = max(MIN_ROTATION_BYTES, int(2.5 * l2_cache_bytes()))
    return max(1, min(max_copies, math.ceil(target / max(1, bytes_per_copy))))


def rotated_copies(tensors: Sequence[torch.Tensor], copies: int) -> list[tuple[torch.Tensor, ...]]:
    """`copies` copies of `tensors` (each contiguous): entry i is a tuple of views, one per tensor, holding
    that tensor's values. Each tensor's copies live in one buffer of their own (tensors never alias one
    another), each copy 256-byte aligned."""
    per_tensor_views = []
    for tensor in tensors:
        if not tensor.is_contiguous():
            raise ValueError("rotated_copies: the template tensors must be contiguous")
        numel = tensor.numel()
        elements_per_alignment = max(1, COPY_ALIGNMENT_BYTES // tensor.element_size())
        padded = max(1, math.ceil(numel / elements_per_alignment)) * elements_per_alignment
        buffer = torch.empty((copies, padded), dtype=tensor.dtype, device=tensor.device)
        buffer[:, :numel].copy_(tensor.reshape(1, numel).expand(copies, numel))
        per_tensor_views.append([row[:numel].view(tensor.shape) for row in buffer.unbind(0)])
    return list(zip(*per_tensor_views))


# ----------------------------------------------------------------------------------------------------
# Measuring one provider on one case
# ----------------------------------------------------------------------------------------------------

def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def check_close(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """'ok', or what differs: a quick guard that a timed provider computes the right thing (the tests hold
    the real tolerance rules). Tolerances are a few units in the last place of fp16 / bf16."""
    if actual.shape != expected.shape:
        return f"MISMATCH shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tolerance = 6e-2 if expected.dtype == torch.bfloat16 else 1e-2
    actual32, expected32 = actual.float(), expected.float()
    if torch.allclose(actual32, expected32, rtol=tolerance, atol=tolerance):
        return "ok"
    return f"MISMATCH max_abs_err={(actual32 - expected32).abs().max().item():.3g}"


def measure(*, family: str, case: str, provider: str, dtype: torch.dtype, fields: dict, bytes_moved: int,
            step: Callable[[int], object], with_graph: bool, graph_calls: int,
            verify: Callable[[], str] | None = None, flops: int = 0) -> dict:
    """One row: verify (once; also triggers JIT / torch.compile), do_bench time, and the CUDA-graph latency
    when `with_graph`. GB/s from `bytes_moved`, TFLOP/s from `flops` (each only when non-zero). Any
    exception becomes the row's `error` (printed), never an abort of the run; a graph failure keeps the
    do_bench time."""
    row = {"family": family, "case": case, "provider": provider, "dtype": dtype_name(dtype), **fields,
           "bytes": bytes_moved if bytes_moved else None}
    if flops:
        row["flops"] = flops
    errors = []
    try:
        if verify is not None:
            row["check"] = verify()
        counter = itertools.count()
        row["ms"] = time_ms(lambda: step(next(counter)))
        torch.cuda.synchronize()
        if bytes_moved:
            row["gbps"] = bytes_moved / (row["ms"] * 1e-3) / 1e9
        if flops:
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    except Exception as error:  # one failing provider must not stop the others
        errors.append(short_error(error))
    if with_graph and not errors:
        try:
            row["us_graph"] = graph_us_per_call(step, calls_per_graph=graph_calls)
        except Exception as error:
            errors.append("graph: " + short_error(error))
    if errors:
        row["error"] = " | ".join(errors)
        print(f"  ERROR {family} {case} {row['dtype']} {provider}: {row['error']}")
    return row


def error_row(*, family: str, case: str, provider: str, dtype: torch.dtype, fields: dict, error: str) -> dict:
    """A row that records why a provider has no numbers for this case (skipped, or failed to set up)."""
    return {"family": family, "case": case, "provider": provider, "dtype": dtype_name(dtype), **fields,
            "error": error}


CUDA_EXTENSION_MISSING = "skipped: the CUDA extension is not available"


def unavailable_providers(providers: Sequence[str], *, cuda_probe: Callable[[], object] | None = None,
                          announce: bool = False) -> dict[str, str]:
    """Providers that cannot run at all in this environment, with why (each gets error rows, not calls):
    fusedgpt-cuda without the CUDA extension, or when `cuda_probe()` (one tiny call of the op's CUDA
    backend, once per run) raises; flash-attn when `import flash_attn` fails. `announce` prints a NOTE
    line per provider."""
    import fusedgpt

    reasons = {}
    if "fusedgpt-cuda" in providers:
        if not fusedgpt.extension_available():
            reasons["fusedgpt-cuda"] = CUDA_EXTENSION_MISSING
        elif cuda_probe is not None:
            try:
                cuda_probe()
            except Exception as error:  # e.g. ValueError: the op's CUDA kernel cannot run here
                reasons["fusedgpt-cuda"] = "skipped: " + short_error(error)
    if "flash-attn" in providers:
        try:
            import flash_attn  # noqa: F401
        except Exception as error:  # ImportError, or a broken build (OSError, RuntimeError)
            reasons["flash-attn"] = "not installed: " + short_error(error)
    if announce:
        for provider, reason in reasons.items():
            print(f"NOTE: {provider}: {reason}")
    return reasons


def providers_to_time(rows: list[dict], *, family: str, case: str, dtype: torch.dtype,
                      providers: Sequence[str], unavailable: dict[str, str],
                      fields: dict | Callable[[str], dict], make_function: Callable[[str], object],
                      with_graph: bool = False, graph_calls: int = 0):
    """The provider loop of a bench script's run_case: yields (provider, make_function(provider), fields)
    for each provider the script must time itself, in order, and appends to `rows` the rows it settles
    on its own: the empty kernel (measured here, only when `with_graph`: its floor is a graph-replay
    latency), an error row for a provider in `unavailable`, and an error row (printed) when
    make_function raises. `fields` is the case's row fields, or a function of the provider giving them."""
    for provider in providers:
        provider_fields = fields(provider) if callable(fields) else fields
        if provider == EMPTY_KERNEL_PROVIDER:
            if with_graph:
                rows.append(measure(family=family, case=case, provider=provider, dtype=dtype, fields=provider_fields,
                                    bytes_moved=0, step=empty_kernel_step(), with_graph=True,
                                    graph_calls=graph_calls))
            continue
        if provider in unavailable:
            rows.append(error_row(family=family, case=case, provider=provider, dtype=dtype, fields=provider_fields,
                                  error=unavailable[provider]))
            continue
        try:
            function = make_function(provider)
        except Exception as error:
            rows.append(error_row(family=family, case=case, provider=provider, dtype=dtype, fields=provider_fields,
                                  error=short_error(error)))
            print(f"  ERROR {case} {provider}: {rows[-1]['error']}")
            continue
        yield provider, function, provider_fields
        del function  # not kept alive while the next provider is set up


def rows_by_case(rows: Sequence[dict]) -> dict[tuple[str, str, str], dict[str, dict]]:
    """{(family, case, dtype): {provider: row}}, in the order the cases first appear."""
    by_case: dict[tuple[str, str, str], dict[str, dict]] = {}
    for row in rows:
        by_case.setdefault((row["family"], row["case"], row["dtype"]), {})[row["provider"]] = row
    return by_case


def add_speedups(rows: list[dict], peers: Sequence[str] = PEERS) -> None:
    """Fills ratio_vs_<peer> (peer ms / row ms) and graph_ratio_vs_<peer> (peer us_graph / row us_graph)
    for every row of the same (family, case, dtype) as a peer row measured in this run."""
    for providers in rows_by_case(rows).values():
        for peer in peers:
            peer_row = providers.get(peer)
            if peer_row is None:
                continue
            column = peer.replace("-", "_")
            for row in providers.values():
                if row["provider"] == EMPTY_KERNEL_PROVIDER:
                    continue
                for time_key, prefix in (("ms", "ratio_vs_"), ("us_graph", "graph_ratio_vs_")):
                    mine, theirs = row.get(time_key), peer_row.get(time_key)
                    if mine and theirs:
                        row[prefix + column] = theirs / mine


def best_fusedgpt(providers: dict[str, dict], time_key: str) -> dict | None:
    """The fusedgpt row with the lowest `time_key` among those measured without error."""
    candidates = [providers[name] for name in FUSEDGPT_PROVIDERS
                  if name in providers and providers[name].get(time_key) and not providers[name].get("error")]
    return min(candidates, key=lambda row: row[time_key]) if candidates else None


# ----------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------

def _format(value, digits: int) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int]]) -> None:
    """Plain aligned text. columns: (header, row key, digits for floats)."""
    cells = [[header for header, _, _ in columns]]
    cells += [[_format(row.get(key), digits) for _, key, digits in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line_number, line in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if line_number == 0:
            print("  ".join("-" * width for width in widths))


RESULT_COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("provider", "provider", 0), ("ms", "ms", 4),
                  ("us_graph", "us_graph", 2), ("GB/s", "gbps", 1), ("x_compile", "ratio_vs_torch_compile", 2),
                  ("x_eager", "ratio_vs_torch_eager", 2), ("check", "check", 0), ("error", "error", 0)]


def print_speedups(rows: Sequence[dict], peers: Sequence[str] = ("torch-compile", "torch-eager")) -> None:
    """Per case: the best fusedgpt provider and its speedup (peer time / its time) over each peer, from
    do_bench times and, where measured, from CUDA-graph latencies."""
    summary = []
    for (_, case, dtype), providers in rows_by_case(rows).items():
        line = {"case": case, "dtype": dtype}
        for time_key, label in (("ms", ""), ("us_graph", "graph ")):
            best = best_fusedgpt(providers, time_key)
            if best is None:
                continue
            line[f"{label}best"] = best["provider"].replace("fusedgpt-", "")
            for peer in peers:
                peer_row = providers.get(peer)
                if peer_row and peer_row.get(time_key):
                    line[f"{label}x {peer}"] = peer_row[time_key] / best[time_key]
        summary.append(line)
    keys = []
    for line in summary:
        keys += [key for key in line if key not in keys]
    print("\nSpeedup of the best fusedgpt provider (peer time / fusedgpt time; > 1 = fusedgpt faster):")
    print_table(summary, [(key, key, 2) for key in keys])


# ----------------------------------------------------------------------------------------------------
# Results: CSV and PNG
# ----------------------------------------------------------------------------------------------------

def results_csv_path(out_dir: Path | str = DEFAULT_OUT_DIR) -> Path:
    return Path(out_dir) / f"{device_slug()}.csv"


def write_results_csv(rows: Sequence[dict], family: str, out_dir: Path | str = DEFAULT_OUT_DIR, *,
                      merge: bool = False) -> Path:
    """Writes bench/results/<device-slug>.csv: this family's rows replace its old ones, other families'
    rows are kept. With merge=True only this family's old rows with the (case, dtype, provider) of a new
    row are replaced (a family measured in several calls). Every row is stamped with the device and
    versions."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_csv_path(out_dir)
    kept, columns = [], list(CSV_COLUMNS)
    if path.exists():
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns += [name for name in (reader.fieldnames or []) if name not in columns]
            if merge:
                measured = {(row["case"], row["dtype"], row["provider"]) for row in rows}
                kept = [row for row in reader if row.get("family") != family
                        or (row.get("case"), row.get("dtype"), row.get("provider")) not in measured]
            else:
                kept = [row for row in reader if row.get("family") != family]
    meta = environment_metadata()
    new_rows = [{**meta, **row} for row in rows]
    for row in new_rows:
        columns += [name for name in row if name not in columns]
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in kept + new_rows:
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
    os.replace(temporary, path)
    return path


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot_gbps(rows: Sequence[dict], family: str, out_dir: Path | str = DEFAULT_OUT_DIR) -> Path | None:
    """bench/results/<device-slug>_<family>.png: grouped bars of GB/s, one group per case, one bar per
    provider, one panel per dtype (log scale: 1-token and 16384-token cases differ by orders of
    magnitude). Returns None (with a note) when matplotlib is missing or nothing was measured."""
    return plot_metric(rows, family, out_dir)


def plot_metric(rows: Sequence[dict], family: str, out_dir: Path | str = DEFAULT_OUT_DIR, *, key: str = "gbps",
                label: str = "GB/s (effective)", log_scale: bool = True) -> Path | None:
    """bench/results/<device-slug>_<family>.png: grouped bars of row[key] (GB/s by default; e.g. "tflops"
    for attention), one group per case, one bar per provider, one panel per dtype. Returns None (with a
    note) when matplotlib is missing or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"NOTE: no plot for {family}: matplotlib is not available ({error})")
        return None
    measured = [row for row in rows if row.get(key)]
    if not measured:
        print(f"NOTE: no plot for {family}: no {label} was measured")
        return None
    dtypes = list(dict.fromkeys(row["dtype"] for row in measured))
    providers = list(dict.fromkeys(row["provider"] for row in measured))
    cases_by_dtype = {dtype: list(dict.fromkeys(row["case"] for row in measured if row["dtype"] == dtype))
                      for dtype in dtypes}
    values = {(row["dtype"], row["case"], row["provider"]): row[key] for row in measured}
    most_cases = max(len(cases) for cases in cases_by_dtype.values())
    width_inches = min(40.0, max(8.0, 0.14 * most_cases * len(providers) + 2.0))
    figure, axes = plt.subplots(len(dtypes), 1, figsize=(width_inches, 4.2 * len(dtypes)), squeeze=False)
    bar_width = 0.8 / len(providers)
    for axis, dtype in zip(axes[:, 0], dtypes):
        cases = cases_by_dtype[dtype]
        for index, provider in enumerate(providers):
            positions = [case_index + (index - (len(providers) - 1) / 2) * bar_width
                         for case_index in range(len(cases))]
            heights = [values.get((dtype, case, provider), 0.0) for case in cases]
            axis.bar(positions, heights, width=bar_width, label=provider)
        axis.set_xticks(range(len(cases)))
        axis.set_xticklabels(cases, rotation=60, ha="right", fontsize=8)
        if log_scale:
            axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.set_title(f"{family}, {dtype}", fontsize=10)
        axis.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(providers), fontsize=9)
    meta = environment_metadata()
    figure.suptitle(f"{family}: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date'][:10]}",
                    fontsize=11)
    figure.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug()}_{family}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _family_rows_from_csv(path: Path, family: str, key: str) -> list[dict]:
    """This family's rows of a results CSV, with `key` as a float (None where empty), for plotting."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("family") == family]
    for row in rows:
        try:
            row[key] = float(row.get(key) or "")
        except ValueError:
            row[key] = None
    return rows


def finish(rows: list[dict], family: str, args: argparse.Namespace,
           speedup_peers: Iterable[str] = ("torch-compile", "torch-eager"), *,
           columns: Sequence[tuple[str, str, int]] = RESULT_COLUMNS, plot_key: str = "gbps",
           plot_label: str = "GB/s (effective)", plot_log_scale: bool = True) -> None:
    """The end of every bench script: ratios, printed table (`columns`) and speedups, CSV, PNG of
    `plot_key`."""
    add_speedups(rows)
    print()
    print_table(rows, columns)
    print_speedups(rows, tuple(speedup_peers))
    merge = getattr(args, "merge", False)
    path = write_results_csv(rows, family, args.out_dir, merge=merge)
    print(f"\nwrote {path}")
    if not args.no_plot:
        try:
            # With --merge the plot shows every row of the family now in the CSV, not only this run's.
            plot_rows = _family_rows_from_csv(path, family, plot_key) if merge else rows
            plot = plot_metric(plot_rows, family, args.out_dir, key=plot_key, label=plot_label,
                               log_scale=plot_log_scale)
        except Exception as error:  # a broken plot must not lose the CSV
            print(f"NOTE: plot failed: {short_error(error)}")
            plot = None
        if plot is not None:
            print(f"wrote {plot}")


# ----------------------------------------------------------------------------------------------------
# Driving a run
# ----------------------------------------------------------------------------------------------------

def run_benchmark(family: str, args: argparse.Namespace, dtypes: Sequence[torch.dtype], providers: Sequence[str],
                  cases: Sequence[dict], describe_case: Callable[[dict], str],
                  run_case: Callable[[dict, torch.dtype, list[str], dict[str, str], int], list[dict]], *,
                  cuda_probe: Callable[[], object] | None = None, announce_unavailable: bool = False,
                  **finish_kwargs) -> list[dict]:
    """The main loop of every bench script, after its arguments are parsed: require a GPU, print the
    environment, seed, then under torch.no_grad() find the unavailable providers (`unavailable_providers`
    with `cuda_probe`, `announce_unavailable`) and, for each dtype and case, print
    "<family>: <describe_case(case)> <dtype>" and collect run_case(case, dtype, providers, unavailable,
    args.graph_calls); a case whose set-up raises (e.g. out of memory while building the inputs) is
    printed and skipped. Ends with `finish` (given `finish_kwargs`); returns the rows."""
    require_gpu()
    print_environment(family)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        unavailable = unavailable_providers(providers, cuda_probe=cuda_probe, announce=announce_unavailable)
        for dtype in dtypes:
            for case in cases:
                print(f"{family}: {describe_case(case)} {dtype_name(dtype)}", flush=True)
                try:
                    rows += run_case(case, dtype, providers, unavailable, args.graph_calls)
                except Exception as error:  # e.g. out of memory while building the inputs
                    print(f"  ERROR building case: {short_error(error)}")
                    torch.cuda.empty_cache()
    finish(rows, family, args, **finish_kwargs)
    return rows


def stack_pngs(paths: Sequence[Path | str], out_path: Path | str) -> Path | None:
    """Stacks PNG images vertically (left-aligned, white padding) into `out_path`, so several families'
    plots come back from the GPU machine as one file. Missing paths are skipped; returns None when none
    is left or matplotlib is missing."""
    paths = [Path(path) for path in paths if Path(path).is_file()]
    if not paths:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image as mpimg
        import numpy as np
    except ImportError as error:
        print(f"NOTE: no stacked plot: matplotlib is not available ({error})")
        return None
    images = []
    for path in paths:
        image = mpimg.imread(path)  # float32 in [0, 1] for PNGs: (h, w), (h, w, 3) or (h, w, 4)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.shape[2] == 3:
            image = np.concatenate([image, np.ones(image.shape[:2] + (1,), dtype=image.dtype)], axis=-1)
        images.append(image.astype(np.float32))
    width = max(image.shape[1] for image in images)
    padded = []
    for image in images:
        pad = np.ones((image.shape[0], width - image.shape[1], 4), dtype=np.float32)
        padded.append(np.concatenate([image, pad], axis=1))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mpimg.imsave(out_path, np.concatenate(padded, axis=0))
    return out_path
