"""End-to-end generation benchmark (issue 5, "Benchmark"): fusedgpt's own models and generation loop
against transformers' `generate`, in tokens/s, next to the memory-bandwidth bound of a decode step.
Why: the op benchmarks time one kernel each; what a user feels is tokens/s of a whole model, and the
issue's performance bar is stated there (GPT-2 124M >= 2,500 decode tokens/s at batch 1, OPT-1.3B >= 700,
>= 1.3x transformers' static cache + compiled decoding, >= 10x its default generate, >= 5x the faster of
eager / sdpa at batch 16).

Models (real sizes, random weights; the transformers configs are built in code, nothing is downloaded):
GPT-2 124M, OPT-125m, GPT-Neo-125M, OPT-1.3B, GPT-Neo-1.3B. Each is built once with
AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=fp16) on the GPU (seeded), and
fusedgpt.from_hf copies its weights, so every provider runs the same weights.
Cases: batch 1, prompt 128, 256 new tokens; batch 16, prompt 512, 128 new tokens. fp16 (--dtypes).
--headline (issue 15; what bench/gpu_run.py runs, sized to its time budget): GPT-2 124M and OPT-1.3B, batch 1,
prompt 128, 128 new tokens; providers fusedgpt, hf-eager (the reference of the agreement columns) and hf-sdpa
(transformers' default generate). hf-static-compiled (tens of seconds of compile per model) and batch 16
stay in the full run.
Prompts are random token ids (no padding); nothing stops early: fusedgpt gets eos_token_id=[] (no EOS),
transformers gets generation_config.eos_token_id = None and min_new_tokens = N, so every provider
produces exactly N new tokens (checked: the `check` column).

Providers (greedy, do_sample=False):
  fusedgpt            fusedgpt.generation.generate_with_stats (what model.generate runs): static KV cache,
                      prefill, then the decode step replayed as a CUDA graph; backends as FUSEDGPT_BACKEND
                      or the automatic choice. Its own prefill / decode timings are used.
  hf-eager            transformers generate(do_sample=False, max_new_tokens=N, min_new_tokens=N), dynamic
                      cache, attn_implementation="eager"
  hf-sdpa             the same with attn_implementation="sdpa" (transformers' default where supported;
                      GPT-Neo has no sdpa: an error row)
  hf-static-compiled  the same with cache_implementation="static", which makes transformers torch.compile
                      the decoding forward itself (mode "reduce-overhead": CUDA graphs); sdpa where the model
                      supports it, else eager (the `attn` column); any failure is an error row
Each provider gets one warm-up call per case before timing, so Triton JIT, autotuning, fusedgpt's CUDA-graph
capture and transformers' torch.compile / CUDA-graph recording are EXCLUDED from every time reported.
Timing: torch.cuda.synchronize + time.perf_counter around whole calls, --repeats times (median).

Formulas (B batch, P prompt, N new tokens; the first new token comes from the prefill, so a decode phase
is N - 1 steps of B tokens):
  decode tokens/s   = B * (N - 1) / decode time. fusedgpt: from generate_with_stats (decode_tokens /
                      decode_seconds). transformers has no split: decode time = median(generate with N new
                      tokens) - median(generate with 1 new token), and prefill time = the latter.
  e2e tokens/s      = B * N / median time of the whole generate call (prefill included)
  prefill tokens/s  = B * P / prefill time
  bytes per step    = weight bytes + average KV bytes per decode step, where weight bytes = every
                      parameter once (tied embedding counted once, as the lm_head reads it all), less the
                      position table and, when untied, the token embedding (only B rows are read); KV bytes
                      of step k (k = 1 .. N-1, P + k cached positions attended) = sum over layers of
                      2 (K, V) * B * H * D * elt * (min(P + k, window) + 1 written), averaged over k.
  copy bandwidth    = 2 * 1 GiB / time of one 1 GiB torch copy_ (read + write), triton.testing.do_bench
                      median, measured once per run (the `copy_gbps` column and a "device-copy" row)
  bound tokens/s    = B * copy bandwidth / bytes per step;  of_bound = decode tokens/s / bound tokens/s
  gbps              = bytes per step / measured time per decode step (effective bandwidth)
  ratio_vs_<hf>     = this row's decode tokens/s / that provider's (same case and run; > 1 = faster);
  ratio_vs_hf_best_dynamic: against the faster of hf-eager and hf-sdpa (the issue's batch-16 bar)
  agreement_vs_hf_eager: fraction of the B * N new tokens identical to hf-eager's at the same position
                      (greedy, fp16: rows drift apart after the first near-tie); agreement_prefix_vs_hf_eager:
                      mean fraction of each row's new tokens before its first difference. Shown for the
                      other transformers providers too, as the fp16 noise floor.
Results: bench/results/<device>.csv (family "generate"; `ms` = ms per decode step; rewritten after every
provider, so a run stopped part-way keeps what it measured) and
<device>_generate.png (decode tokens/s, log scale, with the bandwidth bound as a line of its own).

Run time on an H100: about 2-3 minutes per model for all four providers and both cases (transformers
eager at batch 1 is ~100 tokens/s; each torch.compile takes tens of seconds). One GPU command gets 10
minutes, so split a full run, e.g.
    python bench/bench_generate.py --models gpt2-124m,opt-125m,gpt-neo-125m
    python bench/bench_generate.py --models opt-1.3b,gpt-neo-1.3b --merge

CPU rows (--cpu, no GPU needed): the embedded model and GPT-2 124M's shape in float32, batch 1, prompt 16,
64 new tokens, fusedgpt's generate against transformers' (eager and sdpa), the providers alternating
within every repeat; whole calls timed; issue 14's bar is fusedgpt >= 1.2x the faster transformers
provider on the embedded model and >= 1.0x on GPT-2 124M (the `target` column).
    python bench/bench_generate.py --cpu [--models embedded,gpt2-124m] [--repeats 5]

    python bench/bench_generate.py [--quick | --headline] [--models gpt2-124m,opt-1.3b] [--providers fusedgpt,hf-sdpa]
                                   [--cases REGEX] [--repeats 3] [--merge] [--out-dir bench/results] [--no-plot]
"""

