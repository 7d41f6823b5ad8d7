// SPA triple log-probs on CUDA, forward: one pass over the policy logits z and the reference logits z_ref per token
// gives log p(y), log p_ref(y) and the de-coupled noise detection log-prob log softmax((1 + lam) z - lam z_ref)(y),
// three online log-sum-exps side by side (mirrors csrc/spa_logprobs/spa_logprobs_cpu.cpp). The backward only reaches
// the policy logits, through log p(y): it is logprobs_backward_cuda with scale 1.
//
// Python side: spa_kernels/ops/spa_logprobs/cuda.py.
#include "../logprobs/logprobs_cuda.cuh"

namespace spa {
namespace {

using namespace spa::cuda;

// Extrapolated logit (1 + lam) z - lam z_ref; a token the policy rules out (z = -inf) stays -inf even where the
// reference rules it out too (padded vocabulary entries), instead of -inf + inf = NaN.
__device__ __forceinline__ float extrapolate(float z, float zr, float c1, float lam) {
  return z == -INFINITY ? z : c1 * z - lam * zr;
}

template <typename scalar_t, bool kWarpPerRow>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM)
    spa_logprobs_forward_kernel(const scalar_t* __restrict__ logits, int64_t sN, int64_t sT,
                                const scalar_t* __restrict__ ref_logits, int64_t rN, int64_t rT,
                                const int64_t* __restrict__ labels, int64_t rows, int64_t T, int V,
                                int64_t ignore_index, float lam, float* __restrict__ token, float* __restrict__ lse,
                                float* __restrict__ ref_token, float* __restrict__ ext_token,
                                unsigned long long* __restrict__ bad) {
  const RowThread<kWarpPerRow> rt;
  if (rt.row >= rows) return;  // uniform over the row's threads
  const int64_t r = rt.row, n = r / T, t = r % T;
  const int64_t label = labels[r];
  if (label == ignore_index || label < 0 || label >= V) {
    if (rt.tid == 0) {
      token[r] = lse[r] = ref_token[r] = ext_token[r] = 0.f;
      if (label != ignore_index) atomicMin(bad, static_cast<unsigned long long>(r));
    }
    return;
  }
  const scalar_t* x = logits + n * sN + t * sT;
  const scalar_t* xr = ref_logits + n * rN + t * rT;
  const float c1 = 1.f + lam;
  float z_label = 0.f, zr_label = 0.f;
  if (rt.tid == 0) {  // issued now, used after the merge
    z_label = static_cast<float>(x[label]);
    zr_label = static_cast<float>(xr[label]);
  }
  // st[0]: z, st[1]: z_ref, st[2]: extrapolated (scale 1), see logprobs_cuda.cuh.
  MaxSum st[3] = {{-INFINITY, 0.f}, {-INFINITY, 0.f}, {-INFINITY, 0.f}};
  auto scalar = [&](int i) {
    const float z = static_cast<float>(x[i]), zr = static_cast<float>(xr[i]);
    add_scalar(st[0], z, 1.f);
    add_scalar(st[1], zr, 1.f);
    add_scalar(st[2], extrapolate(z, zr, c1, lam), 1.f);
  };
  if (misaligned_head(x) == misaligned_head(xr)) {
    const scalar_t* const rows_in[2] = {x, xr};
    walk_row<scalar_t, 2>(
        split_row(x, V), V, rt.tid, rt.nthreads, scalar,
        [&](int, const Pack<scalar_t>& a, const Pack<scalar_t>& b) {
          // Two sweeps over the packs (max, then terms), converting again in the second: bf16/fp16 -> float32 is one
          // instruction, cheaper than keeping 3 x 8 floats live.
          constexpr int kVec = Pack<scalar_t>::kSize;
          float vmax[3] = {-INFINITY, -INFINITY, -INFINITY};
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float z = static_cast<float>(a.v[k]), zr = static_cast<float>(b.v[k]);
            vmax[0] = nan_max(vmax[0], z);
            vmax[1] = nan_max(vmax[1], zr);
            vmax[2] = nan_max(vmax[2], extrapolate(z, zr, c1, lam));
          }
          bool live[3];
#pragma unroll
          for (int s = 0; s < 3; ++s) live[s] = raise_max(st[s], vmax[s]);
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const float z = static_cast<float>(a.v[k]), zr = static_cast<float>(b.v[k]);
            if (live[0]) st[0].s += __expf(z - st[0].m);
            if (live[1]) st[1].s += __expf(zr - st[1].m);
            if (live[2]) st[2].s += __expf(extrapolate(z, zr, c1, lam) - st[2].m);
          }
        },
        rows_in);
  } else {
    // The two rows sit at different offsets from a 16-byte boundary (differently strided views): element by element.
    for (int i = rt.tid; i < V; i += rt.nthreads) scalar(i);
  }
  row_merge<kWarpPerRow, 3>(st);
  if (rt.tid == 0) {
    float log_s[3];
#pragma unroll
    for (int s = 0; s < 3; ++s) log_s[s] = __logf(st[s].s);
    float l[3];
#pragma unroll
    for (int s = 0; s < 3; ++s) l[s] = row_lse(st[s], log_s[s]);
    lse[r] = l[0];
    token[r] = isnan(l[0]) ? l[0] : (z_label - st[0].m) - log_s[0];
    ref_token[r] = isnan(l[1]) ? l[1] : (zr_label - st[1].m) - log_s[1];
    ext_token[r] = isnan(l[2]) ? l[2] : (extrapolate(z_label, zr_label, c1, lam) - st[2].m) - log_s[2];
  }
}

}  // namespace

