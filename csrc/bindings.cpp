// The one pybind11 module, spa_kernels._C: CPU kernels (SPA_WITH_CPU) and CUDA kernels (SPA_WITH_CUDA), each
// compiled in unless setup.py was told to skip it or could not build it.
// Each kernel lives in csrc/<op>/<op>_{cpu.cpp,cuda.cu}; its Python wrapper in spa_kernels/ops/<op>/{cpu,cuda}.py.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#ifndef SPA_CUDA_ARCHS
#define SPA_CUDA_ARCHS ""
#endif
#ifndef SPA_CPU_CAPABILITY
#define SPA_CPU_CAPABILITY "DEFAULT"
#endif
#ifndef SPA_TORCH_VERSION
#define SPA_TORCH_VERSION ""
#endif
#ifndef SPA_CUDA_VERSION
#define SPA_CUDA_VERSION ""
#endif

namespace spa {
#ifdef SPA_WITH_CPU
// logprobs
std::tuple<at::Tensor, at::Tensor> logprobs_forward_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double inv_temperature, double softcap);
at::Tensor logprobs_backward_cpu(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index, double inv_temperature,
                                 const std::optional<at::Tensor>& grad_out, double softcap);
// spa_logprobs
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> spa_logprobs_forward_cpu(const at::Tensor& logits,
                                                                                    const at::Tensor& ref_logits,
                                                                                    const at::Tensor& labels,
                                                                                    int64_t ignore_index, double lam);
#endif
#ifdef SPA_WITH_CUDA
// logprobs (the last output of each forward is the bad-label flag, see spa_kernels/_validation.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward_cuda(const at::Tensor& logits,
                                                                     const at::Tensor& labels, int64_t ignore_index,
                                                                     double inv_temperature, double softcap);
at::Tensor logprobs_backward_cuda(const at::Tensor& grad_token, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index, double inv_temperature,
                                  const std::optional<at::Tensor>& grad_out, double softcap);
// spa_logprobs
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> spa_logprobs_forward_cuda(
    const at::Tensor& logits, const at::Tensor& ref_logits, const at::Tensor& labels, int64_t ignore_index,
    double lam);
#endif
}  // namespace spa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spa_kernels compiled kernels (CPU always; CUDA when built with it)";
#ifdef SPA_WITH_CPU
  m.def("logprobs_forward_cpu", &spa::logprobs_forward_cpu, "token log-probs and log-sum-exp (CPU)",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("inv_temperature"),
        py::arg("softcap") = 0.0);
  m.def("logprobs_backward_cpu", &spa::logprobs_backward_cpu, "softmax gradient of token log-probs (CPU)",
        py::arg("grad_token"), py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::arg("grad_out") = py::none(), py::arg("softcap") = 0.0);
  m.def("spa_logprobs_forward_cpu", &spa::spa_logprobs_forward_cpu,
        "policy, reference and extrapolated token log-probs in one pass (CPU)", py::arg("logits"),
        py::arg("ref_logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("lam"));
#endif
#ifdef SPA_WITH_CUDA
  m.def("logprobs_forward_cuda", &spa::logprobs_forward_cuda, "token log-probs and log-sum-exp (CUDA)",
        py::arg("logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("inv_temperature"),
        py::arg("softcap") = 0.0);
  m.def("logprobs_backward_cuda", &spa::logprobs_backward_cuda, "softmax gradient of token log-probs (CUDA)",
        py::arg("grad_token"), py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("ignore_index"),
        py::arg("inv_temperature"), py::arg("grad_out") = py::none(), py::arg("softcap") = 0.0);
  m.def("spa_logprobs_forward_cuda", &spa::spa_logprobs_forward_cuda,
        "policy, reference and extrapolated token log-probs in one pass (CUDA)", py::arg("logits"),
        py::arg("ref_logits"), py::arg("labels"), py::arg("ignore_index"), py::arg("lam"));
#endif
  m.def("build_info", []() {
    py::dict d;
#ifdef SPA_WITH_CPU
    d["cpu"] = true;
#else
    d["cpu"] = false;
#endif
#ifdef SPA_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = std::string(SPA_CUDA_ARCHS);
    d["cuda_version"] = std::string(SPA_CUDA_VERSION);
    d["cpu_capability"] = std::string(SPA_CPU_CAPABILITY);
    d["torch_version"] = std::string(SPA_TORCH_VERSION);
    return d;
  });
}
