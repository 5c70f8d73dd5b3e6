"""What each backend of the ops supports: the op contract's limits, defined here once.

The ops' checks and backend decisions read these names; the Triton launchers assume them (they define
none); the C++ side's limits are generated from this file by csrc/generate_sources.py (csrc/op_limits.h,
which the host functions check and the attention dispatch switches expand, and the per-(head dim,
dtype) attention instantiation files), and the extension reports the head dims it was built with
(torch.ops.fusedgpt.cuda_head_dims()). Plain Python without imports, so that the generator can load
this file alone. Changing a value here means running `python csrc/generate_sources.py` and rebuilding.
"""

# Head dims the CUDA attention kernels (prefill and decode) are instantiated for: multiples of 16 (the
# mma's k step), at most 128 (32 lanes of 16-byte vectors in the decode kernel's float32 case).
CUDA_ATTENTION_HEAD_DIMS = (64, 80, 96, 128)
# Dtypes of the CUDA prefill attention (one instantiation file per head dim and dtype); float32 prefill
# runs on the Triton kernel. The CUDA decode attention also takes float32.
CUDA_ATTENTION_DTYPES = ("float16", "bfloat16")
CUDA_DECODE_ATTENTION_DTYPES = ("float16", "bfloat16", "float32")
# Largest head dim of the Triton attention kernels (the row of q and the accumulator stay in registers,
# padded to a power of two); larger head dims run on the torch backend.
TRITON_ATTENTION_MAX_HEAD_DIM = 256
# B * H of attention and decode_attention: both kernels put it on the launch grid's second axis, whose
# hardware limit this is; larger calls run on the torch backend.
MAX_BATCH_HEADS = 65535
# New tokens per sequence in one decode_attention call (speculative / chunked decode steps); prompts
# go through attention. Every backend refuses more.
MAX_NEW_TOKENS = 16
# LayerNorm's hidden size (x's last dim): the kernels hold a whole row on chip (the Triton kernel in
# registers, the CUDA kernel as at most 16 vectors per thread of 1024 threads). Every backend refuses more.
MAX_COLUMNS = 16384
# bias_act's activations: GELU with the tanh approximation (GPT-2, GPT-Neo), exact GELU (erf), ReLU (OPT).
ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
