"""patch(model): put fusedgpt's fused kernels into a Hugging Face GPT-2, OPT or GPT-Neo model in place,
and unpatch(model) to take them out again. Most users already hold a transformers model; one call makes
it fast without changing their code, and the model keeps its classes, parameters and state-dict keys.

What patch() changes, per decoder block (every head type: *Model, *ForCausalLM / LMHead, sequence
classification, question answering, token classification, GPT-2's double heads):
  - attention: GPT-2 and OPT go through transformers' AttentionInterface and AttentionMaskInterface as
    "fusedgpt" (attention.py; registration.py registers it); patch() sets it on the model's config.
    GPT-Neo's attention forward is replaced at module level (gpt_neo.py: unscaled scores, the local
    layers' window), and GPT-Neo's attention class is registered under "fusedgpt" too.
  - layer_norm: every torch.nn.LayerNorm becomes a fusedgpt.nn.LayerNorm (the same object: its class is
    swapped, its parameters untouched), and the block's forward is rewritten so the residual add before
    the second norm is folded into it (LN(attn + residual) and the sum in one pass; OPT's post-LN
    layers fold both adds). The add before the first norm belongs to the previous block and stays apart.
  - mlp: the first projection's bias + activation in one fusedgpt.ops.bias_act (GPT-2's Conv1D as
    x @ W then bias_act; OPT's fc1 + ReLU; GPT-Neo's c_fc + GELU-tanh).
And on the language-model head (GPT2LMHeadModel, OPTForCausalLM, GPTNeoForCausalLM), loss: a training
call with labels takes its loss from fusedgpt.ops.linear_cross_entropy on the last hidden states, never
making the logits (layers.causal_lm_forward). Every fused op has a backward: a patched model trains on
the kernels.
Everything replaced is recorded on the module it came from (restore.py), so unpatch() restores the
original behaviour exactly, deep copies of a patched model stay independent, and patching twice
starts again from the original (the new flags win).

Fallbacks, each with a one-time warnings.warn: output_attentions=True, a head_mask, attention dropout
(training), cross-attention / non-causal masks, a padding mask that is not left padding (right padding,
holes: a host check per forward, as transformers' sdpa mask makes; skipped while torch.compile traces
and in the decode steps over a static cache, where the prompt's prefill has checked it), packed
sequences or custom mask functions, and custom 4D masks run transformers' eager attention for that
call (GPT-2's upcast path where the model asks for it). transformers 5.x has no head_mask argument on
these models any more: one passed anyway reaches GPT-2's and OPT's attention as a keyword and is
refused there. Inputs the fused norm / bias_act cannot take (mixed dtypes under autocast) run the plain
PyTorch expression, silently. On the CPU every op runs its PyTorch path (or the Triton kernels under
TRITON_INTERPRET=1), as fusedgpt.ops decides.

The modules: this file holds the entry points and which classes each family patches (the way
Liger-Kernel keeps its apply_* functions apart from the per-model forwards); attention.py the mask and
attention entries; restore.py the record / restore; gpt2.py, opt.py, gpt_neo.py each family's forwards,
layers.py what they share; registration.py register() and the registration on transformers' import.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fusedgpt.ops.layer_norm import MAX_COLUMNS
from fusedgpt.patching import gpt2, gpt_neo, opt
from fusedgpt.patching.attention import ATTENTION_NAME, fusedgpt_attention, fusedgpt_mask
from fusedgpt.patching.layers import FUSED_ACTIVATIONS, PatchedLayerNorm, causal_lm_forward, mlp_forward
from fusedgpt.patching.registration import register, register_now_or_on_import, require_transformers
from fusedgpt.patching.restore import is_recorded, override_forward, restore, set_attention_implementation, swap_class

__all__ = ["patch", "patch_gpt2", "patch_opt", "patch_gpt_neo", "unpatch", "is_patched", "register",
           "require_transformers", "fusedgpt_attention", "fusedgpt_mask", "PatchedLayerNorm", "ATTENTION_NAME",
           "FAMILIES", "FUSED_ACTIVATIONS"]


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
    causal_lm: str  # the language-model head whose training loss patch() fuses


FAMILIES = {
    "gpt2": Family("GPT-2", "transformers.models.gpt2.modeling_gpt2", "GPT2Model", "GPT2Block", "GPT2MLP", None,
                   ("GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
                    "GPT2ForTokenClassification", "GPT2ForQuestionAnswering"), "GPT2LMHeadModel"),
    "opt": Family("OPT", "transformers.models.opt.modeling_opt", "OPTDecoder", "OPTDecoderLayer", None, None,
                  ("OPTModel", "OPTForCausalLM", "OPTForSequenceClassification", "OPTForQuestionAnswering"),
                  "OPTForCausalLM"),
    "gpt_neo": Family("GPT-Neo", "transformers.models.gpt_neo.modeling_gpt_neo", "GPTNeoModel", "GPTNeoBlock",
                      "GPTNeoMLP", "GPTNeoSelfAttention",
                      ("GPTNeoModel", "GPTNeoForCausalLM", "GPTNeoForSequenceClassification",
                       "GPTNeoForTokenClassification", "GPTNeoForQuestionAnswering"), "GPTNeoForCausalLM"),
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
# Patching a decoder stack
# ----------------------------------------------------------------------------------------------------

def _fuse_layer_norms(stack: torch.nn.Module) -> None:
    for module in stack.modules():
        if (type(module) is torch.nn.LayerNorm and len(module.normalized_shape) == 1
                and module.normalized_shape[0] <= MAX_COLUMNS):
            swap_class(module, PatchedLayerNorm)


def _fused_activation(config) -> str | None:
    name = getattr(config, "activation_function", None)
    if name not in FUSED_ACTIVATIONS:
        warnings.warn(f"fusedgpt.patch: activation {name!r} has no fused kernel (fusedgpt.ops.bias_act takes "
                      f"{sorted(FUSED_ACTIVATIONS)}); the MLP is left as it is", UserWarning, stacklevel=4)
        return None
    return FUSED_ACTIVATIONS[name]


def _patch_stack(key: str, stack: torch.nn.Module, fuse_attention: bool, layer_norm: bool, mlp: bool) -> None:
    family = FAMILIES[key]
    if fuse_attention:
        register()
        set_attention_implementation(stack, ATTENTION_NAME)  # the stack's masks, GPT-2 / OPT attention
        for module in _modules_of(stack, family, family.self_attention):
            override_forward(module, gpt_neo.attention_forward)
    if layer_norm:
        _fuse_layer_norms(stack)
    activation = _fused_activation(stack.config) if mlp else None
    if key == "opt":
        if layer_norm or activation:
            for layer in _modules_of(stack, family, family.block):
                override_forward(layer, opt.layer_forward(activation))
        return
    if layer_norm:
        for block in _modules_of(stack, family, family.block):
            override_forward(block, gpt2.block_forward if key == "gpt2" else gpt_neo.block_forward)
    if activation:
        forward = mlp_forward(activation, conv1d=key == "gpt2")
        for module in _modules_of(stack, family, family.mlp):
            override_forward(module, forward)


def _patch(model: torch.nn.Module, wanted: str | None, attention: bool, layer_norm: bool, mlp: bool,
           loss: bool):
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
    if loss:
        for key, family in FAMILIES.items():
            for head in _modules_of(model, family, family.causal_lm):
                override_forward(head, causal_lm_forward(type(head).forward))
    return model


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------

def patch(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
          loss: bool = True):
    """Put fusedgpt's fused kernels into a transformers GPT-2, OPT or GPT-Neo model, in place; returns it.

    attention: fused attention (GPT-2 / OPT through transformers' AttentionInterface as "fusedgpt",
    GPT-Neo at module level with its local window and unscaled scores); layer_norm: fused LayerNorms
    with the residual add folded in; mlp: the first MLP projection's bias + activation fused; loss: the
    *ForCausalLM training loss (labels given, gradients on) from fusedgpt.ops.linear_cross_entropy, which
    never makes the [tokens, vocab] logits (the output's logits are then None).
    Parameters, buffers and state-dict keys stay the same objects and names; unpatch(model) restores
    the original behaviour exactly. Patching a patched model starts again from the original. Any head
    type transformers ships works; another model is a TypeError listing the supported ones."""
    return _patch(model, None, attention, layer_norm, mlp, loss)


def patch_gpt2(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
               loss: bool = True):
    """patch() for GPT-2 models only (GPT2Model, GPT2LMHeadModel, ...); anything else is a TypeError."""
    return _patch(model, "gpt2", attention, layer_norm, mlp, loss)


def patch_opt(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
              loss: bool = True):
    """patch() for OPT models only (OPTModel, OPTForCausalLM, ...); anything else is a TypeError."""
    return _patch(model, "opt", attention, layer_norm, mlp, loss)


def patch_gpt_neo(model: torch.nn.Module, attention: bool = True, layer_norm: bool = True, mlp: bool = True,
                  loss: bool = True):
    """patch() for GPT-Neo models only (GPTNeoModel, GPTNeoForCausalLM, ...); anything else is a TypeError."""
    return _patch(model, "gpt_neo", attention, layer_norm, mlp, loss)


def unpatch(model: torch.nn.Module):
    """Undo patch() on the model (or on whatever part of it was patched): original classes, forwards and
    attention implementation. A model that was never patched is returned unchanged."""
    for module in list(model.modules()):
        restore(module)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """Whether patch() has changed anything in the model."""
    return any(is_recorded(module) for module in model.modules())


register_now_or_on_import()
