"""What the family adapters (gpt2.py, opt.py, gpt_neo.py) share to turn a Hugging Face config and
checkpoint into models/gpt.py's GPTConfig and state dict: reading a config setting with the class
default for what old config.json files omit, Hugging Face's activation names, and taking tensors out of
a checkpoint by name (a missing one is a KeyError naming it), with the embeddings, final norm and
lm_head that GPT-2-style checkpoints lay out alike. Nothing here knows a particular family.
"""

from __future__ import annotations

import torch

from fusedgpt.models.gpt import GPTConfig
from fusedgpt.nn.bias_act import HF_ACTIVATIONS  # Hugging Face names -> fusedgpt's (gelu_fast: the same tanh)

Tensor = torch.Tensor


def hf_setting(hf_config: dict, defaults: dict, *names: str):
    """The first of `names` present in a Hugging Face config dict, else the class default for names[0]
    (config.json files written by old transformers versions omit settings added later)."""
    for name in names:
        if name in hf_config:
            return hf_config[name]
    return defaults[names[0]]


def activation_from_hf(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"activation_function {name!r} is not supported; fusedgpt runs {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def take(state: dict, key: str) -> Tensor:
    """Removes and returns state[key]; a missing key is a KeyError naming it."""
    if key not in state:
        raise KeyError(f"the checkpoint has no tensor {key!r}")
    return state.pop(key)


def take_gpt2_style_ends(state: dict, prefix: str) -> dict:
    """The token / position embeddings and final norm of GPT-2-style checkpoints (GPT-2, GPT-Neo):
    wte, wpe, ln_f under `prefix` -> GPT's names (removed from `state`)."""
    return {
        "embed_tokens.weight": take(state, prefix + "wte.weight"),
        "embed_positions.weight": take(state, prefix + "wpe.weight"),
        "ln_final.weight": take(state, prefix + "ln_f.weight"),
        "ln_final.bias": take(state, prefix + "ln_f.bias"),
    }


def take_lm_head(state: dict, out: dict, config: GPTConfig) -> None:
    """Moves lm_head.weight into `out` unless the embeddings are tied (then a saved copy is dropped)."""
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    else:
        out["lm_head.weight"] = take(state, "lm_head.weight")
