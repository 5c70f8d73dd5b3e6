"""Benchmark of fusedgpt.ops.attention (fused prefill attention, causal and sliding-window) against the
strongest attention kernels PyTorch offers, in TFLOP/s: 16384 tokens per batch, S = 512 .. 16384 with
B = 16384 // S, (H, D) = (12, 64) (GPT-2 small), (32, 80) (Phi-2-like, a head dim that is not a power
of two) and (16, 128) (GPT-Neo 1.3B / 7B-class); causal; plus GPT-Neo's local layers (window 256,
scale 1.0) at S = 2048 .. 16384 with (H, D) = (16, 128) and (12, 64); fp16 and bf16.

Providers (each gets its preferred memory layout, made once outside the timed region):
  fusedgpt-cuda     fusedgpt.ops.attention(..., backend="cuda") on [B, S, H, D]   (error rows when it
                    cannot run: without the CUDA kernel (probed once per run on a tiny input), or for a
                    case it does not take, e.g. a head dim it was not built for)
  fusedgpt-triton   fusedgpt.ops.attention(..., backend="triton") on [B, S, H, D]
  sdpa-flash        F.scaled_dot_product_attention(is_causal=True) under
  sdpa-cudnn          torch.nn.attention.sdpa_kernel(FLASH_ATTENTION / CUDNN_ATTENTION /
  sdpa-efficient      EFFICIENT_ATTENTION), on contiguous [B, H, S, D] copies (SDPA's documented layout)
  flex-attention    torch.compile(flex_attention) (fullgraph, default mode, a fresh static-shape compile per
                    case) on contiguous [B, H, S, D] copies, with create_block_mask of
                    q_idx >= kv_idx (and q_idx - kv_idx < window); scale via its scale argument
  flash-attn        flash_attn.flash_attn_func(causal=True, window_size=(window - 1, 0)) on [B, S, H, D];
                    an error row "not installed" when `import flash_attn` fails

Sliding-window cases: SDPA has no window, so the three sdpa-* providers run PLAIN CAUSAL attention there
(column mask = "causal (no window)"): their TFLOP/s counts the causal FLOPs they really do, and the ratio
(a time ratio) says how much sooner fusedgpt finishes the windowed layer than SDPA finishes the causal
superset. Their check compares against the causal reference.

--headline (issue 15; what bench/gpu_run.py runs): causal at S = 2048 and 8192 (16384 tokens per batch) for
(H, D) = (12, 64) and (16, 128) against sdpa-flash and sdpa-cudnn; window 256 (scale 1.0) at S = 8192 for
the same two head shapes against flex-attention (each case runs only its own peers: a flex-attention
compile costs seconds); fusedgpt-cuda, fusedgpt-triton and fusedgpt-torch (the composite PyTorch backend:
SDPA, with the visibility mask for a window) on every case.

FLOPs: 4 * B * H * D * (visible (query, key) pairs) -- two matmuls, 2 FLOPs per multiply-add. Visible
pairs per (b, h): causal S * (S + 1) / 2; window W: sum over i < S of min(i + 1, W)
= W * (W + 1) / 2 + (S - W) * W for S >= W. TFLOP/s = FLOPs / do_bench median time. ratio_vs_<peer> =
peer time / this time (> 1: faster than the peer, same run).

Check (before timing, once per provider and case): the provider's output at batch 0 and B - 1, all heads,
on the first and the last 128 queries, against fusedgpt.ops.attention_reference (float32) evaluated on
just those queries (the reference takes the queries as the last Sq of the keys, so a slice is exact and
cheap at any S). The inputs (0.1 GB or less each) are not rotated: attention is compute-bound and
do_bench clears L2 before every call. No CUDA-graph latency here (prefill is not launch-bound).

Results: bench/results/<device>.csv (family "attention") and <device>_attention.png (TFLOP/s).

    python bench/bench_attention.py [--quick | --headline] [--dtypes fp16,bf16] [--providers fusedgpt-triton,sdpa-flash]
                                    [--cases REGEX] [--merge] [--out-dir bench/results] [--no-plot]
A full run (26 cases x 2 dtypes x 7 providers; a flex-attention compile and a Triton autotune per case)
takes several minutes: split it over calls with --dtypes / --cases and --merge if needed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
from fusedgpt.ops import attention, attention_reference  # noqa: E402

FAMILY = "attention"
SDPA_PROVIDERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton") + SDPA_PROVIDERS + ("flex-attention", "flash-attn")
HEADLINE_FUSEDGPT = ("fusedgpt-cuda", "fusedgpt-triton", common.TORCH_BACKEND_PROVIDER)
HEADLINE_CAUSAL_PROVIDERS = HEADLINE_FUSEDGPT + ("sdpa-flash", "sdpa-cudnn")
HEADLINE_WINDOW_PROVIDERS = HEADLINE_FUSEDGPT + ("flex-attention",)
HEADLINE_PROVIDERS = HEADLINE_CAUSAL_PROVIDERS + ("flex-attention",)
HEADLINE_SEQ_LENS = (2048, 8192)
HEADLINE_WINDOW_SEQ_LEN = 8192
HEADLINE_HEAD_SHAPES = ((12, 64), (16, 128))  # (heads, head_dim)
TOKENS_PER_BATCH = 16384
CAUSAL_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
CAUSAL_HEAD_SHAPES = ((12, 64), (32, 80), (16, 128))  # (heads, head_dim)
WINDOW = 256
WINDOW_SCALE = 1.0  # GPT-Neo does not scale its scores
WINDOW_SEQ_LENS = (2048, 4096, 8192, 16384)
WINDOW_HEAD_SHAPES = ((16, 128), (12, 64))
CHECK_QUERIES = 128  # the first and the last this many queries are checked
DEVICE = "cuda"

COLUMNS = [("case", "case", 0), ("dtype", "dtype", 0), ("provider", "provider", 0), ("mask", "mask", 0),
           ("ms", "ms", 4), ("TFLOP/s", "tflops", 1), ("x_sdpa_flash", "ratio_vs_sdpa_flash", 2),
           ("x_sdpa_cudnn", "ratio_vs_sdpa_cudnn", 2), ("x_sdpa_eff", "ratio_vs_sdpa_efficient", 2),
           ("x_flex", "ratio_vs_flex_attention", 2), ("x_flash_attn", "ratio_vs_flash_attn", 2),
           ("check", "check", 0), ("error", "error", 0)]


def benchmark_cases(quick: bool) -> list[dict]:
    """(batch, seq_len, heads, head_dim, window, scale) per case: causal first, then the windowed ones."""
    if quick:  # a smoke run: one causal and one windowed case (each costs a flex-attention compile)
        causal = [(4096, 16, 128)]
        windowed = [(8192, 12, 64)]
    else:
        causal = [(seq_len, heads, head_dim) for (heads, head_dim) in CAUSAL_HEAD_SHAPES
                  for seq_len in CAUSAL_SEQ_LENS]
        windowed = [(seq_len, heads, head_dim) for (heads, head_dim) in WINDOW_HEAD_SHAPES
                    for seq_len in WINDOW_SEQ_LENS]
    cases = [{"batch": TOKENS_PER_BATCH // seq_len, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
              "window": None, "scale": None} for (seq_len, heads, head_dim) in causal]
    cases += [{"batch": TOKENS_PER_BATCH // seq_len, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
               "window": WINDOW, "scale": WINDOW_SCALE} for (seq_len, heads, head_dim) in windowed]
    return cases


def headline_cases() -> list[dict]:
    """Issue 15's headline, each case with the providers it runs (see common.run_benchmark): causal D=64 and
    D=128 at S=2k and 8k against SDPA flash and cuDNN, then window 256 at S=8k against FlexAttention."""
    def case(seq_len: int, heads: int, head_dim: int, window: int | None, providers: tuple[str, ...]) -> dict:
        return {"batch": TOKENS_PER_BATCH // seq_len, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                "window": window, "scale": None if window is None else WINDOW_SCALE, "providers": providers}

    cases = [case(seq_len, heads, head_dim, None, HEADLINE_CAUSAL_PROVIDERS)
             for (heads, head_dim) in HEADLINE_HEAD_SHAPES for seq_len in HEADLINE_SEQ_LENS]
    return cases + [case(HEADLINE_WINDOW_SEQ_LEN, heads, head_dim, WINDOW, HEADLINE_WINDOW_PROVIDERS)
                    for (heads, head_dim) in HEADLINE_HEAD_SHAPES]


def case_label(case: dict) -> str:
    label = f"B{case['batch']} S{case['seq_len']} H{case['heads']} D{case['head_dim']}"
    if case["window"] is not None:
        label += f" w{case['window']}"
    if case["scale"] is not None:
        label += f" s{case['scale']:g}"
    return label


def visible_pairs(seq_len: int, window: int | None) -> int:
    """(query, key) pairs a causal (and windowed) attention over seq_len positions computes, per (b, h)."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def attention_flops(batch: int, heads: int, head_dim: int, seq_len: int, window: int | None) -> int:
    """QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add x D per visible pair."""
    return 4 * batch * heads * head_dim * visible_pairs(seq_len, window)


