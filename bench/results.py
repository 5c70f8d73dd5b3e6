"""The bench scripts' results: bench/results/<device-slug>.csv and its plots (CONVENTIONS.md, "Benchmarks").

One row format for every family (CSV_COLUMNS), stamped with the device, the versions and the date, so the
README's numbers can come from one file. run_gpu.sh runs the families one after another into that file:
`write_results_csv` replaces the rows of the family it writes and keeps the others' (with merge=True only
the (case, dtype, provider) rows measured again, for a family split over several calls). `add_speedups`
fills the ratios to the peers measured in the same run. `plot` draws a family's rows with
triton.testing.perf_report: the cases on the x axis, one line per provider and dtype.

torch.cuda is touched only inside functions.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
from pathlib import Path
from typing import Sequence

import torch
import triton
import triton.testing

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = BENCH_DIR / "results"

# A family leaves the shape fields it has no use for empty. ratio_vs_<peer> = peer ms / this ms (> 1: this
# provider is faster than the peer, same run); graph_ratio_vs_<peer> is the same with the CUDA-graph
# latencies. PEERS is the union over the families (a family fills only the columns of the peers it runs).
PEERS = ("torch-compile", "torch-eager", "torch-copy-k-only",
         "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex-attention", "flash-attn", "sdpa")
EMPTY_KERNEL_PROVIDER = "empty-kernel"  # the latency floor: no ratio of its own
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


def device_name() -> str:
    """The GPU's name, or the CPU's (bench_generate.py --cpu) on a machine without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"CPU {platform.machine()} {os.cpu_count()} cores"


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


def results_csv_path(out_dir: Path | str = DEFAULT_OUT_DIR) -> Path:
    return Path(out_dir) / f"{device_slug()}.csv"


def write_results_csv(rows: Sequence[dict], family: str, out_dir: Path | str = DEFAULT_OUT_DIR, *,
                      merge: bool = False) -> Path:
    """Writes <out_dir>/<device-slug>.csv: this family's rows replace its old ones (with merge=True only
    those of a (case, dtype, provider) measured again), other families' rows and columns are kept.
    Every new row is stamped with environment_metadata(). Floats keep 6 significant digits."""
    path = results_csv_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept, columns = [], list(CSV_COLUMNS)
    if path.exists():
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns += [name for name in (reader.fieldnames or []) if name not in columns]
            measured = {(row["case"], row["dtype"], row["provider"]) for row in rows}
            kept = [row for row in reader if row.get("family") != family
                    or (merge and (row.get("case"), row.get("dtype"), row.get("provider")) not in measured)]
    meta = environment_metadata()
    new_rows = [{**meta, **row} for row in rows]
    for row in new_rows:
        columns += [name for name in row if name not in columns]
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in kept + new_rows:
            writer.writerow({key: "" if value is None else f"{value:.6g}" if isinstance(value, float) else value
                             for key, value in row.items()})
    os.replace(temporary, path)
    return path


def read_family_rows(path: Path | str, family: str) -> list[dict]:
    """This family's rows of a results CSV, as written (strings)."""
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("family") == family]


def number(value) -> float | None:
    """A CSV cell or row value as a float; None when empty or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


def plot(rows: Sequence[dict], family: str, out_dir: Path | str = DEFAULT_OUT_DIR, *, key: str = "gbps",
         label: str = "GB/s (effective)", log_scale: bool = True) -> Path | None:
    """<out_dir>/<device-slug>_<family>.png: triton.testing.perf_report's plot of row[key] (rows as the
    results CSV holds them, or as measured), the cases on the x axis (named on their ticks), one line per
    (provider, dtype): a colour per provider, solid for the first dtype, dashed for the next. Returns None,
    with a note, when nothing was measured or matplotlib or pandas (perf_report's table) is missing."""
    values = {(row["case"], (row["provider"], row["dtype"])): number(row.get(key)) for row in rows}
    values = {point: value for point, value in values.items() if value}
    if not values:
        print(f"NOTE: no plot for {family}: no {label} was measured")
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas  # noqa: F401  (perf_report builds its table with it)
    except ImportError as error:
        print(f"NOTE: no plot for {family}: {error}")
        return None
    cases = list(dict.fromkeys(case for case, _ in values))
    lines = list(dict.fromkeys(line for _, line in values))
    providers = list(dict.fromkeys(provider for provider, _ in lines))
    dtypes = list(dict.fromkeys(dtype for _, dtype in lines))
    benchmark = triton.testing.Benchmark(
        x_names=["case_index"], x_vals=list(range(len(cases))), line_arg="line", line_vals=lines,
        line_names=[f"{provider} {dtype}" for provider, dtype in lines], plot_name=f"{device_slug()}_{family}",
        args={}, xlabel="case", ylabel=label, y_log=log_scale,
        styles=[(f"C{providers.index(provider) % 10}", "-" if dtypes.index(dtype) == 0 else "--")
                for provider, dtype in lines])

    @triton.testing.perf_report(benchmark)
    def lookup(case_index: int, line: tuple[str, str]) -> float:
        return values.get((cases[case_index], line), float("nan"))

    lookup.run()  # no save_path: perf_report writes no CSV or HTML of its own, and its figure stays current
    figure = plt.gcf()  # the figure perf_report drew: name the cases, mark lone points, add the stamp
    axis = figure.axes[0]
    axis.set_xticks(range(len(cases)), cases, rotation=60, ha="right", fontsize=7)
    for line in axis.get_lines():
        line.set_marker("o")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the lines, not over them
    axis.grid(which="both", alpha=0.3)
    meta = environment_metadata()
    axis.set_title(f"{family}: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date'][:10]}",
                   fontsize=9)
    figure.set_size_inches(min(40.0, max(8.0, 0.3 * len(cases) + 3.0)), 6.0)
    figure.tight_layout()
    path = Path(out_dir) / f"{device_slug()}_{family}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close("all")
    return path
