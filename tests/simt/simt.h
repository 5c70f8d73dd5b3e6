// A CPU emulator for fusedgpt's CUDA kernels, for machines without a GPU (CI): the real csrc/ sources,
// host code and kernels alike, compiled by the host C++ compiler with this header force-included
// (tests/simt/simt_emulator.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::simt::Launch("kernel", grid, block, smem, stream)(kernel, args)`, the first argument naming the kernel).
//
// Semantics emulated, one thread block at a time, every CUDA thread a fiber (ucontext) on one OS thread:
//   threadIdx / blockIdx / blockDim / gridDim; __shared__ (function-static storage, shared by the fibers
//   of the running block); __syncthreads (waits for every thread of the block that has not exited);
//   dynamic shared memory (filled with 0xff bytes at every block, sized by the launch, more than 48 KB only
//   after cudaFuncSetAttribute); cp.async (16-byte copies that land in shared memory only at the issuing
//   thread's cp.async.wait_group / wait_all, never at a __syncthreads); ex2.approx.ftz;
//   __shfl_xor_sync, mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate) and ldmatrix.x4 (.trans too) as
//   warp collectives: every lane
//   of the warp must arrive at the same collective with the same arguments, as the full 0xffffffff mask
//   demands; a lane that exits while its warp mates wait there, a divergent collective and a deadlock
//   are reported as errors naming the block and thread, never silently run.
// Between two synchronisation points the threads run one after another in a random order, reshuffled at
// every round (seeded by FUSEDGPT_SIMT_SEED, default 0, so a run is reproducible): a read of shared
// memory that a missing __syncthreads leaves unordered against its write then goes wrong in some runs
// instead of always seeing the same lucky order.
// The mma fragment layouts follow the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), written independently of the kernel that uses them, so a layout slip in a kernel shows up as
// a wrong result here. Not emulated: memory ordering between threads without a barrier (races), timing,
// and anything a real GPU adds (compute-sanitizer on a GPU covers those).
//
// The kernels know nothing of this header: csrc/intrinsics.h is the one file of csrc/ that tests
// FUSEDGPT_SIMT_EMULATION (defined below) or calls into namespace simt, and it holds the kernels' only
// inline PTX, each intrinsic behind a wrapper (mma_m16n8k16) whose emulator twin is here
// (tests/test_kernel_sources.py checks all three). Every new intrinsic (inline PTX: cp.async, ldmatrix,
// another mma shape or type, ...) gets its twin here first, defined from the PTX ISA rather than from
// the kernel that will use it, with a selftest kernel in selftest.cpp that tests/ops/test_cuda_emulated.py
// checks; then its wrapper in csrc/intrinsics.h, which the kernel calls. CUDA C++ built-ins keep their
// names (defined at the bottom of this file); a new one, or a use rejected here (another shuffle mask or
// width), is emulated and selftested here first too.
//
// Memory counters, in the build with FUSEDGPT_SIMT_COUNT=1 (memory_counters.cpp): gcc's ThreadSanitizer
// instrumentation, linked with no sanitizer runtime, calls back before every load and store of the
// library's code that may touch memory (not the registers it keeps); those a kernel's thread makes are
// logged, and at the end of each block the accesses of each warp are grouped into warp requests (the k-th
// execution of one static instruction by each lane of the warp is one request) and counted per kernel, by
// the name its launch has in the source, as Nsight Compute counts them:
//   shared memory (the __shared__ arrays, i.e. the library's own writable statics): wavefronts per
//   request over 32 banks of 4 bytes. Accesses of up to 4 bytes go in one phase of 32 lanes, 8-byte ones
//   in 2 half-warp phases, 16-byte ones in 4 quarter-warp phases; a phase with an active lane costs the
//   largest number of distinct 4-byte words that one bank holds among the words its lanes touch (lanes
//   reading the same word share it, a broadcast), against the ideal ceil(distinct words / 32). An
//   ldmatrix.x4 is each lane's 16-byte row (4 phases: one per 8x8 matrix, as the hardware's wavefronts);
//   a cp.async is a 16-byte global load where it is issued and a 16-byte shared store where it lands.
//   global memory (any other address but the thread's own stack): the 32-byte sectors a request touches
//   against the distinct bytes its lanes ask for (sector efficiency = bytes / (32 * sectors)).
// Registers and locals (the fiber's stack, where the host compiler spills) are not counted, nor is the
// emulator's own work (functions marked SIMT_UNCOUNTED, and UncountedScope inside them). Not modelled:
// L1/L2 caching and hit rates, timing and latency; constant memory (kernel parameters live on the stack
// here, and read-only data is not instrumented); accesses as nvcc would emit them rather than the host compiler (the counting build turns off the optimisations
// that change access widths, so a 16-byte uint4 copy stays one access); and divergence the grouping
// cannot see: a lane that skips a static instruction in one iteration of a loop and executes it in a
// later one has its later executions grouped into the wrong requests.
#pragma once

