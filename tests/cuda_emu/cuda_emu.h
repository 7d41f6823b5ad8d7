// A tiny CUDA execution emulator for the CPU, enough to run spa's log-prob kernels as plain C++: every CUDA thread of
// a block is a ucontext coroutine; __syncthreads() and the warp shuffles are real barriers (a thread waits until
// every live thread of its block / warp has arrived). Blocks run one after another, so `__shared__` is a static.
// It checks the kernels' logic (indexing, row splits, alignment, merges, in-place order) without a GPU; it says
// nothing about races or speed (compute-sanitizer and the benchmarks do that on a GPU).
//
// Included before the kernels' source (see tests/cuda_emu/build.py), after the ATen / CUDA headers.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::max;
using std::min;

namespace emu {

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  Wait wait = Wait::kNone;
};

struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  std::vector<float> shfl_slots;
};

inline Block* g_block = nullptr;
inline dim3 g_block_idx, g_block_dim, g_grid_dim, g_thread_idx;

inline void wait_at(Wait w) {
  Block& b = *g_block;
  b.threads[b.current].wait = w;
  swapcontext(&b.threads[b.current].ctx, &b.scheduler);
}

inline void thread_entry() {
  (*g_block->body)();
  wait_at(Wait::kDone);
}

// Runs one block to completion; aborts on a deadlock (a barrier some live thread never reaches).
inline void run_block(const std::function<void()>& body, dim3 block_idx, dim3 block_dim) {
  constexpr size_t kStack = 256 * 1024;
  Block b;
  b.body = &body;
  const int n = static_cast<int>(block_dim.x);
  b.threads.resize(n);
  b.shfl_slots.assign(n, 0.f);
  g_block = &b;
  g_block_idx = block_idx;
  g_block_dim = block_dim;
  for (auto& t : b.threads) {
    t.stack.reset(new char[kStack]);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, thread_entry, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (b.threads[i].wait != Wait::kNone) continue;
      b.current = i;
      g_thread_idx = dim3(i, 0, 0);
      swapcontext(&b.scheduler, &b.threads[i].ctx);
      ran = true;
    }
    // Release every barrier all of whose live threads have arrived.
    bool all_done = true, released = false, block_ready = true;
    for (auto& t : b.threads) {
      if (t.wait != Wait::kDone) all_done = false;
      if (t.wait == Wait::kNone || t.wait == Wait::kWarp) block_ready = false;
    }
    if (all_done) break;
    if (block_ready) {
      for (auto& t : b.threads)
        if (t.wait == Wait::kBlock) t.wait = Wait::kNone, released = true;
    }
    for (int w = 0; w < (n + 31) / 32; ++w) {
      bool warp_ready = true, any = false;
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
        if (b.threads[i].wait == Wait::kWarp) any = true;
        if (b.threads[i].wait == Wait::kNone || b.threads[i].wait == Wait::kBlock) warp_ready = false;
      }
      if (any && warp_ready) {
        for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i)
          if (b.threads[i].wait == Wait::kWarp) b.threads[i].wait = Wait::kNone, released = true;
      }
    }
    if (!ran && !released) {
      std::fprintf(stderr, "cuda_emu: deadlock in block %u (a barrier not reached by every live thread)\n",
                   block_idx.x);
      std::abort();
    }
  }
  g_block = nullptr;
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  g_grid_dim = grid;
  for (unsigned bx = 0; bx < grid.x; ++bx) run_block(body, dim3(bx, 0, 0), block);
}

inline float shfl_xor(float v, int lane_mask) {
  Block& b = *g_block;
  const int me = b.current;
  b.shfl_slots[me] = v;
  wait_at(Wait::kWarp);  // every lane has written its value
  const float out = b.shfl_slots[(me & ~31) | ((me & 31) ^ lane_mask)];
  wait_at(Wait::kWarp);  // every lane has read before the slots are reused
  return out;
}

}  // namespace emu

#define threadIdx emu::g_thread_idx
#define blockIdx emu::g_block_idx
#define blockDim emu::g_block_dim
#define gridDim emu::g_grid_dim

inline void __syncthreads() { emu::wait_at(emu::Wait::kBlock); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = std::min(old, v);
  return old;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fmul_rn(float a, float b) { return std::fma(a, b, 0.0f); }  // one rounding, never contracted
inline float __fdiv_rn(float a, float b) { return a / b; }  // IEEE division: one rounding
inline float __logf(float x) { return std::log(x); }
