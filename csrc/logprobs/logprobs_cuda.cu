// token / sequence log-probs on CUDA: forward (per-token log-prob + log-sum-exp, one read of the logits) and
// backward (softmax gradient, one read of the logits and one write of the gradient, optionally in place).
//
// One warp per row for rows up to 4 KiB, else one block per row; 16-byte loads and stores (a scalar head and tail
// where a row does not start on a 16-byte boundary); online log-sum-exp in float32 (see logprobs_cuda.cuh);
// warp-shuffle merges. Out-of-range labels are never read: the row is scored as ignored and its flat index is
// recorded in a device flag that the Python side checks (spa_kernels/_validation.py: check_label_flag).
// The per-sequence sum is a deterministic [N, T] -> [N] torch reduction on the Python side (no atomics).
//
// Python side: spa_kernels/ops/logprobs/cuda.py.
#include "logprobs_cuda.cuh"

namespace spa {
namespace {

using namespace spa::cuda;

template <typename scalar_t, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    logprobs_forward_kernel(const scalar_t* __restrict__ logits, int64_t sN, int64_t sT,
                            const int64_t* __restrict__ labels, int64_t rows, int64_t T, int V,
                            int64_t ignore_index, float scale, float cap, float* __restrict__ token,
                            float* __restrict__ lse, unsigned long long* __restrict__ bad) {
  const RowThread<kWarpPerRow> rt;
  if (rt.row >= rows) return;  // uniform over the row's threads (a whole warp, or the whole block)
  const int64_t r = rt.row;
  const int64_t label = labels[r];
  if (label == ignore_index || label < 0 || label >= V) {
    if (rt.tid == 0) {
      token[r] = 0.f;
      lse[r] = 0.f;
      if (label != ignore_index) atomicMin(bad, static_cast<unsigned long long>(r));
    }
    return;
  }
  const scalar_t* x = logits + (r / T) * sN + (r % T) * sT;
  const float x_label = rt.tid == 0 ? static_cast<float>(x[label]) : 0.f;  // issued now, used after the merge
  MaxSum st[1] = {{-INFINITY, 0.f}};
  const scalar_t* const rows_in[1] = {x};
  walk_row<scalar_t, 1>(
      split_row(x, V), V, rt.tid, rt.nthreads,
      [&](int i) { add_scalar(st[0], static_cast<float>(x[i]), scale, cap); },
      [&](int, const Pack<scalar_t>& a) {
        constexpr int kVec = Pack<scalar_t>::kSize;
        float f[kVec];
        float vmax = -INFINITY;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          f[k] = static_cast<float>(a.v[k]);
          vmax = nan_max(vmax, f[k]);
        }
        // tanh is increasing: the capped max is the max of the capped logits
        if (raise_max(st[0], capped(vmax, scale, cap))) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) st[0].s += __expf(capped(f[k], scale, cap) - st[0].m);
        }
      },
      rows_in);
  row_merge<kWarpPerRow, 1>(st);
  if (rt.tid == 0) {
    const float log_s = __logf(st[0].s);
    const float l = row_lse(st[0], log_s);
    lse[r] = l;
    // u_label - m is exact near the max, so a confident token's log-prob keeps its small digits.
    token[r] = isnan(l) ? l : (capped(x_label, scale, cap) - st[0].m) - log_s;
  }
}

template <typename scalar_t>
__device__ __forceinline__ void zero_row(scalar_t* gx, int V, int tid, int nthreads) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  const RowSplit sp = split_row(gx, V);
  Pack<scalar_t> zero;
#pragma unroll
  for (int k = 0; k < kVec; ++k) zero.v[k] = scalar_t(0);
  for (int i = tid; i < sp.head; i += nthreads) gx[i] = scalar_t(0);
  for (int q = tid; q < sp.packs; q += nthreads) store_pack(gx + sp.head + q * kVec, zero);
  for (int i = sp.tail + tid; i < V; i += nthreads) gx[i] = scalar_t(0);
}

