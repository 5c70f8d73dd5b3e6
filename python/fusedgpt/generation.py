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
sequence has met EOS.

One owner for the cache and its graph: a DecodeState holds the KV cache [B, S_max, H, D] per layer, the
step's other buffers and the captured step, built for one DecodeKey: batch, length bucket, dtype,
device, the backend each op call of the step gets (as the ops decide it now: FUSEDGPT_BACKEND changing
between calls changes it) and the parameters' addresses (which a captured graph reads). decode_state()
keeps the model's one state (model._decode_state) while its key holds and replaces it otherwise, so
calls of the same shape reuse both and nothing replays a graph captured for other kernels or weights.

One entry point: generate_with_stats runs the loop and returns the ids with the prefill and decode
timings (GenerationResult); generate (also GPT.generate, attached here: the models never import this
module) returns the ids alone. The settings are GenerationOptions' fields, documented and checked
there once, given as an options object, as keywords, or both (keywords win), as Hugging Face's
generate takes a GenerationConfig and keyword overrides.

Batches are left-padded: cache slots 0..P-1 hold the padded prompt, kv_start[b] (the row's leading pad
count) hides the pads from attention, and positions count from the first real token, so every row
generates what it would alone. A prompt + max_new_tokens beyond the model's positions (GPT-2: 1024;
OPT, GPT-Neo: 2048) is a ValueError.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, NamedTuple

import torch

from fusedgpt.models.gpt import GPT, check_input_ids, left_padding
from fusedgpt.nn import LayerNorm, LinearAct
from fusedgpt.ops import BackendChoice, bias_act_backend, decode_attention_backend, layer_norm_backend

Tensor = torch.Tensor

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so prompts of similar length share a graph


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """The settings of one generate call, checked when it is made (ValueError naming the first one out of
    range; the token ids are checked against the model's vocabulary by the call).

    max_new_tokens: how many tokens to generate after each prompt (fewer only when every row met EOS).
    do_sample: False (default) is greedy; True draws from softmax(logits / temperature) restricted to
    the top_k most likely tokens and to the top_p nucleus (None: no restriction), reproducibly given
    `seed` (a torch.Generator on the model's device; None uses torch's global generator).
    eos_token_id: int or list (None: the model config's); a row that emits one is finished and
    continues with pad_token_id (None: the config's, else the first EOS).
    streamer(tokens): called with the new tokens as a CPU int64 [B, n] chunk, in order, every
    `sync_every` tokens (the host reads the device then, and only then; it also checks for EOS).
    cuda_graph: capture the decode step once and replay it (None, the default: on CUDA whenever
    fusedgpt.ops.decode_attention_backend says every layer's call of the step is capturable; True where
    it is not, or off CUDA, is a ValueError)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    streamer: Callable[[Tensor], None] | None = None
    cuda_graph: bool | None = None
    sync_every: int = 8

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not _is_int(self.sync_every) or self.sync_every < 1:
            raise ValueError(f"sync_every must be a positive int, got {self.sync_every!r}")
        if self.cuda_graph not in (None, True, False):
            raise ValueError(f"cuda_graph must be True, False or None, got {self.cuda_graph!r}")
        if self.streamer is not None and not callable(self.streamer):
            raise TypeError(f"streamer must be callable or None, got {type(self.streamer).__name__}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [0, 2^64), got {self.seed!r}")
        if not self.do_sample:
            return
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0 when sampling, got {temperature!r} "
                             "(greedy decoding is do_sample=False)")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


@dataclasses.dataclass
class GenerationResult:
    """ids [B, P + N'] (N' <= max_new_tokens: fewer when every row met EOS); the timings behind the
    tokens/s that `fusedgpt generate` prints. decode_tokens counts B tokens per decode step."""

    ids: Tensor
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float


class DecodeKey(NamedTuple):
    """Everything a DecodeState's buffers and captured step depend on. batch, cache_len (the length
    bucket), dtype, device: the buffers' shape and place. backends: the backend of each op call of the
    step, as the ops decide it for the step's arguments (decode_key). weights: the address of every
    parameter, which a captured graph reads (model.half().float() moves them)."""

    batch: int
    cache_len: int
    dtype: torch.dtype
    device: torch.device
    backends: tuple[str, ...]
    weights: tuple[int, ...]


class DecodeState:
    """The static buffers of one DecodeKey: the KV cache, cache_lens and kv_start (device int32 [B]), the
    step's input tokens [B] and, on a GPU, the captured step. Build it through decode_state()."""

    def __init__(self, model: GPT, batch: int, cache_len: int):
        config = model.config
        shape = (batch, cache_len, config.num_heads, config.head_dim)  # (B, S_max, H, D)
        options = dict(dtype=model.dtype, device=model.device)
        self.cache = [(torch.empty(shape, **options), torch.empty(shape, **options)) for _ in model.blocks]
        self.cache_lens = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=model.device)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: Tensor | None = None
        self.key = decode_key(model, self)

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


