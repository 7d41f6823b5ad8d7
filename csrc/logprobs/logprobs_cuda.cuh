// Row primitives shared by the CUDA log-prob kernels (logprobs, spa_logprobs): 16-byte packs, an online
// log-sum-exp in float32, warp / block merges, the row walk (scalar head up to the first 16-byte boundary, aligned
// 16-byte packs, scalar tail) and the launch configuration. Header-only so each op's .cu reads top to bottom.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
#pragma once

// Per-operator ATen headers rather than ATen/ATen.h: every .cu is parsed by the device front-end once per arch, and
// the full ATen API makes up most of that time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

namespace spa {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Launch shapes. A row of at most kWarpRowBytes is handled by one warp (8 rows per 256-thread block): a whole block
// on a short row would leave most threads idle. Longer rows get a block each, of 256 threads, 512 from 64 KiB (e.g.
// V = 128256 bf16; V = 32000 bf16 is 62.5 KiB). kUnroll 16-byte packs are loaded before any is used: with two
// 512-thread blocks per SM that is 32 KiB of loads in flight per SM, above what H100 / A100 need to saturate HBM
// (bandwidth x latency / SMs, about 18 / 11 KiB). __launch_bounds__(512, 2) caps registers at 64; at kUnroll = 2 no
// kernel spills on sm_80 / sm_90 (ptxas -v; kUnroll = 4 spilled in the bf16 backward and the SPA kernel).
constexpr int kWarpRowBytes = 4096;
constexpr int kWarpRowsThreads = 256;
constexpr int kUnroll = 2;
constexpr int kMaxThreads = 512;
constexpr int kMinBlocksPerSM = 2;

// The float32 / bfloat16 / float16 storage types the CUDA kernels take (float64 is left to the other backends).
#define SPA_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                            \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// ---------------------------------------------------------------------------------------------------------------
// 16-byte packs (ATen's aligned_vector idiom: the compiler emits one 128-bit load / store per pack).
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& v) {
  *reinterpret_cast<Pack<T>*>(p) = v;
}

// Elements before the first 16-byte boundary at or after p (p itself is aligned to sizeof(T), as every tensor
// element is). Rows of a non-contiguous [N, T, V] view, or of any view when V * sizeof(T) is not a multiple of 16,
// can start anywhere.
template <typename T>
__device__ __forceinline__ int misaligned_head(const T* p) {
  const unsigned off = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  return off == 0 ? 0 : static_cast<int>((16u - off) / sizeof(T));
}

// A row of V elements at p split into [0, head) scalar, `packs` aligned 16-byte packs, [tail, V) scalar. Indices
// within a row are 32-bit (the host checks V < 2^31): fewer registers in the hot loops.
struct RowSplit {
  int head, packs, tail;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int V) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = min(misaligned_head(p), V);
  const int packs = (V - head) / kVec;
  return {head, packs, head + packs * kVec};
}

