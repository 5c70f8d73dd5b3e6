// Prefill attention instantiation: head dim 64, bf16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__nv_bfloat16, 64>(const fusedgpt::attention::Params&, cudaStream_t);
