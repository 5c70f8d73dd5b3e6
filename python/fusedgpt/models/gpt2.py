"""GPT-2 (small to XL) as a fusedgpt GPT: the Hugging Face config's settings and the checkpoint's
tensors mapped onto models/gpt.py (with convert.py's shared helpers). Nothing else lives here.

GPT-2 specifics: Conv1D weights are stored [in, out] (transposed here to Linear's [out, in]); gelu_new
is bias_act's "gelu_tanh"; scale_attn_weights (D^-0.5, else 1) and scale_attn_by_inverse_layer_idx
(also / (layer + 1)) become per-layer attention scales; reorder_and_upcast_attn (Hugging Face's fp32
attention for fp16 models) needs nothing: fusedgpt's attention kernels always compute q.k and the
softmax in fp32. The lm_head is tied to wte.
"""

from __future__ import annotations

import torch

from fusedgpt.models.convert import activation_from_hf, hf_setting, take, take_gpt2_style_ends, take_lm_head
from fusedgpt.models.gpt import GPTConfig

MODEL_TYPE = "gpt2"

# transformers.GPT2Config's defaults for every setting read below.
DEFAULTS = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}

# Buffers some GPT-2 checkpoints carry (causal masks): not weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def convert_config(hf: dict) -> GPTConfig:
    def setting(*names):
        return hf_setting(hf, DEFAULTS, *names)

    if setting("add_cross_attention"):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is an encoder-decoder "
                         "component; fusedgpt runs decoder-only language models")
    hidden = setting("n_embd", "hidden_size")
    layers = setting("n_layer", "num_hidden_layers")
    heads = setting("n_head", "num_attention_heads")
    base_scale = (hidden // heads) ** -0.5 if setting("scale_attn_weights") else 1.0
    by_layer = setting("scale_attn_by_inverse_layer_idx")
    return GPTConfig(
        family=MODEL_TYPE, vocab_size=setting("vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, ffn_size=setting("n_inner") or 4 * hidden,
        max_positions=setting("n_positions", "max_position_embeddings"),
        activation=activation_from_hf(setting("activation_function")),
        layer_norm_eps=setting("layer_norm_epsilon"),
        attention_scales=[base_scale / (layer + 1) if by_layer else base_scale for layer in range(layers)],
        tie_word_embeddings=setting("tie_word_embeddings"),
        bos_token_id=setting("bos_token_id"), eos_token_id=setting("eos_token_id"),
        pad_token_id=setting("pad_token_id"),
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face GPT2LMHeadModel tensors (with or without the `transformer.` prefix of old
    checkpoints) -> GPT's state dict, plus the checkpoint keys left unused."""
    state = dict(state)
    prefix = "transformer." if any(key.startswith("transformer.") for key in state) else ""
    out = take_gpt2_style_ends(state, prefix)
    for layer in range(config.num_layers):
        source, target = f"{prefix}h.{layer}.", f"blocks.{layer}."
        for name, hf_name in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            out[target + name + ".weight"] = take(state, source + hf_name + ".weight")
            out[target + name + ".bias"] = take(state, source + hf_name + ".bias")
        for name, hf_name in (("qkv", "attn.c_attn"), ("out", "attn.c_proj"), ("fc_in", "mlp.c_fc"),
                              ("fc_out", "mlp.c_proj")):
            out[target + name + ".weight"] = take(state, source + hf_name + ".weight").t()  # Conv1D [in, out]
            out[target + name + ".bias"] = take(state, source + hf_name + ".bias")
    take_lm_head(state, out, config)
    unused = [key for key in state if not key.endswith(IGNORED_SUFFIXES)]
    return out, unused