#define FUSEDGPT_SIMT_EMULATION 1

// SIMT_UNCOUNTED marks the emulator's own functions: in the counting build they are left uninstrumented
// (and gcc inlines neither way across the mark), so their memory accesses are never the kernel's.
#if defined(FUSEDGPT_SIMT_COUNT)
#define SIMT_UNCOUNTED __attribute__((no_sanitize_thread))
#else
#define SIMT_UNCOUNTED
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA keywords and built-in types -------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using cudaStream_t = struct CUstream_st*;

struct __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline __half __float2half_rn(float f) { return {c10::detail::fp16_ieee_from_fp32_value(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::detail::round_to_nearest_even(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// Device math the host library lacks, and CUDA's min/max overloads for mixed integer types.
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

namespace simt {

// ---- the scheduler ----------------------------------------------------------------------------------

enum class State { kRunnable, kAtBarrier, kInCollective, kExited };

struct Thread {
  ucontext_t context;
  uint3 index;
  int linear = 0;  // index in the block, x fastest: warp = linear / 32, lane = linear % 32
  int warp = 0, lane = 0;
  State state = State::kExited;
  uintptr_t stack_begin = 0, stack_end = 0;  // the fiber's stack: its locals and spilled registers
  int uncounted_depth = 0;  // > 0 while the emulator works on this thread's behalf (UncountedScope)
  // cp.async copies this thread issued and that have not landed: those since its last commit_group, and
  // the committed groups, oldest first (see cp_async_16).
  struct AsyncCopy {
    void* destination;
    unsigned char bytes[16];
  };
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> committed;
};

// The thread whose fiber runs, or nullptr (the scheduler's own code). A plain global rather than a member
// of the scheduler: the memory counters' callbacks read it before and while scheduler() is first built.
inline Thread* current_thread = nullptr;

// One warp collective in flight: inputs deposited lane by lane, outputs computed when the last lane
// arrives (so a lane that runs ahead into the next collective cannot clobber what the others read).
struct Slot {
  alignas(8) unsigned char bytes[48];
};
struct Warp {
  int lanes = 0, arrived = 0, exited = 0;
  const char* what = nullptr;  // the collective in flight, e.g. "__shfl_xor_sync"
  int argument = 0;
  void (*compute)(Warp&) = nullptr;
  Slot in[32], out[32];
};

struct Scheduler {
  dim3 grid, block;
  uint3 block_index{0, 0, 0};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<void*> stacks;
  ucontext_t scheduler_context;
  int live = 0, at_barrier = 0;
  void (*body)(const void*) = nullptr;  // runs the kernel for the current thread: body(body_data)
  const void* body_data = nullptr;
  std::mt19937 random{0};
  const void* scheduler_stack = nullptr;  // AddressSanitizer's view of the stack the launch runs on
  size_t scheduler_stack_bytes = 0;
  std::string error;
  bool running = false;
  size_t dynamic_shared_bytes = 0;  // the running launch's third argument
};

// Dynamic shared memory (`extern __shared__`): one buffer of the library (a writable static, so the memory
// counters count it as shared memory, as they do the __shared__ arrays), as large as an sm_90 block may
// have. Every block starts with it filled with 0xff bytes (NaN in every floating type), so a read before
// the block wrote it, or before its cp.async copies landed, is a wrong result; beyond the launch's size
// AddressSanitizer (the simt-asan build) stops any access.
inline constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;
alignas(128) inline unsigned char dynamic_shared[kMaxDynamicSharedBytes];
inline constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;  // above it, cudaFuncSetAttribute first

constexpr size_t kStackBytes = 256 * 1024;

SIMT_UNCOUNTED inline Scheduler& scheduler() {
  static Scheduler instance = []() SIMT_UNCOUNTED {
    Scheduler s;
    const char* seed = std::getenv("FUSEDGPT_SIMT_SEED");
    s.random.seed(seed != nullptr ? std::strtoul(seed, nullptr, 10) : 0);
    return s;
  }();
  return instance;
}

// Held while the emulator works inside a fiber (a collective, a barrier, an error report): the library
// code it calls (std::vector, std::string) is instrumented like the kernels, and must not be counted.
struct UncountedScope {
  Thread* thread;
  SIMT_UNCOUNTED UncountedScope() : thread(current_thread) {
    if (thread != nullptr) ++thread->uncounted_depth;
  }
  SIMT_UNCOUNTED ~UncountedScope() {
    if (thread != nullptr) --thread->uncounted_depth;
  }
  UncountedScope(const UncountedScope&) = delete;
  UncountedScope& operator=(const UncountedScope&) = delete;
};

// Context switches, annotated for AddressSanitizer when it is on (the build with
// FUSEDGPT_SIMT_SANITIZE=1), so that it follows the fibers' stacks and checks every access of the
// kernels, global and shared memory alike, for out-of-bounds reads and writes.
SIMT_UNCOUNTED inline void enter_fiber(ucontext_t* from, ucontext_t* to, const void* stack) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, stack, kStackBytes);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)stack;
  swapcontext(from, to);
#endif
}

SIMT_UNCOUNTED inline void fiber_started() {  // first thing a fiber does, and after every resumption
#if defined(__SANITIZE_ADDRESS__)
  Scheduler& s = scheduler();
  __sanitizer_finish_switch_fiber(nullptr, &s.scheduler_stack, &s.scheduler_stack_bytes);
#endif
}

SIMT_UNCOUNTED inline void leave_fiber(ucontext_t* from, bool finished) {
  Scheduler& s = scheduler();
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, s.scheduler_stack, s.scheduler_stack_bytes);
  if (finished) return;  // the fiber returns to uc_link
  swapcontext(from, &s.scheduler_context);
  __sanitizer_finish_switch_fiber(fake_stack, &s.scheduler_stack, &s.scheduler_stack_bytes);
#else
  if (!finished) swapcontext(from, &s.scheduler_context);
#endif
}

SIMT_UNCOUNTED inline std::string where() {
  const UncountedScope uncounted;
  const Scheduler& s = scheduler();
  std::string text = "block (" + std::to_string(s.block_index.x) + ", " + std::to_string(s.block_index.y) + ", " +
                     std::to_string(s.block_index.z) + ")";
  if (current_thread != nullptr) {
    text += ", thread " + std::to_string(current_thread->index.x) + " (warp " + std::to_string(current_thread->warp) +
            ", lane " + std::to_string(current_thread->lane) + ")";
  }
  return text;
}

// Records the error and leaves the running fiber for good; the launch then throws it.
[[noreturn]] SIMT_UNCOUNTED inline void fail(const std::string& message) {
  const UncountedScope uncounted;
  Scheduler& s = scheduler();
  if (s.error.empty()) s.error = "simt: " + message + " at " + where();
  Thread* self = current_thread;
  self->state = State::kExited;
  leave_fiber(&self->context, false);
  std::abort();  // never resumed
}

SIMT_UNCOUNTED inline void yield_to_scheduler() { leave_fiber(&current_thread->context, false); }

SIMT_UNCOUNTED inline void release_barrier_if_complete() {
  Scheduler& s = scheduler();
  if (s.at_barrier == 0 || s.at_barrier < s.live) return;
  for (Thread& t : s.threads) {
    if (t.state == State::kAtBarrier) t.state = State::kRunnable;
  }
  s.at_barrier = 0;
}

SIMT_UNCOUNTED inline void syncthreads() {
  const UncountedScope uncounted;
  Scheduler& s = scheduler();
  current_thread->state = State::kAtBarrier;
  ++s.at_barrier;
  release_barrier_if_complete();
  if (current_thread->state != State::kRunnable) yield_to_scheduler();
}

// Deposits this lane's input, waits for the whole warp, returns this lane's output slot.
SIMT_UNCOUNTED inline const Slot& warp_collective(const char* what, int argument, const void* input, size_t bytes,
                                                  void (*compute)(Warp&)) {
  const UncountedScope uncounted;
  Scheduler& s = scheduler();
  Thread* self = current_thread;
  Warp& warp = s.warps[self->warp];
  if (warp.exited > 0) {
    fail(std::string(what) + " with the full mask after " + std::to_string(warp.exited) +
         " lane(s) of the warp exited");
  }
  if (warp.arrived == 0) {
    warp.what = what;
    warp.argument = argument;
    warp.compute = compute;
  } else if (std::strcmp(warp.what, what) != 0 || warp.argument != argument) {
    fail(std::string("divergent warp collective: this lane is in ") + what + "(" + std::to_string(argument) +
         ") while others are in " + warp.what + "(" + std::to_string(warp.argument) + ")");
  }
  std::memcpy(warp.in[self->lane].bytes, input, bytes);
  self->state = State::kInCollective;
  if (++warp.arrived == warp.lanes) {
    warp.compute(warp);
    warp.arrived = 0;
    for (Thread& t : s.threads) {
      if (t.warp == self->warp && t.state == State::kInCollective) t.state = State::kRunnable;
    }
  } else {
    yield_to_scheduler();
  }
  return warp.out[self->lane];
}

SIMT_UNCOUNTED inline void fiber_main() {
  fiber_started();
  Scheduler& s = scheduler();
  try {
    s.body(s.body_data);  // the kernel: counted
  } catch (const std::exception& e) {
    const UncountedScope uncounted;
    if (s.error.empty()) s.error = std::string("simt: exception in a kernel: ") + e.what() + " at " + where();
  }
  const UncountedScope uncounted;
  Thread* self = current_thread;
  if (s.error.empty() && (!self->uncommitted.empty() || !self->committed.empty())) {
    s.error = "simt: a thread exited with cp.async copies that no cp.async.wait_group / wait_all landed at " +
              where();
  }
  self->state = State::kExited;
  --s.live;
  Warp& warp = s.warps[self->warp];
  ++warp.exited;
  if (warp.arrived > 0 && s.error.empty()) {
    s.error = "simt: a lane exited while " + std::to_string(warp.arrived) + " lane(s) of its warp wait in " +
              warp.what + " at " + where();
  }
  release_barrier_if_complete();
  leave_fiber(&self->context, true);  // returning switches to uc_link, the scheduler
}

#if defined(FUSEDGPT_SIMT_COUNT)
// The memory counters (memory_counters.cpp), called by the scheduler outside any fiber.
void counters_begin_launch(const char* kernel_name, const void* kernel_entry, int64_t threads_per_block,
                           size_t dynamic_shared_bytes);
void counters_end_block();  // groups the block's logged accesses into warp requests and counts them
void counters_end_launch();
#endif

SIMT_UNCOUNTED inline void run_block() {
  Scheduler& s = scheduler();
  const int count = static_cast<int>(s.block.x * s.block.y * s.block.z);
  s.threads.assign(count, Thread{});
  s.warps.assign((count + 31) / 32, Warp{});
  while (static_cast<int>(s.stacks.size()) < count) {
    void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (stack == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    s.stacks.push_back(stack);
  }
  s.live = count;
  s.at_barrier = 0;
  std::memset(dynamic_shared, 0xff, s.dynamic_shared_bytes);
  for (int i = 0; i < count; ++i) {
    Thread& t = s.threads[i];
    t.index = {static_cast<unsigned>(i % s.block.x), static_cast<unsigned>((i / s.block.x) % s.block.y),
               static_cast<unsigned>(i / (s.block.x * s.block.y))};
    t.linear = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.state = State::kRunnable;
    t.stack_begin = reinterpret_cast<uintptr_t>(s.stacks[i]);
    t.stack_end = t.stack_begin + kStackBytes;
    ++s.warps[t.warp].lanes;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = s.stacks[i];
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &s.scheduler_context;
    makecontext(&t.context, fiber_main, 0);
  }
  std::vector<int> order(count);
  for (int i = 0; i < count; ++i) order[i] = i;
  while (s.live > 0 && s.error.empty()) {
    bool ran = false;
    std::shuffle(order.begin(), order.end(), s.random);
    for (const int i : order) {
      Thread& t = s.threads[i];
      if (t.state != State::kRunnable) continue;
      current_thread = &t;
      enter_fiber(&s.scheduler_context, &t.context, s.stacks[i]);
      current_thread = nullptr;
      ran = true;
      if (!s.error.empty()) break;
    }
    if (!ran && s.error.empty()) {
      int waiting_barrier = 0, waiting_warp = 0;
      for (const Thread& t : s.threads) {
        waiting_barrier += t.state == State::kAtBarrier;
        waiting_warp += t.state == State::kInCollective;
      }
      s.error = "simt: deadlock at " + where() + ": " + std::to_string(waiting_barrier) +
                " thread(s) wait in __syncthreads, " + std::to_string(waiting_warp) + " in warp collectives";
    }
  }
#if defined(FUSEDGPT_SIMT_COUNT)
  counters_end_block();
#endif
}

template <typename Callable>
SIMT_UNCOUNTED void call_kernel(const void* callable) {
  (*static_cast<const Callable*>(callable))();
}

// `kernel<<<grid, block, shared_bytes, stream>>>(args...)` becomes
// `Launch("kernel", grid, block, shared_bytes, stream)(kernel, args...)`; the name (the launch's text in
// the source) keys the memory counters.
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) per kernel entry: a
// launch with more than 48 KB of dynamic shared memory needs it, as on a GPU (where it fails to launch).
SIMT_UNCOUNTED inline std::vector<std::pair<const void*, size_t>>& dynamic_shared_limits() {
  static std::vector<std::pair<const void*, size_t>> limits;
  return limits;
}

SIMT_UNCOUNTED inline size_t dynamic_shared_limit(const void* entry) {
  for (const auto& [kernel, bytes] : dynamic_shared_limits()) {
    if (kernel == entry) return bytes;
  }
  return kDefaultDynamicSharedLimit;
}

struct Launch {
  const char* name = nullptr;
  dim3 grid, block;
  size_t shared_bytes = 0;
  Launch(dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_), shared_bytes(shared_bytes_) {}
  Launch(const char* name_, dim3 grid_, dim3 block_, size_t shared_bytes_ = 0, cudaStream_t = nullptr)
      : name(name_), grid(grid_), block(block_), shared_bytes(shared_bytes_) {}