def mask_name(window: int | None, provider: str) -> str:
    if window is None:
        return "causal"
    if provider in SDPA_PROVIDERS:
        return "causal (no window)"
    return f"causal+window{window}"


def _sdpa_backend(provider: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[provider]


def provider_function(provider: str, case: dict):
    """(q, k, v in the provider's layout) -> output in that layout, plus the layout name ("bshd"/"bhsd")."""
    window, scale = case["window"], case["scale"]
    if provider in common.BACKEND_PROVIDERS:
        backend = common.BACKEND_PROVIDERS[provider]
        return (lambda q, k, v: attention(q, k, v, causal=True, window=window, scale=scale, backend=backend)), "bshd"
    if provider in SDPA_PROVIDERS:
        from torch.nn.attention import sdpa_kernel

        sdpa_backend = _sdpa_backend(provider)

        def sdpa(q, k, v):  # plain causal also for the windowed cases (SDPA has no window)
            with sdpa_kernel(sdpa_backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        return sdpa, "bhsd"
    if provider == "flex-attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if window is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        seq_len = case["seq_len"]
        block_mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=DEVICE)
        compiled = common.compile_fresh(flex_attention)
        return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask, scale=scale)), "bhsd"
    if provider == "flash-attn":
        from flash_attn import flash_attn_func

        window_size = (-1, -1) if window is None else (window - 1, 0)
        return (lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=scale, causal=True,
                                                window_size=window_size)), "bshd"
    raise ValueError(provider)


