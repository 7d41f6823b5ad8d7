// Row primitives shared by the CPU log-prob kernels (logprobs, spa_logprobs): a blockwise online log-sum-exp and
// the softmax-gradient row writer. Header-only so each op's .cpp reads top to bottom with its own entry points.
#pragma once

#include "../common.h"

namespace spa {

// Online log-sum-exp works on blocks of kBlock elements: one sweep takes the block max, a second sweep (the block
// is still in L1: 4 KiB of float32) adds exp(x - running_max). The row is read from memory once.
//
// Every scaled logit u = x * scale is rounded to the accumulation type once, then shifted: the forward's terms
// exp(u - m), its log-prob u_label - lse and the backward's exp(u - lse) all see the same u. The extension is compiled
// with -ffp-contract=off (setup.py) so that the compiler cannot fuse x * scale - m into one FMA in some places and
// not in others: at |u| ~ 1e4 the product's rounding error is ~1e-3 and an FMA in the forward only would put it in
// the log-sum-exp but not in the backward's p (a gradient error of that size at temperature != 1).
constexpr int64_t kBlock = 1024;

// NaN and +inf follow torch.log_softmax: a row holding a NaN or a +inf logit has a NaN log-sum-exp, hence NaN
// log-probs for every label of the row and a NaN gradient row.
template <typename A>
struct OnlineLSE {
  A m = -std::numeric_limits<A>::infinity();
  A s = 0;
  // Raise the running max to at least `block_max`; returns false when everything so far is -inf (nothing to add).
  // A NaN block max (the block holds a NaN) makes the state NaN for good.
  inline bool raise(A block_max) {
    if (block_max != block_max) {
      m = s = std::numeric_limits<A>::quiet_NaN();
      return false;
    }
    if (block_max > m) {
      s *= std::exp(m - block_max);  // m == -inf -> s == 0 and exp(-inf) == 0
      m = block_max;
    }
    return m != -std::numeric_limits<A>::infinity() && m == m;
  }
  inline A value() const {
    if (m == std::numeric_limits<A>::infinity()) return std::numeric_limits<A>::quiet_NaN();  // a +inf logit
    return m + std::log(s);  // all -inf -> -inf + log(0) = -inf; NaN state -> NaN
  }
};

// Final-logit softcapping (Gemma 2 / 3): with cap > 0 every scaled logit u becomes c = cap * tanh(u / cap) before
// the softmax (cap = 0: none), and the backward multiplies the softmax gradient by dc/du = 1 - (c / cap)^2. The
// scalar and the vector paths compute c the same way (u * (1 / cap), tanh, * cap).
template <typename A>
inline A softcapped(A u, A cap) {
  return cap > A(0) ? std::tanh(u * (A(1) / cap)) * cap : u;
}

template <typename scalar_t>
struct RowOps {
  using A = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<A>;
  using IO = VecIO<scalar_t>;
  static constexpr int64_t W = Vec::size();

  static inline Vec softcapped_vec(Vec u, A cap) {
    return cap > A(0) ? (u * Vec(A(1) / cap)).tanh() * Vec(cap) : u;
  }

  static inline A max_scaled(const scalar_t* x, int64_t len, A scale, A cap = 0) {
    Vec vm(-std::numeric_limits<A>::infinity());
    const Vec vscale(scale);
    int64_t i = 0;
    for (; i + W <= len; i += W) vm = at::vec::maximum(vm, IO::load(x + i) * vscale);
    A m = horizontal_max(vm);
    for (; i < len; ++i) m = nan_max(m, static_cast<A>(x[i]) * scale);
    return softcapped(m, cap);  // tanh is increasing: the max of the capped logits is the capped max
  }

  static inline A sum_exp_scaled(const scalar_t* x, int64_t len, A scale, A shift, A cap = 0) {
    Vec vs(0);
    const Vec vscale(scale), vshift(shift);
    int64_t i = 0;
    if (cap > A(0)) {
      for (; i + W <= len; i += W) vs = vs + (softcapped_vec(IO::load(x + i) * vscale, cap) - vshift).exp();
    } else {
      for (; i + W <= len; i += W) vs = vs + (IO::load(x + i) * vscale - vshift).exp();
    }
    A s = horizontal_sum(vs);
    for (; i < len; ++i) s += std::exp(softcapped(static_cast<A>(x[i]) * scale, cap) - shift);
    return s;
  }

  // logsumexp(softcapped(x * scale)) over a row of V elements, reading the row once.
  static inline A logsumexp(const scalar_t* x, int64_t V, A scale, A cap = 0) {
    OnlineLSE<A> acc;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t len = std::min(kBlock, V - b);
      if (!acc.raise(max_scaled(x + b, len, scale, cap))) continue;
      acc.s += sum_exp_scaled(x + b, len, scale, acc.m, cap);
    }
    return acc.value();
  }

  // gx = g * scale * (onehot(label) - softmax(x * scale)); gx may alias x (in-place backward). With cap > 0 the
  // softmax is of the capped logits c and each term is multiplied by 1 - (c / cap)^2.
  static inline void softmax_grad_row(const scalar_t* x, scalar_t* gx, int64_t V, A scale, A lse, A g,
                                      int64_t label, A cap = 0) {
    // read before an in-place write overwrites it
    const A z_label = softcapped(static_cast<A>(x[label]) * scale, cap);
    const Vec vscale(scale), vlse(lse), vcoef(-g * scale);
    int64_t i = 0;
    if (cap > A(0)) {
      const Vec one(A(1)), vinv(A(1) / cap);
      for (; i + W <= V; i += W) {
        const Vec c = softcapped_vec(IO::load(x + i) * vscale, cap);
        const Vec t = c * vinv;
        IO::store(gx + i, vcoef * (c - vlse).exp() * (one - t * t));
      }
      for (; i < V; ++i) {
        const A c = softcapped(static_cast<A>(x[i]) * scale, cap), t = c / cap;
        gx[i] = static_cast<scalar_t>(-g * scale * std::exp(c - lse) * (A(1) - t * t));
      }
      const A t = z_label / cap;
      gx[label] = static_cast<scalar_t>(g * scale * (A(1) - std::exp(z_label - lse)) * (A(1) - t * t));
      return;
    }
    for (; i + W <= V; i += W) IO::store(gx + i, vcoef * (IO::load(x + i) * vscale - vlse).exp());
    for (; i < V; ++i) gx[i] = static_cast<scalar_t>(-g * scale * std::exp(static_cast<A>(x[i]) * scale - lse));
    // The label term in acc precision, rounded once (for bf16 this is where the gradient signal lives).
    gx[label] = static_cast<scalar_t>(g * scale * (A(1) - std::exp(z_label - lse)));
  }
};

// Rows are walked in parallel; each covers V elements, so small V gets several rows per task.
inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
}

}  // namespace spa