from __future__ import annotations

import copy
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import results  # noqa: E402
import timing  # noqa: E402
from models import MODEL_CONFIGS  # noqa: E402

FAMILY = "generate"
PROVIDERS = ("fusedgpt", "hf-eager", "hf-sdpa", "hf-static-compiled")
HF_PROVIDERS = ("hf-eager", "hf-sdpa", "hf-static-compiled")
BOUND_PROVIDER = "bandwidth-bound"  # plot only: the bound drawn as a line next to the providers
DEVICE = "cuda"
DEFAULT_REPEATS = 3
COPY_BYTES = 2**30  # one 1 GiB buffer copied into another: far beyond L2, long enough to time well
SEED = 0

# (batch, prompt tokens, new tokens): the two operating points.
CASES = ((1, 128, 256), (16, 512, 128))
QUICK_MODELS = ("gpt2-124m",)
QUICK_CASES = ((1, 128, 32),)
HEADLINE_MODELS = ("gpt2-124m", "opt-1.3b")
HEADLINE_CASES = ((1, 128, 128),)
HEADLINE_PROVIDERS = ("fusedgpt", "hf-eager", "hf-sdpa")


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------

def synchronize() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Drops dynamo's caches (and the compiled graphs they hold), so each model's compile starts fresh and
    never meets the recompile limit."""
    try:
        import torch._dynamo as dynamo

        dynamo.reset()
    except Exception as error:  # never fatal: only hygiene
        print(f"NOTE: torch._dynamo.reset() failed: {common.short_error(error)}")


def case_label(model_name: str, batch: int, prompt: int, new: int) -> str:
    return f"{model_name} b{batch} p{prompt} n{new}"


def timed_calls(function, repeats: int) -> tuple[list[float], object]:
    """Wall-clock seconds of `repeats` calls, each between two device synchronisations, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = function()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def measure_copy_bandwidth(copy_bytes: int = COPY_BYTES) -> float:
    """GB/s of a device-to-device torch copy_ of `copy_bytes` (1 GiB) into another buffer: bytes read + bytes
    written over the do_bench median."""
    elements = copy_bytes // 2
    source = torch.ones(elements, dtype=torch.float16, device=DEVICE)
    target = torch.empty_like(source)
    milliseconds = timing.time_ms(lambda: target.copy_(source))
    del source, target
    free_memory()
    return 2 * copy_bytes / (milliseconds * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------

def build_hf_model(hf_config, attn_implementation: str, dtype: torch.dtype, state_dict: dict | None = None):
    """A transformers causal LM from `hf_config` with this attention implementation, in `dtype` on DEVICE, in
    eval mode, with `state_dict` loaded when given, and no EOS (generation always runs max_new_tokens)."""
    import transformers

    config = copy.deepcopy(hf_config)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                              dtype=dtype)
    model.to(device=DEVICE, dtype=dtype)
    actual = getattr(model.config, "_attn_implementation", attn_implementation)
    if actual != attn_implementation:
        raise ValueError(f"{type(model).__name__}: asked for attn_implementation={attn_implementation!r}, "
                         f"got {actual!r}")
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def decode_bytes_per_step(hf_model, gpt_config, batch: int, prompt: int, new: int, element_size: int) -> dict:
    """The bytes a decode step must move at least: weights once (see the header) + the average KV read and
    write per step over the N - 1 decode steps."""
    input_weight = hf_model.get_input_embeddings().weight
    output_embeddings = hf_model.get_output_embeddings()
    output_weight = output_embeddings.weight if output_embeddings is not None else None
    weight_bytes, params = 0, 0
    for name, parameter in hf_model.named_parameters():  # tied parameters appear once
        params += parameter.numel()
        if name.endswith(("embed_positions.weight", "wpe.weight")):
            continue  # B rows read per step
        if parameter is input_weight and output_weight is not None and output_weight is not input_weight:
            continue  # untied: the token embedding is only gathered (B rows); the lm_head is counted instead
        weight_bytes += parameter.numel() * parameter.element_size()
    per_position = 2 * batch * gpt_config.num_heads * gpt_config.head_dim * element_size  # K and V of one slot
    steps = max(1, new - 1)
    kv_total = 0
    for step in range(1, steps + 1):
        attended = prompt + step
        for window in gpt_config.attention_windows:
            kv_total += per_position * ((attended if window is None else min(attended, window)) + 1)
    kv_bytes = kv_total / steps
    return {"params": params, "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes,
            "bytes": int(weight_bytes + kv_bytes)}


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------

