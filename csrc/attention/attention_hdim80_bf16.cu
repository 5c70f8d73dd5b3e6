// Prefill attention instantiation: head dim 80, bf16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__nv_bfloat16, 80>(const fusedgpt::attention::Params&, cudaStream_t);
