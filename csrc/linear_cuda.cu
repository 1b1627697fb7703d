// CUDA bodies of the linear form's gathers and scatters (see ctal_ext.h for the layouts); the GEMMs
// between them are cuBLAS calls made by ATen in linear.cpp.
//
// prep is two launches. linear_prep_query_kernel: one thread per (b, t, pixel i) loops over the C
// channels (consecutive threads touch consecutive pixels of one channel plane: coalesced), writes
// the norm and the 9 weighted query rows, with the pixel's 9 fusion weights in registers.
// linear_prep_keys_kernel: one thread per (b, t, key-grid position) writes that position of the
// three column-shifted key copies (zero frame included, so no memset is needed) and of the padded
// values, reading the norms of the first launch (same stream).
// finish: one thread per (b, t, pixel i), dn kept in the accumulation type until dx.
// Accumulation is in at::opmath_type (float for 16-bit). Each kernel divides once per pixel
// (1 / norm) and multiplies per channel: every kernel sees the same n, and no per-channel IEEE
// division (a called slow path that costs stack and spills) sits in the channel loops.
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
linear_prep_query_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wt,
                         scalar_t* __restrict__ q, acc_t* __restrict__ norm, const LinearGeom g) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.T * g.N) return;
  const int64_t i = idx % g.N, bt = idx / g.N, t = bt % g.T, b = bt / g.T;
  const scalar_t* xp = x + bt * g.C * g.N + i;
  acc_t ss = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t a = static_cast<acc_t>(xp[c * g.N]);
    ss += a * a;
  }
  const acc_t nrm = ::max(::sqrt(ss), static_cast<acc_t>(kNormEps));
  norm[idx] = nrm;
  const acc_t inv = acc_t(1) / nrm;
  acc_t w9[9];
#pragma unroll
  for (int d = 0; d < 9; ++d) w9[d] = static_cast<acc_t>(wt[(t * 9 + d) * g.N + i]);
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t n = static_cast<acc_t>(xp[c * g.N]) * inv;
#pragma unroll
    for (int d = 0; d < 9; ++d) {
      q[(((b * 9 + d) * g.T + t) * g.C + c) * g.N + i] = static_cast<scalar_t>(w9[d] * n);
    }
  }
}

// Position pos = yy*Wp + xx of the key grid ((H+2) x Wp): copy dx holds n[yy-1, xx+dx-1] (0 off the
// grid); for yy in [1, H] the padded values hold v[yy-1, xx] (0 for xx >= W) when vp is given.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
linear_prep_keys_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                        const acc_t* __restrict__ norm, scalar_t* __restrict__ keys,
                        scalar_t* __restrict__ vp, const LinearGeom g) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.T * g.Lk) return;
  const int64_t pos = idx % g.Lk, bt = idx / g.Lk, t = bt % g.T, b = bt / g.T;
  const int64_t y = pos / g.Wp - 1, xx = pos % g.Wp;
  const bool row_in = y >= 0 && y < g.H;
  // Copy dx reads pixel (y, xx + dx - 1): s - 1, s, s + 1 of the image plane.
  const bool in0 = row_in && xx >= 1 && xx <= g.W, in1 = row_in && xx < g.W,
             in2 = row_in && xx + 1 < g.W;
  const int64_t s = row_in ? y * g.W + xx : 0;
  const acc_t* nb = norm + bt * g.N;
  const acc_t r0 = in0 ? acc_t(1) / nb[s - 1] : acc_t(0), r1 = in1 ? acc_t(1) / nb[s] : acc_t(0),
              r2 = in2 ? acc_t(1) / nb[s + 1] : acc_t(0);
  const scalar_t zero = static_cast<scalar_t>(acc_t(0));
  const scalar_t* xp = x + bt * g.C * g.N + s;             // channel stride N
  scalar_t* kp = keys + (b * 3 * g.R + t * g.C) * g.Lk + pos;  // channel stride Lk
  const int64_t copy = g.R * g.Lk;                          // between the dx copies
  const bool write_v = vp != nullptr && row_in;
  const scalar_t* vs = write_v && in1 ? v + bt * g.C * g.N + s : nullptr;
  scalar_t* vpp = write_v ? vp + (b * g.R + t * g.C) * g.Lv + y * g.Wp + xx : nullptr;
  for (int64_t c = 0; c < g.C; ++c) {
    kp[0] = in0 ? static_cast<scalar_t>(static_cast<acc_t>(xp[-1]) * r0) : zero;
    kp[copy] = in1 ? static_cast<scalar_t>(static_cast<acc_t>(xp[0]) * r1) : zero;
    kp[2 * copy] = in2 ? static_cast<scalar_t>(static_cast<acc_t>(xp[1]) * r2) : zero;
    if (write_v) {
      *vpp = vs != nullptr ? *vs : zero;
      vpp += g.Lv;
      if (vs != nullptr) vs += g.N;
    }
    xp += g.N;
    kp += g.Lk;
  }
}

