// The exact linear form of CTAL (docs/design.md section 2), device-generic host code.
//
//   G_d = K_d V^T          (R x R per shift d and batch item; K_d a strided view of np, no copy)
//   Y   = G^T Q + sumV b^T (one batched GEMM plus a rank-1 update)
// backward
//   dG  = Q dY^T,  dQ = G dY,  dK = dG vp,  dV = sum_d dG_d^T K_d + dY b,  db = sumV^T dY
// The GEMMs go through ATen (BLAS on CPU, cuBLAS on CUDA); the gathers and scatters around them
// (normalize + pad + per-row weights, and the fold of dQ / un-shift of dK / normalization backward)
// are the device-specific passes in linear_cpu.cpp and linear_cuda.cu.
#include "ctal_ext.h"

#include <ATen/ATen.h>

namespace ctal_ext {

namespace {

bool is_half_like(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

struct Prepped {
  at::Tensor np, vp, q, norm, wt;
};

Prepped prep(const at::Tensor& xc, const at::Tensor& vc, const at::Tensor& weight, const LinearGeom& g) {
  auto opts = xc.options();
  Prepped p;
  // (N, T, 3, 3) -> (T, 9, N): the weight of shift d for query pixel i, contiguous over pixels.
  p.wt = weight.reshape({g.N, g.T, 9}).permute({1, 2, 0}).contiguous();
  if (xc.is_cuda()) {  // the CUDA pass writes only the interior: the frame comes from the memset
    p.np = at::zeros({g.B, g.R, g.Ln}, opts);
    p.vp = at::zeros({g.B, g.R, g.Lv}, opts);
  } else {  // the CPU pass writes every element
    p.np = output_buffer({g.B, g.R, g.Ln}, opts);
    p.vp = output_buffer({g.B, g.R, g.Lv}, opts);
  }
  p.q = output_buffer({g.B, 9, g.T, g.C, g.N}, opts);
  p.norm = output_buffer({g.B, g.T, g.N}, opts.dtype(is_half_like(xc.scalar_type()) ? at::kFloat
                                                                                : xc.scalar_type()));
#ifdef CTAL_WITH_CUDA
  if (xc.is_cuda()) {
    linear_prep_cuda(xc, vc, p.wt, p.np, p.vp, p.q, p.norm);
    return p;
  }
#endif
  linear_prep_cpu(xc, vc, p.wt, p.np, p.vp, p.q, p.norm);
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& v,
                                              const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias) {
  const NoAutocast no_autocast;
  check_inputs("linear_fwd", x, v, weight, bias);
  const LinearGeom g = LinearGeom::of(x);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous();
  Prepped p = prep(xc, vc, weight, g);

  // G[:, d] = K_d V^T: K_d = np[:, :, s_d : s_d + Lv] is a strided view (row stride Ln, batch
  // stride R * Ln). One batched GEMM per shift over the whole batch.
  at::Tensor G = output_buffer({g.B, 9, g.R, g.R}, x.options());
  const at::Tensor vpt = p.vp.transpose(1, 2);  // [B, Lv, R]
  for (int64_t d = 0; d < 9; ++d) {
    at::Tensor out = G.select(1, d);  // [B, R, R]
    at::bmm_out(out, p.np.narrow(2, g.shift_start(d), g.Lv), vpt);
  }
  G = G.view({g.B, g.P, g.R});

  at::Tensor Y = at::bmm(G.transpose(1, 2), p.q.view({g.B, g.P, g.N}));  // [B, R, N]
  if (bias.has_value()) {
    // sum_j v[:, j] runs over all N pixels: kept in fp32 for 16-bit inputs, where it overflows
    // (the product with a small bias is what must be representable).
    const at::ScalarType acc = is_half_like(x.scalar_type()) ? at::kFloat : x.scalar_type();
    const at::Tensor sumv = vc.view({g.B, g.R, g.N}).sum(2, /*keepdim=*/true, acc);  // [B, R, 1]
    const at::Tensor b = bias->to(acc).reshape({1, 1, g.N}).expand({g.B, 1, g.N});
    Y.add_(at::bmm(sumv, b).to(Y.scalar_type()));
  }
  return {Y.view({g.B, g.T, g.C, g.H, g.W}), G};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& G) {
  const NoAutocast no_autocast;
  check_inputs("linear_bwd", x, v, weight, bias);
  const LinearGeom g = LinearGeom::of(x);
  TORCH_CHECK(dy.sizes() == x.sizes(), "linear_bwd: dy must have the shape of x ", x.sizes(),
              ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "linear_bwd: dy must have the dtype and device of x");
  TORCH_CHECK(G.dim() == 3 && G.size(0) == g.B && G.size(1) == g.P && G.size(2) == g.R,
              "linear_bwd: g must be the (B, 9*T*C, T*C) = (", g.B, ", ", g.P, ", ", g.R,
              ") matrix returned by linear_fwd, got ", G.sizes());
  TORCH_CHECK(G.scalar_type() == x.scalar_type() && G.device() == x.device(),
              "linear_bwd: g must have the dtype and device of x");

  const at::Tensor xc = x.contiguous(), vc = v.contiguous();
  const at::Tensor Gc = G.contiguous();
  Prepped p = prep(xc, vc, weight, g);
  const at::Tensor dym = dy.contiguous().view({g.B, g.R, g.N});
  const at::Tensor q3 = p.q.view({g.B, g.P, g.N});

  const at::Tensor dG = at::bmm(q3, dym.transpose(1, 2));  // [B, P, R]
  const at::Tensor dq = at::bmm(Gc, dym);                   // [B, P, N]
  const at::Tensor dk = at::bmm(dG, p.vp);                  // [B, P, Lv], un-shifted in finish

  // dV (row-padded) = sum_d dG_d^T K_d; the pad columns are dropped below.
  at::Tensor dvp = output_buffer({g.B, g.R, g.Lv}, x.options());
  const at::Tensor dG4 = dG.view({g.B, 9, g.R, g.R});
  for (int64_t d = 0; d < 9; ++d) {
    const at::Tensor kd = p.np.narrow(2, g.shift_start(d), g.Lv);  // [B, R, Lv], row stride Ln
    const at::Tensor a = dG4.select(1, d).transpose(1, 2);        // [B, R, R]
    if (d == 0) {
      at::bmm_out(dvp, a, kd);
    } else {
      dvp.baddbmm_(a, kd);
    }
  }
  at::Tensor dv = dvp.view({g.B, g.R, g.H, g.Wp}).narrow(3, 1, g.W);  // [B, R, H, W]
  at::Tensor db;
  if (bias.has_value()) {
    const at::Tensor b3 = bias->reshape({1, g.N, 1}).expand({g.B, g.N, 1});
    dv = dv + at::bmm(dym, b3).view({g.B, g.R, 1, 1});  // sum_i dY[r, i] b_i
    const at::ScalarType acc = is_half_like(x.scalar_type()) ? at::kFloat : x.scalar_type();
    const at::Tensor sumv = vc.view({g.B, 1, g.R, g.N}).sum(3, /*keepdim=*/false, acc);  // [B, 1, R]
    db = at::bmm(sumv, dym.to(acc)).sum(0).view({g.N}).to(x.scalar_type());
  } else {
    db = at::zeros({g.N}, x.options());
  }
  dv = dv.contiguous().view({g.B, g.T, g.C, g.H, g.W});

  at::Tensor dx = output_buffer(xc.sizes(), xc.options());
  at::Tensor dwp = output_buffer({g.B, g.T, 9, g.N}, p.norm.options());
#ifdef CTAL_WITH_CUDA
  if (x.is_cuda()) {
    linear_finish_cuda(xc, p.norm, p.wt, dq, dk, dx, dwp);
  } else
#endif
  {
    linear_finish_cpu(xc, p.norm, p.wt, dq, dk, dx, dwp);
  }
  // (B, T, 9, N) -> (N, T, 3, 3), summed over the batch.
  at::Tensor dw = dwp.sum(0).permute({2, 0, 1}).to(x.scalar_type()).contiguous().view({g.N, g.T, 3, 3});
  return {dx, dv, dw, db};
}

}  // namespace ctal_ext
