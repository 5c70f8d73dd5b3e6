"""Benchmark of fusedgpt.ops.decode_attention (attention of one new token per sequence over a static KV
cache, with the KV-cache append fused into the same launch, split along the keys) against SDPA and
flash-attn, in GB/s and microseconds: (H, D) = (12, 64) (GPT-2 small), (32, 64), (16, 128) and (32, 128)
(7B-class) x (B, cache length L) = (1, 1024), (1, 8192), (1, 32768), (16, 2048), (64, 2048); plus a
sliding window of 256 at B = 1, L = 8192 (GPT-Neo's local layers); T = 1 new token; fp16 and bf16.

Setup per case: caches k_cache, v_cache [B, S_max, H, D] with S_max = L + 16, cache_lens int32 [B] on
the device = L, q and the new k, v [B, 1, H, D]. The fused append writes the new token at cache_lens
without advancing it, so repeated calls rewrite the same slot and every timed call does the same work.

Providers:
  fusedgpt-cuda             decode_attention(..., backend="cuda") with the append (error rows when it cannot
                            run: without the CUDA kernel, probed once per run on a tiny input)
  fusedgpt-triton           decode_attention(q, k_cache, v_cache, cache_lens, k=k, v=v, window=...,
                            backend="triton"): L cached keys + the appended one (window: the last 255
                            cached + the new one), the new k, v also written into the caches
  fusedgpt-triton-noappend  the same without k, v: attention over the L cached keys only
  sdpa                      F.scaled_dot_product_attention (default backend selection, is_causal=False: the
                            one query sees every key) of q [B, H, 1, D] against the equivalent cache: a
                            contiguous [B, H, L', D] copy of the cache's last L' = min(L, window) valid
                            entries, made outside the timing. The append is NOT included for SDPA (no op
                            of SDPA writes a cache): compare it with fusedgpt-triton-noappend for the same
                            work, with fusedgpt-triton for "one decode step"
  flash-attn                flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens,
                            causal=True, window_size=(window - 1, 0)) on the same caches, append included;
                            an error row "not installed" when `import flash_attn` fails
  empty-kernel              an empty Triton kernel under CUDA-graph replay: the latency floor (B = 1 only)

--headline (issue 15; what bench/gpu_run.py runs): B = 1 with an 8192-token cache and B = 64 with a 2048-token
cache, each at (H, D) = (12, 64) (GPT-2 small) and (16, 128) (GPT-Neo 1.3B; the prefill headline's two head
shapes), no window; providers fusedgpt-cuda, fusedgpt-triton, fusedgpt-torch (the composite PyTorch
backend: SDPA over the masked cache, append included), fusedgpt-triton-noappend, sdpa and (B = 1) the
empty kernel.

Bytes (elt = bytes per element, BHD = B * H * D, T = 1):
  K and V actually read from the cache: 2 * BHD * keys_read * elt, keys_read = L, or min(L, W) with a
  window W (with the append: L, or min(L, W - 1): the new token is one of the W visible keys);
  plus q read and out written (2 * T * BHD * elt); with the append the new k, v read AND written into
  the caches (4 * T * BHD * elt); plus cache_lens (4 * B) for fusedgpt and flash-attn.
GB/s = bytes / do_bench median time (L2 cleared before each call; caches rotated where small, so CUDA-graph
replay does not run from L2 either). For B = 1, us_graph = latency per call when calls are captured back
to back in one CUDA graph and replayed (timing.graph_us: triton.testing.do_bench_cudagraph, median).
ratio_vs_sdpa = sdpa time / this time.

Check (before timing): every provider's output against fusedgpt.ops.decode_attention_reference (with or
without the appended token, as the provider computes), and for the appending providers the new k in the
cache at slot L.

Results: bench/results/<device>.csv (family "decode_attention") and <device>_decode_attention.png (GB/s).

    python bench/bench_decode_attention.py [--quick | --headline] [--dtypes fp16,bf16] [--providers fusedgpt-triton,sdpa]
                                           [--cases REGEX] [--merge] [--out-dir bench/results] [--no-plot]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import timing  # noqa: E402
from fusedgpt.ops import decode_attention, decode_attention_reference  # noqa: E402

FAMILY = "decode_attention"
NOAPPEND = "fusedgpt-triton-noappend"
PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", NOAPPEND, "sdpa", "flash-attn", common.EMPTY_KERNEL_PROVIDER)
HEADLINE_PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", common.TORCH_BACKEND_PROVIDER, NOAPPEND, "sdpa",
                      common.EMPTY_KERNEL_PROVIDER)
APPENDING = ("fusedgpt-cuda", "fusedgpt-triton", common.TORCH_BACKEND_PROVIDER, "flash-attn")
HEAD_SHAPES = ((12, 64), (32, 64), (16, 128), (32, 128))  # (heads, head_dim)
BATCH_CACHE_LENS = ((1, 1024), (1, 8192), (1, 32768), (16, 2048), (64, 2048))  # (batch, cache length)
WINDOW = 256
WINDOW_BATCH_CACHE_LEN = (1, 8192)
HEADLINE_BATCH_CACHE_LENS = ((1, 8192), (64, 2048))
HEADLINE_HEAD_SHAPES = ((12, 64), (16, 128))
NEW_TOKENS = 1
CACHE_SLACK = 16  # S_max = cache length + this
# The caches are rotated (as many copies as make one pass over the keys read exceed max(128 MiB,
# 2.5 x L2)) within this budget per cache layout (fusedgpt's [B, S_max, H, D] and SDPA's [B, H, L', D]).
CACHE_ROTATION_BUDGET_BYTES = 8 << 30
DEVICE = "cuda"

COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("provider", "provider", 0), ("us", "us", 2),
           ("us_graph", "us_graph", 2), ("GB/s", "gbps", 1), ("x_sdpa", "ratio_vs_sdpa", 2),
           ("graph_x_sdpa", "graph_ratio_vs_sdpa", 2), ("x_flash_attn", "ratio_vs_flash_attn", 2),
           ("check", "check", 0), ("error", "error", 0)]


def benchmark_cases(quick: bool) -> list[dict]:
    """(batch, cache_len, heads, head_dim, window) per case."""
    if quick:
        plain = [(1, 1024, 12, 64), (1, 8192, 32, 128), (64, 2048, 32, 128)]
        windowed = [(1, 8192, 32, 128)]
    else:
        plain = [(batch, cache_len, heads, head_dim) for (heads, head_dim) in HEAD_SHAPES
                 for (batch, cache_len) in BATCH_CACHE_LENS]
        windowed = [WINDOW_BATCH_CACHE_LEN + head_shape for head_shape in HEAD_SHAPES]
    cases = [{"batch": b, "cache_len": length, "heads": h, "head_dim": d, "window": None}
             for (b, length, h, d) in plain]
    cases += [{"batch": b, "cache_len": length, "heads": h, "head_dim": d, "window": WINDOW}
              for (b, length, h, d) in windowed]
    return cases


def headline_cases() -> list[dict]:
    """Issue 15's headline: decode at B = 1 over an 8k cache and at B = 64 over a 2k cache."""
    return [{"batch": b, "cache_len": length, "heads": h, "head_dim": d, "window": None}
            for (h, d) in HEADLINE_HEAD_SHAPES for (b, length) in HEADLINE_BATCH_CACHE_LENS]


