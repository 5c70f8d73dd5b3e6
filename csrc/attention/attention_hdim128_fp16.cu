// Prefill attention instantiation: head dim 128, fp16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__half, 128>(const fusedgpt::attention::Params&, cudaStream_t);
