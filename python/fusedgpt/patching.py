"""patch(model): put fusedgpt's fused kernels into a Hugging Face GPT-2, OPT or GPT-Neo model in place,
and unpatch(model) to take them out again. Most users already hold a transformers model; one call makes
it fast without changing their code, and the model keeps its classes, parameters and state-dict keys.

What patch() changes, per decoder block (every head type: *Model, *ForCausalLM / LMHead, sequence
classification, question answering, token classification, GPT-2's double heads):
  - attention: GPT-2 and OPT go through transformers' AttentionInterface. `import fusedgpt` registers
    "fusedgpt" there and in AttentionMaskInterface (so `attn_implementation="fusedgpt"` works in
    from_pretrained / from_config / set_attn_implementation too); patch() sets it on the model's config.
    GPT-Neo's attention does not use that interface in transformers 5.x, so each GPTNeoSelfAttention's
    forward is replaced: unscaled scores (scale=1.0) and the local layers' sliding window
    (window=config.window_size) — transformers' own flash path for GPT-Neo drops that window. GPT-Neo
    picks its attention class by the config's name, so "fusedgpt" is also registered there (a
    GPTNeoSelfAttention with that forward): models built from a patched model's config, or with
    attn_implementation="fusedgpt", work.
  - layer_norm: every torch.nn.LayerNorm becomes a fusedgpt.nn.LayerNorm (the same object: its class is
    swapped, its parameters untouched), and the block's forward is rewritten so the residual add before
    the second norm is folded into it (LN(attn + residual) and the sum in one pass; OPT's post-LN
    layers fold both adds). The add before the first norm belongs to the previous block and stays apart.
  - mlp: the first projection's bias + activation in one fusedgpt.ops.bias_act (GPT-2's Conv1D as
    x @ W then bias_act; OPT's fc1 + ReLU; GPT-Neo's c_fc + GELU-tanh).
Everything replaced is kept on the module it came from (`_fusedgpt_saved`), so unpatch() restores the
original behaviour exactly, deep copies of a patched model stay independent, and patching twice
starts again from the original (the new flags win).

The mask that reaches the kernels. transformers builds one mask per forward through
AttentionMaskInterface; ours turns the 2D padding mask into a compact int32 tensor the kernels read:
  None                 no padding, and the keys end with the queries: plain causal;
  [B, 1, 1, 1]         kv_start per sequence (left padding: keys before it are padding);
  [B, 1, 1, 2]         (kv_start, keys filled) when the cache holds more slots than are filled
                       (transformers' static cache): the queries are the last positions of the filled
                       keys. It is 4D so that transformers passes it through unchanged (generate builds
                       static-cache masks ahead of the forward); an int32 4D mask of that shape given by
                       a caller would be read as ours (transformers' own masks are bool or float).
The keys filled in a static cache live on the device, so a compiled decode step never reads them on the
host: up to 16 new tokens go to fusedgpt.ops.decode_attention (which bounds the keys by that length),
longer prompts over a static cache read the length once (not capturable) and slice the keys.
A dynamic cache gives keys that end with the queries (Sq <= Sk): fusedgpt.ops.attention, whose queries
are bottom-right aligned.

Fallbacks, each with a one-time warnings.warn: output_attentions=True, a head_mask, attention dropout
(training), cross-attention / non-causal masks, a padding mask that is not left padding (right padding,
holes: a host check per forward, as transformers' sdpa mask makes; skipped while torch.compile traces
and in the decode steps over a static cache, where the prompt's prefill has checked it), packed
sequences or custom mask functions, and custom 4D masks run transformers' eager attention for that
call (GPT-2's upcast path where the model asks for it). transformers 5.x has no head_mask argument on
these models any more: one passed anyway reaches GPT-2's and OPT's attention as a keyword and is
refused there. Inputs the fused norm / bias_act cannot take (mixed dtypes under autocast) run the plain
PyTorch expression, silently. On the CPU every op runs its PyTorch reference (or the Triton kernels
under TRITON_INTERPRET=1), as fusedgpt.ops decides.

transformers is optional: the registration runs when transformers.modeling_utils is imported (at once
if it already is), so `import fusedgpt` does not pay for importing transformers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import functools
import importlib.util
import inspect
import sys
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedgpt.models.gpt import HF_ACTIVATIONS
from fusedgpt.nn import LayerNorm
from fusedgpt.ops import attention, bias_act, choose_backend, decode_attention
from fusedgpt.ops._checks import kernel_limits
from fusedgpt.ops.decode_attention import MAX_NEW_TOKENS
from fusedgpt.triton_kernels.layer_norm import MAX_COLUMNS

Tensor = torch.Tensor

ATTENTION_NAME = "fusedgpt"  # the key in transformers' AttentionInterface and AttentionMaskInterface

# transformers' activation names (config.activation_function) -> fusedgpt.ops.bias_act's: the models'
# table, so both paths accept the same activations.
FUSED_ACTIVATIONS = HF_ACTIVATIONS

_SAVED = "_fusedgpt_saved"  # on each patched module: {"class": original class, "forward": (attribute, value)}
_SAVED_ATTENTION = "_fusedgpt_saved_attn_implementation"  # on each patched decoder stack

_warned: set[str] = set()
_FOUR_D_MASK = "a 4D attention mask (the caller's, or transformers' eager mask for a case named in an earlier warning)"


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"fusedgpt: {reason}: the fused kernels cannot serve it, so these calls run transformers' "
                      "eager attention (warned once)", UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """Where a family lives in transformers and the classes patch() looks for (matched by module and
    name, so looking needs no import)."""

    name: str
    module: str
    stack: str  # the decoder stack: holds the config, builds the mask, runs the blocks
    block: str
    mlp: str | None
    self_attention: str | None  # patched at module level (GPT-Neo); None: via AttentionInterface
    heads: tuple[str, ...]  # the model classes transformers ships (for the error message)


FAMILIES = {
    "gpt2": Family("GPT-2", "transformers.models.gpt2.modeling_gpt2", "GPT2Model", "GPT2Block", "GPT2MLP", None,
                   ("GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
                    "GPT2ForTokenClassification", "GPT2ForQuestionAnswering")),
    "opt": Family("OPT", "transformers.models.opt.modeling_opt", "OPTDecoder", "OPTDecoderLayer", None, None,
                  ("OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering")),
    "gpt_neo": Family("GPT-Neo", "transformers.models.gpt_neo.modeling_gpt_neo", "GPTNeoModel", "GPTNeoBlock",
                      "GPTNeoMLP", "GPTNeoSelfAttention",
                      ("GPTNeoModel", "GPTNeoForCausalLM", "GPTNeoForSequenceClassification",
                       "GPTNeoForTokenClassification", "GPTNeoForQuestionAnswering")),
}


def _is(module: torch.nn.Module, family: Family, class_name: str | None) -> bool:
    cls = type(module)
    return class_name is not None and cls.__module__ == family.module and cls.__name__ == class_name


def _modules_of(root: torch.nn.Module, family: Family, class_name: str | None) -> list[torch.nn.Module]:
    return [module for module in root.modules() if _is(module, family, class_name)]


def _stacks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(family key, decoder stack) for every GPT-2 / OPT / GPT-Neo decoder stack inside the model."""
    return [(key, module) for module in model.modules() for key, family in FAMILIES.items()
            if _is(module, family, family.stack)]


