// Stand-in for c10's CUDA error checks under the CPU emulator (tests/simt): a launch that fails throws
// (simt::Launch does), and a runtime call's error status (cudaFuncSetAttribute's) throws here.
#pragma once

#include <stdexcept>
#include <string>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(EXPRESSION)                                                                       \
  do {                                                                                                   \
    const auto fusedgpt_simt_status = (EXPRESSION);                                                      \
    if (fusedgpt_simt_status != cudaSuccess) {                                                           \
      throw std::runtime_error("simt: CUDA error " + std::to_string(static_cast<int>(fusedgpt_simt_status)) + \
                               " from " #EXPRESSION);                                                    \
    }                                                                                                    \
  } while (0)
