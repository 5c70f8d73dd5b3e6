// Stand-in for c10's CUDA device guard under the CPU emulator (tests/simt): tensors are on the CPU.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