def _unsupported_model(model, wanted: str | None) -> TypeError:
    keys = [wanted] if wanted else list(FAMILIES)
    supported = "; ".join(f"{FAMILIES[key].name}: {', '.join(FAMILIES[key].heads)}" for key in keys)
    config = getattr(model, "config", None)
    model_type = f" (model_type {config.model_type!r})" if getattr(config, "model_type", None) else ""
    what = "fusedgpt.patch" if wanted is None else f"fusedgpt.patch_{wanted}"
    return TypeError(f"{what}: unsupported model {type(model).__name__}{model_type}. Supported (transformers "
                     f"classes, any device and dtype): {supported}")


# ----------------------------------------------------------------------------------------------------
# The mask (AttentionMaskInterface)
# ----------------------------------------------------------------------------------------------------

# transformers' objects the mask and attention functions use, set by register().
_causal_mask_function = None
_eager_mask = None
_output_collector = None


def _is_descriptor(mask) -> bool:
    """Our compact mask (see the module docstring), as opposed to a 4D bool / float mask."""
    return (isinstance(mask, Tensor) and mask.dtype == torch.int32 and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] in (1, 2))


def fusedgpt_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask: Tensor | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                  **kwargs) -> Tensor | None:
    """transformers' AttentionMaskInterface entry for "fusedgpt": the arguments of its eager / sdpa mask
    functions; returns None, or the int32 [B, 1, 1, 1] / [B, 1, 1, 2] mask of the module docstring.
    Patterns the kernels cannot serve return transformers' eager mask (4D float), which sends the
    attention to its eager fallback."""
    reason = None
    if mask_function is not None and mask_function is not _causal_mask_function:
        reason = "an attention mask other than causal + padding (packed sequences, a bidirectional or custom mask)"
    elif isinstance(kv_offset, Tensor) or kv_offset != 0:
        reason = "a cache that drops old keys (sliding-window cache layers)"
    elif (attention_mask is not None and not isinstance(q_offset, Tensor)
          and attention_mask.shape[-1] != q_offset + q_length):
        reason = "a 2D attention mask whose length is not past + new tokens"
    kv_start = None
    if reason is None and attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)  # (B, L): True = a real token
        leading = (padding.cumsum(-1) == 0).sum(-1)  # (B,) left pads
        # Left padding only: every token after the first real one is real. A host read (as transformers'
        # sdpa mask does), skipped while torch.compile traces, and over a static cache once the mask is
        # longer than the new tokens (the decode steps of transformers' compiled generation, where a
        # sync per token would cost): a right-padded prompt is caught at its prefill; left padding is
        # assumed, as generate produces.
        static_decode = isinstance(q_offset, Tensor) and padding.shape[-1] > q_length
        if (not torch.compiler.is_compiling() and not static_decode
                and not bool((padding.sum(-1) == padding.shape[-1] - leading).all())):
            reason = "a padding mask that is not left padding (right padding or holes)"
        kv_start = leading.to(torch.int32)
    if reason is not None:
        _warn_once(reason)
        _warned.add(_FOUR_D_MASK)  # the attention's own warning about the mask returned here would repeat this one
        return _eager_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                           kv_offset=kv_offset, mask_function=mask_function or _causal_mask_function,
                           attention_mask=attention_mask, dtype=dtype, device=device)
    if not isinstance(q_offset, Tensor) and q_offset + q_length == kv_length:  # keys end with the queries
        return None if kv_start is None else kv_start.view(batch_size, 1, 1, 1)
    if kv_start is None:
        kv_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
    # A static cache: kv_length slots, q_offset + q_length of them filled (q_offset is a device tensor).
    filled = torch.as_tensor(q_offset + q_length, device=device).to(torch.int32).expand(batch_size)
    return torch.stack([kv_start, filled], dim=-1).view(batch_size, 1, 1, 2)