// Walks a row with `nthreads` cooperating threads (this one is `tid`); every element is visited by exactly one
// thread. scalar(i) for the head and tail elements; packs(i, a) (P = 1) or packs(i, a, b) (P = 2) with the 16-byte
// packs starting at element i of ptrs[0] (and ptrs[1], which must share ptrs[0]'s misalignment: sp = split_row of
// ptrs[0]). kUnroll / P packs per pointer are loaded before any is used (the same bytes in flight for P = 1, 2).
template <typename T, int P, typename ScalarFn, typename PackFn>
__device__ __forceinline__ void walk_row(const RowSplit& sp, int V, int tid, int nthreads, ScalarFn&& scalar,
                                         PackFn&& packs, const T* const (&ptrs)[P]) {
  static_assert(P == 1 || P == 2, "walk_row takes one or two rows");
  constexpr int kVec = Pack<T>::kSize;
  constexpr int kU = kUnroll / P;
  for (int i = tid; i < sp.head; i += nthreads) scalar(i);
  for (int q0 = tid; q0 < sp.packs; q0 += nthreads * kU) {
    // Loaded into registers first, then used: kUnroll independent 128-bit loads in flight per thread.
    Pack<T> loaded[P][kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int q = q0 + u * nthreads;
      if (q < sp.packs) {
#pragma unroll
        for (int k = 0; k < P; ++k) loaded[k][u] = load_pack(ptrs[k] + sp.head + q * kVec);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int q = q0 + u * nthreads;
      if (q < sp.packs) {
        if constexpr (P == 1) {
          packs(sp.head + q * kVec, loaded[0][u]);
        } else {
          packs(sp.head + q * kVec, loaded[0][u], loaded[1][u]);
        }
      }
    }
  }
  for (int i = sp.tail + tid; i < V; i += nthreads) scalar(i);
}

// ---------------------------------------------------------------------------------------------------------------
// Online log-sum-exp: the state (m, s) stands for m + log(s) = log sum_i exp(u_i), u_i = x_i * scale, with m the
// largest u seen. Each u is the float32 product rounded once (scaled(): __fmul_rn, never contracted into an FMA), and
// every term is exp(u - m): u - m is exact near the max, and forward and backward see the same u. (An FMA
// exp(fma(x, scale, -m)) would put the product's rounding error, ~1e-3 at |u| ~ 1e4, into s but not into the
// float32 lse the backward gets, so p = exp(u - lse) of the top logit would be off by that much at temperature != 1.)
// At scale = 1 the product is exact. All -inf so far: m = -inf, s = 0.
//
// NaN and +inf follow torch.log_softmax: a row holding a NaN or a +inf logit gets a NaN log-sum-exp (so NaN
// log-probs and, in the backward, a NaN gradient row). A NaN must survive whatever a thread saw before it (nothing,
// or only -inf): maxima are taken with nan_max (fmaxf drops NaN), a NaN max makes the state's s NaN for good, and
// merges propagate a NaN m or s. A +inf max gives terms exp(inf - inf) = NaN.
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ float scaled(float x, float scale) {
  return __fmul_rn(x, scale);
}

// Final-logit softcapping (Gemma 2 / 3): with cap > 0 the scaled logit u becomes c = cap * tanh(u / cap) (cap = 0:
// none), computed the same way wherever it is needed, so forward and backward see the same c; the backward
// multiplies the softmax gradient by dc/du = 1 - (c / cap)^2 (softcap_slope). tanh(v) = 1 - 2 / (exp(2v) + 1) with
// IEEE division: exact at +-inf, an absolute error of a few 1e-7 elsewhere (tanhf itself may become a coarse
// hardware approximation under --use_fast_math).
__device__ __forceinline__ float capped(float x, float scale, float cap) {
  const float u = scaled(x, scale);
  if (!(cap > 0.f)) return u;
  const float e = __expf(__fmul_rn(2.f, __fdiv_rn(u, cap)));
  return __fmul_rn(1.f - __fdiv_rn(2.f, e + 1.f), cap);
}

__device__ __forceinline__ float softcap_slope(float c, float cap) {
  if (!(cap > 0.f)) return 1.f;
  const float t = __fdiv_rn(c, cap);
  return 1.f - t * t;
}

// max(a, b) that returns NaN when either is NaN (fmaxf returns the other operand).
__device__ __forceinline__ float nan_max(float a, float b) {
  return (b > a || isnan(b)) ? b : a;
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = nan_max(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty: avoid -inf - -inf = NaN
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};  // m NaN, or a NaN s: NaN
}

// Raises the running max to `max_u` (already scaled) if larger, or NaN (then s becomes NaN: exp(m - NaN), and m
// stays NaN: nothing compares larger); returns whether terms exp(u - m) may be added, i.e. whether anything but -inf
// was seen (with m = -inf they would be exp(-inf + inf) = NaN).
__device__ __forceinline__ bool raise_max(MaxSum& st, float max_u) {
  if (max_u > st.m || isnan(max_u)) {
    st.s *= __expf(st.m - max_u);  // m = -inf: s = 0 * 0; max_u NaN: s = NaN
    st.m = max_u;
  }
  return st.m != -INFINITY;
}

// The row's log-sum-exp from its merged state: NaN for a row holding +inf (as torch.log_softmax) or NaN.
__device__ __forceinline__ float row_lse(const MaxSum& st, float log_s) {
  return st.m == INFINITY ? NAN : st.m + log_s;
}

__device__ __forceinline__ void add_scalar(MaxSum& st, float x, float scale, float cap = 0.f) {
  const float u = capped(x, scale, cap);
  if (raise_max(st, u)) st.s += __expf(u - st.m);
}

template <int K>
__device__ __forceinline__ void warp_merge(MaxSum (&v)[K]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const MaxSum o{__shfl_xor_sync(kFullMask, v[k].m, offset), __shfl_xor_sync(kFullMask, v[k].s, offset)};
      v[k] = merge(v[k], o);
    }
  }
}

