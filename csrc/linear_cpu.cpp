// CPU bodies of the linear form's gathers and scatters (see ctal_ext.h for the layouts).
//
// Both passes work on one image row (b, t, y) at a time, so every inner loop runs over W
// contiguous pixels (vectorizable) and at::parallel_for splits the B*T*H rows between threads.
// Nothing is shared between rows: no atomics, deterministic results. They run float32 and float64
// only, so dn is held in the accumulation type until dx.
#include "ctal_ext.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ctal_ext {

namespace {

template <typename scalar_t>
void prep_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
               const scalar_t* __restrict__ wt, scalar_t* __restrict__ keys, scalar_t* __restrict__ vp,
               scalar_t* __restrict__ q, scalar_t* __restrict__ norm, const LinearGeom g) {
  const int64_t rows = g.B * g.T * g.H;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> ss(g.W), nrm(g.W), nv(g.W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % g.H, bt = row / g.H, t = bt % g.T, b = bt / g.T;
      const scalar_t* xr = x + bt * g.C * g.N + y * g.W;  // channel stride N
      std::fill(ss.begin(), ss.end(), scalar_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* xc = xr + c * g.N;
        for (int64_t i = 0; i < g.W; ++i) ss[i] += xc[i] * xc[i];
      }
      scalar_t* norm_row = norm + bt * g.N + y * g.W;
      for (int64_t i = 0; i < g.W; ++i) {
        nrm[i] = std::max(std::sqrt(ss[i]), scalar_t(kNormEps));
        norm_row[i] = nrm[i];
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const int64_t tc = t * g.C + c;
        const scalar_t* xc = xr + c * g.N;
        for (int64_t i = 0; i < g.W; ++i) nv[i] = xc[i] / nrm[i];

        // Key copy dx, grid row y+1: column xx holds n[y, xx + dx - 1], zero off the grid. The
        // first and last image rows also write the zero rows 0 and H+1 of their (b, t, c).
        for (int64_t dx = 0; dx < 3; ++dx) {
          scalar_t* kbase = keys + ((b * 3 + dx) * g.R + tc) * g.Lk;
          scalar_t* krow = kbase + (y + 1) * g.Wp;
          const int64_t lo = std::max<int64_t>(0, 1 - dx), hi = std::min<int64_t>(g.Wp, g.W + 1 - dx);
          std::fill(krow, krow + lo, scalar_t(0));
          for (int64_t xx = lo; xx < hi; ++xx) krow[xx] = nv[xx + dx - 1];
          std::fill(krow + hi, krow + g.Wp, scalar_t(0));
          if (y == 0) std::fill(kbase, kbase + g.Wp, scalar_t(0));
          if (y == g.H - 1) std::fill(kbase + (g.H + 1) * g.Wp, kbase + g.Lk, scalar_t(0));
        }

        if (vp != nullptr) {
          const scalar_t* vc = v + (bt * g.C + c) * g.N + y * g.W;
          scalar_t* vrow = vp + (b * g.R + tc) * g.Lv + y * g.Wp;
          std::copy(vc, vc + g.W, vrow);
          std::fill(vrow + g.W, vrow + g.Wp, scalar_t(0));
        }

        for (int64_t d = 0; d < 9; ++d) {
          scalar_t* qrow = q + (((b * 9 + d) * g.T + t) * g.C + c) * g.N + y * g.W;
          const scalar_t* wrow = wt + (t * 9 + d) * g.N + y * g.W;
          for (int64_t i = 0; i < g.W; ++i) qrow[i] = nv[i] * wrow[i];
        }
      }
    }
  });
}