// Returns (token_logps, lse, token_ref_logps, token_extrapolated_logps) [N, T] float32 each, and the bad-label flag
// [1] int64 (INT64_MAX if none); `lse` (of the policy logits) is what logprobs_backward_cuda needs. Ignored and
// out-of-range tokens get 0 everywhere.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spa_logprobs_forward_cuda(
    const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& labels, int64_t ignore_index,
    double lam) {
  check_logits_cuda(logits, "logits");
  check_logits_cuda(ref_logits, "ref_logits");
  check_labels_cuda(labels, logits);
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), "ref_logits must have logits' shape ", logits.sizes(), ", got ",
              ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), "ref_logits must have logits' dtype ",
              logits.scalar_type(), ", got ", ref_logits.scalar_type());
  TORCH_CHECK(ref_logits.device() == logits.device(), "ref_logits is on ", ref_logits.device(), " but logits on ",
              logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  const auto opts = logits.options().dtype(at::kFloat);
  auto tok = at::empty({N, T}, opts), lse = at::empty({N, T}, opts);
  auto ref_tok = at::empty({N, T}, opts), ext_tok = at::empty({N, T}, opts);
  auto bad = new_bad_label_flag(logits);
  if (rows == 0) return {tok, lse, ref_tok, ext_tok, bad};
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  const auto labels_c = labels.contiguous();
  // Two rows are read per token: the launch shape follows their combined size.
  const Launch launch = launch_for(rows, V, 2 * logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  SPA_DISPATCH_CUDA_FLOATS(logits.scalar_type(), "spa_logprobs_forward_cuda", [&] {
    auto kernel = launch.warp_per_row ? spa_logprobs_forward_kernel<scalar_t, true>
                                      : spa_logprobs_forward_kernel<scalar_t, false>;
    kernel<<<launch.grid, launch.block, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), ref_logits.const_data_ptr<scalar_t>(),
        ref_logits.stride(0), ref_logits.stride(1), labels_c.const_data_ptr<int64_t>(), rows, T, static_cast<int>(V),
        ignore_index, static_cast<float>(lam), tok.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(),
        ref_tok.mutable_data_ptr<float>(), ext_tok.mutable_data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {tok, lse, ref_tok, ext_tok, bad};
}

}  // namespace spa