def probe_cuda() -> None:
    """One tiny call of the CUDA backend (once per run, via common.unavailable_providers): when it raises,
    fusedgpt-cuda gets error rows instead of calls."""
    probe = torch.randn(1, 16, 1, 64, dtype=torch.float16, device=DEVICE)
    attention(probe, probe, probe, causal=True, backend="cuda")


def reference_slices(q, k, v, batches: list[int], causal_window: int | None, scale: float | None):
    """attention_reference on the first and the last CHECK_QUERIES queries of the chosen batches, all heads."""
    seq_len = q.shape[1]
    edge = min(CHECK_QUERIES, seq_len)
    qb, kb, vb = q[batches], k[batches], v[batches]  # (nb, S, H, D)
    first = attention_reference(qb[:, :edge], kb[:, :edge], vb[:, :edge], causal=True, window=causal_window,
                                scale=scale)
    last = attention_reference(qb[:, -edge:], kb, vb, causal=True, window=causal_window, scale=scale)
    return first, last


def run_case(case: dict, dtype: torch.dtype, providers: list[str], unavailable: dict[str, str]) -> list[dict]:
    batch, seq_len, heads, head_dim = case["batch"], case["seq_len"], case["heads"], case["head_dim"]
    window, scale = case["window"], case["scale"]
    label = case_label(case)
    base_fields = {"tokens": batch * seq_len, "batch": batch, "seq_len": seq_len, "heads": heads,
                   "head_dim": head_dim, "window": window, "scale": scale}
    q = torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S, H, D)
    k = torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S, H, D)
    v = torch.randn(batch, seq_len, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S, H, D)
    layouts = {"bshd": (q, k, v)}
    if any(p in providers for p in SDPA_PROVIDERS + ("flex-attention",)):
        layouts["bhsd"] = tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D)

    batches = sorted({0, batch - 1})
    edge = min(CHECK_QUERIES, seq_len)
    expected = {window: reference_slices(q, k, v, batches, window, scale)}
    if window is not None and any(p in providers for p in SDPA_PROVIDERS):
        expected[None] = reference_slices(q, k, v, batches, None, scale)

    rows = []
    for provider, (function, layout), fields in common.providers_to_time(
            rows, family=FAMILY, case=label, dtype=dtype, providers=providers, unavailable=unavailable,
            fields=lambda provider: {**base_fields, "mask": mask_name(window, provider)},
            make_function=lambda provider: provider_function(provider, case)):
        mask = fields["mask"]
        inputs = layouts[layout]
        computed_window = None if mask == "causal (no window)" else window

        def step(index: int, function=function, inputs=inputs):
            return function(*inputs)

        def verify(step=step, layout=layout, computed_window=computed_window) -> str:
            out = step(0)
            if layout == "bhsd":
                out = out.transpose(1, 2)  # (B, S, H, D)
            if tuple(out.shape) != tuple(q.shape):
                return f"MISMATCH shape {tuple(out.shape)} != {tuple(q.shape)}"
            out = out[batches]
            first, last = expected[computed_window]
            checks = [common.check_close(out[:, :edge], first), common.check_close(out[:, -edge:], last)]
            bad = [check for check in checks if check != "ok"]
            return "ok" if not bad else "; ".join(bad)

        flops = attention_flops(batch, heads, head_dim, seq_len, computed_window)
        rows.append(common.measure(family=FAMILY, case=label, provider=provider, dtype=dtype, fields=fields,
                                   bytes_moved=0, flops=flops, step=step, with_graph=False, verify=verify))
        del function, step, verify
    del q, k, v, layouts, expected
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    common.add_cases_option(parser, "B4 S4096 H16 D128 w256 s1")
    common.add_headline_option(parser, "causal S2048 and S8192 at H12 D64 and H16 D128, window 256 at S8192")
    args = parser.parse_args(argv)
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_providers(args, PROVIDERS, HEADLINE_PROVIDERS)
    cases = common.select_cases(headline_cases() if args.headline else benchmark_cases(args.quick), args.cases,
                                case_label)
    common.run_benchmark(FAMILY, args, dtypes, providers, cases, case_label, run_case, cuda_probe=probe_cuda,
                         columns=COLUMNS, plot_key="tflops", plot_label="TFLOP/s", plot_log_scale=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