// dn is parked in `park` between the two channel loops: the accumulation type, so the projection
// n (n . dn) is subtracted before any rounding to a 16-bit dx. For fp32/fp64 `park` is dx itself
// (hence no __restrict__ on either).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
linear_finish_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ norm,
                     const scalar_t* __restrict__ wt, const scalar_t* __restrict__ dq,
                     const scalar_t* __restrict__ dk, acc_t* park, scalar_t* dx,
                     acc_t* __restrict__ dwp, const LinearGeom g) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.B * g.T * g.N) return;
  const int64_t i = idx % g.N, bt = idx / g.N, t = bt % g.T, b = bt / g.T;
  const int64_t py = i / g.W, px = i % g.W;
  const acc_t nrm = norm[idx], inv = acc_t(1) / nrm;
  acc_t w9[9], dw9[9];
#pragma unroll
  for (int d = 0; d < 9; ++d) {
    w9[d] = static_cast<acc_t>(wt[(t * 9 + d) * g.N + i]);
    dw9[d] = 0;
  }
  acc_t proj = 0;
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t off = (bt * g.C + c) * g.N + i;
    const acc_t n = static_cast<acc_t>(x[off]) * inv;
    acc_t dn = 0;
#pragma unroll
    for (int d = 0; d < 9; ++d) {
      const int64_t pdc = ((b * 9 + d) * g.T + t) * g.C + c;
      const acc_t dqv = static_cast<acc_t>(dq[pdc * g.N + i]);
      dn += w9[d] * dqv;          // query side: Q_d = w_d * n
      dw9[d] += dqv * n;
      // Key side: this key met the value pixel (py+1-sy, px+1-sx) (adjoint of the shift).
      const int64_t vy = py + 1 - d / 3, vx = px + 1 - d % 3;
      if (vy >= 0 && vy < g.H && vx >= 0 && vx < g.W) {
        dn += static_cast<acc_t>(dk[pdc * g.N + vy * g.W + vx]);
      }
    }
    proj += n * dn;
    park[off] = dn;
  }
  if (!(nrm > static_cast<acc_t>(kNormEps))) proj = 0;  // the clamp passes no gradient
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t off = (bt * g.C + c) * g.N + i;
    const acc_t n = static_cast<acc_t>(x[off]) * inv;
    dx[off] = static_cast<scalar_t>((park[off] - n * proj) * inv);
  }
#pragma unroll
  for (int d = 0; d < 9; ++d) dwp[((b * g.T + t) * 9 + d) * g.N + i] = dw9[d];
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

}  // namespace

void linear_prep_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& wt, at::Tensor& keys,
                      at::Tensor& vp, at::Tensor& q, at::Tensor& norm) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearGeom g = LinearGeom::of(x);
  const int64_t n = g.B * g.T * g.N, nk = g.B * g.T * g.Lk;
  TORCH_CHECK(blocks_for(nk) < (int64_t{1} << 31), "linear_fwd: problem too large for one launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ctal_linear_prep_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    linear_prep_query_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(), q.mutable_data_ptr<scalar_t>(),
        norm.mutable_data_ptr<acc_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    linear_prep_keys_kernel<scalar_t, acc_t><<<blocks_for(nk), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc_t>(),
        keys.mutable_data_ptr<scalar_t>(), vp.defined() ? vp.mutable_data_ptr<scalar_t>() : nullptr, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void linear_finish_cuda(const at::Tensor& x, const at::Tensor& norm, const at::Tensor& wt,
                        const at::Tensor& dq, const at::Tensor& dk, at::Tensor& dx, at::Tensor& dwp) {
  const c10::cuda::CUDAGuard guard(x.device());
  const LinearGeom g = LinearGeom::of(x);
  const int64_t n = g.B * g.T * g.N;
  TORCH_CHECK(blocks_for(n) < (int64_t{1} << 31), "linear_bwd: problem too large for one launch");
  // dn's parking buffer: dx itself when it has the accumulation type, else a float32 scratch
  // (B*T*C*N*4 bytes, freed on return; stream-ordered reuse by the caching allocator is safe).
  const at::Tensor park = norm.scalar_type() == dx.scalar_type() ? dx : at::empty(dx.sizes(), norm.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ctal_linear_finish_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    linear_finish_kernel<scalar_t, acc_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), norm.const_data_ptr<acc_t>(), wt.const_data_ptr<scalar_t>(),
        dq.const_data_ptr<scalar_t>(), dk.const_data_ptr<scalar_t>(), park.mutable_data_ptr<acc_t>(),
        dx.mutable_data_ptr<scalar_t>(), dwp.mutable_data_ptr<acc_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ctal_ext