def _visible_keys(mask: Tensor | None, q_length: int, kv_length: int, device, window: int | None = None) -> Tensor:
    """Bool [B or 1, 1, Sq, Sk] from None or our descriptor: key j is visible to the query at position p
    iff kv_start <= j <= p (and j > p - window); the queries are the last Sq of the filled keys."""
    key_positions = torch.arange(kv_length, device=device)  # (Sk,)
    if mask is None:
        kv_start = torch.zeros(1, dtype=torch.int64, device=device)  # (1,)
        filled = torch.full_like(kv_start, kv_length)
    else:
        kv_start = mask[:, 0, 0, 0].to(device, torch.int64)  # (B,)
        filled = (mask[:, 0, 0, 1].to(device, torch.int64) if mask.shape[-1] == 2
                  else torch.full_like(kv_start, kv_length))
    query_positions = filled[:, None] - q_length + torch.arange(q_length, device=device)  # (B, Sq)
    keys, queries = key_positions[None, None, :], query_positions[:, :, None]  # (1, 1, Sk), (B, Sq, 1)
    visible = (keys <= queries) & (keys >= kv_start[:, None, None])  # (B, Sq, Sk)
    if window is not None:
        visible &= keys > queries - window
    return visible[:, None]  # (B, 1, Sq, Sk)


def _additive_mask(mask, q_length: int, kv_length: int, dtype: torch.dtype, device) -> Tensor:
    """The float [B or 1, 1, Sq, Sk] mask (0 visible, dtype's min hidden) for the eager fallback."""
    if mask is not None and not _is_descriptor(mask):  # already 4D, built by transformers or the caller
        if mask.dtype == torch.bool:
            return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask
    visible = _visible_keys(mask, q_length, kv_length, device)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------