  template <typename Kernel, typename... Args>
  SIMT_UNCOUNTED void operator()(Kernel kernel, const Args&... args) const {
    Scheduler& s = scheduler();
    if (s.running) throw std::runtime_error("simt: a kernel launched from inside a kernel");
    const int64_t threads = int64_t{block.x} * block.y * block.z;
    if (threads < 1 || threads > 1024) {
      throw std::runtime_error("simt: invalid launch: " + std::to_string(threads) + " threads per block");
    }
    if (grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
      throw std::runtime_error("simt: invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                               ", " + std::to_string(grid.z) + ")");
    }
    const void* entry = nullptr;
    if constexpr (std::is_pointer_v<Kernel>) entry = reinterpret_cast<const void*>(kernel);
    if (shared_bytes > kMaxDynamicSharedBytes || shared_bytes > dynamic_shared_limit(entry)) {
      throw std::runtime_error("simt: invalid launch: " + std::to_string(shared_bytes) +
                               " bytes of dynamic shared memory, above " +
                               std::to_string(std::min(kMaxDynamicSharedBytes, dynamic_shared_limit(entry))) +
                               " (above 48 KB, cudaFuncSetAttribute(kernel, "
                               "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) must come first)");
    }
    s.dynamic_shared_bytes = shared_bytes;
#if defined(__SANITIZE_ADDRESS__)
    __asan_poison_memory_region(dynamic_shared + shared_bytes, kMaxDynamicSharedBytes - shared_bytes);
#endif
    // Parameters copied per thread, by value, here: uncounted, as a GPU's parameters are constant memory.
    const auto body = [&]() SIMT_UNCOUNTED { kernel(args...); };
    s.body = &call_kernel<decltype(body)>;
    s.body_data = &body;
    s.grid = grid;
    s.block = block;
    s.error.clear();
    s.running = true;
#if defined(FUSEDGPT_SIMT_COUNT)
    counters_begin_launch(name, entry, threads, shared_bytes);
#endif
    for (unsigned z = 0; z < grid.z && s.error.empty(); ++z) {
      for (unsigned y = 0; y < grid.y && s.error.empty(); ++y) {
        for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
          s.block_index = {x, y, z};
          run_block();
        }
      }
    }
#if defined(FUSEDGPT_SIMT_COUNT)
    counters_end_launch();
#endif
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(dynamic_shared, kMaxDynamicSharedBytes);
#endif
    s.dynamic_shared_bytes = 0;
    s.running = false;
    if (!s.error.empty()) throw std::runtime_error(s.error);
  }
};

