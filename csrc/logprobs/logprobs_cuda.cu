// token / sequence log-probs on CUDA: forward (per-token log-prob + log-sum-exp) and backward (softmax gradient,
// optionally in place). One thread block per token row, online log-sum-exp in float32, block reduction.
//
// Python side: spa_kernels/ops/logprobs/cuda.py. Out-of-range labels never cause a read: the kernel records the
// first bad row in a device flag ([1] int64, INT64_MAX when none) that the Python side checks.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <cstdint>
#include <limits>

namespace spa {
namespace {

constexpr int kThreads = 512;

struct MaxSum {
  float m;
  float s;
};

// Merge two partial log-sum-exps; -inf partials (nothing seen yet) merge without producing NaN.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o{__shfl_xor_sync(0xffffffff, v.m, offset), __shfl_xor_sync(0xffffffff, v.s, offset)};
    v = merge(v, o);
  }
  return v;
}

__device__ __forceinline__ MaxSum block_merge(MaxSum v) {
  __shared__ float sm[32], ss[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_merge(v);
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = lane < nwarps ? MaxSum{sm[lane], ss[lane]} : MaxSum{-INFINITY, 0.f};
  if (warp == 0) v = warp_merge(v);
  if (threadIdx.x == 0) {
    sm[0] = v.m;
    ss[0] = v.s;
  }
  __syncthreads();
  return {sm[0], ss[0]};
}

template <typename scalar_t>
__global__ void logprobs_forward_kernel(const scalar_t* __restrict__ logits, int64_t sN, int64_t sT,
                                        const int64_t* __restrict__ labels, int64_t T, int64_t V,
                                        int64_t ignore_index, float scale, float* __restrict__ token,
                                        float* __restrict__ lse, unsigned long long* __restrict__ bad) {
  const int64_t r = blockIdx.x;
  const int64_t label = labels[r];
  if (label == ignore_index || label < 0 || label >= V) {
    if (threadIdx.x == 0) {
      token[r] = 0.f;
      lse[r] = 0.f;
      if (label != ignore_index) atomicMin(bad, static_cast<unsigned long long>(r));
    }
    return;
  }
  const scalar_t* x = logits + (r / T) * sN + (r % T) * sT;
  MaxSum acc{-INFINITY, 0.f};
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = static_cast<float>(x[i]) * scale;
    if (v == -INFINITY) continue;
    if (v > acc.m) {
      acc.s = acc.s * __expf(acc.m - v) + 1.f;
      acc.m = v;
    } else {
      acc.s += __expf(v - acc.m);
    }
  }
  acc = block_merge(acc);
  if (threadIdx.x == 0) {
    const float l = acc.m + logf(acc.s);
    lse[r] = l;
    token[r] = static_cast<float>(x[label]) * scale - l;
  }
}

template <typename scalar_t>
__global__ void logprobs_backward_kernel(const float* __restrict__ grad_token, const scalar_t* logits, int64_t sN,
                                         int64_t sT, const int64_t* __restrict__ labels, const float* __restrict__ lse,
                                         int64_t T, int64_t V, int64_t ignore_index, float scale, scalar_t* grad,
                                         int64_t gN, int64_t gT) {
  const int64_t r = blockIdx.x;
  const int64_t n = r / T, t = r % T;
  scalar_t* gx = grad + n * gN + t * gT;
  const int64_t label = labels[r];
  const float g = grad_token[r];
  if (label == ignore_index || label < 0 || label >= V || g == 0.f) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) gx[i] = scalar_t(0);
    return;
  }
  const scalar_t* x = logits + n * sN + t * sT;  // may alias gx (in place): each element is read, then written, by one thread
  const float l = lse[r], coef = g * scale;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const float p = __expf(static_cast<float>(x[i]) * scale - l);
    gx[i] = static_cast<scalar_t>(i == label ? coef * (1.f - p) : -coef * p);
  }
}

void check_cuda_inputs(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.is_cuda() && labels.is_cuda(), "the CUDA kernels need CUDA tensors");
  TORCH_CHECK(logits.dim() == 3 && (logits.size(2) == 0 || logits.stride(2) == 1),
              "logits must be [N, T, V] with unit stride over V, got ", logits.sizes(), " strides ", logits.strides());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1) &&
                  labels.scalar_type() == at::kLong,
              "labels must be int64 [N, T] matching logits, got ", labels.sizes(), " ", labels.scalar_type());
}

}  // namespace

// Returns (token_logprobs [N, T] f32, lse [N, T] f32, first_bad_row [1] int64 (INT64_MAX if none)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& labels, int64_t ignore_index,
                                                                     double inv_temperature) {
  check_cuda_inputs(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  auto opts = logits.options().dtype(at::kFloat);
  auto token = at::empty({N, T}, opts), lse = at::empty({N, T}, opts);
  auto bad = at::full({1}, std::numeric_limits<int64_t>::max(), logits.options().dtype(at::kLong));
  if (N * T == 0) return {token, lse, bad};
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  const auto labels_c = labels.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward_cuda", [&] {
    logprobs_forward_kernel<scalar_t><<<N * T, kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), labels_c.const_data_ptr<int64_t>(), T,
        V, ignore_index, static_cast<float>(inv_temperature), token.data_ptr<float>(), lse.data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {token, lse, bad};
}

at::Tensor logprobs_backward_cuda(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index, double inv_temperature,
                                  const std::optional<at::Tensor>& grad_out) {
  check_cuda_inputs(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  TORCH_CHECK(grad_token.sizes() == labels.sizes() && grad_token.scalar_type() == at::kFloat,
              "grad_token must be float32 [N, T]");
  TORCH_CHECK(lse.sizes() == labels.sizes() && lse.scalar_type() == at::kFloat, "lse must be float32 [N, T]");
  at::Tensor grad = grad_out.has_value() ? *grad_out : at::empty(logits.sizes(), logits.options());
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  (V == 0 || grad.stride(2) == 1),
              "grad_out must match logits' shape and dtype with unit stride over V");
  if (N * T == 0 || V == 0) return grad;
  const auto labels_c = labels.contiguous();
  const auto g_c = grad_token.contiguous();
  const auto lse_c = lse.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward_cuda", [&] {
    logprobs_backward_kernel<scalar_t><<<N * T, kThreads, 0, stream>>>(
        g_c.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
        labels_c.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(), T, V, ignore_index,
        static_cast<float>(inv_temperature), grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad;
}

}  // namespace spa
