"""Tiny random-initialised transformers models of every family and variant fusedgpt supports, shared by
the tests in tests/models: the GPT-2, OPT and GPT-Neo layouts (opt-350m's post-LN with project_in/out,
GPT-2's inverse-layer scaling, GPT-Neo's local layers with a small window so they matter at a few
tokens), with every parameter randomised (Hugging Face initialises LayerNorms to 1/0 and biases to 0,
which would hide a swapped or missing tensor), plus helpers to compare logits and build left-padded
batches."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from utils import assert_within_tolerance

transformers.logging.set_verbosity_error()

VOCAB = 100
# No special tokens: generation runs the full length unless a test sets eos_token_id itself.
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")


def gpt2_config(**overrides):
    settings = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, **NO_SPECIAL_TOKENS)
    return transformers.GPT2Config(**{**settings, **overrides})


def opt_config(**overrides):
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, max_position_embeddings=128,
                    vocab_size=VOCAB, **NO_SPECIAL_TOKENS)
    return transformers.OPTConfig(**{**settings, **overrides})


def gpt_neo_config(**overrides):
    settings = dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=8, max_position_embeddings=128, vocab_size=VOCAB, **NO_SPECIAL_TOKENS)
    return transformers.GPTNeoConfig(**{**settings, **overrides})


CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "opt": transformers.OPTForCausalLM,
           "gpt_neo": transformers.GPTNeoForCausalLM}

# name -> config factory; every variant the issue lists.
VARIANTS = {
    "gpt2": lambda: gpt2_config(),
    # inverse-layer scaling + fp32 attention, 3 heads of 16, a non-4x MLP
    "gpt2-scaled": lambda: gpt2_config(n_embd=48, n_head=3, n_layer=3, n_inner=80, scale_attn_by_inverse_layer_idx=True,
                                       reorder_and_upcast_attn=True),
    "gpt2-unscaled": lambda: gpt2_config(scale_attn_weights=False),
    "opt": lambda: opt_config(),  # opt-125m's layout: pre-LN, final norm
    "opt-350m": lambda: opt_config(do_layer_norm_before=False, word_embed_proj_dim=16),  # post-LN, project_in/out
    "opt-no-bias": lambda: opt_config(enable_bias=False, layer_norm_elementwise_affine=False,
                                      _remove_final_layer_norm=True),
    "gpt_neo": lambda: gpt_neo_config(),  # global, local (window 8)
    "gpt_neo-local": lambda: gpt_neo_config(attention_types=[[["local", "global", "local"], 1]], num_layers=3,
                                            window_size=5, intermediate_size=40),
}


def hf_model(variant: str) -> transformers.PreTrainedModel:
    config = VARIANTS[variant]()
    model = CLASSES[config.model_type](config).eval()
    randomize(model)
    return model


@torch.no_grad()
def randomize(model) -> None:
    """Random values in every parameter: LayerNorm weights around 1, everything else around 0."""
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1 and ("ln" in name or "layer_norm" in name) and name.endswith("weight"):
            parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
        else:
            parameter.normal_(0.0, 0.1)


def left_padded(batch_lengths: list[int], vocab: int = VOCAB, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, max] and their left-padded mask; pads hold `pad`."""
    width = max(batch_lengths)
    ids = torch.randint(0, vocab, (len(batch_lengths), width))
    mask = torch.zeros(len(batch_lengths), width, dtype=torch.int64)
    for row, length in enumerate(batch_lengths):
        mask[row, width - length:] = 1
        ids[row, :width - length] = pad
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face generate's position ids: cumsum(mask) - 1, pads at 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def assert_logits_match(hf, ours, ids, mask=None, what="logits") -> None:
    """The tolerance rule on the real tokens: ours against the Hugging Face model in float64, with the
    Hugging Face model `hf` (in ours' dtype) on the same padded batch as the plain-PyTorch baseline.
    The float64 reference runs each row alone, unpadded: OPT's eager attention casts float64's
    mask value to float32 (-inf), so its fully masked pad rows turn to NaN and leak through 0 * NaN."""
    mask = torch.ones_like(ids) if mask is None else mask
    reference_model = copy.deepcopy(hf).double()
    for module in reference_model.modules():  # GPT-2's fp32 upcast path refuses float64: same math without it
        if hasattr(module, "reorder_and_upcast_attn"):
            module.reorder_and_upcast_attn = False
    keep = mask.bool()
    reference = torch.cat([reference_model(ids[row:row + 1, keep[row]]).logits[0] for row in range(ids.shape[0])])
    baseline = hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    actual = ours(ids, mask)
    assert actual.shape == baseline.shape
    assert_within_tolerance(actual[keep], reference, baseline[keep], what)


def set_backend(monkeypatch, backend: str, device: str) -> None:
    """fusedgpt's models pick each op's backend from FUSEDGPT_BACKEND (fusedgpt.ops._backend)."""
    from utils import skip_unsupported

    skip_unsupported(backend, device, torch.float32)
    monkeypatch.setenv("FUSEDGPT_BACKEND", backend)


CPU_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]
