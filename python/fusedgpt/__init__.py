"""fusedgpt: hand-written CUDA and Triton kernels for GPT-style causal language models (OPT, GPT-2,
GPT-Neo) in PyTorch. `fusedgpt.ops` holds the kernels' public functions, `fusedgpt.nn` the drop-in
modules; `fusedgpt info` says what this install can run."""

from fusedgpt import nn, ops
from fusedgpt._extension import extension_available, extension_cuda_archs, extension_unavailable_reason

__version__ = "0.1.0"

__all__ = ["nn", "ops", "extension_available", "extension_cuda_archs", "extension_unavailable_reason",
           "__version__"]
