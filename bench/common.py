"""The run of an op benchmark, shared by the bench/bench_<family>.py scripts (CONVENTIONS.md, "Benchmarks").

Every family must be checked, timed and recorded the same way, or its ratios mean nothing. This holds
  - the command line every script takes (`argument_parser`, `parse_dtypes`, `parse_choices`,
    `select_cases`, `add_headline_option`: the issue-15 headline cases that bench/gpu_run.py runs);
  - one row per provider and case (`measure`: the correctness check, then timing.time_ms and, where
    asked, timing.graph_us; GB/s and TFLOP/s from the script's byte and FLOP counts; an exception
    becomes the row's error, never the end of the run);
  - the loops: `run_benchmark` (dtypes x cases, the results CSV rewritten after every case by
    `write_rows_so_far` so that a run stopped part-way keeps what it measured, then `finish`: ratios,
    table, results CSV, plot) and `providers_to_time` (a case's providers: those that cannot run get an
    error row, the empty kernel is measured here).
Timing is in timing.py (triton.testing's do_bench and do_bench_cudagraph), the results file and its
plot in results.py. torch.cuda is touched only inside functions, so `python bench/bench_<family>.py
--help` works on a machine without a GPU. Written for torch >= 2.11 with triton >= 3.6.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

import results
import timing

FUSEDGPT_PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton")
# Providers that are one of fusedgpt's backends, called with backend=<name>. "fusedgpt-torch" (the composite
# PyTorch backend) is in no script's default providers: the headline runs time it, so that gpu_run.py can
# rank all three backends of each family from one run.
TORCH_BACKEND_PROVIDER = "fusedgpt-torch"
BACKEND_PROVIDERS = {"fusedgpt-cuda": "cuda", "fusedgpt-triton": "triton", TORCH_BACKEND_PROVIDER: "torch"}
EMPTY_KERNEL_PROVIDER = results.EMPTY_KERNEL_PROVIDER
CUDA_EXTENSION_MISSING = "skipped: the CUDA extension is not available"
DTYPES_BY_NAME = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
                  "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def argument_parser(description: str, *, dtypes: str = "fp16,bf16") -> argparse.ArgumentParser:
    """The flags every bench script takes (`dtypes`: the --dtypes default); a script adds its own before
    parsing."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few shapes only (a smoke run)")
    parser.add_argument("--dtypes", default=dtypes,
                        help=f"comma-separated dtypes among fp16, bf16 (default: {dtypes})")
    parser.add_argument("--out-dir", type=Path, default=results.DEFAULT_OUT_DIR,
                        help="where the CSV and PNG go (default: bench/results)")
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers to run (default: all of this script's)")
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


def add_headline_option(parser: argparse.ArgumentParser, cases: str) -> None:
    """--headline: exactly the issue-15 headline `cases` (described in the help) with the script's
    HEADLINE_PROVIDERS, instead of the full grid (what bench/gpu_run.py runs)."""
    parser.add_argument("--headline", action="store_true",
                        help=f"only the headline cases of issue 15 ({cases}) and their providers "
                             "(HEADLINE_PROVIDERS: fusedgpt's and the peers the issue names)")


def select_cases(cases: list, pattern: str | None, case_label: Callable) -> list:
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


def parse_choices(text: str | None, known: Sequence[str], option: str = "--providers", *,
                  default: Sequence[str] | None = None) -> list[str]:
    """The comma-separated names of `option` to run, in the script's order (`default`, else all of
    `known`, when None); unknown names, or none, are an error."""
    if text is None:
        return list(known if default is None else default)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    if not wanted:  # (an empty run would still rewrite the family's CSV rows)
        raise SystemExit(f"{option}: no name given; this script has {list(known)}")
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"{option}: unknown {unknown}; this script has {list(known)}")
    return [name for name in known if name in wanted]


def parse_providers(args: argparse.Namespace, providers: Sequence[str], headline_providers: Sequence[str]) -> list[str]:
    """--providers among the script's `providers` and its headline ones (fusedgpt-torch); without it,
    `headline_providers` under --headline, else `providers`."""
    known = tuple(providers) + tuple(name for name in headline_providers if name not in providers)
    return parse_choices(args.providers, known, default=headline_providers if args.headline else providers)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------

def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: these benchmarks need one (try --help for the options)")


