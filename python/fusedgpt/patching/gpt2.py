"""GPT-2's patched forward: GPT2Block with ln_2 fused with the attention's residual add. (GPT-2's
attention goes through AttentionInterface, attention.py; its MLP forward is layers.mlp_forward with
the Conv1D weight.)
"""

from __future__ import annotations

from fusedgpt.nn import LayerNorm
from fusedgpt.patching.layers import named_arguments


def block_forward(self, hidden_states, *args, **kwargs):
    """GPT2Block.forward with ln_2 fused with the attention's residual add (cross-attention blocks, and
    blocks whose ln_2 is not fused, run the original)."""
    original = type(self).forward
    arguments = named_arguments(original, self, hidden_states, *args, **kwargs)
    if arguments.pop("encoder_hidden_states", None) is not None or not isinstance(self.ln_2, LayerNorm):
        return original(self, hidden_states, *args, **kwargs)
    arguments.pop("encoder_attention_mask", None)
    hidden_states = arguments.pop("hidden_states")
    attn_output, _ = self.attn(self.ln_1(hidden_states), **arguments)
    normed, hidden_states = self.ln_2(attn_output, hidden_states)  # LN(attn + residual), attn + residual
    return hidden_states + self.mlp(normed)
