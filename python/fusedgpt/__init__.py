"""fusedgpt: hand-written CUDA and Triton kernels for GPT-style causal language models (OPT, GPT-2,
GPT-Neo) in PyTorch. `fusedgpt.ops` holds the kernels' public functions, `fusedgpt.nn` the drop-in
modules, `fusedgpt.models` the GPT-2 / OPT / GPT-Neo models (from_pretrained, from_hf, load_tokenizer)
and `fusedgpt.generation` their generation loop; `fusedgpt info` says what this install can run."""

from fusedgpt import generation, models, nn, ops  # generation gives fusedgpt's GPT its generate method
from fusedgpt._extension import extension_available, extension_cuda_archs, extension_unavailable_reason
from fusedgpt.models import from_config, from_hf, from_pretrained, load_tokenizer
from fusedgpt.patching import patch, patch_gpt2, patch_gpt_neo, patch_opt, unpatch

__version__ = "0.1.0"

__all__ = ["generation", "models", "nn", "ops", "from_config", "from_hf", "from_pretrained", "load_tokenizer",
           "extension_available", "extension_cuda_archs", "extension_unavailable_reason", "__version__",
           "patch", "unpatch", "patch_gpt2", "patch_opt", "patch_gpt_neo"]