def time_fusedgpt(model, input_ids: torch.Tensor, new: int, repeats: int) -> tuple[dict, torch.Tensor]:
    from fusedgpt.generation import generate_with_stats

    def call():
        return generate_with_stats(model, input_ids, max_new_tokens=new, do_sample=False, eos_token_id=[])

    call()  # warm-up: Triton JIT / autotuning, cache allocation, CUDA-graph capture
    synchronize()
    prefill, decode, results = [], [], []
    seconds = []
    for _ in range(repeats):
        one_call, result = timed_calls(call, 1)
        seconds += one_call
        prefill.append(result.prefill_seconds)
        decode.append(result.decode_seconds)
        results.append(result)
    batch = input_ids.shape[0]
    last = results[-1]
    if last.decode_tokens != batch * (new - 1):
        raise RuntimeError(f"fusedgpt produced {last.decode_tokens} decode tokens, expected {batch * (new - 1)}")
    timing = {"prefill_s": statistics.median(prefill), "decode_s": statistics.median(decode),
              "total_s": statistics.median(seconds)}
    return timing, last.ids


def time_hf(model, input_ids: torch.Tensor, new: int, repeats: int, pad_token_id: int,
            extra: dict) -> tuple[dict, torch.Tensor]:
    attention_mask = torch.ones_like(input_ids)

    def call(max_new_tokens: int):
        return model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              pad_token_id=pad_token_id, **extra)

    # All full-length calls first, then the 1-token ones: with a static cache the 1-token call allocates a
    # cache of another length, which must not disturb the full-length calls' compiled graphs.
    call(new)  # warm-up (transformers' torch.compile and CUDA-graph recording happen here)
    full_seconds, ids = timed_calls(lambda: call(new), repeats)
    call(1)  # warm-up
    prefill_seconds, _ = timed_calls(lambda: call(1), repeats)
    total, prefill = statistics.median(full_seconds), statistics.median(prefill_seconds)
    if total <= prefill:
        raise RuntimeError(f"generate with {new} new tokens ({total * 1e3:.2f} ms) was not slower than with 1 "
                           f"({prefill * 1e3:.2f} ms): no decode time to report")
    return {"prefill_s": prefill, "decode_s": total - prefill, "total_s": total}, ids


# ----------------------------------------------------------------------------------------------------
# One model: every provider on every case
# ----------------------------------------------------------------------------------------------------

