// SPA triple log-probs on the CPU, forward: one pass over logits z and ref_logits z_ref per token gives
// log p(y), log p_ref(y) and the de-coupled noise detection log-prob log softmax((1 + lam) z - lam z_ref)(y).
// The backward only reaches the policy logits, through log p(y): it is logprobs_backward_cpu with scale 1.
//
// Python side: spa_kernels/ops/spa_logprobs/cpu.py.
#include "../logprobs/logprobs_cpu.h"

namespace spa {
namespace {

template <typename scalar_t>
struct SpaRow {
  using A = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<A>;
  using IO = VecIO<scalar_t>;
  static constexpr int64_t W = Vec::size();

  // Extrapolated logit (1 + lam) z - lam z_ref; a token the policy rules out (z = -inf) stays -inf even where the
  // reference rules it out too (padded vocabulary entries), instead of -inf + inf = NaN.
  static inline Vec extrapolate(const Vec& a, const Vec& r, const Vec& c1, const Vec& lam) {
    const Vec ninf(-std::numeric_limits<A>::infinity());
    return Vec::blendv(a * c1 - r * lam, ninf, a == ninf);
  }
  static inline A extrapolate(A a, A r, A c1, A lam) {
    return a == -std::numeric_limits<A>::infinity() ? a : c1 * a - lam * r;
  }

  // Fills lse[0..2] = logsumexp of z, z_ref and (1 + lam) z - lam z_ref over the row, reading each row once.
  static inline void triple_lse(const scalar_t* x, const scalar_t* xr, int64_t V, A lam, A* lse) {
    OnlineLSE<A> acc[3];
    const A c1 = A(1) + lam;
    const Vec vc1(c1), vlam(lam);
    constexpr A ninf = -std::numeric_limits<A>::infinity();
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t len = std::min(kBlock, V - b);
      const scalar_t* p = x + b;
      const scalar_t* pr = xr + b;
      Vec m0(ninf), m1(ninf), m2(ninf);
      int64_t i = 0;
      for (; i + W <= len; i += W) {
        const Vec a = IO::load(p + i), r = IO::load(pr + i);
        m0 = at::vec::maximum(m0, a);
        m1 = at::vec::maximum(m1, r);
        m2 = at::vec::maximum(m2, extrapolate(a, r, vc1, vlam));
      }
      A bm[3] = {horizontal_max(m0), horizontal_max(m1), horizontal_max(m2)};
      for (int64_t j = i; j < len; ++j) {
        const A a = static_cast<A>(p[j]), r = static_cast<A>(pr[j]);
        const A e = extrapolate(a, r, c1, lam);
        bm[0] = nan_max(bm[0], a);
        bm[1] = nan_max(bm[1], r);
        bm[2] = nan_max(bm[2], e);
      }
      bool live[3];
      for (int k = 0; k < 3; ++k) live[k] = acc[k].raise(bm[k]);
      const Vec s0(acc[0].m), s1(acc[1].m), s2(acc[2].m);
      Vec e0(0), e1(0), e2(0);
      for (i = 0; i + W <= len; i += W) {
        const Vec a = IO::load(p + i), r = IO::load(pr + i);
        e0 = e0 + (a - s0).exp();
        e1 = e1 + (r - s1).exp();
        e2 = e2 + (extrapolate(a, r, vc1, vlam) - s2).exp();
      }
      A add[3] = {horizontal_sum(e0), horizontal_sum(e1), horizontal_sum(e2)};
      for (int64_t j = i; j < len; ++j) {
        const A a = static_cast<A>(p[j]), r = static_cast<A>(pr[j]);
        add[0] += std::exp(a - acc[0].m);
        add[1] += std::exp(r - acc[1].m);
        add[2] += std::exp(extrapolate(a, r, c1, lam) - acc[2].m);
      }
      // A stream whose values so far are all -inf adds exp(-inf - -inf) = NaN above; it contributes nothing.
      for (int k = 0; k < 3; ++k)
        if (live[k]) acc[k].s += add[k];
    }
    for (int k = 0; k < 3; ++k) lse[k] = acc[k].value();
  }
};

}  // namespace

// Returns (token_logps, lse, token_ref_logps, token_extrapolated_logps), each [N, T] in the accumulation dtype;
// `lse` (of the policy logits) is what logprobs_backward_cpu needs. Ignored tokens get 0 everywhere.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spa_logprobs_forward_cpu(const at::Tensor& logits,
                                                                                    const at::Tensor& ref_logits,
                                                                                    const at::Tensor& labels,
                                                                                    int64_t ignore_index,
                                                                                    double lam) {
  check_logits(logits, "logits");
  check_logits(ref_logits, "ref_logits");
  check_labels(labels, logits);
  TORCH_CHECK(ref_logits.sizes() == logits.sizes(), "ref_logits must have logits' shape ", logits.sizes(),
              ", got ", ref_logits.sizes());
  TORCH_CHECK(ref_logits.scalar_type() == logits.scalar_type(), "ref_logits must have logits' dtype ",
              logits.scalar_type(), ", got ", ref_logits.scalar_type());
  TORCH_CHECK(logits.device().is_cpu() && ref_logits.device().is_cpu() && labels.device().is_cpu(),
              "spa_logprobs_forward_cpu needs CPU tensors");
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(acc_dtype);
  auto tok = at::empty({N, T}, opts), lse = at::empty({N, T}, opts);
  auto ref_tok = at::empty({N, T}, opts), ext_tok = at::empty({N, T}, opts);
  if (N * T == 0) return {tok, lse, ref_tok, ext_tok};
  TORCH_CHECK(V > 0, "logits has an empty vocabulary dimension");
  const auto labels_c = labels.contiguous();
  FirstBadLabel bad;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "spa_logprobs_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const scalar_t* rbase = ref_logits.const_data_ptr<scalar_t>();
    const int64_t sN = logits.stride(0), sT = logits.stride(1);
    const int64_t rN = ref_logits.stride(0), rT = ref_logits.stride(1);
    const int64_t* y = labels_c.const_data_ptr<int64_t>();
    A* out[4] = {tok.data_ptr<A>(), lse.data_ptr<A>(), ref_tok.data_ptr<A>(), ext_tok.data_ptr<A>()};
    const A lam_a = static_cast<A>(lam);
    at::parallel_for(0, N * T, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t label = y[r];
        for (auto* o : out) o[r] = 0;
        if (label == ignore_index) continue;
        if (label < 0 || label >= V) {
          bad.record(r);
          continue;
        }
        const int64_t n = r / T, t = r % T;
        const scalar_t* x = base + n * sN + t * sT;
        const scalar_t* xr = rbase + n * rN + t * rT;
        A l[3];
        SpaRow<scalar_t>::triple_lse(x, xr, V, lam_a, l);
        const A zy = static_cast<A>(x[label]), zry = static_cast<A>(xr[label]);
        out[0][r] = zy - l[0];
        out[1][r] = l[0];
        out[2][r] = zry - l[1];
        out[3][r] = SpaRow<scalar_t>::extrapolate(zy, zry, A(1) + lam_a, lam_a) - l[2];
      }
    });
  });
  if (bad.any()) throw_bad_label(labels_c, bad.index.load(), T, V, ignore_index);
  return {tok, lse, ref_tok, ext_tok};
}

}  // namespace spa