// ---- warp collectives -------------------------------------------------------------------------------

template <typename T>
SIMT_UNCOUNTED void shuffle_xor_compute(Warp& warp) {
  static_assert(sizeof(T) <= sizeof(Slot));
  for (int lane = 0; lane < 32; ++lane) {
    const int source = lane ^ warp.argument;
    if (lane < warp.lanes) {
      if (source >= warp.lanes) std::memset(warp.out[lane].bytes, 0, sizeof(T));  // (partial warps only)
      else std::memcpy(warp.out[lane].bytes, warp.in[source].bytes, sizeof(T));
    }
  }
}

template <typename T>
SIMT_UNCOUNTED T shuffle_xor(unsigned mask, T value, int lane_mask, int width) {
  const UncountedScope uncounted;
  if (mask != 0xffffffffu) fail("only the full mask 0xffffffff is emulated in __shfl_xor_sync");
  if (width != 32) fail("only width 32 is emulated in __shfl_xor_sync");
  if (lane_mask < 0 || lane_mask > 31) fail("__shfl_xor_sync lane mask out of range");
  const Slot& out = warp_collective("__shfl_xor_sync", lane_mask, &value, sizeof(T), &shuffle_xor_compute<T>);
  T result;
  std::memcpy(&result, out.bytes, sizeof(T));
  return result;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A (16x16) * B (16x8) + C, per lane
// 4 A registers, 2 B registers (two 16-bit elements each, the lower index in the low half) and 4 C floats.
struct MmaFragments {
  uint32_t a[4], b[2];
  float c[4];
};

template <typename Element>
SIMT_UNCOUNTED float mma_element(uint32_t word, int half) {
  const uint16_t bits = static_cast<uint16_t>(half == 0 ? word & 0xffffu : word >> 16);
  if constexpr (std::is_same_v<Element, __half>) return __half2float(__half{bits});
  else return __bfloat162float(__nv_bfloat16{bits});
}

template <typename Element>
SIMT_UNCOUNTED void mma_compute(Warp& warp) {
  double a[16][16], b[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaFragments f;
    std::memcpy(&f, warp.in[lane].bytes, sizeof(f));
    const int group = lane >> 2, thread_in_group = lane % 4;
    for (int i = 0; i < 8; ++i) {  // A element a_i: register i / 2, half i % 2
      const int row = group + ((i % 4) >= 2 ? 8 : 0);
      const int col = thread_in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = mma_element<Element>(f.a[i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {  // B element b_i: register i / 2, half i % 2
      const int row = thread_in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][group] = mma_element<Element>(f.b[i / 2], i % 2);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    MmaFragments f;
    std::memcpy(&f, warp.in[lane].bytes, sizeof(f));
    const int group = lane >> 2, thread_in_group = lane % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {  // C/D element c_i
      const int row = group + (i >= 2 ? 8 : 0), col = thread_in_group * 2 + (i & 1);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[i] = static_cast<float>(static_cast<double>(f.c[i]) + sum);
    }
    std::memcpy(warp.out[lane].bytes, d, sizeof(d));
  }
}

template <typename Element>
SIMT_UNCOUNTED void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(sizeof(MmaFragments) <= sizeof(Slot));
  const UncountedScope uncounted;
  if (scheduler().warps[current_thread->warp].lanes != 32) fail("mma.sync needs a full warp");
  MmaFragments f;
  std::memcpy(f.a, a, sizeof(f.a));
  std::memcpy(f.b, b, sizeof(f.b));
  std::memcpy(f.c, c, sizeof(f.c));
  const Slot& out = warp_collective(std::is_same_v<Element, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", 0,
                                    &f, sizeof(f), &mma_compute<Element>);
  std::memcpy(c, out.bytes, sizeof(float) * 4);
}

// ldmatrix.sync.aligned.m8n8.x4{,.trans}.shared.b16: four 8x8 matrices of 16-bit elements, each row 16
// contiguous bytes of shared memory at an address that lanes 8i .. 8i + 7 give for rows 0 .. 7 of matrix i.
// Lane l receives one 32-bit register per matrix: without .trans the elements (row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1), with .trans (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4), the lower
// column (row) in the low half (PTX ISA, "Warp-level matrix load instruction: ldmatrix"). Each lane's row
// is read here, by the lane, as one 16-byte load: the memory counters see the four 8-lane phases that the
// hardware's four wavefronts are.
struct MatrixRows {
  uint16_t row[8];
};

template <bool kTranspose>
SIMT_UNCOUNTED void ldmatrix_compute(Warp& warp) {
  MatrixRows rows[32];
  for (int lane = 0; lane < 32; ++lane) std::memcpy(&rows[lane], warp.in[lane].bytes, sizeof(MatrixRows));
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t registers[4];
    for (int matrix = 0; matrix < 4; ++matrix) {
      const MatrixRows* m = rows + 8 * matrix;
      const int outer = lane / 4, inner = 2 * (lane % 4);
      const uint16_t lo = kTranspose ? m[inner].row[outer] : m[outer].row[inner];
      const uint16_t hi = kTranspose ? m[inner + 1].row[outer] : m[outer].row[inner + 1];
      registers[matrix] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    std::memcpy(warp.out[lane].bytes, registers, sizeof(registers));
  }
}

template <bool kTranspose>
inline void ldmatrix_x4(uint32_t (&registers)[4], const void* row_address) {
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  const uint4 row = *static_cast<const uint4*>(row_address);  // the lane's row: counted
  const UncountedScope uncounted;
  if (scheduler().warps[current_thread->warp].lanes != 32) fail("ldmatrix needs a full warp");
  const Slot& out = warp_collective(kTranspose ? "ldmatrix.x4.trans" : "ldmatrix.x4", 0, &row, sizeof(row),
                                    &ldmatrix_compute<kTranspose>);
  std::memcpy(registers, out.bytes, sizeof(registers));
}

// cp.async.cg.shared.global [destination], [source], 16, source_bytes (source_bytes 16 or 0: 0 fills the
// 16 bytes with zeros and reads nothing), cp.async.commit_group, cp.async.wait_group N and
// cp.async.wait_all (PTX ISA, "Data Movement and Conversion Instructions: cp.async"): the copy reads its
// source when issued (a counted 16-byte load) but writes shared memory only when a wait of the issuing
// thread lands its group (a counted 16-byte store then): until then the destination keeps what it held, so
// a missing wait, or a __syncthreads taken for one, reads stale data and the kernel's result is wrong.
// wait_group N lands the oldest committed groups until at most N remain in flight; copies not yet
// committed are not waited for; wait_all commits them and lands everything. Both addresses must be
// 16-byte aligned; a thread that exits with copies in flight is an error (the run names it).
// What a zero-filling cp.async "reads": zeros, at an address the memory counters log as an access of no
// bytes, so that the lane's later copies stay grouped with its warp mates' (the k-th execution of an
// instruction by each lane is one request: a lane that skipped the load would shift all its later ones).
alignas(16) inline unsigned char absent_source[16] = {};

inline void cp_async_16(void* destination, const void* source, bool valid) {
  if (reinterpret_cast<uintptr_t>(destination) % 16 != 0 ||
      (valid && reinterpret_cast<uintptr_t>(source) % 16 != 0)) {
    fail("cp.async addresses not 16-byte aligned");
  }
  Thread::AsyncCopy copy{destination, {}};
  // Counted: the global side of LDGSTS (a zero fill reads absent_source: an access of no bytes).
  const uint4 value = *static_cast<const uint4*>(valid ? source : static_cast<const void*>(absent_source));
  std::memcpy(copy.bytes, &value, sizeof(value));
  const UncountedScope uncounted;
  current_thread->uncommitted.push_back(copy);
}

SIMT_UNCOUNTED inline void cp_async_commit_group() {
  const UncountedScope uncounted;
  Thread* self = current_thread;
  self->committed.push_back(std::move(self->uncommitted));
  self->uncommitted.clear();
}

// The next copy that a wait_group(pending) lands, taken off the thread's queue: false when no more than
// `pending` committed groups remain. Bookkeeping only, uncounted; the caller's store is the counted one.
SIMT_UNCOUNTED inline bool next_landing_copy(int pending, uint4& value, void*& destination) {
  const UncountedScope uncounted;
  Thread* self = current_thread;
  auto& groups = self->committed;
  while (!groups.empty() && groups.front().empty() && static_cast<int>(groups.size()) > pending) {
    groups.erase(groups.begin());
  }
  if (static_cast<int>(groups.size()) <= pending) return false;
  const Thread::AsyncCopy& copy = groups.front().front();
  std::memcpy(&value, copy.bytes, sizeof(value));
  destination = copy.destination;
  groups.front().erase(groups.front().begin());
  return true;
}

inline void cp_async_wait_group(int pending) {
  uint4 value;
  void* destination;
  while (next_landing_copy(pending, value, destination)) {
    *static_cast<uint4*>(destination) = value;  // counted: the shared side of LDGSTS
  }
}

inline void cp_async_wait_all() {
  cp_async_commit_group();  // (uncounted)
  cp_async_wait_group(0);
}

// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero (+0 for results, x = -inf
// gives +0). The hardware's result is within 2 ulp of 2^x; the twin rounds the exact value, so a kernel's
// tolerance must not rest on the last bits.
SIMT_UNCOUNTED inline float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float result = std::exp2(x);
  return std::fpclassify(result) == FP_SUBNORMAL ? 0.f : result;
}

// intrinsics.h's opaque(x): on a GPU an empty asm statement that hides x's value from the optimiser; here x.
SIMT_UNCOUNTED inline int opaque(int x) { return x; }

// The dynamic shared memory of the running launch (extern __shared__).
SIMT_UNCOUNTED inline void* dynamic_shared_memory() { return dynamic_shared; }

// The built-ins, by value: reading them is no memory access of the kernel.
SIMT_UNCOUNTED inline uint3 thread_index() { return current_thread->index; }
SIMT_UNCOUNTED inline uint3 block_index() { return scheduler().block_index; }
SIMT_UNCOUNTED inline dim3 block_dimensions() { return scheduler().block; }
SIMT_UNCOUNTED inline dim3 grid_dimensions() { return scheduler().grid; }

}  // namespace simt

// ---- the CUDA built-ins the kernels use ---------------------------------------------------------------

#define threadIdx (::simt::thread_index())
#define blockIdx (::simt::block_index())
#define blockDim (::simt::block_dimensions())
#define gridDim (::simt::grid_dimensions())

SIMT_UNCOUNTED inline void __syncthreads() { ::simt::syncthreads(); }

template <typename T>
SIMT_UNCOUNTED T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::simt::shuffle_xor(mask, value, lane_mask, width);
}

