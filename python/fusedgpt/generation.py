"""Text generation for fusedgpt models: a static KV cache, the prompt (prefill) through
fusedgpt.ops.attention, then one token per step through fusedgpt.ops.decode_attention with the KV-cache
append fused in, the step captured once as a CUDA graph and replayed; greedy, temperature, top-k and
top-p sampling; per-sequence EOS; streaming.

Why it is fast: the step has no host synchronisation (cache lengths, positions and the finished flags
live on the device), so on a GPU it is recorded once as a CUDA graph and every later token costs one
graph launch plus the sampling kernels. Whether the step can be captured is decode_attention's own
decision (fusedgpt.ops.decode_attention_backend, asked for each layer's call of the step): the one op
of the step that can read the host, e.g. through its reference, which reads the lengths. The host
reads the device every `sync_every` tokens only, to stream the new tokens and to stop once every
sequence has met EOS. The cache [B, S_max, H, D] per layer
is allocated once per (batch, length bucket, dtype, device) and kept on the model with its graph, so
repeated calls of the same shape reuse both (model._decode_state).

Batches are left-padded: cache slots 0..P-1 hold the padded prompt, kv_start[b] (the row's leading pad
count) hides the pads from attention, and positions count from the first real token, so every row
generates what it would alone. A prompt + max_new_tokens beyond the model's positions (GPT-2: 1024;
OPT, GPT-Neo: 2048) is a ValueError.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from fusedgpt.models.gpt import GPT, check_input_ids, left_padding
from fusedgpt.ops import BackendChoice, decode_attention_backend

Tensor = torch.Tensor

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so prompts of similar length share a graph


@dataclass
class GenerationResult:
    """ids [B, P + N'] (N' <= max_new_tokens: fewer when every row met EOS); the timings behind the
    tokens/s that `fusedgpt generate` prints. decode_tokens counts B tokens per decode step."""

    ids: Tensor
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float


class DecodeState:
    """The static buffers of one (batch, cache length, dtype, device): the KV cache, cache_lens and
    kv_start (device int32 [B]), the step's input tokens [B] and, on a GPU, the captured step."""

    def __init__(self, model: GPT, batch: int, max_len: int):
        config = model.config
        shape = (batch, max_len, config.num_heads, config.head_dim)  # (B, S_max, H, D)
        options = dict(dtype=model.dtype, device=model.device)
        self.key = (batch, max_len, model.dtype, model.device)
        self.cache = [(torch.empty(shape, **options), torch.empty(shape, **options)) for _ in model.blocks]
        self.cache_lens = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: Tensor | None = None

    def step(self, model: GPT, use_graph: bool) -> Tensor:
        """Logits [B, V] of self.tokens at slot cache_lens; appends them to the cache, advances cache_lens."""
        if not use_graph:
            return model.decode_step(self.tokens, self.kv_start, self.cache, self.cache_lens)
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        return self.graph_logits

    def _capture(self, model: GPT) -> None:
        # Warm-up on a side stream first (Triton compiles, cuBLAS picks its kernels: neither may happen
        # during capture). Its effects are harmless: it writes slot cache_lens, which the first replay
        # rewrites, and cache_lens is put back.
        saved_lens = self.cache_lens.clone()
        stream = torch.cuda.Stream(device=model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):
            model.decode_step(self.tokens, self.kv_start, self.cache, self.cache_lens)
            self.cache_lens.copy_(saved_lens)
        torch.cuda.current_stream(model.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.graph_logits = model.decode_step(self.tokens, self.kv_start, self.cache, self.cache_lens)
        self.graph = graph


def decode_step_backends(model: GPT, state: DecodeState) -> list[BackendChoice]:
    """decode_attention's decision for each layer's call in a decode step over `state`, asked with the
    arguments the step passes: q, k, v of one token per sequence as the block's QKV projection lays them
    out, the state's caches, cache_lens and kv_start. (The step's other ops, layer_norm and bias_act, are
    capturable on every backend.)"""
    batch = state.tokens.shape[0]
    hidden = torch.zeros(batch, 1, model.config.hidden_size, dtype=model.dtype, device=model.device)  # (B, 1, C)
    q, k, v = model.blocks[0].project_qkv(hidden)  # each (B, 1, H, D): every block lays them out alike
    return [decode_attention_backend(q, k_cache, v_cache, state.cache_lens, k=k, v=v, window=block.window,
                                     scale=block.scale, kv_start=state.kv_start)
            for block, (k_cache, v_cache) in zip(model.blocks, state.cache)]


def capture_blocker(choices: list[BackendChoice]) -> str | None:
    """Why a decode step whose decode_attention calls got these decisions cannot be captured in a CUDA
    graph (None: it can)."""
    for layer, choice in enumerate(choices):
        if not choice.capturable:
            return (f"layer {layer}'s decode_attention call (the {choice.backend!r} path) cannot be captured: "
                    f"{choice.host_read}")
    return None


def use_cuda_graph(requested: bool | None, device: torch.device, blocker: str | None) -> bool:
    """The cuda_graph setting of a generate call on `device`: `requested` (None: on CUDA whenever the step
    can be captured, i.e. capture_blocker found nothing); True where it cannot be is a ValueError naming
    why (the caller has refused True off CUDA already)."""
    if requested is None:
        return device.type == "cuda" and blocker is None
    if requested and blocker is not None:
        raise ValueError(f"cuda_graph=True: {blocker}")
    return bool(requested)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Logits [B, V] -> float32 logits divided by temperature, with -inf outside the top_k largest and
    outside the nucleus: the fewest most likely tokens whose probabilities add up to top_p (always at
    least the most likely one). The order of Hugging Face's warpers: temperature, top-k, top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        drop = mass_before >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> Tensor:
    """The next token per row [B]: argmax (greedy), or a draw from the filtered distribution. No host sync."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, sync_every=1) -> None:
    """Raises ValueError naming the first generation setting that is out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
    if not do_sample:
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 when sampling, got {temperature!r} "
                         "(greedy decoding is do_sample=False)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _decode_state(model: GPT, batch: int, max_len: int) -> DecodeState:
    """The model's cached DecodeState for this shape, or a new one (replacing the old: one at a time)."""
    state = getattr(model, "_decode_state", None)
    if state is None or state.key != (batch, max_len, model.dtype, model.device):
        model._decode_state = None  # free the old cache and graph before allocating the new ones
        state = model._decode_state = DecodeState(model, batch, max_len)
    return state


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_with_stats(model: GPT, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                        max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                        eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                        streamer: Callable[[Tensor], None] | None = None, cuda_graph: bool | None = None,
                        sync_every: int = 8) -> GenerationResult:
    """generate(), returning the ids with the prefill and decode timings (see GenerationResult)."""
    check_input_ids(input_ids, model.config.vocab_size)
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, sync_every)
    device = model.device
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device ({device}), got {input_ids.device}")
    batch, prompt_len = input_ids.shape
    kv_start = left_padding(attention_mask, input_ids)
    lengths = [prompt_len] * batch if kv_start is None else (prompt_len - kv_start).tolist()
    if min(lengths) == 0:
        raise ValueError(f"attention_mask row {lengths.index(0)} has no tokens: every prompt needs at least one")
    model.check_positions(max(lengths) + max_new_tokens, f"the prompt ({max(lengths)} tokens) + max_new_tokens "
                                                         f"({max_new_tokens})")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    vocab = model.config.vocab_size
    for name, token in [("pad_token_id", pad)] + [("eos_token_id", token) for token in eos]:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {token!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an int in [0, 2^64), got {seed!r}")
    if cuda_graph and device.type != "cuda":  # before the cache is allocated
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample and seed is not None else None

    def pick(logits):
        return sample(logits, do_sample, temperature, top_k, top_p, generator)

    max_len = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    state = _decode_state(model, batch, max_len)
    cuda_graph = use_cuda_graph(cuda_graph, device, capture_blocker(decode_step_backends(model, state)))
    state.kv_start.copy_(kv_start if kv_start is not None else torch.zeros_like(state.kv_start))
    state.cache_lens.fill_(prompt_len)
    eos_ids = torch.tensor(eos, dtype=torch.int64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.int64, device=device)
    out[:, :prompt_len] = input_ids

    def emit(step: int, token: Tensor) -> None:  # device-side EOS bookkeeping, no sync
        token = torch.where(finished, pad, token)
        finished.logical_or_(torch.isin(token, eos_ids))
        out[:, prompt_len + step] = token
        state.tokens.copy_(token)

    start = time.perf_counter()
    emit(0, pick(model.prefill(input_ids, kv_start, state.cache)))
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    done_at = [None] * batch  # per row: index of its EOS among the new tokens (host bookkeeping)
    flushed, produced = 0, 1
    while True:
        if produced == max_new_tokens or produced % sync_every == 0:  # the only host reads
            chunk = out[:, prompt_len + flushed:prompt_len + produced].cpu()  # (B, n)
            is_eos = torch.isin(chunk, torch.tensor(eos, dtype=torch.int64))  # (B, n)
            for row in range(batch):
                hits = is_eos[row].nonzero().flatten().tolist()
                if done_at[row] is None and hits:
                    done_at[row] = flushed + hits[0]
            if all(index is not None for index in done_at):
                produced = max(done_at) + 1  # every row has stopped: trim the tail of pads
                chunk = chunk[:, :produced - flushed]
            if streamer is not None and chunk.shape[1]:
                streamer(chunk)
            flushed = produced
            if produced == max_new_tokens or all(index is not None for index in done_at):
                break
        emit(produced, pick(state.step(model, cuda_graph)))
        produced += 1
    _synchronize(device)
    decode_seconds = time.perf_counter() - start
    return GenerationResult(ids=out[:, :prompt_len + produced].clone(), prompt_tokens=sum(lengths),
                            prefill_seconds=prefill_seconds, decode_tokens=batch * (produced - 1),
                            decode_seconds=decode_seconds)


def generate(model: GPT, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, streamer: Callable[[Tensor], None] | None = None,
             cuda_graph: bool | None = None, sync_every: int = 8) -> Tensor:
    """Generates up to max_new_tokens after each prompt; returns ids [B, P + N] (int64, on the model's
    device), N < max_new_tokens only when every row met EOS first, as Hugging Face's generate does.

    input_ids [B, P] on the model's device; attention_mask [B, P] of 0/1, left-padded (None: no padding).
    Greedy by default; do_sample=True draws from softmax(logits / temperature) restricted to the top_k
    tokens and to the top_p nucleus, reproducibly given `seed` (a torch.Generator on the device; None
    uses torch's global generator). eos_token_id: int or list (None: the model config's); a row that
    emits one is finished and continues with pad_token_id (None: the config's, else the first EOS).
    streamer(tokens): called with the new tokens as a CPU int64 [B, n] chunk, in order, every
    `sync_every` tokens (the host reads the device then, and only then; it also checks for EOS).
    cuda_graph: capture the decode step once and replay it (default: on CUDA whenever
    fusedgpt.ops.decode_attention_backend says every layer's call of the step is capturable; True where
    it is not is a ValueError)."""
    return generate_with_stats(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=streamer,
                               cuda_graph=cuda_graph, sync_every=sync_every).ids
