"""Training-step benchmark (issue 17): one optimizer step (forward with labels, backward, AdamW) of a
GPT-style model, fusedgpt against transformers, in tokens/s and peak memory, ratios in one run.

Models (real sizes, random weights, configs built in code): GPT-2 124M, OPT-350m (post-LN, 512-wide
embeddings projected to 1024), GPT-Neo 125M (GPT-Neo's 256-token local window on every other layer).
Cases: sequence 1024 (batch 4) and 2048 (batch 2): 4096 tokens per step. Parameters in the benchmark's
dtype (bf16 by default, --dtypes), AdamW(lr 1e-4, foreach), no dropout (so every provider computes the
same function), random token ids as inputs and labels.

Providers (each on its own copy of the same weights):
  fusedgpt-patch   the transformers model after fusedgpt.patch(model): fused attention (Triton
                   FlashAttention-2 backward), LayerNorm + residual, bias + activation, and the head's loss
                   by fusedgpt.ops.linear_cross_entropy (no [tokens, vocab] logits)
  fusedgpt         fusedgpt.from_hf(model) in training: model(ids, labels=ids) returns the loss
  hf-eager         transformers with attn_implementation="eager"
  hf-sdpa          the same with "sdpa" (GPT-Neo has none: an error row)
One warm-up step per provider and case (Triton JIT and autotuning excluded); then --repeats timed steps,
torch.cuda.synchronize + perf_counter around each; the median is reported.
Columns: ms (per step), tokens_per_s = batch * seq / step time, peak_mb = torch.cuda.max_memory_allocated
during the timed steps (weights, gradients and optimizer state included), ratio_vs_<hf> = that provider's ms
/ this one's (> 1: faster), memory_vs_<hf> = this peak / that peak (< 1: less memory), check = the first
step's loss against hf-eager's (relative difference; same weights, same batch).
Results: bench/results/<device>.csv (family "train").

CPU mode (--cpu, no GPU): the embedded model's shape in float32, batch 2, sequence 64, one step per
repeat, every provider; peak memory not measured (the CPU has no allocator counter).
    python bench/bench_train.py --cpu [--repeats 2]
    python bench/bench_train.py [--models gpt2-124m,opt-350m,gpt-neo-125m] [--dtypes bf16] [--repeats 5]
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import results  # noqa: E402
from models import MODEL_CONFIGS  # noqa: E402

FAMILY = "train"
PROVIDERS = ("fusedgpt-patch", "fusedgpt", "hf-eager", "hf-sdpa")
HF_PROVIDERS = ("hf-eager", "hf-sdpa")
CASES = ((4, 1024), (2, 2048))  # (batch, sequence)
QUICK_CASES = ((4, 1024),)
CPU_CASE = (2, 64)
DEFAULT_REPEATS = 3
SEED = 0
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, dropout=0.0, attention_dropout=0.0,
                  resid_dropout=0.0, embed_dropout=0.0)


def _opt_350m():
    import transformers

    return transformers.OPTConfig(vocab_size=50272, hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                                  num_attention_heads=16, word_embed_proj_dim=512, max_position_embeddings=2048,
                                  do_layer_norm_before=False, activation_function="relu")


TRAIN_CONFIGS = {"gpt2-124m": MODEL_CONFIGS["gpt2-124m"], "opt-350m": _opt_350m,
                 "gpt-neo-125m": MODEL_CONFIGS["gpt-neo-125m"]}
COLUMNS = [("case", "case", 0), ("provider", "provider", 0), ("dtype", "dtype", 0), ("ms", "ms", 1),
           ("tok/s", "tokens_per_s", 0), ("peak MB", "peak_mb", 0), ("x_hf_eager", "ratio_vs_hf_eager", 2),
           ("x_hf_sdpa", "ratio_vs_hf_sdpa", 2), ("mem_vs_eager", "memory_vs_hf_eager", 2),
           ("check", "check", 0), ("error", "error", 0)]


def build(config_function, dtype: torch.dtype, device: str):
    """The transformers model (eval-free training mode, no dropout) for a config, seeded, in dtype."""
    import transformers

    config = config_function()
    for name, value in NO_DROPOUT.items():
        if hasattr(config, name):
            setattr(config, name, value)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.to(device).train()


def providers_for(hf_model, wanted):
    """provider -> (model, step_loss(model, ids) -> scalar loss), each a copy of hf_model's weights."""
    import fusedgpt

    made = {}
    for name in wanted:
        if name == "fusedgpt":
            model = fusedgpt.from_hf(hf_model).train().requires_grad_(True)
            made[name] = (model, lambda m, ids: m(ids, labels=ids))
            continue
        model = copy.deepcopy(hf_model)
        if name == "fusedgpt-patch":
            fusedgpt.patch(model)
        else:
            model.set_attn_implementation(name.removeprefix("hf-"))
        made[name] = (model, lambda m, ids: m(input_ids=ids, labels=ids).loss)
    return made