def print_environment(family: str) -> None:
    import fusedgpt

    meta = results.environment_metadata()
    print(f"bench {family}: {meta['device']} (L2 {timing.l2_cache_bytes() / 2**20:.0f} MiB), torch {meta['torch']} "
          f"(CUDA {meta['cuda']}), triton {meta['triton']}, python {meta['python']}, {meta['date']}")
    if fusedgpt.extension_available():
        print(f"fusedgpt CUDA extension built for {', '.join(fusedgpt.extension_cuda_archs())}")
    else:
        print(f"NOTE: fusedgpt-cuda is skipped: {fusedgpt.extension_unavailable_reason()}")


def compile_fresh(function: Callable) -> Callable:
    """torch.compile(function, fullgraph=True, dynamic=False) in the default mode, after clearing dynamo's
    caches: each case gets its own static-shape compile (the strongest compile for that shape) instead of
    a dynamic-shape recompile, and many cases never reach dynamo's recompile limit."""
    import torch._dynamo as dynamo

    dynamo.reset()
    return torch.compile(function, fullgraph=True, dynamic=False)


# ----------------------------------------------------------------------------------------------------
# One provider on one case
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
            step: Callable[[int], object], with_graph: bool, verify: Callable[[], str] | None = None,
            flops: int = 0) -> dict:
    """One row: verify() once (it also triggers JIT / torch.compile), then the do_bench time and, when
    `with_graph`, the CUDA-graph latency of step(0), step(1), ... (consecutive indices: step i uses rotated
    input copy i). GB/s from `bytes_moved`, TFLOP/s from `flops` (each only when non-zero). An exception
    becomes the row's `error` (printed); a graph failure keeps the do_bench time."""
    row = {"family": family, "case": case, "provider": provider, "dtype": dtype_name(dtype), **fields,
           "bytes": bytes_moved or None, "flops": flops or None}
    counter = itertools.count()

    def call():
        return step(next(counter))

    errors = []
    try:
        if verify is not None:
            row["check"] = verify()
        row["ms"] = timing.time_ms(call)
        if bytes_moved:
            row["gbps"] = bytes_moved / (row["ms"] * 1e-3) / 1e9
        if flops:
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    except Exception as error:  # one failing provider must not stop the others
        errors.append(short_error(error))
    if with_graph and not errors:
        try:
            row["us_graph"] = timing.graph_us(call)
        except Exception as error:
            errors.append("graph: " + short_error(error))
    if errors:
        row["error"] = " | ".join(errors)
        print(f"  ERROR {family} {case} {row['dtype']} {provider}: {row['error']}")
    return row


def unavailable_providers(providers: Sequence[str], *, cuda_probe: Callable[[], object] | None = None) -> dict[str, str]:
    """Providers that cannot run at all in this environment, with why (printed; each gets error rows, not
    calls): fusedgpt-cuda without the CUDA extension, or when `cuda_probe()` (one tiny call of the op's
    CUDA backend, once per run) raises; flash-attn when `import flash_attn` fails."""
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
    for provider, reason in reasons.items():
        print(f"NOTE: {provider}: {reason}")
    return reasons


def providers_to_time(rows: list[dict], *, family: str, case: str, dtype: torch.dtype,
                      providers: Sequence[str], unavailable: dict[str, str],
                      fields: dict | Callable[[str], dict], make_function: Callable[[str], object],
                      with_graph: bool = False):
    """The provider loop of a script's run_case: yields (provider, make_function(provider), fields) for each
    provider the script times itself, in order, and appends to `rows` the rows it settles on its own: the
    empty kernel (only when `with_graph`: its floor is a graph-replay latency), an error row for a provider
    in `unavailable`, and an error row (printed) when make_function raises. `fields` is the case's row
    fields, or a function of the provider giving them."""
    for provider in providers:
        provider_fields = fields(provider) if callable(fields) else fields
        row = {"family": family, "case": case, "provider": provider, "dtype": dtype_name(dtype), **provider_fields}
        if provider == EMPTY_KERNEL_PROVIDER:
            if with_graph:
                rows.append(measure(family=family, case=case, provider=provider, dtype=dtype, fields=provider_fields,
                                    bytes_moved=0, step=timing.empty_kernel_step(), with_graph=True))
            continue
        if provider in unavailable:
            rows.append({**row, "error": unavailable[provider]})
            continue
        try:
            function = make_function(provider)
        except Exception as error:
            rows.append({**row, "error": short_error(error)})
            print(f"  ERROR {case} {provider}: {rows[-1]['error']}")
            continue
        yield provider, function, provider_fields
        del function  # not kept alive while the next provider is set up


# ----------------------------------------------------------------------------------------------------
# Printing, and the end of a run
# ----------------------------------------------------------------------------------------------------

