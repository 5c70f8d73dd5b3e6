// Launch template of the prefill attention kernel; instantiated once per (dtype, head dim) in
// attention_hdim<D>_<dtype>.cu so the instantiations compile in parallel.
#pragma once

#include "attention/attention_kernel.cuh"

namespace fusedgpt::attention {

// Returns the status of the shared-memory opt-in (the host function checks it; the launch itself is
// checked there by C10_CUDA_KERNEL_LAUNCH_CHECK). No c10 header here: the instantiation files stay light.
template <typename Element, int HEAD_DIM>
cudaError_t launch(const Params& params, cudaStream_t stream) {
  const dim3 grid((params.q_len + kBlockM - 1) / kBlockM, params.batch * params.heads);
  constexpr int kSharedBytes = Tile<HEAD_DIM>::kSharedBytes;
  if constexpr (kSharedBytes > 48 * 1024) {  // more than the default needs the kernel's opt-in
    const cudaError_t status = cudaFuncSetAttribute(attention_fwd_kernel<Element, HEAD_DIM>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
    if (status != cudaSuccess) return status;
  }
  attention_fwd_kernel<Element, HEAD_DIM><<<grid, kThreads, kSharedBytes, stream>>>(params);
  return cudaSuccess;
}

}  // namespace fusedgpt::attention
