"""GPT-Neo's patched forwards. Its attention does not go through transformers' AttentionInterface (5.x),
so GPTNeoSelfAttention's forward is replaced: unscaled scores (scale=1.0) and the local layers' sliding
window (window=config.window_size), which transformers' own flash path for GPT-Neo drops. GPT-Neo picks
its attention class by the config's name, so register_attention_class() adds "fusedgpt" there too. The
block forward folds the attention's residual add into ln_2; the MLP forward is layers.mlp_forward.
"""

from __future__ import annotations

from fusedgpt.nn import LayerNorm
from fusedgpt.patching.attention import ATTENTION_NAME, additive_mask, run_attention, unsupported, warn_once


def attention_forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                      output_attentions=False, **kwargs):
    """GPTNeoSelfAttention.forward on the fused kernel: unscaled scores, the local layers' window. Calls
    the kernels cannot serve run GPT-Neo's own eager attention (its _attn)."""
    batch, q_length, _ = hidden_states.shape
    heads_shape = (batch, q_length, self.num_heads, self.head_dim)
    query = self.q_proj(hidden_states).view(heads_shape)  # (B, S, H, D)
    key = self.k_proj(hidden_states).view(heads_shape)
    value = self.v_proj(hidden_states).view(heads_shape)
    if layer_past is not None:  # the cache holds (B, H, S, D)
        key, value = layer_past.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_id)
        key, value = key.transpose(1, 2), value.transpose(1, 2)  # (B, Sk, H, D)
    dropout = self.attn_dropout.p if self.training else 0.0
    reason = unsupported(query, key, value, attention_mask, causal=True, dropout=dropout,
                         output_attentions=output_attentions)
    weights = None
    if reason is None:
        window = self.config.window_size if self.attention_type == "local" else None
        output = run_attention(query, key, value, attention_mask, scale=1.0, window=window)  # (B, S, H, D)
    else:
        warn_once(reason)
        additive = additive_mask(attention_mask, q_length, key.shape[1], query.dtype, query.device)
        output, weights = self._attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), additive)
        output = output.transpose(1, 2)  # (B, S, H, D)
    output = self.out_proj(output.reshape(batch, q_length, self.embed_dim))
    return self.resid_dropout(output), weights


def block_forward(self, hidden_states, layer_past=None, attention_mask=None, use_cache=False,
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


def register_attention_class() -> None:
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
            "forward": attention_forward,
            "__doc__": "GPTNeoSelfAttention on fusedgpt's attention kernel (local window, unscaled scores).",
        })