def fill_rates(row: dict, timing: dict, batch: int, prompt: int, new: int) -> None:
    steps = max(1, new - 1)
    row["prefill_ms"] = timing["prefill_s"] * 1e3
    row["decode_ms"] = timing["decode_s"] * 1e3
    row["total_ms"] = timing["total_s"] * 1e3
    row["ms"] = row["decode_ms"] / steps  # per decode step
    row["tokens_per_s"] = batch * steps / timing["decode_s"]
    row["e2e_tokens_per_s"] = batch * new / timing["total_s"]
    row["prefill_tokens_per_s"] = batch * prompt / timing["prefill_s"]
    if row.get("bytes"):
        row["gbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
    if row.get("bound_tokens_per_s"):
        row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]


def add_agreement(rows: list[dict], outputs: dict) -> None:
    """agreement_vs_hf_eager (and its prefix form) for every row whose case has an hf-eager output."""
    for row in rows:
        reference = outputs.get((row["case"], "hf-eager"))
        mine = outputs.get((row["case"], row["provider"]))
        if reference is None or mine is None or row["provider"] == "hf-eager" or mine.shape != reference.shape:
            continue
        prompt = row["seq_len"]
        same = mine[:, prompt:] == reference[:, prompt:]  # (B, N)
        row["agreement_vs_hf_eager"] = same.float().mean().item()
        # Tokens before each row's first difference: the cumulative product of `same` stays 1 until then.
        prefix = same.int().cumprod(dim=1).sum(dim=1)  # (B,)
        row["agreement_prefix_vs_hf_eager"] = (prefix.float() / same.shape[1]).mean().item()


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_<hf provider> = tokens/s / that provider's, per (case, dtype); plus the faster of eager/sdpa."""
    results.add_speedups(rows, peers=HF_PROVIDERS)  # peer ms / row ms, ms = per decode step: a tokens/s ratio
    for providers in results.rows_by_case(rows).values():
        dynamic = [providers[name]["tokens_per_s"] for name in ("hf-eager", "hf-sdpa")
                   if name in providers and providers[name].get("tokens_per_s")]
        if not dynamic:
            continue
        for row in providers.values():
            if row.get("tokens_per_s") and row["provider"] not in HF_PROVIDERS:
                row["ratio_vs_hf_best_dynamic"] = row["tokens_per_s"] / max(dynamic)


