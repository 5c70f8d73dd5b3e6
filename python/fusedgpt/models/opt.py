"""OPT (125m to 66b) as a fusedgpt GPT: the Hugging Face config's settings and the checkpoint's
tensors mapped onto models/gpt.py (with convert.py's shared helpers). Nothing else lives here.

OPT specifics: learned positions with an offset of 2 (rows 0 and 1 of embed_positions are never used
by real tokens); ReLU; do_layer_norm_before=False (opt-350m) is the post-LN block, and then there is
no final norm (nor with _remove_final_layer_norm); word_embed_proj_dim != hidden_size (opt-350m: 512
vs 1024) adds project_in / project_out around the blocks; enable_bias and
layer_norm_elementwise_affine switch the Linear biases and the LayerNorm parameters. Hugging Face
scales q after its projection; fusedgpt passes the same D^-0.5 to the attention kernel instead.
"""

from __future__ import annotations

import torch

from fusedgpt.models.convert import activation_from_hf, hf_setting, take, take_lm_head
from fusedgpt.models.gpt import GPTConfig

MODEL_TYPE = "opt"

# transformers.OPTConfig's defaults for every setting read below.
DEFAULTS = {
    "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
    "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
    "word_embed_proj_dim": None, "num_attention_heads": 12, "activation_function": "relu", "enable_bias": True,
    "layer_norm_elementwise_affine": True, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 2,
    "pad_token_id": 1,
}
POSITION_OFFSET = 2


def convert_config(hf: dict) -> GPTConfig:
    def setting(*names):
        return hf_setting(hf, DEFAULTS, *names)

    hidden = setting("hidden_size")
    pre_layer_norm = setting("do_layer_norm_before")
    bias = setting("enable_bias")
    return GPTConfig(
        family=MODEL_TYPE, vocab_size=setting("vocab_size"), hidden_size=hidden,
        num_layers=setting("num_hidden_layers"), num_heads=setting("num_attention_heads"),
        ffn_size=setting("ffn_dim"), max_positions=setting("max_position_embeddings"),
        activation=activation_from_hf(setting("activation_function")), layer_norm_eps=1e-5,
        layer_norm_affine=setting("layer_norm_elementwise_affine"), pre_layer_norm=pre_layer_norm,
        final_layer_norm=pre_layer_norm and not setting("_remove_final_layer_norm"),
        qkv_bias=bias, out_bias=bias, mlp_bias=bias, embed_size=setting("word_embed_proj_dim") or hidden,
        position_offset=POSITION_OFFSET, tie_word_embeddings=setting("tie_word_embeddings"),
        bos_token_id=setting("bos_token_id"), eos_token_id=setting("eos_token_id"),
        pad_token_id=setting("pad_token_id"),
    )


def convert_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face OPTForCausalLM tensors (`model.decoder.*`, or `decoder.*` as the facebook/opt
    checkpoints store them) -> GPT's state dict, plus the checkpoint keys left unused."""
    state = dict(state)
    prefix = "model.decoder." if any(key.startswith("model.decoder.") for key in state) else "decoder."
    out = {
        "embed_tokens.weight": take(state, prefix + "embed_tokens.weight"),
        "embed_positions.weight": take(state, prefix + "embed_positions.weight"),
    }
    if config.token_embed_size != config.hidden_size:
        out["project_in.weight"] = take(state, prefix + "project_in.weight")
        out["project_out.weight"] = take(state, prefix + "project_out.weight")
    norms = [("ln_final", prefix + "final_layer_norm")] if config.final_layer_norm else []
    for layer in range(config.num_layers):
        source, target = f"{prefix}layers.{layer}.", f"blocks.{layer}."
        norms += [(target + "ln_attn", source + "self_attn_layer_norm"),
                  (target + "ln_mlp", source + "final_layer_norm")]
        linears = [("qkv", [source + f"self_attn.{name}_proj" for name in "qkv"]),
                   ("out", [source + "self_attn.out_proj"]), ("fc_in", [source + "fc1"]), ("fc_out", [source + "fc2"])]
        for name, hf_names in linears:
            out[target + name + ".weight"] = torch.cat([take(state, n + ".weight") for n in hf_names])  # (out, in)
            if config.mlp_bias:  # enable_bias switches every Linear's bias at once
                out[target + name + ".bias"] = torch.cat([take(state, n + ".bias") for n in hf_names])
    if config.layer_norm_affine:
        for target, source in norms:
            out[target + ".weight"] = take(state, source + ".weight")
            out[target + ".bias"] = take(state, source + ".bias")
    take_lm_head(state, out, config)
    return out, list(state)
