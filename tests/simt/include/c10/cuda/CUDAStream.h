// Stand-in for c10's CUDA streams under the CPU emulator (tests/simt): launches run synchronously.
#pragma once

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda
