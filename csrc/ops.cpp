// One op library, ctal_ext, with CPU and CUDA bodies; the Python module ctal._C only reports how
// the extension was built. Autograd, fake (meta) kernels and the ctal.ops backends are registered
// from Python in ctal/ops/extension.py.
#include "ctal_ext.h"

#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace ctal_ext {

bool poison_outputs() {
  const char* e = std::getenv("CTAL_POISON");  // read per call: tests toggle it
  return e != nullptr && std::strcmp(e, "1") == 0;
}

at::Tensor output_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 5, op, ": x must be (B, T, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": x must be non-empty, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(v.sizes() == x.sizes(), op, ": v must have the shape of x ", x.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == x.scalar_type() && v.device() == x.device(), op,
              ": v must have the dtype and device of x (", x.scalar_type(), ", ", x.device(),
              "), got (", v.scalar_type(), ", ", v.device(), ")");
  const int64_t T = x.size(1), N = x.size(3) * x.size(4);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == N && weight.size(1) == T &&
                  weight.size(2) == 3 && weight.size(3) == 3,
              op, ": weight must be (H*W, T, 3, 3) = (", N, ", ", T, ", 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(), op,
              ": weight must have the dtype and device of x");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (H*W,) = (", N,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have the dtype and device of x");
  }
}

}  // namespace ctal_ext

TORCH_LIBRARY(ctal_ext, m) {
  m.def("linear_fwd(Tensor x, Tensor v, Tensor weight, Tensor? bias) -> (Tensor, Tensor)");
  m.def("linear_bwd(Tensor dy, Tensor x, Tensor v, Tensor weight, Tensor? bias, Tensor g) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_fwd(Tensor x, Tensor v, Tensor weight, Tensor? bias, bool allow_tf32) -> Tensor");
  m.def("fused_bwd(Tensor dy, Tensor x, Tensor v, Tensor weight, Tensor? bias, bool allow_tf32) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ctal_ext, CPU, m) {
  m.impl("linear_fwd", &ctal_ext::linear_fwd);
  m.impl("linear_bwd", &ctal_ext::linear_bwd);
}

#ifdef CTAL_WITH_CUDA
TORCH_LIBRARY_IMPL(ctal_ext, CUDA, m) {
  m.impl("linear_fwd", &ctal_ext::linear_fwd);
  m.impl("linear_bwd", &ctal_ext::linear_bwd);
  m.impl("fused_fwd", &ctal_ext::fused_fwd_cuda);
  m.impl("fused_bwd", &ctal_ext::fused_bwd_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ctal compiled kernels; the ops live in torch.ops.ctal_ext";
  m.def("with_cuda", [] {
#ifdef CTAL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA kernels were compiled in");
  m.def("poison_outputs", &ctal_ext::poison_outputs,
        "whether output buffers are NaN-filled before the kernels write them (CTAL_POISON=1)");
  m.def("fused_smem_bytes",
        [](int64_t T, int64_t C, int64_t H, int64_t W, const std::string& dtype, bool allow_tf32,
           bool backward) -> int64_t {
          at::ScalarType s;
          if (dtype == "float32") s = at::kFloat;
          else if (dtype == "float64") s = at::kDouble;
          else if (dtype == "bfloat16") s = at::kBFloat16;
          else if (dtype == "float16") s = at::kHalf;
          else TORCH_CHECK(false, "fused_smem_bytes: dtype must be float32, float64, bfloat16 or float16, got ", dtype);
#ifdef CTAL_WITH_CUDA
          return ctal_ext::fused_smem_bytes(T, C, H, W, s, allow_tf32, backward);
#else
          (void)T; (void)C; (void)H; (void)W; (void)s; (void)allow_tf32; (void)backward;
          return -1;
#endif
        },
        "shared memory (bytes) the cuda-fused kernels need, -1 when built without CUDA",
        pybind11::arg("T"), pybind11::arg("C"), pybind11::arg("H"), pybind11::arg("W"),
        pybind11::arg("dtype"), pybind11::arg("allow_tf32"), pybind11::arg("backward"));
}