def best_fusedgpt(providers: dict[str, dict], time_key: str) -> dict | None:
    """The fusedgpt row with the lowest `time_key` among those measured without error."""
    candidates = [providers[name] for name in FUSEDGPT_PROVIDERS
                  if name in providers and providers[name].get(time_key) and not providers[name].get("error")]
    return min(candidates, key=lambda row: row[time_key]) if candidates else None


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int]]) -> None:
    """Plain aligned text. columns: (header, row key, digits for floats)."""
    def cell(value, digits):
        if value is None or value == "":
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    cells = [[header for header, _, _ in columns]]
    cells += [[cell(row.get(key), digits) for _, key, digits in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line_number, line in enumerate(cells):
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
        if line_number == 0:
            print("  ".join("-" * width for width in widths))


RESULT_COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("provider", "provider", 0), ("ms", "ms", 4),
                  ("us_graph", "us_graph", 2), ("GB/s", "gbps", 1), ("x_compile", "ratio_vs_torch_compile", 2),
                  ("x_eager", "ratio_vs_torch_eager", 2), ("check", "check", 0), ("error", "error", 0)]


def finish(rows: list[dict], family: str, args: argparse.Namespace, *,
           columns: Sequence[tuple[str, str, int]] = RESULT_COLUMNS, plot_key: str = "gbps",
           plot_label: str = "GB/s (effective)", plot_log_scale: bool = True,
           plot_rows: Callable[[Path], list[dict]] | None = None) -> None:
    """The end of every bench script: ratios to the peers, the printed table (`columns`), the results CSV,
    and the plot of `plot_key` over the family's rows in the CSV (with --merge, earlier calls' too), or
    over plot_rows(csv path)."""
    results.add_speedups(rows)
    print()
    print_table(rows, columns)
    path = results.write_results_csv(rows, family, args.out_dir, merge=args.merge)
    print(f"\nwrote {path}")
    if args.no_plot:
        return
    try:
        rows_to_plot = plot_rows(path) if plot_rows else results.read_family_rows(path, family)
        plot = results.plot(rows_to_plot, family, args.out_dir, key=plot_key, label=plot_label,
                            log_scale=plot_log_scale)
    except Exception as error:  # a broken plot must not lose the CSV
        print(f"NOTE: plot failed: {short_error(error)}")
        plot = None
    if plot is not None:
        print(f"wrote {plot}")


def write_rows_so_far(rows: list[dict], family: str, args: argparse.Namespace,
                      add_ratios: Callable[[list[dict]], None] = results.add_speedups) -> None:
    """The results CSV as `finish` would write it from the rows measured so far (ratios included; with
    --merge only those rows replaced), so that a run killed at its time budget (bench/gpu_run.py) keeps
    every case it finished. add_ratios(rows) recomputes the ratios from scratch, so calling this after
    every case gives the same file as one call at the end."""
    if rows:
        add_ratios(rows)
        results.write_results_csv(rows, family, args.out_dir, merge=args.merge)


def run_benchmark(family: str, args: argparse.Namespace, dtypes: Sequence[torch.dtype], providers: Sequence[str],
                  cases: Sequence[dict], describe_case: Callable[[dict], str],
                  run_case: Callable[[dict, torch.dtype, list[str], dict[str, str]], list[dict]], *,
                  cuda_probe: Callable[[], object] | None = None, **finish_kwargs) -> list[dict]:
    """The main loop of every op script, after its arguments are parsed: require a GPU, print the
    environment, seed, then under torch.no_grad() find the unavailable providers and, for each dtype and
    case, print "<family>: <describe_case(case)> <dtype>" and collect run_case(case, dtype, providers,
    unavailable), where a case carrying a "providers" list (the headline cases' peers) runs only those of
    `providers`; a case whose set-up raises (e.g. out of memory while building the inputs) is printed
    and skipped. The results CSV is rewritten after every case (`write_rows_so_far`). Ends with `finish`
    (given `finish_kwargs`); returns the rows."""
    require_gpu()
    print_environment(family)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        unavailable = unavailable_providers(providers, cuda_probe=cuda_probe)
        for dtype in dtypes:
            for case in cases:
                print(f"{family}: {describe_case(case)} {dtype_name(dtype)}", flush=True)
                case_providers = [name for name in providers if name in case.get("providers", providers)]
                try:
                    rows += run_case(case, dtype, case_providers, unavailable)
                except Exception as error:  # e.g. out of memory while building the inputs
                    print(f"  ERROR building case: {short_error(error)}")
                    torch.cuda.empty_cache()
                write_rows_so_far(rows, family, args)
    finish(rows, family, args, **finish_kwargs)
    return rows
