// Prefill attention instantiation: head dim 64, fp16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__half, 64>(const fusedgpt::attention::Params&, cudaStream_t);