def _attentions_requested() -> bool:
    """output_attentions=True (argument or config) in this forward: GPT-2 and OPT do not pass it down to
    the attention function in transformers 5.x, but record it in the output collector their forward sets."""
    if _output_collector is None:
        return False
    collected = _output_collector.get()
    return bool(collected) and "attentions" in collected


def _unsupported(query: Tensor, key: Tensor, value: Tensor, mask, *, causal: bool, dropout: float,
                 output_attentions: bool, extra: dict | None = None) -> str | None:
    """Why the kernels cannot serve this call (None: they can). query/key/value are [B, S, H, D]; extra:
    the attention function's other keyword arguments."""
    extra = extra or {}
    if output_attentions:
        return "output_attentions=True (the kernels never form the attention weights)"
    if extra.get("head_mask") is not None:
        return "a head_mask"
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):  # other models' attention features
        if extra.get(name) is not None:
            return f"attention with {name} (a model other than GPT-2 / OPT / GPT-Neo)"
    if query.shape[2] != key.shape[2]:
        return "grouped-query attention (fewer key heads than query heads)"
    if dropout:
        return "attention dropout (a model in training mode)"
    if not causal:
        return "non-causal attention (cross-attention or a bidirectional model)"
    if mask is not None and not _is_descriptor(mask):
        return _FOUR_D_MASK
    if not query.dtype == key.dtype == value.dtype:
        return f"mixed dtypes (query {query.dtype}, key {key.dtype}, value {value.dtype})"
    if query.shape[1] > key.shape[1]:
        return "more queries than keys"
    return None


def _run_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *, scale: float | None,
                   window: int | None) -> Tensor:
    """The fused attention over [B, S, H, D] views; mask is None or our int32 descriptor. Returns a
    contiguous [B, Sq, H, D]."""
    if mask is None:  # no padding, keys end with the queries
        return attention(query, key, value, causal=True, window=window, scale=scale)
    if mask.shape[-1] == 1:  # keys end with the queries (no cache, or a dynamic cache)
        kv_start = mask.reshape(mask.shape[0]).to(query.device)  # (B,) int32, a view
        return attention(query, key, value, causal=True, window=window, scale=scale, kv_start=kv_start)
    kv_start = mask[:, 0, 0, 0].to(query.device).contiguous()  # (B,) int32
    filled = mask[:, 0, 0, 1].to(query.device).contiguous()  # (B,) keys filled in a static cache
    if query.shape[1] <= MAX_NEW_TOKENS:  # decode steps: the length stays on the device (capturable)
        if torch.compiler.is_compiling() and choose_backend("decode_attention", query.device,
                                                            unsupported=kernel_limits(query)) == "torch":
            # decode_attention's reference reads the lengths on the host, which torch.compile cannot trace
            return _masked_attention(query, key, value, mask, scale=scale, window=window)
        return decode_attention(query, key, value, filled, window=window, scale=scale, kv_start=kv_start)
    end = int(filled[0])  # a long prompt over a static cache: one host read, then the filled keys only
    return attention(query, key[:, :end], value[:, :end], causal=True, window=window, scale=scale, kv_start=kv_start)


def _masked_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, *, scale: float | None,
                      window: int | None) -> Tensor:
    """The reference math of fusedgpt.ops.attention over [B, S, H, D] with the visibility of our
    descriptor, without host reads (for the torch backend while torch.compile traces a static cache)."""
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.transpose(1, 2).to(compute) for t in (query, key, value))  # (B, H, S, D)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    visible = _visible_keys(mask, query.shape[1], key.shape[1], query.device, window)  # (B, 1, Sq, Sk)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2).to(query.dtype).contiguous()  # (B, Sq, H, D)