def time_steps(model, step_loss, ids, repeats: int, device: str) -> dict:
    """Median ms of an AdamW step (after one warm-up step), the first loss, and the peak memory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(model, ids)
        loss.backward()
        optimizer.step()
        return loss.detach()

    first_loss = step().float().item()  # warm-up: compilation and autotuning
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"ms": statistics.median(seconds) * 1e3, "loss": first_loss, "peak_mb": peak}


def run(models: dict, cases, dtypes, wanted, repeats: int, device: str) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for name, config_function in models.items():
            for batch, seq in cases:
                label = f"{name} b{batch} s{seq}"
                hf_model = build(config_function, dtype, device)
                ids = torch.randint(0, hf_model.config.vocab_size, (batch, seq), device=device,
                                    generator=torch.Generator(device=device).manual_seed(SEED))
                case_rows = []
                for provider, (model, step_loss) in providers_for(hf_model, wanted).items():
                    row = {"family": FAMILY, "case": label, "provider": provider, "dtype": common.dtype_name(dtype),
                           "batch": batch, "seq_len": seq}
                    try:
                        measured = time_steps(model, step_loss, ids, repeats, device)
                        row.update(ms=measured["ms"], tokens_per_s=batch * seq / (measured["ms"] / 1e3),
                                   peak_mb=measured["peak_mb"], loss=measured["loss"])
                    except Exception as error:  # e.g. GPT-Neo has no sdpa; out of memory
                        row["error"] = common.short_error(error)
                    case_rows.append(row)
                    del model
                    if device == "cuda":
                        torch.cuda.empty_cache()
                _compare(case_rows)
                rows += case_rows
                print(f"{FAMILY}: {label} {common.dtype_name(dtype)} done", flush=True)
    results.add_speedups(rows, peers=HF_PROVIDERS)
    return rows


def _compare(rows: list[dict]) -> None:
    """memory_vs_<hf> and the check of every row against hf-eager's first loss (same weights and batch)."""
    by_provider = {row["provider"]: row for row in rows}
    eager = by_provider.get("hf-eager")
    for row in rows:
        for peer in HF_PROVIDERS:
            other = by_provider.get(peer)
            if other and other.get("peak_mb") and row.get("peak_mb"):
                row[f"memory_vs_{peer.replace('-', '_')}"] = row["peak_mb"] / other["peak_mb"]
        if eager and "loss" in eager and "loss" in row:
            difference = abs(row["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-12)
            row["check"] = f"{difference:.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, dtypes="bf16")
    parser.add_argument("--models", default=None, help=f"comma-separated among {', '.join(TRAIN_CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed steps after one warm-up")
    parser.add_argument("--cpu", action="store_true", help="no GPU: the embedded model's shape in float32")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    wanted = common.parse_choices(args.providers, PROVIDERS)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.cpu:
        from fusedgpt.models.tiny import TINY_MODEL_DIR

        models = {"embedded": lambda: transformers.AutoConfig.from_pretrained(TINY_MODEL_DIR)}
        rows = run(models, (CPU_CASE,), [torch.float32], wanted, args.repeats, "cpu")
    else:
        names = [n.strip() for n in (args.models or ",".join(TRAIN_CONFIGS)).split(",") if n.strip()]
        unknown = [n for n in names if n not in TRAIN_CONFIGS]
        if unknown:
            raise SystemExit(f"--models: unknown {unknown!r}; this script has {list(TRAIN_CONFIGS)}")
        common.require_gpu()
        common.print_environment(FAMILY)
        rows = run({n: TRAIN_CONFIGS[n] for n in names}, QUICK_CASES if args.quick else CASES,
                   common.parse_dtypes(args.dtypes), wanted, args.repeats, "cuda")
    common.print_table(rows, COLUMNS)
    path = results.write_results_csv(rows, FAMILY, args.out_dir, merge=args.merge)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
