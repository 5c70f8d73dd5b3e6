// Prefill attention instantiation: head dim 80, fp16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__half, 80>(const fusedgpt::attention::Params&, cudaStream_t);