def _eager_attention(module, query: Tensor, key: Tensor, value: Tensor, mask, scaling, dropout, **kwargs):
    """transformers' own eager attention for this module's family, on [B, H, S, D] (the fallback)."""
    additive = _additive_mask(mask, query.shape[2], key.shape[2], query.dtype, query.device)
    if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
        return module._upcast_and_reordered_attn(query, key, value, additive)  # GPT-2's fp32 path
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None:
        return eager(module, query, key, value, additive, scaling=scaling, dropout=dropout, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    weights = torch.softmax(scores + additive, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def fusedgpt_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                       dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                       **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' AttentionInterface entry for "fusedgpt" (GPT-2, OPT): query [B, H, Sq, D], key and
    value [B, H, Sk, D] (the cache's keys when there is one), the mask fusedgpt_mask built, the scaling
    (None: D^-0.5). Returns ([B, Sq, H, D] contiguous, None); the fallbacks return eager's weights."""
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    reason = _unsupported(q, k, v, attention_mask, causal=causal, dropout=dropout,
                          output_attentions=_attentions_requested(), extra=kwargs)
    if reason is not None:
        _warn_once(reason)
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return _run_attention(q, k, v, attention_mask, scale=scaling, window=None), None


def _gpt_neo_attention_forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                               output_attentions=False, **kwargs):
    """GPTNeoSelfAttention.forward on the fused kernel: unscaled scores, the local layers' window."""
    batch, q_length, _ = hidden_states.shape
    heads_shape = (batch, q_length, self.num_heads, self.head_dim)
    query = self.q_proj(hidden_states).view(heads_shape)  # (B, S, H, D)
    key = self.k_proj(hidden_states).view(heads_shape)
    value = self.v_proj(hidden_states).view(heads_shape)
    if layer_past is not None:  # the cache holds (B, H, S, D)
        key, value = layer_past.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_id)
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # (B, Sk, H, D)
    dropout = self.attn_dropout.p if self.training else 0.0
    reason = _unsupported(query, key, value, attention_mask, causal=True, dropout=dropout,
                          output_attentions=output_attentions)
    weights = None
    if reason is None:
        window = self.config.window_size if self.attention_type == "local" else None
        output = _run_attention(query, key, value, attention_mask, scale=1.0, window=window)  # (B, S, H, D)
    else:
        _warn_once(reason)
        additive = _additive_mask(attention_mask, q_length, key.shape[1], query.dtype, query.device)
        output, weights = self._attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), additive)
        output = output.transpose(1, 2)  # (B, S, H, D)
    output = self.out_proj(output.reshape(batch, q_length, self.embed_dim))
    return self.resid_dropout(output), weights


# ----------------------------------------------------------------------------------------------------
# Layer norm and MLP
# ----------------------------------------------------------------------------------------------------

class PatchedLayerNorm(LayerNorm):
    """The class patch() gives a model's torch.nn.LayerNorm modules: fusedgpt.nn.LayerNorm (forward(x) or
    forward(x, residual) -> (LN(x + residual), x + residual)), except that inputs the fused op cannot
    take — mixed dtypes under autocast — run torch's layer_norm on the same math."""

    def forward(self, x: Tensor, residual: Tensor | None = None):
        if self._fusable(x, residual):
            return super().forward(x, residual)
        total = x if residual is None else x + residual
        y = F.layer_norm(total, self.normalized_shape, self.weight, self.bias, self.eps)
        return y if residual is None else (y, total)

    def _fusable(self, x: Tensor, residual: Tensor | None) -> bool:
        tensors = [t for t in (self.weight, self.bias, residual) if t is not None]
        return (x.stride(-1) == 1 and all(t.dtype == x.dtype and t.device == x.device for t in tensors)
                and (residual is None or (residual.shape == x.shape and residual.stride(-1) == 1)))


def _bias_act(hidden: Tensor, bias: Tensor | None, activation: str, act_module) -> Tensor:
    """bias_act(hidden, bias) where the op takes it; act_module(hidden + bias) otherwise (autocast)."""
    if bias is None or (bias.dtype == hidden.dtype and bias.device == hidden.device):
        return bias_act(hidden, bias, activation)
    return act_module(hidden + bias)


def _mlp_forward(activation: str, conv1d: bool):
    def forward(self, hidden_states):
        """GPT2MLP / GPTNeoMLP.forward with c_fc's bias joined to the activation. GPT-2's Conv1D is
        y = x @ W + b with W [in, out]; GPT-Neo's Linear is y = x @ W.T + b."""
        weight = self.c_fc.weight
        hidden = torch.matmul(hidden_states, weight) if conv1d else F.linear(hidden_states, weight)  # (..., inner)
        hidden = _bias_act(hidden, self.c_fc.bias, activation, self.act)
        return self.dropout(self.c_proj(hidden))
    return forward


