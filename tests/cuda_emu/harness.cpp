// Launchers for the emulated kernels (appended by build.py after cuda_emu.h and the kernels' source). They mirror
// the real launchers in csrc/*/*_cuda.cu (shapes, strides, launch shape from launch_for) on CPU tensors, and take
// the launch shape as an argument too so both the warp-per-row and the block-per-row kernels can be driven at any V.

namespace spa {
namespace {

using namespace spa::cuda;

Launch pick_launch(int64_t rows, int64_t V, int64_t elem_size, int64_t mode, int64_t threads) {
  Launch l = launch_for(rows, V, elem_size);
  if (mode >= 0) {  // force: 1 = warp per row, 0 = block per row with `threads` threads
    l.warp_per_row = mode == 1;
    const int64_t rows_per_block = l.warp_per_row ? kWarpRowsThreads / 32 : 1;
    l.grid = dim3(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
    l.block = dim3(static_cast<unsigned>(l.warp_per_row ? kWarpRowsThreads : threads));
  }
  return l;
}

#define EMU_DISPATCH(TYPE, ...)                                                                       \
  [&] {                                                                                               \
    switch (TYPE) {                                                                                   \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                              \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }                   \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                           \
      default: TORCH_CHECK(false, "emulated kernels take float32 / bfloat16 / float16, got ", TYPE);  \
    }                                                                                                 \
  }()

}  // namespace

std::vector<at::Tensor> emu_logprobs_forward(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                             double inv_temperature, int64_t mode, int64_t threads, double softcap) {
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  TORCH_CHECK(logits.stride(2) == 1 || V <= 1);
  auto opts = logits.options().dtype(at::kFloat);
  auto token = at::full({N, T}, NAN, opts), lse = at::full({N, T}, NAN, opts);  // poisoned
  auto bad = at::full({1}, std::numeric_limits<int64_t>::max(), logits.options().dtype(at::kLong));
  auto labels_c = labels.contiguous();
  const Launch l = pick_launch(rows, V, logits.element_size(), mode, threads);
  EMU_DISPATCH(logits.scalar_type(), [&] {
    auto kernel = l.warp_per_row ? logprobs_forward_kernel<scalar_t, true> : logprobs_forward_kernel<scalar_t, false>;
    emu::launch(l.grid, l.block, [&] {
      kernel(logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
             labels_c.const_data_ptr<int64_t>(), rows, T, static_cast<int>(V), ignore_index,
             static_cast<float>(inv_temperature), static_cast<float>(softcap), token.data_ptr<float>(),
             lse.data_ptr<float>(),
             reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
    });
  });
  return {token, lse, bad};
}

void emu_logprobs_backward(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, int64_t ignore_index, double inv_temperature, at::Tensor grad,
                           int64_t mode, int64_t threads, double softcap) {
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() && grad.stride(2) == 1);
  auto labels_c = labels.contiguous();
  auto g_c = grad_token.contiguous();
  auto lse_c = lse.contiguous();
  const Launch l = pick_launch(rows, V, logits.element_size(), mode, threads);
  EMU_DISPATCH(logits.scalar_type(), [&] {
    auto kernel = l.warp_per_row ? logprobs_backward_kernel<scalar_t, true> : logprobs_backward_kernel<scalar_t, false>;
    emu::launch(l.grid, l.block, [&] {
      kernel(g_c.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
             labels_c.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(), rows, T, static_cast<int>(V),
             ignore_index, static_cast<float>(inv_temperature), static_cast<float>(softcap),
             grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1));
    });
  });
}

std::vector<at::Tensor> emu_spa_logprobs_forward(const at::Tensor& logits, const at::Tensor& ref_logits,
                                                 const at::Tensor& labels, int64_t ignore_index, double lam,
                                                 int64_t mode, int64_t threads) {
  const int64_t N = logits.size(0), T = logits.size(1), V = logits.size(2), rows = N * T;
  auto opts = logits.options().dtype(at::kFloat);
  std::vector<at::Tensor> out;
  for (int i = 0; i < 4; ++i) out.push_back(at::full({N, T}, NAN, opts));
  auto bad = at::full({1}, std::numeric_limits<int64_t>::max(), logits.options().dtype(at::kLong));
  auto labels_c = labels.contiguous();
  const Launch l = pick_launch(rows, V, 2 * logits.element_size(), mode, threads);
  EMU_DISPATCH(logits.scalar_type(), [&] {
    auto kernel =
        l.warp_per_row ? spa_logprobs_forward_kernel<scalar_t, true> : spa_logprobs_forward_kernel<scalar_t, false>;
    emu::launch(l.grid, l.block, [&] {
      kernel(logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
             ref_logits.const_data_ptr<scalar_t>(), ref_logits.stride(0), ref_logits.stride(1),
             labels_c.const_data_ptr<int64_t>(), rows, T, static_cast<int>(V), ignore_index, static_cast<float>(lam),
             out[0].data_ptr<float>(), out[1].data_ptr<float>(), out[2].data_ptr<float>(), out[3].data_ptr<float>(),
             reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()));
    });
  });
  out.push_back(bad);
  return out;
}

std::vector<int64_t> emu_launch_shape(int64_t rows, int64_t V, int64_t elem_size) {
  const Launch l = launch_for(rows, V, elem_size);
  return {l.warp_per_row ? 1 : 0, static_cast<int64_t>(l.grid.x), static_cast<int64_t>(l.block.x)};
}

}  // namespace spa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logprobs_forward", &spa::emu_logprobs_forward, py::arg("logits"), py::arg("labels"),
        py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("mode"), py::arg("threads"),
        py::arg("softcap") = 0.0);
  m.def("logprobs_backward", &spa::emu_logprobs_backward, py::arg("grad_token"), py::arg("logits"),
        py::arg("labels"), py::arg("lse"), py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("grad"),
        py::arg("mode"), py::arg("threads"), py::arg("softcap") = 0.0);
  m.def("spa_logprobs_forward", &spa::emu_spa_logprobs_forward);
  m.def("launch_shape", &spa::emu_launch_shape);
}
