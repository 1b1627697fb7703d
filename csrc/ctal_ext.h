// ctal compiled extension: shared declarations.
//
// Layout conventions (same as ctal/ops/linear.py and docs/design.md section 2):
//   x, v       (B, T, C, H, W), N = H*W, R = T*C value rows, P = 9*T*C stacked shifted rows
//   weight     (N, T, 3, 3), shift d = 3*dy + dx means key offset (dy - 1, dx - 1)
//   bias       (N,) or absent
//   G          (B, P, R) with P ordered (d, t, c): the small matrix saved by the forward
//
// The linear form works on "row-padded" grids so that every shifted copy of the normalized
// features is a plain strided view (no 9x copy):
//   Wp = W + 2, Lv = H * Wp, Ln = (H + 2) * Wp + 2
//   vp[b, r, y*Wp + x + 1]        = v[b, r, y, x]          (columns 0 and W+1 of each row are 0)
//   np[b, tc, 1 + (y+1)*Wp + x+1] = n[b, tc, y, x]          (a zero frame of one row/column + 2)
// so that K_d[b, tc, p] = np[b, tc, s_d + p] with s_d = dy*Wp + dx, p in [0, Lv), is the key
// n[b, tc, y+dy-1, x+dx-1] for p = y*Wp + x + 1 (zero outside the grid), and every p on a pad
// column meets vp == 0.
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ctal_ext {

constexpr double kNormEps = 1e-12;  // F.normalize's eps

// A buffer the kernels must write completely. With CTAL_POISON=1 in the environment (the tests set
// it) it is NaN-filled first, so an element a kernel forgets to write fails the comparison with
// the reference instead of passing on whatever the allocator returned.
bool poison_outputs();

// Every op body starts with one: the ops compute in their inputs' dtype, so autocast must not
// re-cast the GEMMs inside them (an fp32 call under bf16 autocast would mix dtypes in one bmm).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};
at::Tensor output_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts);

struct LinearGeom {
  int64_t B, T, C, H, W, N, R, P, Wp, Lv, Ln;
  static LinearGeom of(const at::Tensor& x) {
    LinearGeom g;
    g.B = x.size(0); g.T = x.size(1); g.C = x.size(2); g.H = x.size(3); g.W = x.size(4);
    g.N = g.H * g.W; g.R = g.T * g.C; g.P = 9 * g.R;
    g.Wp = g.W + 2; g.Lv = g.H * g.Wp; g.Ln = (g.H + 2) * g.Wp + 2;
    return g;
  }
  int64_t shift_start(int64_t d) const { return (d / 3) * Wp + (d % 3); }
};

// Shape / dtype / device checks shared by every entry point (TORCH_CHECK with clear messages).
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// ---- elementwise passes of the linear form, one body per device ------------------------------
// prep: x, v (B,T,C,H,W) contiguous, wt (T, 9, N) contiguous ->
//   np (B, R, Ln), vp (B, R, Lv), q (B, 9, T, C, N) = wt[t,d,i] * n[b,t,c,i], norm (B, T, N)
//   (norm = max(||x||, eps) as float32 for 16-bit inputs, else the input dtype).
//   np / vp must arrive zero-filled on CUDA; the CPU body writes every element itself.
// finish: dq (B, 9, T, C, N), dk (B, 9, T, C, Lv) (= dG_d vp, the key-side gradient before the
//   un-shift) -> dx (B,T,C,H,W), dwp (B, T, 9, N) per-batch partial weight gradient (fp32 for
//   16-bit inputs).
void linear_prep_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& np,
                     at::Tensor& vp, at::Tensor& q, at::Tensor& norm);
void linear_finish_cpu(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                       const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp);
#ifdef CTAL_WITH_CUDA
void linear_prep_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& np,
                      at::Tensor& vp, at::Tensor& q, at::Tensor& norm);
void linear_finish_cuda(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                        const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp);

// ---- fused quadratic form (CUDA only) ------------------------------------------------------------
at::Tensor fused_fwd_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, bool allow_tf32);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, bool allow_tf32);
// Shared memory (bytes) the fused kernels need for a problem, or -1 when it cannot be tiled.
int64_t fused_smem_bytes(int64_t T, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                         bool allow_tf32, bool backward);
#endif

// ---- the linear form, device-generic host code (GEMMs through ATen: BLAS on CPU, cuBLAS on CUDA)
std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& v,
                                              const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& g);

}  // namespace ctal_ext