template <typename scalar_t>
void finish_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ norm,
                 const scalar_t* __restrict__ wt, const scalar_t* __restrict__ dq,
                 const scalar_t* __restrict__ dk, scalar_t* __restrict__ dx,
                 scalar_t* __restrict__ dwp, const LinearGeom g) {
  const int64_t rows = g.B * g.T * g.H;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> dn(g.C * g.W), n(g.W), proj(g.W), dw(9 * g.W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t y = row % g.H, bt = row / g.H, t = bt % g.T, b = bt / g.T;
      const scalar_t* nrm = norm + bt * g.N + y * g.W;
      std::fill(proj.begin(), proj.end(), scalar_t(0));
      std::fill(dw.begin(), dw.end(), scalar_t(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* xc = x + (bt * g.C + c) * g.N + y * g.W;
        scalar_t* dnc = dn.data() + c * g.W;
        for (int64_t i = 0; i < g.W; ++i) {
          n[i] = xc[i] / nrm[i];
          dnc[i] = 0;
        }
        for (int64_t d = 0; d < 9; ++d) {
          const int64_t sy = d / 3, sx = d % 3;
          const int64_t pdc = ((b * 9 + d) * g.T + t) * g.C + c;  // row of dq / dk
          // Query side: Q_d = w_d * n folds into dn and dw.
          const scalar_t* dqr = dq + pdc * g.N + y * g.W;
          const scalar_t* wr = wt + (t * 9 + d) * g.N + y * g.W;
          scalar_t* dwr = dw.data() + d * g.W;
          for (int64_t i = 0; i < g.W; ++i) {
            dnc[i] += wr[i] * dqr[i];
            dwr[i] += dqr[i] * n[i];
          }
          // Key side: n[y, x] was key K_d at value pixel (y+1-sy, x+1-sx), where dk holds its
          // gradient (adjoint of the shift; off the grid it met no value).
          const int64_t yy = y + 1 - sy;
          if (yy >= 0 && yy < g.H) {
            const scalar_t* dkr = dk + pdc * g.N + yy * g.W;
            const int64_t lo = std::max<int64_t>(0, sx - 1), hi = std::min<int64_t>(g.W, g.W + sx - 1);
            for (int64_t i = lo; i < hi; ++i) dnc[i] += dkr[i + 1 - sx];
          }
        }
        for (int64_t i = 0; i < g.W; ++i) proj[i] += n[i] * dnc[i];
      }
      // n = x / max(||x||, eps): the clamp passes no gradient to the norm below eps.
      for (int64_t i = 0; i < g.W; ++i) {
        if (!(nrm[i] > scalar_t(kNormEps))) proj[i] = 0;
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* xc = x + (bt * g.C + c) * g.N + y * g.W;
        const scalar_t* dnc = dn.data() + c * g.W;
        scalar_t* dxc = dx + (bt * g.C + c) * g.N + y * g.W;
        for (int64_t i = 0; i < g.W; ++i) dxc[i] = (dnc[i] - (xc[i] / nrm[i]) * proj[i]) / nrm[i];
      }
      for (int64_t d = 0; d < 9; ++d) {
        std::copy(dw.begin() + d * g.W, dw.begin() + (d + 1) * g.W,
                  dwp + ((b * g.T + t) * 9 + d) * g.N + y * g.W);
      }
    }
  });
}

void check_cpu_dtype(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the C++ CPU kernels support float32 and float64, got ", x.scalar_type(),
              " (use the 'linear' or 'reference' backend for 16-bit inputs on CPU)");
}

}  // namespace

void linear_prep_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& keys,
                     at::Tensor& vp, at::Tensor& q, at::Tensor& norm) {
  check_cpu_dtype("linear_prep_cpu", x);
  const LinearGeom g = LinearGeom::of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ctal_linear_prep_cpu", [&] {
    prep_rows<scalar_t>(x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                        wt.const_data_ptr<scalar_t>(), keys.mutable_data_ptr<scalar_t>(),
                        vp.defined() ? vp.mutable_data_ptr<scalar_t>() : nullptr,
                        q.mutable_data_ptr<scalar_t>(),
                        norm.mutable_data_ptr<scalar_t>(), g);
  });
}

void linear_finish_cpu(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                       const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp) {
  check_cpu_dtype("linear_finish_cpu", x);
  const LinearGeom g = LinearGeom::of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ctal_linear_finish_cpu", [&] {
    finish_rows<scalar_t>(x.const_data_ptr<scalar_t>(), norm.const_data_ptr<scalar_t>(),
                          wt.const_data_ptr<scalar_t>(), dq.const_data_ptr<scalar_t>(),
                          dk.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                          dwp.mutable_data_ptr<scalar_t>(), g);
  });
}

}  // namespace ctal_ext
