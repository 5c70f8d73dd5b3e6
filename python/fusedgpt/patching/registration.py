"""Registration of "fusedgpt" with transformers: register() puts fusedgpt_attention and fusedgpt_mask
into AttentionInterface and AttentionMaskInterface and GPT-Neo's attention class under that name, so
that `attn_implementation="fusedgpt"` works in from_pretrained / from_config / set_attn_implementation,
and so does a patched model's config (which says "fusedgpt") wherever it builds new models.

patch() calls register() itself. `import fusedgpt` also registers, but without importing transformers
(optional, and slow to import): a finder on sys.meta_path waits for transformers.modeling_utils to be
imported and calls register() right after it has run (at once if it already has). It is kept for a
need that is written down: the README says that after `import fusedgpt`, attn_implementation="fusedgpt"
works in from_pretrained / from_config with no patch() first, and
tests/test_patching.py::test_import_registers_without_importing_transformers holds it to that.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys

from fusedgpt.patching import attention, gpt_neo


def require_transformers(what: str) -> None:
    """Raises ImportError saying how to install transformers when it is missing (an optional dependency)."""
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"{what} needs Hugging Face transformers, which is not installed: "
                          "pip install 'fusedgpt[hf]' (or pip install 'transformers>=5.17')")


def register() -> None:
    """Registers "fusedgpt" with transformers (imports it; idempotent): fusedgpt_attention in
    AttentionInterface, fusedgpt_mask in AttentionMaskInterface, and a GPTNeoSelfAttention on the fused
    kernel in GPT-Neo's attention classes. After it, `attn_implementation="fusedgpt"` works in
    from_pretrained / from_config / set_attn_implementation for GPT-2, OPT and GPT-Neo. patch() calls it;
    `import fusedgpt` calls it when transformers.modeling_utils is first imported; call it yourself to
    register at a moment of your choosing."""
    require_transformers("fusedgpt.patching.register")
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    attention.load_transformers()
    AttentionInterface.register(attention.ATTENTION_NAME, attention.fusedgpt_attention)
    AttentionMaskInterface.register(attention.ATTENTION_NAME, attention.fusedgpt_mask)
    gpt_neo.register_attention_class()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers.modeling_utils and GPT-Neo's modeling file like the path finder does, and
    registers right after each has run: register() after modeling_utils, GPT-Neo's attention class after
    GPT-Neo's file (which may be the one importing modeling_utils, and is then not yet complete when
    register() runs). Steps out of sys.meta_path once both have run."""

    TARGETS = {"transformers.modeling_utils": register,
               "transformers.models.gpt_neo.modeling_gpt_neo": gpt_neo.register_attention_class}

    def __init__(self):
        self.waiting = set(self.TARGETS)

    def find_spec(self, name, path, target=None):
        if name not in self.waiting:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            self.waiting.discard(name)
            if not self.waiting:
                _remove_import_hook()
            self.TARGETS[name]()

        spec.loader.exec_module = exec_module
        return spec


def _remove_import_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterOnImport)]


def register_now_or_on_import() -> None:
    """What `import fusedgpt` does: register() now if transformers.modeling_utils is imported, else once
    it is (nothing when transformers is not installed)."""
    if "transformers.modeling_utils" in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport())