def run_model(model_name: str, dtype: torch.dtype, cases, providers: list[str], repeats: int,
              copy_gbps: float | None, progress=None) -> list[dict]:
    """Every provider on every case of one model; progress(rows so far), when given, after each provider."""
    import fusedgpt

    hf_config = MODEL_CONFIGS[model_name]()
    gpt_config = fusedgpt.models.convert_config(hf_config)
    element_size = torch.finfo(dtype).bits // 8
    torch.manual_seed(SEED)
    reference = build_hf_model(hf_config, "eager", dtype)  # hf-eager, and the weights of every provider
    pad_token_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0

    fields_by_case, prompts = {}, {}
    for index, (batch, prompt, new) in enumerate(cases):
        label = case_label(model_name, batch, prompt, new)
        fields = {"model": model_name, "batch": batch, "seq_len": prompt, "new_tokens": new, "max_len": prompt + new,
                  "hidden": gpt_config.hidden_size, "heads": gpt_config.num_heads, "head_dim": gpt_config.head_dim,
                  "layers": gpt_config.num_layers, "repeats": repeats, "copy_gbps": copy_gbps,
                  **decode_bytes_per_step(reference, gpt_config, batch, prompt, new, element_size)}
        if copy_gbps:
            fields["bound_tokens_per_s"] = batch * copy_gbps * 1e9 / fields["bytes"]
        fields_by_case[label] = fields
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        prompts[label] = torch.randint(0, gpt_config.vocab_size, (batch, prompt), generator=generator).to(DEVICE)

    rows, outputs = [], {}
    for provider in providers:
        model, attn, extra = None, "", {}
        started = time.perf_counter()
        try:
            if provider == "fusedgpt":
                model = fusedgpt.from_hf(reference)
                attn = os.environ.get("FUSEDGPT_BACKEND", "auto")
            elif provider == "hf-eager":
                model, attn = reference, "eager"
            elif provider == "hf-sdpa":
                model, attn = build_hf_model(hf_config, "sdpa", dtype, reference.state_dict()), "sdpa"
            elif provider == "hf-static-compiled":
                try:
                    model, attn = build_hf_model(hf_config, "sdpa", dtype, reference.state_dict()), "sdpa"
                except ValueError:  # no sdpa for this model (GPT-Neo): its only attention then
                    model, attn = build_hf_model(hf_config, "eager", dtype, reference.state_dict()), "eager"
                extra = {"cache_implementation": "static"}
            else:
                raise ValueError(f"unknown provider {provider!r}")
            setup_error = None
        except Exception as error:
            setup_error = common.short_error(error)
            print(f"  ERROR {model_name} {provider} set-up: {setup_error}")
        for label, fields in fields_by_case.items():
            row = {"family": FAMILY, "case": label, "provider": provider, "dtype": common.dtype_name(dtype),
                   **fields, "attn": attn}
            rows.append(row)
            if setup_error is not None:
                row["error"] = setup_error
                continue
            batch, prompt, new = fields["batch"], fields["seq_len"], fields["new_tokens"]
            if provider == "hf-static-compiled":
                reset_compiler()  # a fresh static-shape compile for each case (its warm-up compiles)
            try:
                if provider == "fusedgpt":
                    timing, ids = time_fusedgpt(model, prompts[label], new, repeats)
                else:
                    timing, ids = time_hf(model, prompts[label], new, repeats, pad_token_id, extra)
                    if provider == "hf-static-compiled":
                        row["hf_compiled_call"] = "yes" if getattr(model, "_compiled_call", None) is not None else "not seen"
                fill_rates(row, timing, batch, prompt, new)
                row["check"] = ("ok" if tuple(ids.shape) == (batch, prompt + new)
                                else f"MISMATCH ids shape {tuple(ids.shape)}, expected {(batch, prompt + new)}")
                outputs[(label, provider)] = ids.cpu()
                print(f"  {label} {provider:<19} decode {row['tokens_per_s']:9.1f} tok/s  prefill "
                      f"{row['prefill_ms']:8.2f} ms  e2e {row['e2e_tokens_per_s']:9.1f} tok/s  {row['check']}",
                      flush=True)
            except Exception as error:  # one failing provider must not stop the others
                row["error"] = common.short_error(error)
                print(f"  ERROR {label} {provider}: {row['error']}", flush=True)
                free_memory()
        if model is not None and model is not reference:
            del model
        model = None
        if provider == "hf-static-compiled":
            reset_compiler()
        free_memory()
        print(f"  ({model_name} {provider}: {time.perf_counter() - started:.0f} s)", flush=True)
        if progress is not None:
            progress(rows)
    add_agreement(rows, outputs)
    del reference, outputs, prompts
    reset_compiler()
    free_memory()
    return rows


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

TABLE_COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("provider", "provider", 0), ("attn", "attn", 0),
                 ("prefill_ms", "prefill_ms", 2), ("decode tok/s", "tokens_per_s", 1),
                 ("e2e tok/s", "e2e_tokens_per_s", 1), ("GB/s", "gbps", 0), ("bound tok/s", "bound_tokens_per_s", 0),
                 ("of_bound", "fraction_of_bound", 2), ("agree", "agreement_vs_hf_eager", 3),
                 ("check", "check", 0), ("error", "error", 0)]
SUMMARY_COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("fusedgpt tok/s", "tokens_per_s", 1),
                   ("bound tok/s", "bound_tokens_per_s", 0), ("of_bound", "fraction_of_bound", 2),
                   ("x_hf_eager", "ratio_vs_hf_eager", 2), ("x_hf_sdpa", "ratio_vs_hf_sdpa", 2),
                   ("x_hf_static", "ratio_vs_hf_static_compiled", 2),
                   ("x_best_eager_sdpa", "ratio_vs_hf_best_dynamic", 2), ("agree", "agreement_vs_hf_eager", 3),
                   ("agree_prefix", "agreement_prefix_vs_hf_eager", 3), ("error", "error", 0)]


CPU_COLUMNS = [("case", "case", 0), ("provider", "provider", 0), ("ms", "total_ms", 1),
               ("tok/s", "e2e_tokens_per_s", 1), ("x_hf_eager", "ratio_vs_hf_eager", 2),
               ("x_hf_sdpa", "ratio_vs_hf_sdpa", 2), ("x_best", "ratio_vs_hf_best_dynamic", 2),
               ("target", "target", 1), ("check", "check", 0)]


