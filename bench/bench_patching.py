"""Benchmark of fusedgpt.patch on Hugging Face models: what one call buys a transformers user. For GPT-2
124M, OPT-125m, GPT-Neo-125M, OPT-1.3B and GPT-Neo-1.3B (real-size configs built here, random weights),
fp16, in one run:

  prefill             one forward over 8 x 1024 tokens (use_cache=False, logits of the last token only,
                      as generate's prefill computes them), do_bench median;
  generate            model.generate, batch 16, prompt 512 (no padding), 128 new tokens, greedy,
                      transformers' dynamic cache; tokens/s = 16 * 128 / wall time (prefill included);
  generate-static     the same with cache_implementation="static", uncompiled (disable_compile=True);
  generate-compiled   cache_implementation="static" with transformers' own compiled decode step
                      (its default CompileConfig: torch.compile, mode "reduce-overhead").

Providers (each on the same weights):
  hf-eager          unpatched, attn_implementation="eager"
  hf-sdpa           unpatched, attn_implementation="sdpa" (GPT-2 and OPT; GPT-Neo has no sdpa path)
  fusedgpt-triton   fusedgpt.patch(model) with FUSEDGPT_BACKEND=triton
  fusedgpt-cuda     fusedgpt.patch(model) with FUSEDGPT_BACKEND=cuda (skipped without the extension)

Each row holds ms per call, tokens_per_s, and ratio_vs_hf_eager / ratio_vs_hf_sdpa / ratio_vs_best_hf
(baseline time / this time, > 1 = faster than the faster of eager and sdpa, measured in the same run).
The fusedgpt prefill rows are checked against hf-eager's last-token logits. Results:
bench/results/<device>.csv (family "patching") and a PNG of tokens/s.
The issue's bar (H100): prefill >= 1.3x hf-sdpa (hf-eager for GPT-Neo), generate >= 1.2x the faster
of hf-eager and hf-sdpa.

Each generate row gets one warm-up call (two for generate-compiled: compile, then CUDA-graph recording)
before --repeats timed calls (median), so Triton JIT / autotuning and torch.compile are excluded.

    python bench/bench_patching.py [--quick] [--models gpt2-124m,opt-1.3b] [--modes prefill,generate]
                                   [--providers hf-eager,fusedgpt-triton] [--repeats 3] [--merge]

GPU only at run time; --help works anywhere. Run time (estimated, not yet measured): a 125M model takes
one to two minutes for all modes and providers, a 1.3B model several (each compiled mode compiles once
per provider). One GPU command gets 10 minutes, so split a full run, e.g.
    python bench/bench_patching.py --models gpt2-124m,opt-125m,gpt-neo-125m
    python bench/bench_patching.py --models opt-1.3b --merge
    python bench/bench_patching.py --models gpt-neo-1.3b --merge
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import fusedgpt  # noqa: E402
import results  # noqa: E402
import timing  # noqa: E402
from models import MODEL_CONFIGS  # noqa: E402

FAMILY = "patching"
PROVIDERS = ("hf-eager", "hf-sdpa", "fusedgpt-triton", "fusedgpt-cuda")
MODES = ("prefill", "generate", "generate-static", "generate-compiled")
PREFILL_BATCH, PREFILL_TOKENS = 8, 1024
GENERATE_BATCH, PROMPT_TOKENS, NEW_TOKENS = 16, 512, 128
QUICK_NEW_TOKENS = 16


MODEL_NAMES = tuple(MODEL_CONFIGS)


def build_model(name: str, dtype: torch.dtype):
    """Random weights, initialised on the GPU (transformers' init on the CPU takes minutes at 1.3B)."""
    import transformers

    config = MODEL_CONFIGS[name]()
    config.bos_token_id = config.eos_token_id = None  # random weights: never stop early
    config.pad_token_id = 0
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def use_provider(model, provider: str) -> str | None:
    """Puts the model in the provider's state; returns why it cannot run (None when it can)."""
    fusedgpt.unpatch(model)
    model.__dict__.pop("_compiled_call", None)  # transformers caches its compiled forward on the model
    torch._dynamo.reset()
    if provider.startswith("hf-"):
        implementation = provider.removeprefix("hf-")
        if implementation == "sdpa" and model.config.model_type == "gpt_neo":
            return "skipped: GPT-Neo has no sdpa attention in transformers"
        model.set_attn_implementation(implementation)
        return None
    backend = provider.removeprefix("fusedgpt-")
    if backend == "cuda" and not fusedgpt.extension_available():
        return common.CUDA_EXTENSION_MISSING
    os.environ["FUSEDGPT_BACKEND"] = backend
    model.set_attn_implementation("eager")
    fusedgpt.patch(model)
    return None


def wall_seconds(function, repeats: int, warmups: int) -> float:
    """Median wall time of `function` (synchronised), after `warmups` untimed calls."""
    for _ in range(warmups):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_mode(model, mode: str, inputs: dict, new_tokens: int, repeats: int, reference: dict) -> dict:
    """One (model, provider, mode) measurement: ms per call, tokens/s, check."""
    if mode == "prefill":
        ids = inputs["prefill"]

        def forward():
            return model(ids, use_cache=False, logits_to_keep=1).logits

        out = forward()
        check = common.check_close(out, reference["prefill"]) if "prefill" in reference else None
        reference.setdefault("prefill", out)
        ms = timing.time_ms(forward)
        return {"batch": ids.shape[0], "seq_len": ids.shape[1], "tokens": ids.numel(), "ms": ms,
                "tokens_per_s": ids.numel() / (ms * 1e-3), "check": check}
    ids, mask = inputs["prompt"]
    options = {"generate": {}, "generate-static": dict(cache_implementation="static", disable_compile=True),
               "generate-compiled": dict(cache_implementation="static")}[mode]

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, **options)

    seconds = wall_seconds(generate, repeats, warmups=2 if mode == "generate-compiled" else 1)
    generated = ids.shape[0] * new_tokens
    return {"batch": ids.shape[0], "seq_len": ids.shape[1], "new_tokens": new_tokens, "tokens": generated,
            "ms": seconds * 1e3, "tokens_per_s": generated / seconds}


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_hf_eager / _sdpa / _best_hf = baseline ms / this row's ms, per (case, dtype)."""
    for providers in results.rows_by_case(rows).values():
        baselines = {name: providers[name]["ms"] for name in ("hf-eager", "hf-sdpa")
                     if providers.get(name, {}).get("ms")}
        for row in providers.values():
            if not row.get("ms"):
                continue
            for name, ms in baselines.items():
                row[f"ratio_vs_{name.replace('-', '_')}"] = ms / row["ms"]
            if baselines:
                row["ratio_vs_best_hf"] = min(baselines.values()) / row["ms"]


