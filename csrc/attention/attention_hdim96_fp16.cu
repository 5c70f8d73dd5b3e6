// Prefill attention instantiation: head dim 96, fp16.
#include "attention/attention_launch.cuh"

template void fusedgpt::attention::launch<__half, 96>(const fusedgpt::attention::Params&, cudaStream_t);