def plot_rows(csv_path: Path) -> list[dict]:
    """The generate rows of the results CSV (with --merge, earlier calls' too), plus one BOUND_PROVIDER row
    per (case, dtype) carrying the bandwidth bound as its tokens_per_s."""
    rows = results.read_family_rows(csv_path, FAMILY)
    bounds = {}
    for row in rows:
        bound = results.number(row.get("bound_tokens_per_s"))
        if bound:
            bounds.setdefault((row["case"], row["dtype"]), bound)
    return rows + [{"case": case, "dtype": dtype, "provider": BOUND_PROVIDER, "tokens_per_s": bound}
                   for (case, dtype), bound in bounds.items()]


def finish(rows: list[dict], args) -> None:
    add_ratios(rows)
    common.finish(rows, FAMILY, args, columns=TABLE_COLUMNS, plot_key="tokens_per_s", plot_label="decode tokens/s",
                  plot_rows=plot_rows)
    fused = [row for row in rows if row["provider"] == "fusedgpt"]
    if fused:
        print("\nfusedgpt against transformers (decode tokens/s ratios, > 1 = fusedgpt faster; agree = top-1 "
              "agreement with hf-eager's greedy tokens):")
        common.print_table(fused, SUMMARY_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# CPU rows (--cpu): where everyone without a GPU meets fusedgpt first
# ----------------------------------------------------------------------------------------------------

CPU_MODELS = ("embedded", "gpt2-124m")  # the model `fusedgpt generate` runs by default, and GPT-2 124M's shape
CPU_CASE = (1, 16, 64)  # batch, prompt, new tokens
CPU_PROVIDERS = ("fusedgpt", "hf-eager", "hf-sdpa")
CPU_TARGETS = {"embedded": 1.2, "gpt2-124m": 1.0}  # issue 14: transformers' time / fusedgpt's, at least


def cpu_models(name: str):
    """(transformers model in fp32 on the CPU, eval, no EOS) for one of CPU_MODELS: the embedded checkpoint
    as it ships, or GPT-2 124M's configuration with random (seeded) weights."""
    import transformers

    from fusedgpt.models.tiny import TINY_MODEL_DIR

    torch.manual_seed(SEED)
    if name == "embedded":
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(MODEL_CONFIGS[name](), dtype=torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    return model


def run_cpu(models: list[str], repeats: int) -> list[dict]:
    """fusedgpt's generate against transformers' (eager and sdpa attention) on the CPU, float32, CPU_CASE,
    whole calls timed with perf_counter; the providers alternate within every repeat, so a change of load
    on the machine falls on all of them alike. ms = the median whole call; ratio_vs_<peer> = peer's ms /
    this ms (> 1: fusedgpt faster); `target` = issue 14's bar for fusedgpt against the faster of the two."""
    import fusedgpt
    from fusedgpt.generation import generate

    batch, prompt, new = CPU_CASE
    rows = []
    for name in models:
        hf_models = {"hf-eager": cpu_models(name)}
        hf_models["hf-sdpa"] = copy.deepcopy(hf_models["hf-eager"])
        hf_models["hf-eager"].set_attn_implementation("eager")
        hf_models["hf-sdpa"].set_attn_implementation("sdpa")
        model = fusedgpt.from_hf(hf_models["hf-eager"], dtype=torch.float32)
        ids = torch.randint(0, hf_models["hf-eager"].config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(SEED))
        calls = {"fusedgpt": lambda: generate(model, ids, max_new_tokens=new, eos_token_id=[])}
        for provider, hf_model in hf_models.items():
            calls[provider] = (lambda hf_model=hf_model: hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=0))
        seconds = {provider: [] for provider in calls}
        outputs = {provider: call() for provider, call in calls.items()}  # warm-up
        for _ in range(repeats):
            for provider, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[provider].append(time.perf_counter() - start)
        label = f"cpu {name} b{batch} p{prompt} n{new}"
        for provider, values in seconds.items():
            total = statistics.median(values)
            same = torch.equal(outputs[provider][:, prompt:], outputs["hf-eager"][:, prompt:])
            rows.append({"family": FAMILY, "case": label, "provider": provider, "dtype": "fp32", "batch": batch,
                         "seq_len": prompt, "new_tokens": new, "ms": total * 1e3, "total_ms": total * 1e3,
                         "e2e_tokens_per_s": batch * new / total, "check": "ok" if same else "MISMATCH"})
        fused = rows[-len(seconds)]
        best_hf = min(row["ms"] for row in rows[-len(seconds):] if row["provider"] != "fusedgpt")
        fused["ratio_vs_hf_best_dynamic"] = best_hf / fused["ms"]
        fused["target"] = CPU_TARGETS.get(name)
    results.add_speedups(rows, peers=("hf-eager", "hf-sdpa"))
    return rows


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def parse_models(text: str | None, quick: bool, headline: bool = False) -> list[str]:
    if text is None:
        return list(HEADLINE_MODELS if headline else QUICK_MODELS if quick else MODEL_CONFIGS)
    wanted = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in MODEL_CONFIGS]
    if unknown or not wanted:
        raise SystemExit(f"--models: unknown {unknown or text!r}; this script has {list(MODEL_CONFIGS)}")
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, dtypes="fp16")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated models among {', '.join(MODEL_CONFIGS)} (default: all; "
                             f"--quick: {', '.join(QUICK_MODELS)})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed calls per provider and case, after one warm-up; the median is reported "
                             f"(default: {DEFAULT_REPEATS})")
    common.add_cases_option(parser, case_label("gpt2-124m", 1, 128, 256))
    common.add_headline_option(parser, "gpt2-124m and opt-1.3b, b1 p128 n128")
    parser.add_argument("--cpu", action="store_true",
                        help=f"no GPU: fusedgpt against transformers on the CPU in float32 ({', '.join(CPU_MODELS)}, "
                             f"batch {CPU_CASE[0]}, prompt {CPU_CASE[1]}, {CPU_CASE[2]} new tokens; --models picks)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.cpu:
        wanted = [part.strip() for part in (args.models or ",".join(CPU_MODELS)).split(",") if part.strip()]
        unknown = [name for name in wanted if name not in CPU_MODELS]
        if unknown:
            raise SystemExit(f"--models: unknown {unknown!r} with --cpu; it has {list(CPU_MODELS)}")
        import transformers

        transformers.logging.set_verbosity_error()
        with torch.inference_mode():
            rows = run_cpu(wanted, args.repeats)
        common.print_table(rows, CPU_COLUMNS)
        path = results.write_results_csv(rows, FAMILY, args.out_dir, merge=args.merge)
        print(f"\nwrote {path}")
        return 0
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_choices(args.providers, PROVIDERS, default=HEADLINE_PROVIDERS if args.headline else None)
    models = parse_models(args.models, args.quick, args.headline)
    cases = HEADLINE_CASES if args.headline else QUICK_CASES if args.quick else CASES
    if args.cases:  # fail early when the pattern selects nothing
        common.select_cases([{"label": case_label(m, *c)} for m in models for c in cases], args.cases,
                            lambda case: case["label"])

    common.require_gpu()
    common.print_environment(FAMILY)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"transformers {transformers.__version__}; FUSEDGPT_BACKEND={os.environ.get('FUSEDGPT_BACKEND', '(auto)')}; "
          f"{args.repeats} timed repeats after 1 warm-up (compilation and graph capture not timed)")
    rows = []
    with torch.no_grad():
        try:
            copy_gbps = measure_copy_bandwidth()
            print(f"device copy bandwidth (1 GiB copy_, read + write): {copy_gbps:.0f} GB/s")
            rows.append({"family": FAMILY, "case": "device-copy 1GiB", "provider": "torch-copy",
                         "dtype": "fp16", "bytes": 2 * COPY_BYTES, "gbps": copy_gbps, "copy_gbps": copy_gbps,
                         "ms": 2 * COPY_BYTES / (copy_gbps * 1e9) * 1e3})
        except Exception as error:
            copy_gbps = None
            print(f"NOTE: copy bandwidth not measured ({common.short_error(error)}): no bandwidth bound")
        for dtype in dtypes:
            for model_name in models:
                model_cases = [case for case in cases
                               if not args.cases or re.search(args.cases, case_label(model_name, *case))]
                if not model_cases:
                    continue
                print(f"{FAMILY}: {model_name} {common.dtype_name(dtype)}", flush=True)

                def write_so_far(model_rows, rows_before=list(rows)):
                    common.write_rows_so_far(rows_before + model_rows, FAMILY, args, add_ratios=add_ratios)

                try:
                    rows += run_model(model_name, dtype, model_cases, providers, args.repeats, copy_gbps,
                                      progress=write_so_far)
                except Exception as error:  # e.g. out of memory while building the model
                    print(f"  ERROR building {model_name}: {common.short_error(error)}")
                    reset_compiler()
                    free_memory()
    finish(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