def case_label(case: dict) -> str:
    label = f"B{case['batch']} L{case['cache_len']} H{case['heads']} D{case['head_dim']}"
    return label + (f" w{case['window']}" if case["window"] is not None else "")


def keys_read(cache_len: int, window: int | None, appending: bool) -> int:
    """Cached keys (and values) a provider reads: all L, or the window's share (the new token takes one
    of the W visible slots when it is appended)."""
    if window is None:
        return cache_len
    return min(cache_len, window - 1 if appending else window)


def decode_bytes(batch: int, heads: int, head_dim: int, cache_len: int, window: int | None, element_size: int,
                 *, appending: bool, with_lengths: bool) -> int:
    per_token = batch * heads * head_dim * element_size  # one [B, 1, H, D] tensor
    total = 2 * keys_read(cache_len, window, appending) * per_token  # K and V from the cache
    total += 2 * NEW_TOKENS * per_token  # q read, out written
    if appending:
        total += 4 * NEW_TOKENS * per_token  # new k, v read and written into the caches
    if with_lengths:
        total += 4 * batch  # cache_lens, int32
    return total


def provider_function(provider: str, window: int | None):
    """A function of the case's tensors (see run_case.step) -> output in the provider's layout."""
    if provider in common.BACKEND_PROVIDERS:
        backend = common.BACKEND_PROVIDERS[provider]
        return lambda q, k_cache, v_cache, cache_lens, k, v: decode_attention(
            q, k_cache, v_cache, cache_lens, k=k, v=v, window=window, backend=backend)
    if provider == NOAPPEND:
        return lambda q, k_cache, v_cache, cache_lens, k, v: decode_attention(
            q, k_cache, v_cache, cache_lens, window=window, backend="triton")
    if provider == "sdpa":  # (q [B, H, 1, D], keys [B, H, L', D], values [B, H, L', D])
        return lambda q, keys, values: torch.nn.functional.scaled_dot_product_attention(q, keys, values,
                                                                                       is_causal=False)
    if provider == "flash-attn":
        from flash_attn import flash_attn_with_kvcache

        window_size = (-1, -1) if window is None else (window - 1, 0)
        return lambda q, k_cache, v_cache, cache_lens, k, v: flash_attn_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_lens, causal=True, window_size=window_size)
    raise ValueError(provider)