# ----------------------------------------------------------------------------------------------------
# Blocks: the residual add folded into the norm that follows it
# ----------------------------------------------------------------------------------------------------

@functools.cache
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def _named_arguments(forward, module, *args, **kwargs) -> dict:
    """The arguments of a call to the original `forward`, by the names it gives them (its **kwargs merged
    in; defaults left out). A patched forward passes them on under those names: transformers renamed
    `past_key_values` to `cache` (5.2x), and this works, without deprecation warnings, on either side."""
    arguments = dict(_signature(forward).bind(module, *args, **kwargs).arguments)
    arguments.pop("self", None)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def _gpt2_block_forward(self, hidden_states, *args, **kwargs):
    """GPT2Block.forward with ln_2 fused with the attention's residual add (cross-attention blocks, and
    blocks whose ln_2 is not fused, run the original)."""
    original = type(self).forward
    arguments = _named_arguments(original, self, hidden_states, *args, **kwargs)
    if arguments.pop("encoder_hidden_states", None) is not None or not isinstance(self.ln_2, LayerNorm):
        return original(self, hidden_states, *args, **kwargs)
    arguments.pop("encoder_attention_mask", None)
    hidden_states = arguments.pop("hidden_states")
    attn_output, _ = self.attn(self.ln_1(hidden_states), **arguments)
    normed, hidden_states = self.ln_2(attn_output, hidden_states)  # LN(attn + residual), attn + residual
    return hidden_states + self.mlp(normed)


