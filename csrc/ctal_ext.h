// ctal compiled extension: shared declarations.
//
// Layout conventions (same as ctal/ops/linear.py and docs/design.md section 2):
//   x, v       (B, T, C, H, W), N = H*W, R = T*C value rows, P = 9*T*C stacked shifted rows
//   weight     (N, T, 3, 3), shift d = 3*dy + dx means key offset (dy - 1, dx - 1)
//   bias       (N,) or absent
//   G          (B, P, R) with P ordered (d, t, c): the small matrix saved by the forward
//
// The linear form's key operand K_d (the normalized features shifted by stencil offset d, zero off
// the grid) is never materialized 9 times. A row pitch Wp >= W is chosen so that a row is a whole
// number of 16-byte vectors (Wp = W rounded up to 16 / element size: 2 for fp64, 4 for fp32, 8 for
// 16-bit); then
//   keys[b, dx, tc, yy*Wp + xx] = n[b, tc, yy - 1, xx + dx - 1]   (0 off the grid), yy in [0, H+2)
// holds three column-shifted copies (dx = 0, 1, 2) with one zero row above and below, and a row
// shift dy is a whole number of rows: K_{3*dy+dx}[b, tc, p] = keys[b, dx, tc, dy*Wp + p] for value
// position p = y*Wp + x in [0, Lv = H*Wp). For fixed dy the three dx copies are one strided matrix
// (3R rows, row stride Lk = (H+2)*Wp, starting dy*Wp elements in), so G and dV take 3 GEMMs, not 9,
// and every operand start and row stride is a multiple of 16 bytes (cuBLAS's vectorized / TMA
// kernels need that; one shared copy would be read at odd dx offsets). The copies cost 3x the
// normalized features (262 MB fp32 at NYUv2 B=8) instead of 9x for a full shifted operand.
// Values: vp[b, r, y*Wp + x] = v[b, r, y, x], zero for x >= W. When W is already a multiple of the
// vector width (the paper's grids), Wp == W and v itself is the value operand (no copy).
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
  int64_t B, T, C, H, W, N, R, P, Wp, Lv, Lk;
  static LinearGeom of(const at::Tensor& x) {
    LinearGeom g;
    g.B = x.size(0); g.T = x.size(1); g.C = x.size(2); g.H = x.size(3); g.W = x.size(4);
    g.N = g.H * g.W; g.R = g.T * g.C; g.P = 9 * g.R;
    const int64_t vec = x.element_size() >= 16 ? 1 : 16 / x.element_size();  // elements per 16 B
    g.Wp = (g.W + vec - 1) / vec * vec;
    g.Lv = g.H * g.Wp; g.Lk = (g.H + 2) * g.Wp;
    return g;
  }
  // Whether the value operand needs a padded copy (W is not a whole number of vectors).
  bool padded() const { return Wp != W; }
};

// Shape / dtype / device checks shared by every entry point (TORCH_CHECK with clear messages).
void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias);

// ---- elementwise passes of the linear form, one body per device ------------------------------
// prep: x, v (B,T,C,H,W) contiguous, wt (T, 9, N) contiguous ->
//   keys (B, 3, R, Lk) (every element written, the zero frame included),
//   vp (B, R, Lv) the padded values, written only when defined (callers pass an undefined tensor
//   when Wp == W, where v itself is the operand, and in the backward, which does not read it),
//   q (B, 9, T, C, N) = wt[t,d,i] * n[b,t,c,i], norm (B, T, N)
//   (norm = max(||x||, eps) as float32 for 16-bit inputs, else the input dtype).
// finish: dq (B, 9, T, C, N), dk (B, 9, T, C, N) (= dG_d v, the key-side gradient at the value
//   pixel each key met, before the un-shift) -> dx (B,T,C,H,W), dwp (B, T, 9, N) per-batch partial
//   weight gradient (fp32 for 16-bit inputs). dn is accumulated in that type too, until dx.
void linear_prep_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& keys,
                     at::Tensor& vp, at::Tensor& q, at::Tensor& norm);
void linear_finish_cpu(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                       const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp);
#ifdef CTAL_WITH_CUDA
void linear_prep_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& keys,
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
