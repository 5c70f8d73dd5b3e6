"""Record and restore: every change patch() makes is recorded on the module it touches, so unpatch()
puts back exactly what was there, a deep copy of a patched model carries its own record (and stays
independent), and patching twice can start again from the original.

On each patched module, `_fusedgpt_saved` holds {"class": original class, "forward": (attribute, value)};
on each patched decoder stack, `_fusedgpt_saved_attn_implementation` holds the config's attention
implementation before patch() set "fusedgpt".
"""

from __future__ import annotations

import types

import torch

SAVED = "_fusedgpt_saved"
SAVED_ATTENTION = "_fusedgpt_saved_attn_implementation"


def _saved(module: torch.nn.Module) -> dict:
    if SAVED not in module.__dict__:
        setattr(module, SAVED, {})
    return module.__dict__[SAVED]


def _forward_attribute(module: torch.nn.Module) -> str:
    """accelerate's hooks (device_map placement) keep the module's own forward in `_old_forward` and
    call it from theirs: replace that one, so the hooks keep moving tensors between devices."""
    return "_old_forward" if "_old_forward" in module.__dict__ else "forward"


def override_forward(module: torch.nn.Module, function) -> None:
    """Gives this module instance `function` as its forward (bound to it); the first original is kept."""
    attribute = _forward_attribute(module)
    saved = _saved(module)
    if "forward" not in saved:
        saved["forward"] = (attribute, module.__dict__.get(attribute))
    setattr(module, attribute, types.MethodType(function, module))


def swap_class(module: torch.nn.Module, cls: type) -> None:
    """Makes the module an instance of `cls` (same object, parameters untouched); the first class is kept."""
    saved = _saved(module)
    saved.setdefault("class", type(module))
    module.__class__ = cls
    if "_old_forward" in module.__dict__:
        override_forward(module, cls.forward)


def set_attention_implementation(stack: torch.nn.Module, name: str) -> None:
    """Sets the config's attention implementation (shared by the head model and every module of the
    stack), keeping the one it had."""
    setattr(stack, SAVED_ATTENTION, stack.config._attn_implementation)
    stack.config._attn_implementation = name


def restore(module: torch.nn.Module) -> None:
    """Undoes what was recorded on this module (nothing if nothing was)."""
    saved = module.__dict__.pop(SAVED, None) or {}
    if "class" in saved:
        module.__class__ = saved["class"]
    if "forward" in saved:
        attribute, original = saved["forward"]
        if original is None:
            module.__dict__.pop(attribute, None)
        else:
            setattr(module, attribute, original)
    if SAVED_ATTENTION in module.__dict__:
        module.config._attn_implementation = module.__dict__.pop(SAVED_ATTENTION)


def is_recorded(module: torch.nn.Module) -> bool:
    """Whether patch() changed this module."""
    return SAVED in module.__dict__ or SAVED_ATTENTION in module.__dict__
