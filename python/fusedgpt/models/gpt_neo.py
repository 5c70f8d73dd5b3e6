"""GPT-Neo (125M to 2.7B) as a fusedgpt GPT: the Hugging Face config's settings and the checkpoint's
tensors mapped onto models/gpt.py (with convert.py's shared helpers). Nothing else lives here.

GPT-Neo specifics: attention_layers (or attention_types, e.g. [[["global", "local"], 12]]) makes each
layer global or local; a local layer sees the last window_size (256) keys, i.e. a query at p sees keys
in (p - 256, p]. Attention scores are NOT scaled (scale 1.0). q/k/v projections have no bias, out_proj
has one; gelu_new is bias_act's "gelu_tanh". Hugging Face computes q.k and the softmax in fp32, as
fusedgpt's kernels always do. The lm_head is tied to wte.
"""

from __future__ import annotations

import torch

from fusedgpt.models.convert import activation_from_hf, hf_setting, take, take_gpt2_style_ends, take_lm_head
from fusedgpt.models.gpt import GPTConfig

MODEL_TYPE = "gpt_neo"

# transformers.GPTNeoConfig's defaults for every setting read below.
DEFAULTS = {
    "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2048, "num_layers": 24,
    "attention_types": [[["global", "local"], 12]], "num_heads": 16, "intermediate_size": None, "window_size": 256,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
    "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}

IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")


def attention_layers(hf: dict) -> list[str]:
    """Per-layer "global" / "local": attention_layers when present, else attention_types expanded."""
    if "attention_layers" in hf:
        return list(hf["attention_layers"])
    return [kind for kinds, repeat in hf_setting(hf, DEFAULTS, "attention_types") for _ in range(repeat)
            for kind in kinds]


def convert_config(hf: dict) -> GPTConfig:
    def setting(*names):
        return hf_setting(hf, DEFAULTS, *names)

    layers = setting("num_layers", "num_hidden_layers")
    kinds = attention_layers(hf)
    if len(kinds) != layers or set(kinds) - {"global", "local"}:
        raise ValueError(f"GPT-Neo attention_layers must list 'global' or 'local' for each of the {layers} "
                         f"layers, got {kinds}")
    hidden = setting("hidden_size")
    window = setting("window_size")
    return GPTConfig(
        family=MODEL_TYPE, vocab_size=setting("vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=setting("num_heads", "num_attention_heads"), ffn_size=setting("intermediate_size") or 4 * hidden,
        max_positions=setting("max_position_embeddings"),
        activation=activation_from_hf(setting("activation_function")),
        layer_norm_eps=setting("layer_norm_epsilon"), qkv_bias=False,
        attention_scales=[1.0] * layers, attention_windows=[window if kind == "local" else None for kind in kinds],
        tie_word_embeddings=setting("tie_word_embeddings"),
        bos_token_id=setting("bos_token_id"), eos_token_id=setting("eos_token_id"),
        pad_token_id=setting("pad_token_id"),
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face GPTNeoForCausalLM tensors -> GPT's state dict, plus the checkpoint keys left unused."""
    state = dict(state)
    prefix = "transformer." if any(key.startswith("transformer.") for key in state) else ""
    out = take_gpt2_style_ends(state, prefix)
    for layer in range(config.num_layers):
        source, target = f"{prefix}h.{layer}.", f"blocks.{layer}."
        attn = source + "attn.attention."
        for name, hf_name in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2"), ("fc_in", "mlp.c_fc"), ("fc_out", "mlp.c_proj")):
            out[target + name + ".weight"] = take(state, source + hf_name + ".weight")
            out[target + name + ".bias"] = take(state, source + hf_name + ".bias")
        out[target + "qkv.weight"] = torch.cat([take(state, attn + f"{n}_proj.weight") for n in "qkv"])  # (3C, C)
        out[target + "out.weight"] = take(state, attn + "out_proj.weight")
        out[target + "out.bias"] = take(state, attn + "out_proj.bias")
    take_lm_head(state, out, config)
    unused = [key for key in state if not key.endswith(IGNORED_SUFFIXES)]
    return out, unused