def probe_cuda() -> None:
    """One tiny call of the CUDA backend (once per run, via common.unavailable_providers): when it raises,
    fusedgpt-cuda gets error rows instead of calls."""
    q = torch.randn(1, 1, 1, 64, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(1, 8, 1, 64, dtype=torch.float16, device=DEVICE)
    lengths = torch.ones(1, dtype=torch.int32, device=DEVICE)
    decode_attention(q, cache, cache.clone(), lengths, k=q, v=q, backend="cuda")


def run_case(case: dict, dtype: torch.dtype, providers: list[str], unavailable: dict[str, str]) -> list[dict]:
    batch, cache_len, heads, head_dim, window = (case["batch"], case["cache_len"], case["heads"], case["head_dim"],
                                                 case["window"])
    max_len = cache_len + CACHE_SLACK
    label = case_label(case)
    fields = {"batch": batch, "new_tokens": NEW_TOKENS, "heads": heads, "head_dim": head_dim,
              "max_len": max_len, "cache_len": cache_len, "window": window, "position": cache_len}
    q = torch.randn(batch, NEW_TOKENS, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, T, H, D)
    k = torch.randn(batch, NEW_TOKENS, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, T, H, D)
    v = torch.randn(batch, NEW_TOKENS, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, T, H, D)
    k_cache = torch.randn(batch, max_len, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S_max, H, D)
    v_cache = torch.randn(batch, max_len, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S_max, H, D)
    cache_lens = torch.full((batch,), cache_len, dtype=torch.int32, device=DEVICE)  # (B,)
    element_size = k_cache.element_size()

    # Expected outputs, from the templates (before any provider writes a cache). The appending reference
    # writes into its caches: give it copies of the part it reads and writes.
    expected_noappend = decode_attention_reference(q, k_cache, v_cache, cache_lens, window=window)
    if any(p in providers for p in APPENDING):
        expected_append = decode_attention_reference(
            q, k_cache[:, :cache_len + NEW_TOKENS].clone(), v_cache[:, :cache_len + NEW_TOKENS].clone(),
            cache_lens, k=k, v=v, window=window)

    # SDPA's equivalent cache: the last min(L, window) valid entries, [B, H, L', D] contiguous.
    sdpa_len = keys_read(cache_len, window, appending=False)
    sdpa_sets = []
    if "sdpa" in providers:
        sdpa_keys = k_cache[:, cache_len - sdpa_len:cache_len].transpose(1, 2).contiguous()  # (B, H, L', D)
        sdpa_values = v_cache[:, cache_len - sdpa_len:cache_len].transpose(1, 2).contiguous()  # (B, H, L', D)
        q_bhsd = q.transpose(1, 2).contiguous()  # (B, H, T, D)
        read_bytes = 2 * sdpa_keys.numel() * element_size
        copies = max(1, min(timing.rotation_copy_count(read_bytes), CACHE_ROTATION_BUDGET_BYTES // read_bytes))
        sdpa_sets = timing.rotated_copies([q_bhsd, sdpa_keys, sdpa_values], copies)  # [(q_i, keys_i, values_i)]
        del sdpa_keys, sdpa_values, q_bhsd

    cache_bytes = 2 * k_cache.numel() * element_size
    read_bytes = 2 * batch * heads * head_dim * keys_read(cache_len, window, appending=False) * element_size
    copies = max(1, min(timing.rotation_copy_count(read_bytes), CACHE_ROTATION_BUDGET_BYTES // cache_bytes))
    cache_sets = timing.rotated_copies([q, k, v, k_cache, v_cache], copies)  # [(q_i, k_i, v_i, k_cache_i, ...)]
    del k_cache, v_cache

    with_graph = batch == 1
    rows = []
    for provider, function, fields in common.providers_to_time(
            rows, family=FAMILY, case=label, dtype=dtype, providers=providers, unavailable=unavailable,
            fields=fields, make_function=lambda provider: provider_function(provider, window),
            with_graph=with_graph):
        appending = provider in APPENDING

        if provider == "sdpa":
            def step(index: int, function=function):
                return function(*sdpa_sets[index % len(sdpa_sets)])
        else:
            def step(index: int, function=function):
                q_i, k_i, v_i, k_cache_i, v_cache_i = cache_sets[index % len(cache_sets)]
                return function(q_i, k_cache_i, v_cache_i, cache_lens, k_i, v_i)

        def verify(step=step, provider=provider, appending=appending) -> str:
            out = step(0)
            if provider == "sdpa":
                out = out.transpose(1, 2)  # (B, T, H, D)
            checks = [common.check_close(out, expected_append if appending else expected_noappend)]
            if appending:
                k_cache_0 = cache_sets[0][3]
                if not torch.equal(k_cache_0[:, cache_len:cache_len + NEW_TOKENS], k):
                    checks.append("MISMATCH new k not in the cache at cache_lens")
            bad = [check for check in checks if check != "ok"]
            return "ok" if not bad else "; ".join(bad)

        bytes_moved = decode_bytes(batch, heads, head_dim, cache_len, window, element_size, appending=appending,
                                   with_lengths=provider != "sdpa")
        row = common.measure(family=FAMILY, case=label, provider=provider, dtype=dtype, fields=fields,
                             bytes_moved=bytes_moved, step=step, with_graph=with_graph, verify=verify)
        if row.get("ms"):
            row["us"] = row["ms"] * 1000.0
        rows.append(row)
        del function, step, verify
    del cache_sets, sdpa_sets
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    common.add_cases_option(parser, "B1 L8192 H32 D128 w256")
    common.add_headline_option(parser, "B1 L8192 and B64 L2048 at H12 D64 and H16 D128")
    args = parser.parse_args(argv)
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_providers(args, PROVIDERS, HEADLINE_PROVIDERS)
    cases = common.select_cases(headline_cases() if args.headline else benchmark_cases(args.quick), args.cases,
                                case_label)
    common.run_benchmark(FAMILY, args, dtypes, providers, cases, case_label, run_case, cuda_probe=probe_cuda,
                         columns=COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
