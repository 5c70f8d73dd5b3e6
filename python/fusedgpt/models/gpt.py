"""The one decoder behind fusedgpt's GPT-2, OPT and GPT-Neo models: learned positions, pre-LN or
post-LN blocks (OPT-350m), optional project_in / project_out (OPT's narrow embedding), per-layer
attention scale and window (GPT-2's inverse-layer scaling, GPT-Neo's local layers), tied or separate
lm_head. The family adapters (gpt2.py, opt.py, gpt_neo.py, with convert.py) only turn a Hugging Face
config into a GPTConfig and a checkpoint into this module's state dict. The generation loop
(fusedgpt.generation) builds on prefill and decode_step; this module does not know it.

The block runs on fusedgpt's fused ops: fusedgpt.nn.LayerNorm with the residual add folded in,
fusedgpt.nn.LinearAct (bias + GELU-tanh / ReLU in one kernel), one fused QKV projection whose output is
viewed as q, k, v without copies, fusedgpt.ops.attention for prompts (causal, window, left padding) and
fusedgpt.ops.decode_attention with the fused KV-cache append for generated tokens (planned once a step,
run by every layer: decode_attention_plan). The backend of every
op follows FUSEDGPT_BACKEND ("cuda" / "triton" / "torch"), else the automatic choice (fusedgpt.ops).

Padding: batches must be left-padded (as for generation). Positions follow the attention mask:
position = index - (number of leading pad tokens), pads at position 0 (Hugging Face's
cumsum(mask) - 1 as its `generate` computes it), so a left-padded sequence gets the logits it gets
alone. A mask with a pad after a token (right padding, holes) is a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fusedgpt.nn import LayerNorm, LinearAct
from fusedgpt.ops import attention, decode_attention_plan, kv_append, linear_cross_entropy

Tensor = torch.Tensor
# One (k_cache, v_cache) pair per layer, each [B, S_max, H, D].
KVCache = list[tuple[Tensor, Tensor]]


@dataclass
class GPTConfig:
    """Everything the decoder needs; the adapters fill it from a Hugging Face config.

    embed_size: width of the token embedding and lm_head when it differs from hidden_size (OPT-350m:
    512 with project_in / project_out). position_offset: rows of the position table before position 0
    (OPT: 2). attention_scales / attention_windows: one per layer (None: D^-0.5 / global)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    max_positions: int
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    layer_norm_affine: bool = True
    pre_layer_norm: bool = True
    final_layer_norm: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    embed_size: int | None = None
    position_offset: int = 0
    attention_scales: list[float | None] = field(default_factory=list)
    attention_windows: list[int | None] = field(default_factory=list)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_positions"):
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPTConfig: hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if not self.attention_scales:
            self.attention_scales = [None] * self.num_layers
        if not self.attention_windows:
            self.attention_windows = [None] * self.num_layers
        for name in ("attention_scales", "attention_windows"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"GPTConfig: {name} must have one entry per layer ({self.num_layers}), "
                                 f"got {len(getattr(self, name))}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_embed_size(self) -> int:
        return self.embed_size or self.hidden_size


def left_padding(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor | None:
    """kv_start int32 [B]: the number of leading pad tokens per sequence (None without a mask).

    attention_mask [B, S] of 0/1 (bool or integer) must be left-padded: zeros, then ones. Reads the
    mask on the host once (a device sync): for prompts, never inside a decode step."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):  # before any cast: 0.5 is not 0
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.to(torch.int32)
    kv_start = mask.shape[1] - mask.sum(dim=1, dtype=torch.int32)  # (B,)
    expected = (torch.arange(mask.shape[1], device=mask.device)[None, :] >= kv_start[:, None]).to(torch.int32)
    bad = (mask != expected).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"attention_mask row {bad[0]} is not left-padded (a 0 after a 1): fusedgpt needs all "
                         "padding before the tokens (tokenizer padding_side='left')")
    return kv_start.to(device=input_ids.device, dtype=torch.int32)


def prompt_positions(seq_len: int, kv_start: Tensor | None, device: torch.device) -> Tensor:
    """Positions [B or 1, S]: index - leading pads, pads at 0 (HF generate's cumsum(mask) - 1)."""
    index = torch.arange(seq_len, device=device)[None, :]  # (1, S)
    if kv_start is None:
        return index
    return (index - kv_start[:, None].to(torch.int64)).clamp(min=0)  # (B, S)


class Block(nn.Module):
    """One decoder layer. Pre-LN: x + attn(LN(x)), then + mlp(LN(.)); the residual adds are fused into
    the next LayerNorm (see GPT.blocks_forward). Post-LN (OPT-350m): LN(x + attn(x)), LN(. + mlp(.))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.scale = config.attention_scales[layer]
        self.window = config.attention_windows[layer]
        self.ln_attn = LayerNorm(hidden, eps=config.layer_norm_eps, elementwise_affine=config.layer_norm_affine)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)  # rows: q, k, v
        self.out = nn.Linear(hidden, hidden, bias=config.out_bias)
        self.ln_mlp = LayerNorm(hidden, eps=config.layer_norm_eps, elementwise_affine=config.layer_norm_affine)
        self.fc_in = LinearAct(hidden, config.ffn_size, bias=config.mlp_bias, activation=config.activation)
        self.fc_out = nn.Linear(config.ffn_size, hidden, bias=config.mlp_bias)

    def project_qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, S, H, D] of h [B, S, C]: strided views of the one fused QKV projection's output."""
        batch, seq, _ = h.shape
        qkv = self.qkv(h).view(batch, seq, 3, self.num_heads, self.head_dim)  # (B, S, 3, H, D)
        return qkv.unbind(dim=2)  # each (B, S, H, D), strided views of qkv

    def attend(self, h: Tensor, kv_start: Tensor | None, cache: tuple[Tensor, Tensor] | None,
               cache_lens: Tensor | None, plans: dict | None = None) -> Tensor:
        """Self-attention of h [B, S, C]. Without cache_lens: the prompt (causal over h itself), written
        into the cache at 0..S-1 when one is given. With cache_lens (device int32 [B]): new tokens
        attending to the cache, appended to it by the same kernel (the caller advances cache_lens).
        plans: the step's decode-attention plans by window, made by the first layer with that window
        and run by the others (fusedgpt.ops.decode_attention_plan: checks and index work once a step)."""
        batch, seq, hidden = h.shape
        q, k, v = self.project_qkv(h)
        if cache_lens is None:
            out = attention(q, k, v, causal=True, window=self.window, scale=self.scale, kv_start=kv_start)
            if cache is not None:
                kv_append(cache[0], cache[1], k, v, torch.zeros(batch, dtype=torch.int32, device=h.device))
        else:
            plans = {} if plans is None else plans
            if self.window not in plans:
                plans[self.window] = decode_attention_plan(q, cache[0], cache[1], cache_lens, k=k, v=v,
                                                           window=self.window, kv_start=kv_start)
            out = plans[self.window].run(q, cache[0], cache[1], k, v, scale=self.scale)
        return self.out(out.view(batch, seq, hidden))  # (B, S, C)

    def mlp(self, h: Tensor) -> Tensor:
        return self.fc_out(self.fc_in(h))


class GPT(nn.Module):
    """A GPT-style causal LM (GPT-2, OPT, GPT-Neo) on fusedgpt's kernels.

    forward(input_ids [B, S], attention_mask [B, S] left-padded or None) -> logits [B, S, V] in the
    model's dtype (full forward, no cache). prefill / decode_step: the two halves of generation over a
    static KV cache. generate(...) -> ids [B, P + N] is fusedgpt.generation.generate, attached there.
    Parameters: embed_tokens [V, E], embed_positions [max_positions + offset, C], project_in [C, E] and
    project_out [E, C] when E != C, blocks.{i}.(ln_attn, qkv [3C, C], out, ln_mlp, fc_in, fc_out),
    ln_final, lm_head [V, E] unless tied to embed_tokens."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        embed, hidden = config.token_embed_size, config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, embed)
        self.embed_positions = nn.Embedding(config.max_positions + config.position_offset, hidden)
        self.project_in = nn.Linear(embed, hidden, bias=False) if embed != hidden else None
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.num_layers))
        self.ln_final = (LayerNorm(hidden, eps=config.layer_norm_eps, elementwise_affine=config.layer_norm_affine)
                         if config.final_layer_norm else None)
        self.project_out = nn.Linear(hidden, embed, bias=False) if embed != hidden else None
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(embed, config.vocab_size, bias=False)
        self.apply(_init_weights)
        self.lay_out_matrices()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .float(), ...: the new device's layout
        super()._apply(fn, recurse)
        self.lay_out_matrices()
        return self

    def matrices(self) -> list[nn.Parameter]:
        """The weights the model multiplies activations by (x @ W.T): every Linear's and the lm_head's."""
        found = [module.weight for module in self.modules() if isinstance(module, nn.Linear)]
        return found + ([self.embed_tokens.weight] if self.lm_head is None else [])

    def lay_out_matrices(self) -> None:
        """Gives each of matrices() the memory layout its device multiplies fastest, keeping its shape,
        values and Parameter: column-major (W.T contiguous, Hugging Face GPT-2's Conv1D layout) for float32
        on the CPU, row-major elsewhere. On this project's 2-core CPU, torch 2.14, a batch-1 x @ W.T with the
        weights out of cache took 1.4-1.6x less time column-major when out > in (qkv, fc_in, lm_head:
        50257 x 768 in 5.5 ms instead of 9.0), the same for out <= in, and 0.82-1.0x at 16 or more rows
        (a prompt); float16 column-major was 17x slower and bfloat16 0.9x, so they stay row-major.
        Called after every move (_apply) and by the loaders, which assign tensors without one."""
        for weight in self.matrices():
            if weight.device.type == "meta":
                continue
            column_major = weight.device.type == "cpu" and weight.dtype == torch.float32
            if column_major and weight.stride() != (1, weight.shape[0]):
                weight.data = weight.data.t().contiguous().t()
            elif not column_major and not weight.is_contiguous():
                weight.data = weight.data.contiguous()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Token + position embeddings [B, S, C]; positions [B or 1, S] counted from 0."""
        x = self.embed_tokens(input_ids)  # (B, S, E)
        if self.project_in is not None:
            x = self.project_in(x)  # (B, S, C)
        return x + self.embed_positions(positions + self.config.position_offset)

    def blocks_forward(self, x: Tensor, kv_start: Tensor | None, cache: KVCache | None = None,
                       cache_lens: Tensor | None = None) -> Tensor:
        """The layers and the final norm / projection: hidden states [B, S, E] for the lm_head."""
        plans = {}  # a decode step's attention plans, by window (see Block.attend)
        if not self.config.pre_layer_norm:  # post-LN: h = LN(h + sublayer(h))
            for layer, block in enumerate(self.blocks):
                layer_cache = cache[layer] if cache is not None else None
                x, _ = block.ln_attn(block.attend(x, kv_start, layer_cache, cache_lens, plans), x)
                x, _ = block.ln_mlp(block.mlp(x), x)
        else:  # pre-LN: `pending` is the sublayer output not yet added to the residual stream
            residual, pending = x, None
            for layer, block in enumerate(self.blocks):
                layer_cache = cache[layer] if cache is not None else None
                if pending is None:
                    h = block.ln_attn(residual)
                else:
                    h, residual = block.ln_attn(pending, residual)
                h, residual = block.ln_mlp(block.attend(h, kv_start, layer_cache, cache_lens, plans), residual)
                pending = block.mlp(h)
            if self.ln_final is not None:
                x = self.ln_final(pending, residual)[0] if pending is not None else self.ln_final(residual)
            else:
                x = residual + pending if pending is not None else residual
        if self.project_out is not None:
            x = self.project_out(x)  # (B, S, E)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, weight)  # (..., V)

    def check_positions(self, length: int, what: str = "the sequence") -> None:
        if length > self.config.max_positions:
            raise ValueError(f"{what} has {length} positions but this {self.config.family} model has "
                             f"{self.config.max_positions} (max_position_embeddings)")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """input_ids [B, S] -> logits [B, S, V]; with labels [B, S] (int64, -100 where a position does not
        count; usually input_ids with padding set to -100), the mean next-token loss instead (Hugging Face's
        shift: position t predicts labels[t + 1]), by fusedgpt.ops.linear_cross_entropy, which never holds
        the [B * S, V] logits."""
        check_input_ids(input_ids, self.config.vocab_size)
        if input_ids.device != self.device:
            raise ValueError(f"input_ids must be on the model's device ({self.device}), got {input_ids.device}")
        self.check_positions(input_ids.shape[1], "input_ids")
        if labels is not None and (labels.shape != input_ids.shape or labels.dtype != torch.int64):
            raise ValueError(f"labels must be int64 with input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        kv_start = left_padding(attention_mask, input_ids)
        positions = prompt_positions(input_ids.shape[1], kv_start, input_ids.device)
        hidden = self.blocks_forward(self.embed(input_ids, positions), kv_start)
        if labels is None:
            return self.logits(hidden)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B * (S - 1), E)
        return linear_cross_entropy(predicting, weight, labels.to(hidden.device)[:, 1:].reshape(-1))

    def prefill(self, input_ids: Tensor, kv_start: Tensor | None, cache: KVCache) -> Tensor:
        """Runs the prompt, writes every layer's keys and values into cache slots 0..S-1 and returns the
        logits of the last position [B, V] (left padding: the last position is a token in every row)."""
        positions = prompt_positions(input_ids.shape[1], kv_start, input_ids.device)
        hidden = self.blocks_forward(self.embed(input_ids, positions), kv_start, cache)
        return self.logits(hidden[:, -1])

    def decode_step(self, tokens: Tensor, kv_start: Tensor, cache: KVCache, cache_lens: Tensor) -> Tensor:
        """One generated token per sequence: tokens [B] at cache slot cache_lens[b] (device int32 [B],
        advanced by one here) -> logits [B, V]. No host synchronisation: capturable in a CUDA graph."""
        positions = (cache_lens - kv_start).to(torch.int64)[:, None]  # (B, 1)
        hidden = self.blocks_forward(self.embed(tokens[:, None], positions), kv_start, cache, cache_lens)
        cache_lens.add_(1)
        return self.logits(hidden[:, -1])


def check_input_ids(input_ids: Tensor, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, S] with B >= 1 and S >= 1, got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())  # a host read: prompts only, never in a step
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}), got values in [{low}, {high}]")


def _init_weights(module: nn.Module) -> None:
    """Random weights for models built from a config alone (GPT-2's scheme without the depth scaling)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