def decode_key(model: GPT, state: DecodeState) -> DecodeKey:
    """The key of a decode step of `model` over `state`'s buffers, now. Its backends are the ops' own
    decisions for the step's calls: decode_attention per layer (decode_step_backends), then layer_norm
    for each fusedgpt.nn.LayerNorm and bias_act for each LinearAct of the model, asked with a step's
    activations ([B, 1, C] and [B, 1, ffn_size], as the step computes them)."""
    batch, cache_len = state.cache[0][0].shape[:2]
    options = dict(dtype=model.dtype, device=model.device)
    hidden = torch.zeros(batch, 1, model.config.hidden_size, **options)  # (B, 1, C)
    residual = torch.zeros_like(hidden)  # (B, 1, C)
    inner = torch.zeros(batch, 1, model.config.ffn_size, **options)  # (B, 1, F)
    backends = [choice.backend for choice in decode_step_backends(model, state)]
    for module in model.modules():
        if isinstance(module, LayerNorm):
            backends.append(layer_norm_backend(hidden, module.weight, module.bias, module.eps, residual).backend)
        elif isinstance(module, LinearAct):
            backends.append(bias_act_backend(inner, module.bias, module.activation).backend)
    return DecodeKey(batch, cache_len, model.dtype, model.device, tuple(backends),
                     tuple(parameter.data_ptr() for parameter in model.parameters()))


def decode_state(model: GPT, batch: int, cache_len: int) -> DecodeState:
    """The DecodeState for a call of `model` with this batch and cache length: the model's current one
    (model._decode_state: one at a time) while its key holds, else a new one that replaces it."""
    state = getattr(model, "_decode_state", None)
    if (state is not None and state.key[:4] == (batch, cache_len, model.dtype, model.device)
            and decode_key(model, state) == state.key):
        return state
    model._decode_state = state = None  # free the old cache and graph before allocating the new ones
    model._decode_state = DecodeState(model, batch, cache_len)
    return model._decode_state


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