// Every thread of the block ends with the merged states (each warp merges the per-warp partials itself, so there
// is no broadcast round). blockDim.x must be a multiple of 32 and at most 1024.
template <int K>
__device__ __forceinline__ void block_merge(MaxSum (&v)[K]) {
  __shared__ MaxSum partial[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  warp_merge<K>(v);
  __syncthreads();  // a previous block_merge in this block has finished reading `partial`
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < nwarps ? partial[k][lane] : MaxSum{-INFINITY, 0.f};
  warp_merge<K>(v);
}

// Which row a thread works on and its place among the row's threads.
template <bool kWarpPerRow>
struct RowThread {
  int64_t row;
  int tid, nthreads;
  __device__ __forceinline__ RowThread() {
    if constexpr (kWarpPerRow) {
      row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
      tid = threadIdx.x & 31;
      nthreads = 32;
    } else {
      row = blockIdx.x;
      tid = threadIdx.x;
      nthreads = blockDim.x;
    }
  }
};

// Merge of the per-thread states of one row: a warp shuffle tree, or the block merge. Called by every thread of
// the row (rows never exit early on a subset of their threads).
template <bool kWarpPerRow, int K>
__device__ __forceinline__ void row_merge(MaxSum (&v)[K]) {
  if constexpr (kWarpPerRow) {
    warp_merge<K>(v);
  } else {
    block_merge<K>(v);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.
struct Launch {
  bool warp_per_row;
  dim3 grid, block;
};

inline Launch launch_for(int64_t rows, int64_t V, int64_t elem_size) {
  TORCH_CHECK(V < std::numeric_limits<int32_t>::max(), "vocabulary too large for the CUDA kernels: ", V);
  const int64_t row_bytes = V * elem_size;
  Launch l;
  l.warp_per_row = row_bytes <= kWarpRowBytes;
  const int64_t rows_per_block = l.warp_per_row ? kWarpRowsThreads / 32 : 1;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "too many rows for one launch: ", rows);
  l.grid = dim3(static_cast<unsigned>(blocks));
  l.block = dim3(l.warp_per_row ? kWarpRowsThreads : (row_bytes >= 65536 ? kMaxThreads : 256));
  return l;
}

inline void check_logits_cuda(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cuda(), name, " must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, name, " must be [N, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) <= 1 || logits.stride(2) == 1, name,
              " must have unit stride over the vocabulary, got strides ", logits.strides());
}

inline void check_labels_cuda(const at::Tensor& labels, const at::Tensor& logits) {
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "labels must be [N, T] = [", logits.size(0), ", ", logits.size(1), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), "labels are on ", labels.device(), " but logits on ",
              logits.device());
}

// [1] int64 device flag: the smallest flat [N, T] index of a label outside [0, V) that is not ignore_index, or
// INT64_MAX when there is none. Written with atomicMin, read by the Python side (spa_kernels/_validation.py).
inline at::Tensor new_bad_label_flag(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}

}  // namespace cuda
}  // namespace spa