def _gpt_neo_block_forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=False,
                           output_attentions=False, **kwargs):
    """GPTNeoBlock.forward with ln_2 fused with the attention's residual add."""
    if not isinstance(self.ln_2, LayerNorm):
        return type(self).forward(self, hidden_states, layer_past=layer_past, attention_mask=attention_mask,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    attn_output, attn_weights = self.attn(self.ln_1(hidden_states), layer_past=layer_past,
                                          attention_mask=attention_mask, use_cache=use_cache,
                                          output_attentions=output_attentions)
    normed, hidden_states = self.ln_2(attn_output, hidden_states)  # LN(attn + residual), attn + residual
    return hidden_states + self.mlp(normed), attn_weights


def _opt_layer_forward(activation: str | None):
    def forward(self, hidden_states, *args, **kwargs):
        """OPTDecoderLayer.forward with the residual adds folded into the norms that follow them (pre-LN:
        the attention's add into final_layer_norm; post-LN, opt-350m: both adds) when the norms are
        fused, and fc1's bias + activation fused when `activation` is given."""
        arguments = _named_arguments(type(self).forward, self, hidden_states, *args, **kwargs)
        hidden_states = arguments.pop("hidden_states")
        arguments.pop("use_cache", None)  # the attention takes the cache itself, not the flag
        fused_norms = isinstance(self.final_layer_norm, LayerNorm)
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        attn_output, _ = self.self_attn(hidden_states=hidden_states, **arguments)
        attn_output = F.dropout(attn_output, p=self.dropout, training=self.training)
        if self.do_layer_norm_before:
            if fused_norms:
                mlp_input, residual = self.final_layer_norm(attn_output, residual)
            else:
                residual = residual + attn_output
                mlp_input = self.final_layer_norm(residual)
        else:
            if fused_norms:
                residual, _ = self.self_attn_layer_norm(attn_output, residual)
            else:
                residual = self.self_attn_layer_norm(residual + attn_output)
            mlp_input = residual
        if activation is None:
            hidden = self.activation_fn(self.fc1(mlp_input))
        else:
            hidden = _bias_act(F.linear(mlp_input, self.fc1.weight), self.fc1.bias, activation, self.activation_fn)
        hidden = F.dropout(self.fc2(hidden), p=self.dropout, training=self.training)
        if self.do_layer_norm_before:
            return residual + hidden
        if fused_norms:
            return self.final_layer_norm(hidden, residual)[0]
        return self.final_layer_norm(residual + hidden)
    return forward


# ----------------------------------------------------------------------------------------------------
# Patching machinery: every change is recorded on the module it touches
# ----------------------------------------------------------------------------------------------------

def _saved(module: torch.nn.Module) -> dict:
    if _SAVED not in module.__dict__:
        setattr(module, _SAVED, {})
    return module.__dict__[_SAVED]


def _forward_attribute(module: torch.nn.Module) -> str:
    """accelerate's hooks (device_map placement) keep the module's own forward in `_old_forward` and
    call it from theirs: replace that one, so the hooks keep moving tensors between devices."""
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def _override_forward(module: torch.nn.Module, function) -> None:
    attribute = _forward_attribute(module)
    saved = _saved(module)
    if "forward" not in saved:
        saved["forward"] = (attribute, module.__dict__.get(attribute))
    setattr(module, attribute, types.MethodType(function, module))


def _swap_class(module: torch.nn.Module, cls: type) -> None:
    saved = _saved(module)
    saved.setdefault("class", type(module))
    module.__class__ = cls
    if "_old_forward" in module.__dict__:
        _override_forward(module, cls.forward)


def _restore(module: torch.nn.Module) -> None:
    saved = module.__dict__.pop(_SAVED, None)
    if not saved:
        return
    if "class" in saved:
        module.__class__ = saved["class"]
    if "forward" in saved:
        attribute, original = saved["forward"]
        if original is None:
            module.__dict__.pop(attribute, None)
        else:
            setattr(module, attribute, original)


def _use_fused_attention(stack: torch.nn.Module) -> None:
    """Route the stack's masks (and GPT-2 / OPT attention) through "fusedgpt"; the config is shared by
    the head model and every module of the stack."""
    register()
    setattr(stack, _SAVED_ATTENTION, stack.config._attn_implementation)
    stack.config._attn_implementation = ATTENTION_NAME


def _fuse_layer_norms(stack: torch.nn.Module) -> None:
    for module in stack.modules():
        if (type(module) is torch.nn.LayerNorm and len(module.normalized_shape) == 1
                and module.normalized_shape[0] <= MAX_COLUMNS):
            _swap_class(module, PatchedLayerNorm)


def _fused_activation(config) -> str | None:
    name = getattr(config, "activation_function", None)
    if name not in FUSED_ACTIVATIONS:
        warnings.warn(f"fusedgpt.patch: activation {name!r} has no fused kernel (fusedgpt.ops.bias_act takes "
                      f"{sorted(FUSED_ACTIVATIONS)}); the MLP is left as it is", UserWarning, stacklevel=4)
        return None
    return FUSED_ACTIVATIONS[name]


def _patch_stack(key: str, stack: torch.nn.Module, attention: bool, layer_norm: bool, mlp: bool) -> None:
    family = FAMILIES[key]
    if attention:
        _use_fused_attention(stack)
        for module in _modules_of(stack, family, family.self_attention):
            _override_forward(module, _gpt_neo_attention_forward)
    if layer_norm:
        _fuse_layer_norms(stack)
    activation = _fused_activation(stack.config) if mlp else None
    if key == "opt":
        if layer_norm or activation:
            for layer in _modules_of(stack, family, family.block):
                _override_forward(layer, _opt_layer_forward(activation))
        return
    if layer_norm:
        for block in _modules_of(stack, family, family.block):
            _override_forward(block, _gpt2_block_forward if key == "gpt2" else _gpt_neo_block_forward)
    if activation:
        mlp_forward = _mlp_forward(activation, conv1d=key == "gpt2")
        for module in _modules_of(stack, family, family.mlp):
            _override_forward(module, mlp_forward)


def require_transformers(what: str) -> None:
    """Raises ImportError saying how to install transformers when it is missing (an optional dependency)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"{what} needs Hugging Face transformers, which is not installed: "
                          "pip install 'fusedgpt[hf]' (or pip install 'transformers>=5.17')")


def _patch(model: torch.nn.Module, wanted: str | None, attention: bool, layer_norm: bool, mlp: bool):
    require_transformers("fusedgpt.patch")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fusedgpt.patch: model must be a torch.nn.Module (a transformers model), "
                        f"got {type(model).__name__}")
    stacks = _stacks(model)
    if not stacks or (wanted is not None and any(key != wanted for key, _ in stacks)):
        raise _unsupported_model(model, wanted)
    unpatch(model)  # patching twice starts again from the original
    for key, stack in stacks:
        _patch_stack(key, stack, bool(attention), bool(layer_norm), bool(mlp))
    return model


def patch(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True):
    """Put fusedgpt's fused kernels into a transformers GPT-2, OPT or GPT-Neo model, in place; returns it.

    attention: fused attention (GPT-2 / OPT through transformers' AttentionInterface as "fusedgpt",
    GPT-Neo at module level with its local window and unscaled scores); layer_norm: fused LayerNorms
    with the residual add folded in; mlp: the first MLP projection's bias + activation fused.
    Parameters, buffers and state-dict keys stay the same objects and names; unpatch(model) restores
    the original behaviour exactly. Patching a patched model starts again from the original. Any head
    type transformers ships works; another model is a TypeError listing the supported ones."""
    return _patch(model, None, attention, layer_norm, mlp)


def patch_gpt2(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True):
    """patch() for GPT-2 models only (GPT2Model, GPT2LMHeadModel, ...); anything else is a TypeError."""
    return _patch(model, "gpt2", attention, layer_norm, mlp)


def patch_opt(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True):
    """patch() for OPT models only (OPTModel, OPTForCausalLM, ...); anything else is a TypeError."""
    return _patch(model, "opt", attention, layer_norm, mlp)


def patch_gpt_neo(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True):
    """patch() for GPT-Neo models only (GPTNeoModel, GPTNeoForCausalLM, ...); anything else is a TypeError."""
    return _patch(model, "gpt_neo", attention, layer_norm, mlp)


def unpatch(model: torch.nn.Module):
    """Undo patch() on the model (or on whatever part of it was patched): original classes, forwards and
    attention implementation. A model that was never patched is returned unchanged."""
    for module in list(model.modules()):
        _restore(module)
        if _SAVED_ATTENTION in module.__dict__:
            module.config._attn_implementation = module.__dict__.pop(_SAVED_ATTENTION)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """Whether patch() has changed anything in the model."""
    return any(_SAVED in module.__dict__ or _SAVED_ATTENTION in module.__dict__ for module in model.modules())


# ----------------------------------------------------------------------------------------------------
# Registration with transformers
# ----------------------------------------------------------------------------------------------------

def register() -> None:
    """Registers "fusedgpt" with transformers' AttentionInterface and AttentionMaskInterface (imports
    transformers; idempotent). Runs by itself when transformers.modeling_utils is first imported."""
    global _causal_mask_function, _eager_mask, _output_collector
    require_transformers("fusedgpt.patching.register")
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, eager_mask
    from transformers.modeling_utils import AttentionInterface

    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: output_attentions is then not detected for GPT-2 / OPT
        _active_collector = None
    _causal_mask_function, _eager_mask, _output_collector = causal_mask_function, eager_mask, _active_collector
    AttentionInterface.register(ATTENTION_NAME, fusedgpt_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fusedgpt_mask)
    _register_gpt_neo_attention()


def _register_gpt_neo_attention() -> None:
    """GPT-Neo builds its attention modules from GPT_NEO_ATTENTION_CLASSES[config._attn_implementation], not
    through AttentionInterface. Without an entry there, a config that says "fusedgpt" (a patched model's,
    shared with every copy of it, or attn_implementation="fusedgpt") could build no GPT-Neo model at all
    (KeyError). The entry is GPT-Neo's own eager attention class with the fused forward."""
    try:
        from transformers.models.gpt_neo import modeling_gpt_neo
    except ImportError:  # a transformers without GPT-Neo
        return
    classes = getattr(modeling_gpt_neo, "GPT_NEO_ATTENTION_CLASSES", None)
    if isinstance(classes, dict) and ATTENTION_NAME not in classes:
        classes[ATTENTION_NAME] = type("FusedGPTNeoSelfAttention", (modeling_gpt_neo.GPTNeoSelfAttention,), {
            "forward": _gpt_neo_attention_forward,
            "__doc__": "GPTNeoSelfAttention on fusedgpt's attention kernel (local window, unscaled scores).",
        })


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers.modeling_utils like the path finder does, and calls register() right after the
    module has run; then steps out of sys.meta_path."""

    TARGET = "transformers.modeling_utils"

    def find_spec(self, name, path, target=None):
        if name != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _remove_import_hook()
            register()

        spec.loader.exec_module = exec_module
        return spec


def _remove_import_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterOnImport)]


def _register_now_or_on_import() -> None:
    if _RegisterOnImport.TARGET in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport())


_register_now_or_on_import()
