// CUDA bodies of the linear form's gathers and scatters (see ctal_ext.h for the layouts); the GEMMs
// between them are cuBLAS calls made by ATen in linear.cpp.
//
// One thread per (b, t, pixel i): it loops over the C channels, so consecutive threads touch
// consecutive pixels of one channel plane (coalesced), and the 9 fusion weights of its pixel stay
// in registers (compile-time indexed). Accumulation is in at::opmath_type (float for 16-bit).
#include "ctal_ext.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace ctal_ext {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
linear_prep_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                   const scalar_t* __restrict__ wt, scalar_t* __restrict__ np,
                   scalar_t* __restrict__ vp, scalar_t* __restrict__ q, acc_t* __restrict__ norm,
                   const LinearGeom g) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.T * g.N) return;
  const int64_t i = idx % g.N, bt = idx / g.N, t = bt % g.T, b = bt / g.T;
  const int64_t py = i / g.W, px = i % g.W;
  const scalar_t* xp = x + bt * g.C * g.N + i;
  acc_t ss = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t a = static_cast<acc_t>(xp[c * g.N]);
    ss += a * a;
  }
  const acc_t nrm = ::max(::sqrt(ss), static_cast<acc_t>(kNormEps));
  norm[idx] = nrm;
  acc_t w9[9];
#pragma unroll
  for (int d = 0; d < 9; ++d) w9[d] = static_cast<acc_t>(wt[(t * 9 + d) * g.N + i]);
  const int64_t npos = 1 + (py + 1) * g.Wp + px + 1;  // interior of the zero frame
  const int64_t vpos = py * g.Wp + px + 1;
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t tc = t * g.C + c;
    const acc_t n = static_cast<acc_t>(xp[c * g.N]) / nrm;
    np[(b * g.R + tc) * g.Ln + npos] = static_cast<scalar_t>(n);
    vp[(b * g.R + tc) * g.Lv + vpos] = v[(bt * g.C + c) * g.N + i];
#pragma unroll
    for (int d = 0; d < 9; ++d) {
      q[(((b * 9 + d) * g.T + t) * g.C + c) * g.N + i] = static_cast<scalar_t>(w9[d] * n);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
linear_finish_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ norm,
                     const scalar_t* __restrict__ wt, const scalar_t* __restrict__ dq,
                     const scalar_t* __restrict__ dk, scalar_t* __restrict__ dx,
                     acc_t* __restrict__ dwp, const LinearGeom g) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.T * g.N) return;
  const int64_t i = idx % g.N, bt = idx / g.N, t = bt % g.T, b = bt / g.T;
  const int64_t py = i / g.W, px = i % g.W;
  const acc_t nrm = norm[idx];
  acc_t w9[9], dw9[9];
#pragma unroll
  for (int d = 0; d < 9; ++d) {
    w9[d] = static_cast<acc_t>(wt[(t * 9 + d) * g.N + i]);
    dw9[d] = 0;
  }
  acc_t proj = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t off = (bt * g.C + c) * g.N + i;
    const acc_t n = static_cast<acc_t>(x[off]) / nrm;
    acc_t dn = 0;
#pragma unroll
    for (int d = 0; d < 9; ++d) {
      const int64_t pdc = ((b * 9 + d) * g.T + t) * g.C + c;
      const acc_t dqv = static_cast<acc_t>(dq[pdc * g.N + i]);
      dn += w9[d] * dqv;          // query side: Q_d = w_d * n
      dw9[d] += dqv * n;
      const int64_t yy = py + 1 - d / 3;  // key side: adjoint of the shift (see linear_cpu.cpp)
      if (yy >= 0 && yy < g.H) dn += static_cast<acc_t>(dk[pdc * g.Lv + yy * g.Wp + px + 2 - d % 3]);
    }
    proj += n * dn;
    dx[off] = static_cast<scalar_t>(dn);  // dn parked in dx, finished below
  }
  if (!(nrm > static_cast<acc_t>(kNormEps))) proj = 0;  // the clamp passes no gradient
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t off = (bt * g.C + c) * g.N + i;
    const acc_t n = static_cast<acc_t>(x[off]) / nrm;
    dx[off] = static_cast<scalar_t>((static_cast<acc_t>(dx[off]) - n * proj) / nrm);
  }
#pragma unroll
  for (int d = 0; d < 9; ++d) dwp[((b * g.T + t) * 9 + d) * g.N + i] = dw9[d];
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

}  // namespace

void linear_prep_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& np,
                      at::Tensor& vp, at::Tensor& q, at::Tensor& norm) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearGeom g = LinearGeom::of(x);
  const int64_t n = g.B * g.T * g.N;
  TORCH_CHECK(blocks_for(n) < (int64_t{1} << 31), "linear_fwd: problem too large for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ctal_linear_prep_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    linear_prep_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
        np.mutable_data_ptr<scalar_t>(), vp.mutable_data_ptr<scalar_t>(),
        q.mutable_data_ptr<scalar_t>(), norm.mutable_data_ptr<acc_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void linear_finish_cuda(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                        const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearGeom g = LinearGeom::of(x);
  const int64_t n = g.B * g.T * g.N;
  TORCH_CHECK(blocks_for(n) < (int64_t{1} << 31), "linear_bwd: problem too large for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ctal_linear_finish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    linear_finish_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc_t>(), wt.const_data_ptr<scalar_t>(),
        dq.const_data_ptr<scalar_t>(), dk.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        dwp.mutable_data_ptr<acc_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ctal_ext
