// The exact linear form of CTAL (docs/design.md section 2), device-generic host code.
//
//   G_d = K_d V^T          (R x R per shift d and batch item; K_d a strided view of `keys`)
//   Y   = G^T Q + sumV b^T (one batched GEMM plus a rank-1 update)
// backward
//   dG  = Q dY^T,  dQ = G dY,  dK = dG V,  dV = sum_d dG_d^T K_d + dY b,  db = sumV^T dY
// With the key layout of ctal_ext.h, G and dV take one batched GEMM per stencil row sy (its dy;
// here dy is the output gradient): the three dx shifts of a row are one matrix of 3R rows, so
// 3 + 3 GEMM calls rather than one per shift, each three times larger, on 16-byte-aligned
// operands. The GEMMs go through ATen (BLAS on CPU, cuBLAS on CUDA); the gathers and scatters
// around them (normalize + shifted copies + per-row weights, and the fold of dQ / un-shift of dK /
// normalization backward) are the device-specific passes in linear_cpu.cpp and linear_cuda.cu.
#include "ctal_ext.h"

#include <ATen/ATen.h>

namespace ctal_ext {

namespace {

bool is_half_like(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

struct Prepped {
  at::Tensor keys;  // (B, 3, R, Lk)
  at::Tensor vp;    // (B, R, Lv): the padded copy, or v itself when Wp == W; undefined in backward
  at::Tensor q, norm, wt;
};

// The backward (values = false) rebuilds only what it reads: keys for dV, q for dG, norm for the
// normalization backward. It needs no value copy: dK is taken against v itself.
Prepped prep(const at::Tensor& xc, const at::Tensor& vc, const at::Tensor& weight, const LinearGeom& g,
             bool values) {
  auto opts = xc.options();
  Prepped p;
  // (N, T, 3, 3) -> (T, 9, N): the weight of shift d for query pixel i, contiguous over pixels.
  p.wt = weight.reshape({g.N, g.T, 9}).permute({1, 2, 0}).contiguous();
  p.keys = output_buffer({g.B, 3, g.R, g.Lk}, opts);  // both passes write every element
  at::Tensor vp_out;                                  // undefined: no value copy to write
  if (values) {
    if (g.padded()) {
      p.vp = vp_out = output_buffer({g.B, g.R, g.Lv}, opts);
    } else {
      p.vp = vc.view({g.B, g.R, g.N});
    }
  }
  p.q = output_buffer({g.B, 9, g.T, g.C, g.N}, opts);
  p.norm = output_buffer({g.B, g.T, g.N}, opts.dtype(is_half_like(xc.scalar_type()) ? at::kFloat
                                                                                : xc.scalar_type()));
#ifdef CTAL_WITH_CUDA
  if (xc.is_cuda()) {
    linear_prep_cuda(xc, vc, p.wt, p.keys, vp_out, p.q, p.norm);
    return p;
  }
#endif
  linear_prep_cpu(xc, vc, p.wt, p.keys, vp_out, p.q, p.norm);
  return p;
}

// K_{3*sy+dx} for dx = 0, 1, 2 stacked: [B, 3R, Lv], row stride Lk, starting sy*Wp elements into
// `keys` (a multiple of 16 bytes, like Lk).
at::Tensor key_rows(const at::Tensor& keys, const LinearGeom& g, int64_t sy) {
  return keys.view({g.B, 3 * g.R, g.Lk}).narrow(2, sy * g.Wp, g.Lv);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_fwd(const at::Tensor& x, const at::Tensor& v,
                                              const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias) {
  const NoAutocast no_autocast;
  check_inputs("linear_fwd", x, v, weight, bias);
  const LinearGeom g = LinearGeom::of(x);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous();
  Prepped p = prep(xc, vc, weight, g, /*values=*/true);

  // G rows (sy, dx, t, c) (d = 3*sy + dx): the block of stencil row sy is key_rows(sy) V^T, one
  // batched GEMM per stencil row over the whole batch, written in place into G.
  at::Tensor G = output_buffer({g.B, g.P, g.R}, x.options());
  {
    const at::Tensor G3 = G.view({g.B, 3, 3 * g.R, g.R});
    const at::Tensor vpt = p.vp.transpose(1, 2);  // [B, Lv, R]
    for (int64_t sy = 0; sy < 3; ++sy) {
      at::Tensor out = G3.select(1, sy);  // [B, 3R, R]
      at::bmm_out(out, key_rows(p.keys, g, sy), vpt);
    }
  }
  p.keys.reset();  // only Y's GEMM remains: return the key copies to the allocator now
  p.vp.reset();

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
  Prepped p = prep(xc, vc, weight, g, /*values=*/false);
  const at::Tensor dym = dy.contiguous().view({g.B, g.R, g.N});
  const at::Tensor vm = vc.view({g.B, g.R, g.N});

  // Ordered so that buffers are released as soon as they are read: q (9x the input) before dq and
  // dk (9x each) exist, the key copies (3x) too, so the peak holds two 9x buffers, not three.
  const at::Tensor dG = at::bmm(p.q.view({g.B, g.P, g.N}), dym.transpose(1, 2));  // [B, P, R]
  p.q.reset();

  // dV = sum_sy dG_sy^T key_rows(sy): one GEMM per stencil row (reduction over its 3R rows),
  // the first writing and the other two accumulating. With Wp == W it lands in dv itself;
  // otherwise in a padded buffer whose pad columns are dropped.
  at::Tensor dv = output_buffer(xc.sizes(), xc.options());
  {
    at::Tensor dvp = g.padded() ? output_buffer({g.B, g.R, g.Lv}, x.options())
                                : dv.view({g.B, g.R, g.N});
    const at::Tensor dG3 = dG.view({g.B, 3, 3 * g.R, g.R});
    for (int64_t sy = 0; sy < 3; ++sy) {
      const at::Tensor a = dG3.select(1, sy).transpose(1, 2);  // [B, R, 3R]
      if (sy == 0) {
        at::bmm_out(dvp, a, key_rows(p.keys, g, sy));
      } else {
        dvp.baddbmm_(a, key_rows(p.keys, g, sy));
      }
    }
    if (g.padded()) {
      dv.view({g.B, g.R, g.H, g.W}).copy_(dvp.view({g.B, g.R, g.H, g.Wp}).narrow(3, 0, g.W));
    }
  }
  p.keys.reset();

  at::Tensor db;
  if (bias.has_value()) {
    const at::Tensor b3 = bias->reshape({1, g.N, 1}).expand({g.B, g.N, 1});
    dv.view({g.B, g.R, g.N}).add_(at::bmm(dym, b3));  // sum_i dY[r, i] b_i, for every pixel
    const at::ScalarType acc = is_half_like(x.scalar_type()) ? at::kFloat : x.scalar_type();
    const at::Tensor sumv = vc.view({g.B, 1, g.R, g.N}).sum(3, /*keepdim=*/false, acc);  // [B, 1, R]
    db = at::bmm(sumv, dym.to(acc)).sum(0).view({g.N}).to(x.scalar_type());
  } else {
    db = at::zeros({g.N}, x.options());
  }

  const at::Tensor dq = at::bmm(Gc, dym);  // [B, P, N]
  const at::Tensor dk = at::bmm(dG, vm);   // [B, P, N], at value pixels: un-shifted in finish

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