// gx = g * scale * (onehot(label) - softmax(x * scale)). `logits` and `grad` may be the same buffer (in-place
// backward): every element is read, then written, by one thread, and no thread reads an element another writes.
template <typename scalar_t, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    logprobs_backward_kernel(const float* __restrict__ grad_token, const scalar_t* logits, int64_t sN, int64_t sT,
                             const int64_t* __restrict__ labels, const float* __restrict__ lse, int64_t rows,
                             int64_t T, int V, int64_t ignore_index, float scale, float cap, scalar_t* grad,
                             int64_t gN, int64_t gT) {
  constexpr int kVec = Pack<scalar_t>::kSize;
  const RowThread<kWarpPerRow> rt;
  if (rt.row >= rows) return;
  const int64_t r = rt.row, n = r / T, t = r % T;
  scalar_t* gx = grad + n * gN + t * gT;
  const int64_t label = labels[r];
  const float g = grad_token[r];
  // Out-of-range labels were flagged by the forward; here they are ignored rather than read out of bounds.
  if (label == ignore_index || label < 0 || label >= V || g == 0.f) {
    zero_row(gx, V, rt.tid, rt.nthreads);
    return;
  }
  const scalar_t* x = logits + n * sN + t * sT;
  const int y = static_cast<int>(label);
  const float l = lse[r], coef = g * scale;
  // -coef * p_i with p_i = exp(x_i * scale - lse): FFMA, FMUL, MUFU.EX2 per element. The label's term
  // coef * (1 - p) is formed in float32 with expm1 (no cancellation when p is close to 1) and rounded to the storage
  // type once: the thread that meets the label writes the plain term first and overwrites it after its walk, which
  // keeps expm1 out of the unrolled loops (the element is read and written by that thread only, in program order).
  // With a softcap each term is also multiplied by 1 - (c / cap)^2 of its capped logit c.
  auto other_term = [&](float xv) {
    const float c = capped(xv, scale, cap);
    return -coef * __expf(c - l) * softcap_slope(c, cap);
  };
  bool own_label = false;
  float x_label = 0.f;
  auto scalar = [&](int i) {
    const float xv = static_cast<float>(x[i]);
    if (i == y) {
      own_label = true;
      x_label = xv;
    }
    gx[i] = static_cast<scalar_t>(other_term(xv));
  };
  if (misaligned_head(x) == misaligned_head(gx)) {
    const scalar_t* const rows_in[1] = {x};
    walk_row<scalar_t, 1>(
        split_row(x, V), V, rt.tid, rt.nthreads, scalar,
        [&](int i, const Pack<scalar_t>& a) {
          Pack<scalar_t> out;
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float xv = static_cast<float>(a.v[k]);
            if (i + k == y) {
              own_label = true;
              x_label = xv;
            }
            out.v[k] = static_cast<scalar_t>(other_term(xv));
          }
          store_pack(gx + i, out);
        },
        rows_in);
  } else {
    // The logits row and the gradient row sit at different offsets from a 16-byte boundary (a strided view with a
    // vocabulary that is not a multiple of 16 bytes, written into a fresh buffer): element by element.
    for (int i = rt.tid; i < V; i += rt.nthreads) scalar(i);
  }
  if (own_label) {
    const float c = capped(x_label, scale, cap);
    gx[y] = static_cast<scalar_t>(-coef * expm1f(c - l) * softcap_slope(c, cap));
  }
}

}  // namespace

// logits [N, T, V] float32 / bfloat16 / float16 (any strides over N and T, unit stride over V), labels [N, T] int64.
// Returns (token_logprobs [N, T] f32, lse [N, T] f32, bad-label flag [1] int64 (INT64_MAX if none)); ignored and
// out-of-range tokens get 0 in both outputs. softcap > 0: the scaled logits are capped (capped() above) first.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& labels, int64_t ignore_index,
                                                                     double inv_temperature, double softcap) {
  check_logits_cuda(logits, "logits");
  check_labels_cuda(labels, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  const auto opts = logits.options().dtype(at::kFloat);
  auto token = at::empty({N, T}, opts), lse = at::empty({N, T}, opts);
  auto bad = new_bad_label_flag(logits);
  if (rows == 0) return {token, lse, bad};
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  const auto labels_c = labels.contiguous();
  const Launch launch = launch_for(rows, V, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SPA_DISPATCH_CUDA_FLOATS(logits.scalar_type(), "logprobs_forward_cuda", [&] {
    auto kernel = launch.warp_per_row ? logprobs_forward_kernel<scalar_t, true>
                                      : logprobs_forward_kernel<scalar_t, false>;
    kernel<<<launch.grid, launch.block, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), labels_c.const_data_ptr<int64_t>(),
        rows, T, static_cast<int>(V), ignore_index, static_cast<float>(inv_temperature), static_cast<float>(softcap),
        token.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {token, lse, bad};
}

// grad_logits[n, t, :] = grad_token[n, t] * (onehot(label) - softmax(logits * s)) * s, s = 1 / temperature.
// grad_out: optional destination of logits' shape and dtype (unit stride over V); passing logits itself makes the
// backward in place. Ignored (and out-of-range) tokens get zero rows.
at::Tensor logprobs_backward_cuda(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index, double inv_temperature,
                                  const std::optional<at::Tensor>& grad_out, double softcap) {
  check_logits_cuda(logits, "logits");
  check_labels_cuda(labels, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  TORCH_CHECK(grad_token.sizes() == labels.sizes() && grad_token.scalar_type() == at::kFloat &&
                  grad_token.device() == logits.device(),
              "grad_token must be float32 [N, T] on ", logits.device(), ", got ", grad_token.scalar_type(), " ",
              grad_token.sizes(), " on ", grad_token.device());
  TORCH_CHECK(lse.sizes() == labels.sizes() && lse.scalar_type() == at::kFloat && lse.device() == logits.device(),
              "lse must be float32 [N, T] on ", logits.device());
  at::Tensor grad = grad_out.has_value() ? *grad_out : at::empty(logits.sizes(), logits.options());
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  grad.device() == logits.device() && (V <= 1 || grad.stride(2) == 1),
              "grad_out must match logits' shape, dtype and device with unit stride over V, got ", grad.sizes(), " ",
              grad.scalar_type(), " on ", grad.device(), " strides ", grad.strides());
  if (rows == 0 || V == 0) return grad;
  const auto labels_c = labels.contiguous();
  const auto g_c = grad_token.contiguous();
  const auto lse_c = lse.contiguous();
  const Launch launch = launch_for(rows, V, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SPA_DISPATCH_CUDA_FLOATS(logits.scalar_type(), "logprobs_backward_cuda", [&] {
    auto kernel = launch.warp_per_row ? logprobs_backward_kernel<scalar_t, true>
                                      : logprobs_backward_kernel<scalar_t, false>;
    kernel<<<launch.grid, launch.block, 0, stream>>>(
        g_c.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
        labels_c.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(), rows, T, static_cast<int>(V), ignore_index,
        static_cast<float>(inv_temperature), static_cast<float>(softcap), grad.mutable_data_ptr<scalar_t>(),
        grad.stride(0), grad.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace spa