// cudaFuncSetAttribute for the one attribute kernels set, recorded per kernel for Launch's check.
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
template <typename Kernel>
SIMT_UNCOUNTED cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::simt::kMaxDynamicSharedBytes) {
    return cudaErrorInvalidValue;
  }
  auto& limits = ::simt::dynamic_shared_limits();
  const void* entry = reinterpret_cast<const void*>(kernel);
  for (auto& [known, bytes] : limits) {
    if (known == entry) {
      bytes = static_cast<size_t>(value);
      return cudaSuccess;
    }
  }
  limits.emplace_back(entry, static_cast<size_t>(value));
  return cudaSuccess;
}

// The emulated device, for the occupancy queries of host code: FUSEDGPT_SIMT_MULTIPROCESSORS
// multiprocessors (default 4, what fusedgpt's Python side assumes without a GPU), each holding what an
// sm_90 multiprocessor holds by threads (2048), blocks (32) and shared memory (228 KB, 1 KB reserved per
// block). Registers are not known here (the host compiler allocates none), so the emulated occupancy is
// an upper bound of the real one; bench/static_report.py gives the real limits from ptxas.
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

SIMT_UNCOUNTED inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (value == nullptr || attribute != cudaDevAttrMultiProcessorCount || device < 0) return cudaErrorInvalidValue;
  const char* configured = std::getenv("FUSEDGPT_SIMT_MULTIPROCESSORS");
  const long count = configured != nullptr ? std::strtol(configured, nullptr, 10) : 4;
  if (count < 1 || count > 1024) return cudaErrorInvalidValue;
  *value = static_cast<int>(count);
  return cudaSuccess;
}

template <typename Kernel>
SIMT_UNCOUNTED cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel* kernel, int block_size,
                                                                         size_t dynamic_shared_bytes) {
  if (blocks == nullptr || kernel == nullptr || block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  const size_t limit = ::simt::dynamic_shared_limit(reinterpret_cast<const void*>(kernel));
  if (dynamic_shared_bytes > limit) {
    *blocks = 0;
    return cudaSuccess;
  }
  const int by_threads = 2048 / (((block_size + 31) / 32) * 32);
  const int by_shared = static_cast<int>((228 * 1024) / (dynamic_shared_bytes + 1024));
  *blocks = std::min({by_threads, 32, by_shared});
  return cudaSuccess;
}
