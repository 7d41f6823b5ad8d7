// token / sequence log-probs on the CPU: forward (per-token log-prob + log-sum-exp) and backward (softmax gradient,
// optionally written in place into the logits). Float32 accumulation (float64 for float64 inputs); rows in parallel.
//
// Python side: spa_kernels/ops/logprobs/cpu.py. The per-sequence sum/average is a [N, T] reduction done there.
#include "logprobs_cpu.h"

namespace spa {

// logits [N, T, V] (any strides over N and T, unit stride over V), labels [N, T] int64.
// Returns (token_logprobs [N, T], lse [N, T]) in the accumulation dtype; ignored tokens get 0 in both.
// softcap > 0: the scaled logits u are capped to softcap * tanh(u / softcap) first (0: no capping).
std::tuple<at::Tensor, at::Tensor> logprobs_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double inv_temperature, double softcap) {
  check_logits(logits, "logits");
  check_labels(labels, logits);
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "logprobs_forward_cpu needs CPU tensors");
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto token = at::empty({N, T}, logits.options().dtype(acc_dtype));
  auto lse = at::empty({N, T}, logits.options().dtype(acc_dtype));
  if (N * T == 0) return {token, lse};
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  const auto labels_c = labels.contiguous();
  FirstBadLabel bad;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t sN = logits.stride(0), sT = logits.stride(1);
    const int64_t* y = labels_c.const_data_ptr<int64_t>();
    A* tok = token.data_ptr<A>();
    A* lsep = lse.data_ptr<A>();
    const A scale = static_cast<A>(inv_temperature);
    const A cap = static_cast<A>(softcap);
    at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = y[r];
        tok[r] = 0;
        lsep[r] = 0;
        if (label == ignore_index) continue;
        if (label < 0 || label >= V) {
          bad.record(r);
          continue;
        }
        const scalar_t* x = base + (r / T) * sN + (r % T) * sT;
        const A l = RowOps<scalar_t>::logsumexp(x, V, scale, cap);
        lsep[r] = l;
        tok[r] = softcapped(static_cast<A>(x[label]) * scale, cap) - l;
      }
    });
  });
  if (bad.any()) throw_bad_label(labels_c, bad.index.load(), T, V, ignore_index);
  return {token, lse};
}

// grad_logits[n, t, :] = grad_token[n, t] * (onehot(label) - softmax(logits * s)) * s, s = 1 / temperature (with
// softcap > 0: the softmax of the capped logits c, times 1 - (c / softcap)^2).
// grad_out: optional destination of logits' shape and dtype (unit stride over V); passing logits itself makes the
// backward in place (the caller must not use logits afterwards). Ignored tokens get zero rows.
at::Tensor logprobs_backward_cpu(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index, double inv_temperature,
                                 const std::optional<at::Tensor>& grad_out, double softcap) {
  check_logits(logits, "logits");
  check_labels(labels, logits);
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_token.sizes() == labels.sizes() && grad_token.scalar_type() == acc_dtype,
              "grad_token must be [N, T] ", acc_dtype, ", got ", grad_token.sizes(), " ", grad_token.scalar_type());
  TORCH_CHECK(lse.sizes() == labels.sizes() && lse.scalar_type() == acc_dtype, "lse must be [N, T] ", acc_dtype);
  at::Tensor grad;
  if (grad_out.has_value()) {
    grad = *grad_out;
    TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type(),
                "grad_out must match logits' shape and dtype");
    TORCH_CHECK(V == 0 || grad.stride(2) == 1, "grad_out must be contiguous along the vocabulary dimension");
  } else {
    grad = at::empty(logits.sizes(), logits.options());
  }
  if (N * T == 0 || V == 0) return grad;
  const auto labels_c = labels.contiguous();
  const auto g_c = grad_token.contiguous();
  const auto lse_c = lse.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprobs_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    const int64_t sN = logits.stride(0), sT = logits.stride(1);
    const int64_t gN = grad.stride(0), gT = grad.stride(1);
    const int64_t* y = labels_c.const_data_ptr<int64_t>();
    const A* g = g_c.const_data_ptr<A>();
    const A* l = lse_c.const_data_ptr<A>();
    const A scale = static_cast<A>(inv_temperature);
    const A cap = static_cast<A>(softcap);
    at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / T, t = r % T;
        scalar_t* gx = gbase + n * gN + t * gT;
        const int64_t label = y[r];
        // Out-of-range labels were rejected by the forward; treat them as ignored here rather than read out of bounds.
        if (label == ignore_index || label < 0 || label >= V || g[r] == A(0)) {
          std::fill(gx, gx + V, scalar_t(0));
          continue;
        }
        RowOps<scalar_t>::softmax_grad_row(base + n * sN + t * sT, gx, V, scale, l[r], g[r], label, cap);
      }
    });
  });
  return grad;
}

}  // namespace spa