COLUMNS = [("case", "case", 0), ("provider", "provider", 0), ("ms", "ms", 2), ("tokens/s", "tokens_per_s", 0),
           ("x_eager", "ratio_vs_hf_eager", 2), ("x_sdpa", "ratio_vs_hf_sdpa", 2), ("x_best_hf", "ratio_vs_best_hf", 2),
           ("check", "check", 0), ("error", "error", 0)]


def main() -> None:
    parser = common.argument_parser(__doc__, dtypes="fp16")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated, among {', '.join(MODEL_NAMES)} (default: all)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, among {', '.join(MODES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls per row (median; default 3)")
    args = parser.parse_args()
    models = common.parse_choices(args.models, MODEL_NAMES, "--models")
    modes = common.parse_choices(args.modes, MODES, "--modes")
    providers = common.parse_choices(args.providers, PROVIDERS)
    dtypes = common.parse_dtypes(args.dtypes)
    new_tokens = QUICK_NEW_TOKENS if args.quick else NEW_TOKENS
    if args.quick and args.models is None:
        models = ["gpt2-124m", "gpt-neo-125m"]

    common.require_gpu()
    common.print_environment(FAMILY)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            for name in models:
                torch.manual_seed(0)
                try:
                    model = build_model(name, dtype)
                except Exception as error:
                    print(f"  ERROR building {name}: {common.short_error(error)}")
                    continue
                vocab = model.config.vocab_size
                inputs = {"prefill": torch.randint(1, vocab, (PREFILL_BATCH, PREFILL_TOKENS), device="cuda"),
                          "prompt": (torch.randint(1, vocab, (GENERATE_BATCH, PROMPT_TOKENS), device="cuda"),
                                     torch.ones(GENERATE_BATCH, PROMPT_TOKENS, dtype=torch.int64, device="cuda"))}
                reference: dict = {}
                for provider in providers:
                    fields = {"model": name}
                    skip = use_provider(model, provider)
                    for mode in modes:
                        case = f"{name}:{mode}"
                        base = {"family": FAMILY, "case": case, "provider": provider,
                                "dtype": common.dtype_name(dtype), "mode": mode, **fields}
                        if skip is not None:
                            rows.append({**base, "error": skip})
                            continue
                        print(f"{FAMILY}: {case} {provider} {common.dtype_name(dtype)}", flush=True)
                        try:
                            rows.append({**base, **measure_mode(model, mode, inputs, new_tokens, args.repeats,
                                                                reference)})
                        except Exception as error:  # one failing provider must not stop the others
                            rows.append({**base, "error": common.short_error(error)})
                            print(f"  ERROR: {rows[-1]['error']}")
                            torch.cuda.empty_cache()
                fusedgpt.unpatch(model)
                del model
                torch.cuda.empty_cache()
    os.environ.pop("FUSEDGPT_BACKEND", None)
    add_ratios(rows)
    common.finish(rows, FAMILY, args, columns=COLUMNS, plot_key="tokens_per_s", plot_label="tokens/s")


if __name__ == "__main__":
    main()
