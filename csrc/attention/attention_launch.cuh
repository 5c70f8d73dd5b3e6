// Launch template of the prefill attention kernel; instantiated once per (dtype, head dim) in
// attention_hdim<D>_<dtype>.cu so the instantiations compile in parallel.
#pragma once

#include "attention/attention_kernel.cuh"

namespace fusedgpt::attention {

template <typename Element, int HEAD_DIM>
void launch(const Params& params, cudaStream_t stream) {
  const dim3 grid((params.q_len + kBlockM - 1) / kBlockM, params.batch * params.heads);
  attention_fwd_kernel<Element, HEAD_DIM><<<grid, kThreads, 0, stream>>>(params);
}

}  // namespace fusedgpt::attention