def sample(logits: Tensor, options: GenerationOptions, generator: torch.Generator | None) -> Tensor:
    """The next token per row [B]: argmax (greedy), or a draw from the filtered distribution. No host sync."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, options.temperature, options.top_k, options.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _options(options: GenerationOptions | None, settings: dict) -> GenerationOptions:
    if options is None:
        return GenerationOptions(**settings)
    if not isinstance(options, GenerationOptions):
        raise TypeError(f"options must be a fusedgpt.generation.GenerationOptions or None, got "
                        f"{type(options).__name__} (the settings are keyword arguments)")
    return dataclasses.replace(options, **settings) if settings else options


@torch.inference_mode()
def generate_with_stats(model: GPT, input_ids: Tensor, attention_mask: Tensor | None = None,
                        options: GenerationOptions | None = None, **settings) -> GenerationResult:
    """Generates after each prompt and returns the ids with the prefill and decode timings.

    input_ids [B, P] (int64 or int32) on the model's device; attention_mask [B, P] of 0/1, left-padded
    (None: no padding). The settings are GenerationOptions' fields (greedy, 32 new tokens by default),
    as `options`, as keywords (an unknown one is a TypeError), or both: keywords override `options`.
    Returns GenerationResult: ids [B, P + N] (int64, on the model's device), N < max_new_tokens only when
    every row met EOS first, as Hugging Face's generate does; generate() returns the ids alone."""
    options = _options(options, settings)
    check_input_ids(input_ids, model.config.vocab_size)
    device = model.device
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device ({device}), got {input_ids.device}")
    batch, prompt_len = input_ids.shape
    max_new_tokens = options.max_new_tokens
    kv_start = left_padding(attention_mask, input_ids)
    lengths = [prompt_len] * batch if kv_start is None else (prompt_len - kv_start).tolist()
    if min(lengths) == 0:
        raise ValueError(f"attention_mask row {lengths.index(0)} has no tokens: every prompt needs at least one")
    model.check_positions(max(lengths) + max_new_tokens, f"the prompt ({max(lengths)} tokens) + max_new_tokens "
                                                         f"({max_new_tokens})")
    eos = model.config.eos_token_id if options.eos_token_id is None else options.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = options.pad_token_id if options.pad_token_id is not None else model.config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    vocab = model.config.vocab_size
    for name, token in [("pad_token_id", pad)] + [("eos_token_id", token) for token in eos]:
        if not _is_int(token) or not 0 <= token < vocab:
            raise ValueError(f"{name} must be a token id in [0, {vocab}), got {token!r}")
    if options.cuda_graph and device.type != "cuda":  # before the cache is allocated
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    generator = None
    if options.do_sample and options.seed is not None:
        generator = torch.Generator(device=device).manual_seed(options.seed)

    cache_len = -(-(prompt_len + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
    state = decode_state(model, batch, cache_len)
    cuda_graph = use_cuda_graph(options.cuda_graph, device, capture_blocker(decode_step_backends(model, state)))
    state.kv_start.copy_(kv_start if kv_start is not None else torch.zeros_like(state.kv_start))
    state.cache_lens.fill_(prompt_len)
    eos_ids = torch.tensor(eos, dtype=torch.int64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.int64, device=device)
    out[:, :prompt_len] = input_ids

    def emit(step: int, logits: Tensor) -> None:  # sampling and device-side EOS bookkeeping, no sync
        token = torch.where(finished, pad, sample(logits, options, generator))
        finished.logical_or_(torch.isin(token, eos_ids))
        out[:, prompt_len + step] = token
        state.tokens.copy_(token)

    start = time.perf_counter()
    emit(0, model.prefill(input_ids, kv_start, state.cache))
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    done_at = [None] * batch  # per row: index of its EOS among the new tokens (host bookkeeping)
    flushed, produced = 0, 1
    while True:
        if produced == max_new_tokens or produced % options.sync_every == 0:  # the only host reads
            chunk = out[:, prompt_len + flushed:prompt_len + produced].cpu()  # (B, n)
            is_eos = torch.isin(chunk, torch.tensor(eos, dtype=torch.int64))  # (B, n)
            for row in range(batch):
                hits = is_eos[row].nonzero().flatten().tolist()
                if done_at[row] is None and hits:
                    done_at[row] = flushed + hits[0]
            if all(index is not None for index in done_at):
                produced = max(done_at) + 1  # every row has stopped: trim the tail of pads
                chunk = chunk[:, :produced - flushed]
            if options.streamer is not None and chunk.shape[1]:
                options.streamer(chunk)
            flushed = produced
            if produced == max_new_tokens or all(index is not None for index in done_at):
                break
        emit(produced, state.step(model, cuda_graph))
        produced += 1
    _synchronize(device)
    decode_seconds = time.perf_counter() - start
    return GenerationResult(ids=out[:, :prompt_len + produced].clone(), prompt_tokens=sum(lengths),
                            prefill_seconds=prefill_seconds, decode_tokens=batch * (produced - 1),
                            decode_seconds=decode_seconds)


def generate(model: GPT, input_ids: Tensor, attention_mask: Tensor | None = None,
             options: GenerationOptions | None = None, **settings) -> Tensor:
    """generate_with_stats(model, input_ids, attention_mask, options, **settings).ids: ids [B, P + N]
    alone. model.generate(input_ids, ...) is this function; the settings are GenerationOptions'."""
    return generate_with_stats(model, input_ids, attention_mask, options, **settings).ids


# model.generate(...) is generate(model, ...). Attached here, not defined in models/gpt.py, so that the
# models never import generation (fusedgpt's __init__ imports this module, so every GPT has it).
GPT.generate = generate
